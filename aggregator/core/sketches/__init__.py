"""Per-cell click-stream analytics: unique users, top URLs, client-delay quantiles.

Pure: standard library and orjson-compatible values only (no I/O, no Faust/aiohttp).
One :class:`CellAggregates` holds the aggregates of one (region, window) cell:

* **unique users**: the exact set of the users' 64-bit hashes up to
  ``SketchParams.exact_users`` (256) of them, then a HyperLogLog of ``2**hll_p``
  one-byte registers (``hll_p`` 12: 4096 registers).  Its estimate is the HIP
  (historic inverse probability, Ting 2014 / Cohen 2015) estimate, started at the exact
  count when the cell leaves exact mode and raised each time a register rises (standard
  error about 0.83/64 = 1.3 %); after a merge of two HyperLogLogs, which HIP cannot
  follow, it is Ertl's improved estimator on the registers (arXiv:1702.01284: no bias
  tables, unbiased from a few users up; standard error 1.04/64 = 1.6 %).  The estimate
  is never below ``exact_users + 1`` (more than that many distinct hashes were seen).
* **top URLs**: Misra-Gries counters over the hashes of normalised URLs, at most
  ``url_capacity`` (128) of them.  While a cell has at most that many distinct URLs
  nothing is ever dropped and the counts are exact.  One more distinct URL *purges*:
  the median count ``d`` is taken off every counter, counters that reach 0 go, and
  ``d`` is added to the cell's ``offset``.  A URL's true count is then within
  ``[counter, counter + offset]`` and ``offset <= 2 N / (url_capacity + 1)`` for N
  URL events; the reported count is ``counter + offset``, exact for a URL seen before
  the first purge and never dropped since (the leading URLs of a skewed stream); one first
  seen after purges is over-counted by up to the offset it found.  The URL text is kept beside
  the counter, for the candidates only, and dropped with it.
* **client delay** (ingest time minus the client's ``ts``, ms): DDSketch-style
  logarithmic buckets, ``gamma = (1 + a) / (1 - a)`` for the relative accuracy ``a``
  (``delay_accuracy``, 1 %): bucket ``i`` holds the delays in
  ``(gamma**(i-1), gamma**i]``, and a quantile is answered with a value within
  ``a`` of the true delay at that rank.  Delays <= 0 (a client clock ahead of the
  server) are clamped to 0 and counted in a separate zero bucket; delays over
  ``MAX_DELAY_MS`` (about 24.8 days) are clamped to it.  So the bucket count is
  bounded by construction (1076 at 1 %), no collapsing.

Everything is deterministic: the same events in the same order give the same state,
whatever the batch boundaries, and the same state gives the same ``to_json()`` value
(and so the same ``orjson.dumps`` bytes).  A cell restored with ``from_json`` and fed
the events after its checkpoint ends in the state of an uninterrupted run.  ``merge``
is exact while both sides are exact, within the bounds above otherwise.

Hashes are :func:`hash64` (XXH3-64, xxhash), stable across processes and
machines (never Python's ``hash()``); ingest computes them once per event.

The package: ``params`` (SketchParams, hash packing), ``urls`` (normalisation, hashes),
``users`` (exact set, HyperLogLog), ``topurls`` (Misra-Gries), ``delays`` (buckets) and
``cell`` (CellAggregates, composing the three).
"""
from aggregator.core.sketches.cell import CellAggregates, max_serialised_bytes
from aggregator.core.sketches.delays import MAX_DELAY_MS, delay_buckets
from aggregator.core.sketches.params import SketchParams
from aggregator.core.sketches.urls import (
    MAX_URL_CHARS,
    NO_URL,
    Parts,
    UrlCache,
    UrlEntry,
    count_parts,
    hash64,
    hash_bytes,
    normalise_url,
    url_hash,
    url_parts,
    user_hash,
)
from aggregator.core.sketches.users import hll_estimate

__all__ = [
    "MAX_DELAY_MS",
    "MAX_URL_CHARS",
    "NO_URL",
    "CellAggregates",
    "Parts",
    "SketchParams",
    "UrlCache",
    "UrlEntry",
    "count_parts",
    "delay_buckets",
    "hash64",
    "hash_bytes",
    "hll_estimate",
    "max_serialised_bytes",
    "normalise_url",
    "url_hash",
    "url_parts",
    "user_hash",
]
