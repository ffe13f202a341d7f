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
  URL events; the reported count is ``counter + offset``, exact for a URL that was
  never dropped (the leading URLs of a skewed stream).  The URL text is kept beside
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
"""
from __future__ import annotations

import base64
import heapq
import math
import re
import sys
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any, cast

from xxhash import xxh3_64_intdigest

__all__ = [
    "MAX_DELAY_MS",
    "MAX_URL_CHARS",
    "CellAggregates",
    "SketchParams",
    "delay_buckets",
    "hash64",
    "hash_bytes",
    "hll_estimate",
    "max_serialised_bytes",
    "normalise_url",
    "url_hash",
    "user_hash",
]

MAX_URL_CHARS = 200       # a normalised URL is cut to this many (ASCII) characters
MAX_DELAY_MS = 2**31 - 1  # larger client delays are clamped to this (~24.8 days)
_TABLE_MS = 1 << 14       # delays below this find their bucket in a table, not with log()


# ---------------------------------------------------------------------------------------
# URL normalisation and hashing (shared by ingest and worker)

# scheme :// [user info @] host[:port] path [?query] [#fragment]
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#]*@)?([^/?#]*)([^?#]*)(\?[^#]*)?")
_DEFAULT_PORT = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}
# Percent-encode everything but printable ASCII, and the two characters JSON escapes:
# the normalised text is ASCII without control characters, one byte per character in JSON.
_ENCODE = {c: f"%{c:02X}" for c in [*range(0x21), 0x22, 0x5C, 0x7F]}
_NEEDS_ENCODING = re.compile(r'[^\x21\x23-\x5b\x5d-\x7e]')


def _encode(text: str) -> str:
    if _NEEDS_ENCODING.search(text) is None:
        return text
    return "".join(_ENCODE.get(ord(ch), ch) if ord(ch) < 0x80 else "".join(f"%{b:02X}" for b in ch.encode())
                   for ch in text)


def normalise_url(url: str, keep_query: bool = False) -> str | None:
    """The form a URL is counted under in ``top_urls`` (None: nothing to count).

    * surrounding whitespace is dropped; an empty URL is None;
    * the fragment (``#...``) is always dropped, the query string (``?...``) unless
      ``keep_query``;
    * with a scheme (``https://Example.COM:443/A``): scheme and host lower-cased, user
      info (``user:pw@``) and the scheme's default port (80, 443) dropped, an empty path
      becomes ``/`` -> ``https://example.com/A``; the path keeps its case;
    * without one (``/home``, ``home``): the path as given;
    * characters other than printable ASCII (and ``"``, ``\\``, spaces) are
      percent-encoded as UTF-8; existing percent-escapes are left as they are;
    * the result is cut to ``MAX_URL_CHARS`` characters.
    """
    u = url.strip()
    m = _ABSOLUTE.match(u)
    if m is not None:
        scheme, host, path, query = m.groups()
        scheme, host = scheme.lower(), host.lower()
        port = _DEFAULT_PORT.get(scheme)
        if port is not None and host.endswith(port):
            host = host[:-len(port)]
        u = f"{scheme}://{host}{path or '/'}{query if keep_query and query else ''}"
    else:
        cut = u.find("#")
        if cut >= 0:
            u = u[:cut]
        if not keep_query:
            cut = u.find("?")
            if cut >= 0:
                u = u[:cut]
    u = _encode(u)
    if len(u) > MAX_URL_CHARS:
        u = u[:MAX_URL_CHARS]
        pct = u.rfind("%", MAX_URL_CHARS - 2)
        if pct >= 0:  # no escape cut in half
            u = u[:pct]
    return u or None


# hash64 of ``text`` is hash_bytes(text.encode()): for per-event loops that save the call
hash_bytes = xxh3_64_intdigest


def hash64(text: str) -> int:
    """A 64-bit hash of ``text`` (XXH3-64 of its UTF-8), the same in every process and on
    every machine.  xxhash: about 0.15 us a call against 1.4 us for an 8-byte BLAKE2b (in
    the per-event path of ingest, and of the worker for records produced straight to Kafka)."""
    return xxh3_64_intdigest(text.encode())


def user_hash(user_id: str) -> int:
    """The hash unique users are counted by."""
    return hash64(user_id)


def url_hash(normalised_url: str) -> int:
    """The hash a URL is counted under: of its :func:`normalise_url` form."""
    return hash64(normalised_url)


# ---------------------------------------------------------------------------------------
# Parameters

@dataclass(frozen=True)
class SketchParams:
    """Settings of the sketches; cells merge only with cells of the same parameters."""

    hll_p: int = 12              # HyperLogLog precision: 2**hll_p registers, error ~1.04/sqrt(2**hll_p)
    exact_users: int = 256       # exact distinct users up to this many
    url_capacity: int = 128      # Misra-Gries counters (exact while distinct URLs <= this)
    delay_accuracy: float = 0.01  # relative accuracy of the delay quantiles

    def __post_init__(self) -> None:
        if not 4 <= self.hll_p <= 18:
            raise ValueError(f"hll_p must be within 4..18 (got {self.hll_p})")
        if not 100 <= self.exact_users <= 4096:
            raise ValueError(f"exact_users must be within 100..4096 (got {self.exact_users})")
        if not 40 <= self.url_capacity <= 4096:
            raise ValueError(f"url_capacity must be within 40..4096 (got {self.url_capacity})")
        if not 0.001 <= self.delay_accuracy <= 0.1:
            raise ValueError(f"delay_accuracy must be within 0.001..0.1 (got {self.delay_accuracy})")

    def key(self) -> list[Any]:
        return [self.hll_p, self.exact_users, self.url_capacity, self.delay_accuracy]


class _Delays:
    """The bucket geometry of one relative accuracy (shared by all cells)."""

    __slots__ = ("gamma", "inv_log_gamma", "n_buckets", "table", "lo", "hi")

    def __init__(self, accuracy: float) -> None:
        self.gamma = (1 + accuracy) / (1 - accuracy)
        self.inv_log_gamma = 1 / math.log(self.gamma)
        self.n_buckets = self.index(MAX_DELAY_MS) + 1
        # bucket of each delay 1.._TABLE_MS-1 (index 0 unused), and the smallest and largest
        # delay of each bucket within the table: a bucket holding one integer is exact.
        self.table = [0, *(self.index(d) for d in range(1, _TABLE_MS))]
        self.lo: dict[int, int] = {}
        self.hi: dict[int, int] = {}
        for d in range(1, _TABLE_MS):
            i = self.table[d]
            self.lo.setdefault(i, d)
            self.hi[i] = d

    def index(self, delay: int) -> int:
        return math.ceil(math.log(delay) * self.inv_log_gamma)

    def value(self, i: int) -> float:
        """The value bucket ``i`` answers: within the accuracy of every delay in it."""
        v = 2 * self.gamma ** i / (self.gamma + 1)
        lo, hi = self.lo.get(i), self.hi.get(i)
        if lo is not None and hi is not None and i != self.table[_TABLE_MS - 1]:
            v = min(max(v, lo), hi)
        return v


@lru_cache(maxsize=8)
def _delays(accuracy: float) -> _Delays:
    return _Delays(accuracy)


def delay_buckets(delays: Sequence[int], params: SketchParams) -> tuple[dict[int, int], int]:
    """Client delays (ms) -> (their ``CellAggregates`` buckets -> events, events with a delay
    <= 0): in bulk (C-level) when every delay is within the table."""
    if not delays:
        return {}, 0
    geo = _delays(params.delay_accuracy)
    if min(delays) > 0 and max(delays) < _TABLE_MS:
        return dict(Counter(map(geo.table.__getitem__, delays))), 0
    out: dict[int, int] = {}
    dz = 0
    table = geo.table
    for d in delays:
        if d <= 0:
            dz += 1
            continue
        i = table[d] if d < _TABLE_MS else geo.index(min(d, MAX_DELAY_MS))
        out[i] = out.get(i, 0) + 1
    return out, dz


# ---------------------------------------------------------------------------------------
# HyperLogLog estimate (Ertl 2017, "New cardinality estimation algorithms for HyperLogLog
# sketches", the improved raw estimator of section 4.2)

def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        z_old = z
        z += x * y
        y += y
        if z == z_old:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        z_old = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == z_old:
            return z / 3


def hll_estimate(registers: bytes | bytearray, p: int) -> float:
    """Cardinality estimate of HyperLogLog ``registers`` (values 0..65-p)."""
    m = len(registers)
    q = 64 - p
    counts = [registers.count(k) for k in range(q + 2)]
    z = m * _tau(1 - counts[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return m * m / (2 * math.log(2)) / z


# ---------------------------------------------------------------------------------------
# The cell

def _text(url: str | bytes | None) -> str:
    """A URL's text as a cell keeps it (bytes as they came in a header: at most
    ``MAX_URL_CHARS``, undecodable bytes replaced, so a forged header cannot grow a cell)."""
    if isinstance(url, bytes):
        return url[:MAX_URL_CHARS].decode(errors="replace")
    return url or ""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class CellAggregates:
    """Unique users, top URLs and client-delay quantiles of one (region, window) cell.

    ``add`` is the per-event path: pass the user's :func:`user_hash`, the URL's
    :func:`url_hash` with its normalised text, and the client delay in ms, each None when
    the event has none.  The URL text is read only when the URL becomes a candidate, so
    the caller may pass text it already holds (a ``str``, or ``bytes`` of ASCII as it came
    in a Kafka header) at no cost for the other events.
    """

    __slots__ = ("params", "_exact_users", "_users", "_regs", "_mask", "_rmax", "_hip", "_kxq", "_scale",
                 "_urls", "_texts", "offset", "_url_cap", "_dz", "_buckets", "_geo", "_table")

    def __init__(self, params: SketchParams | None = None) -> None:
        self.params = p = params or SketchParams()
        self._exact_users = p.exact_users
        self._users: set[int] | None = set()    # exact mode; None once in HyperLogLog mode
        self._regs: bytearray | None = None
        self._mask = (1 << p.hll_p) - 1         # register index: the hash's low hll_p bits
        self._rmax = 65 - p.hll_p                # rank: leading zeros of the other bits + 1
        # HIP (historic inverse probability) estimate, kept while the registers change one
        # insert at a time; None after a merge of two HyperLogLogs (then Ertl's estimate).
        # _kxq = sum over registers of 2**(rmax - r) (0 for r == rmax): the chance that a
        # new user changes a register is _kxq / _scale.
        self._hip: float | None = None
        self._kxq = 0
        self._scale = 1 << (p.hll_p + self._rmax)
        self._urls: dict[int, int] = {}
        self._texts: dict[int, str] = {}
        self.offset = 0                          # Misra-Gries: total taken off every counter
        self._url_cap = p.url_capacity
        self._dz = 0                             # delays <= 0
        self._buckets: array[int] | None = None  # delay buckets, allocated at the first delay > 0
        self._geo = _delays(p.delay_accuracy)
        self._table = self._geo.table

    # -- the per-event path ---------------------------------------------------------------

    def add(self, user: int | None, url_h: int | None, url: str | bytes | None, delay_ms: int | None) -> None:
        """Count one event (each part None when the event has none)."""
        if user is not None:
            users = self._users
            if users is not None:
                users.add(user)
                if len(users) > self._exact_users:
                    self._to_hll()
            else:
                regs = self._regs
                assert regs is not None
                i = user & self._mask
                r = 65 - user.bit_length()
                if regs[i] < r:
                    self._raise(i, r)
        if url_h is not None:
            urls = self._urls
            c = urls.get(url_h)
            if c is None:
                urls[url_h] = 1
                self._texts[url_h] = _text(url)
                if len(urls) > self._url_cap:
                    self._purge()
            else:
                urls[url_h] = c + 1
        if delay_ms is not None:
            if delay_ms <= 0:
                self._dz += 1
            else:
                b = self._buckets
                if b is None:
                    b = self._buckets = array("I", bytes(4 * self._geo.n_buckets))
                if delay_ms < _TABLE_MS:
                    b[self._table[delay_ms]] += 1
                else:
                    b[self._geo.index(min(delay_ms, MAX_DELAY_MS))] += 1

    def add_batch(self, users: Sequence[int], urls: Mapping[int, int], texts: Mapping[int, str | bytes],
                  buckets: Mapping[int, int], dz: int = 0) -> list[list[Any]]:
        """A batch of events at once, as ``WindowAggregates`` stages them: ``users`` their
        user hashes (in order), ``urls`` url hash -> events, ``texts`` the texts of (at
        least) the URLs new to the cell, ``buckets`` delay bucket (``delay_buckets``) ->
        events, ``dz`` events with a delay <= 0.  -> ``[[url hash, text], ...]`` of the
        URLs that got a counter (what a replay of the batch needs of ``texts``).

        The state after it depends on the cell and the batch only (deterministic, so a
        logged batch replays into the same cell), not on how events are cut into batches
        for the exact parts; the URL counters are Misra-Gries merged a batch at a time
        (every count added, then purged back to capacity), the error bound unchanged."""
        if users:
            self._add_users(list(dict.fromkeys(users)) if len(users) > 8 else users)
        read: list[list[Any]] = []
        if urls:
            counts, known, cap = self._urls, self._texts, self._url_cap
            new = [h for h in urls if h not in counts]
            get = counts.get
            for h, c in urls.items():
                counts[h] = get(h, 0) + c
            for h in new:
                known[h] = _text(texts.get(h))
            while len(counts) > cap:
                self._purge()
            read = [[h, known[h]] for h in new if h in counts]
        if buckets or dz:
            self._dz += dz
            b = self._buckets
            if b is None and buckets:
                b = self._buckets = array("I", bytes(4 * self._geo.n_buckets))
            for i, c in buckets.items():
                b[i] += c  # type: ignore[index]
        return read

    def holds_url(self, url_h: int) -> bool:
        """Whether the URL has a counter now (``add`` reads a URL's text only when not)."""
        return url_h in self._urls

    def add_many(self, users: Iterable[int | None], url_hs: Sequence[int | None],
                 urls: Sequence[str | bytes | None], delays: Iterable[int | None]) -> None:
        """``add`` over parallel sequences (one event per index; ``url_hs`` and ``urls``
        of the same length, the others may be shorter or empty): the same state as the
        calls one by one, whatever the batch boundaries.

        Faster than ``add`` where the order does not matter: the exact user set and the
        delay buckets are order-free, and so are the URL counters of a batch that adds
        no more distinct URLs than there is room for (no purge in between), so those take
        C-level bulk paths; the rest is one loop with the look-ups done once."""
        self._add_users(users)
        self._add_urls(url_hs, urls)
        self._add_delays(delays)

    def _add_users(self, users: Iterable[int | None]) -> None:
        exact = cast("set[int | None] | None", self._users)
        if exact is None:
            self._hll_update(users)
            return
        limit = self._exact_users
        if isinstance(users, Sequence) and len(users) <= 8 * limit:  # bounded cost of trying
            new = set(users)
            new.discard(None)
            new -= exact
            if len(exact) + len(new) <= limit:  # stays exact: the whole batch at once
                exact |= new
                return
        it = iter(users)
        for user in it:
            if user is not None:
                exact.add(user)
                if len(exact) > limit:
                    self._to_hll()
                    self._hll_update(it)
                    return

    def _hll_update(self, users: Iterable[int | None]) -> None:
        regs = self._regs
        assert regs is not None
        mask = self._mask
        for user in users:
            if user is None:
                continue
            i = user & mask
            r = 65 - user.bit_length()
            if regs[i] < r:
                self._raise(i, r)

    def _raise(self, i: int, r: int) -> None:
        """Register ``i`` goes up to rank ``r`` (rare: at most rmax times per register)."""
        regs = self._regs
        assert regs is not None
        rmax = self._rmax
        if r > rmax:
            r = rmax
        old = regs[i]
        if self._hip is not None:
            self._hip += self._scale / self._kxq
        self._kxq -= (1 << (rmax - old)) - (1 << (rmax - r) if r < rmax else 0)
        regs[i] = r

    def _set_kxq(self) -> None:
        regs = self._regs
        assert regs is not None
        rmax = self._rmax
        self._kxq = sum(regs.count(k) << (rmax - k) for k in range(rmax))

    def _add_urls(self, url_hs: Sequence[int | None], urls: Sequence[str | bytes | None]) -> None:
        if not url_hs:
            return
        if len(url_hs) != len(urls):
            raise ValueError("url_hs and urls differ in length")
        counts, texts, cap = self._urls, self._texts, self._url_cap
        batch = cast("Counter[int]", Counter(url_hs))
        batch.pop(None, None)  # type: ignore[call-overload]
        new = batch.keys() - counts.keys() if len(counts) + len(batch) > cap else batch.keys()
        if len(counts) + len(new) <= cap:
            # no purge would happen one by one either: count the batch in bulk
            if new:
                first = dict(zip(reversed(url_hs), reversed(urls), strict=True))  # each hash's first text
                for key in new:
                    if key in counts:
                        continue
                    text = first[key]
                    texts[key] = _text(text)
            get = counts.get
            for key, n in batch.items():
                counts[key] = get(key, 0) + n
            return
        get = counts.get
        for h, url in zip(url_hs, urls, strict=True):
            if h is None:
                continue
            c = get(h)
            if c is None:
                counts[h] = 1
                texts[h] = _text(url)
                if len(counts) > cap:
                    self._purge()
            else:
                counts[h] = c + 1

    def _add_delays(self, delays: Iterable[int | None]) -> None:
        b = self._buckets
        table, geo = self._table, self._geo
        for d, c in Counter(delays).items():
            if d is None:
                continue
            if d <= 0:
                self._dz += c
                continue
            if b is None:
                b = self._buckets = array("I", bytes(4 * geo.n_buckets))
            b[table[d] if d < _TABLE_MS else geo.index(min(d, MAX_DELAY_MS))] += c

    # -- mode changes ---------------------------------------------------------------------

    def _to_hll(self) -> None:
        users = self._users
        assert users is not None
        self._regs = bytearray(1 << self.params.hll_p)
        self._users = None
        for user in users:  # order-free: the registers' maxima
            i = user & self._mask
            r = min(65 - user.bit_length(), self._rmax)
            if self._regs[i] < r:
                self._regs[i] = r
        self._set_kxq()
        self._hip = float(len(users))  # the exact count so far: HIP goes on from there

    def _purge(self) -> None:
        """Misra-Gries, a batch at a time: take the median count off every counter."""
        counts = self._urls
        d = sorted(counts.values())[len(counts) // 2]
        texts = self._texts
        for h, c in list(counts.items()):
            if c <= d:
                del counts[h]
                del texts[h]
            else:
                counts[h] = c - d
        self.offset += d

    # -- merge ----------------------------------------------------------------------------

    def merge(self, other: CellAggregates) -> None:
        """Add ``other``'s events to this cell (``other`` is left as it is)."""
        if other.params != self.params:
            raise ValueError(f"cannot merge sketches of different parameters: {self.params} and {other.params}")
        if other._users is not None:
            if self._users is not None:
                self._users |= other._users
                if len(self._users) > self._exact_users:
                    self._to_hll()
            else:
                self._hll_update(sorted(other._users))  # one by one: HIP stays valid
        else:
            assert other._regs is not None
            if self._users is not None:
                # take the other's registers and HIP, then insert ours one by one
                mine = sorted(self._users)
                self._users, self._regs = None, bytearray(other._regs)
                self._hip, self._kxq = other._hip, other._kxq
                self._hll_update(mine)
            else:
                assert self._regs is not None
                self._regs[:] = bytes(map(max, self._regs, other._regs))
                self._set_kxq()
                self._hip = None  # two histories: HIP no longer applies
        counts, texts = self._urls, self._texts
        for h, c in other._urls.items():
            counts[h] = counts.get(h, 0) + c
            if h not in texts:
                texts[h] = other._texts[h]
        self.offset += other.offset
        while len(counts) > self._url_cap:
            self._purge()
        self._dz += other._dz
        if other._buckets is not None:
            if self._buckets is None:
                self._buckets = array("I", other._buckets)
            else:
                b = self._buckets
                for i, c in enumerate(other._buckets):
                    if c:
                        b[i] += c

    # -- answers --------------------------------------------------------------------------

    def unique_users(self) -> int:
        if self._users is not None:
            return len(self._users)
        assert self._regs is not None
        est = self._hip if self._hip is not None else hll_estimate(self._regs, self.params.hll_p)
        return max(self._exact_users + 1, round(est))

    def top_urls(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most frequent URLs, most frequent first; ties by URL text, then hash."""
        off, texts = self.offset, self._texts
        ranked = heapq.nsmallest(n, self._urls.items(), key=lambda hc: (-hc[1], texts[hc[0]], hc[0]))
        return [{"url": texts[h], "count": c + off} for h, c in ranked]

    def delay_quantiles(self, qs: Sequence[float]) -> list[float] | None:
        """The delays (ms) at quantiles ``qs`` (each 0..1), each within the relative accuracy
        of the true delay at rank ``floor(q * (n - 1))``; None: no delays."""
        b = self._buckets
        cums = list(accumulate(b, initial=self._dz)) if b is not None else [self._dz]
        total = cums[-1]
        if total == 0:
            return None
        out = []
        for q in qs:
            rank = q * (total - 1)
            if self._dz > rank:
                out.append(0.0)
            else:  # the first bucket i whose cumulative count cums[i + 1] passes the rank
                out.append(self._geo.value(bisect_right(cums, rank, lo=1) - 1))
        return out

    def delay_quantile(self, q: float) -> float | None:
        """The delay (ms) at quantile ``q``; None: no delays."""
        vs = self.delay_quantiles((q,))
        return None if vs is None else vs[0]

    def client_delay_ms(self) -> dict[str, float] | None:
        """``{"p50", "p90", "p99"}`` in ms, to 0.1 ms; None: no event carried a delay."""
        vs = self.delay_quantiles((0.5, 0.9, 0.99))
        if vs is None:
            return None
        return {"p50": round(vs[0], 1), "p90": round(vs[1], 1), "p99": round(vs[2], 1)}

    def result(self, top_n: int = 10) -> dict[str, Any]:
        """The cell's aggregates as they go into its snapshot."""
        return {"unique_users": self.unique_users(), "top_urls": self.top_urls(top_n),
                "client_delay_ms": self.client_delay_ms()}

    @property
    def exact(self) -> bool:
        """True while every aggregate is exact (delays: within their bucket only)."""
        return self._users is not None and self.offset == 0

    # -- state ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-compatible value; the same state gives the same value.

        ``{"p": params, "ux": base64 of the sorted exact user hashes | "uh": base64 of the
        HyperLogLog registers, "t": [base64 of the URL hashes in order, [their counters],
        [their texts]], "o": offset, "d": [zero count, first bucket, its count, ... up to
        the last non-empty bucket]}``, parts with nothing in them left out.  Hashes are
        8 bytes each, big-endian."""
        out: dict[str, Any] = {"p": self.params.key()}
        if self._users is not None:
            if self._users:
                out["ux"] = _pack(sorted(self._users))
        else:
            assert self._regs is not None
            out["uh"] = _b64(bytes(self._regs))
            if self._hip is not None:
                out["hip"] = self._hip
        if self._urls:
            hashes = sorted(self._urls)
            counts, texts = self._urls, self._texts
            out["t"] = [_pack(hashes), [counts[h] for h in hashes], [texts[h] for h in hashes]]
        if self.offset:
            out["o"] = self.offset
        b = self._buckets
        if b is not None or self._dz:
            raw = b.tobytes() if b is not None else b""
            head = len(raw) - len(raw.lstrip(b"\0"))  # zero bytes before the first non-empty bucket
            if head == len(raw):
                out["d"] = [self._dz]
            else:
                first = head // 4
                last = (len(raw.rstrip(b"\0")) - 1) // 4
                out["d"] = [self._dz, first, *b[first:last + 1].tolist()]  # type: ignore[index]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CellAggregates:
        """A cell from a ``to_json()`` value (ValueError: not one)."""
        try:
            hll_p, exact_users, url_capacity, accuracy = obj["p"]
            cell = cls(SketchParams(int(hll_p), int(exact_users), int(url_capacity), float(accuracy)))
            if "ux" in obj:
                users = _unpack(obj["ux"])
                if len(users) > exact_users:
                    raise ValueError("bad exact users")
                cell._users = set(users)
            elif "uh" in obj:
                regs = bytearray(base64.b64decode(obj["uh"], validate=True))
                if len(regs) != 1 << cell.params.hll_p or max(regs) > 65 - cell.params.hll_p:
                    raise ValueError("bad registers")
                cell._users, cell._regs = None, regs
                cell._set_kxq()
                if "hip" in obj:
                    cell._hip = float(obj["hip"])
                    if not cell._exact_users < cell._hip < 2.0**64:
                        raise ValueError("bad HIP estimate")
            if "t" in obj:
                packed, counts, texts = obj["t"]
                hashes = _unpack(packed)
                if not len(hashes) == len(counts) == len(texts) <= url_capacity:
                    raise ValueError("bad url counters")
                if not all(type(c) is int and c > 0 for c in counts) or not all(type(t) is str for t in texts):
                    raise ValueError("bad url counter")
                cell._urls = dict(zip(hashes, counts, strict=True))
                cell._texts = dict(zip(hashes, texts, strict=True))
            cell.offset = int(obj.get("o", 0))
            if cell.offset < 0 or int(obj.get("d", [0])[0]) < 0:
                raise ValueError("negative count")
            d = obj.get("d")
            if d is not None:
                cell._dz = int(d[0])
                if len(d) > 1:
                    b = cell._buckets = array("I", bytes(4 * cell._geo.n_buckets))
                    first = int(d[1])
                    b[first:first + len(d) - 2] = array("I", d[2:])
                    if len(b) != cell._geo.n_buckets:
                        raise ValueError("bad delay buckets")
        except (KeyError, TypeError, IndexError, OverflowError, ValueError) as exc:
            raise ValueError(f"not a CellAggregates state: {exc}") from exc
        return cell


def _pack(hashes: list[int]) -> str:
    """base64 of 64-bit hashes, 8 bytes each, big-endian."""
    a = array("Q", hashes)
    if sys.byteorder == "little":
        a.byteswap()
    return _b64(a.tobytes())


def _unpack(text: str) -> array[int]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 8:
        raise ValueError("bad packed hashes")
    a = array("Q", raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def max_serialised_bytes(params: SketchParams | None = None) -> int:
    """An upper bound of ``len(orjson.dumps(cell.to_json()))`` for any cell of ``params``."""
    p = params or SketchParams()
    params_part = len(f'"p":[{p.hll_p},{p.exact_users},{p.url_capacity},{p.delay_accuracy}]') + 2
    users = 7 + 4 * math.ceil(max(8 * p.exact_users, 1 << p.hll_p) / 3) + 31  # ,"hip":<float, 24 chars at most>
    # "t":["<base64 of 8 bytes a URL>",[<counter up to 10 digits>,...],["<text>",...]],"o":<offset>
    urls = 6 + 4 * math.ceil(8 * p.url_capacity / 3) + 3 + p.url_capacity * (11 + MAX_URL_CHARS + 3) + 4 + 5 + 10
    # "d":[zero,first,counts...]: each count up to 10 digits (array "I") and a comma
    delays = 7 + 11 + 11 + 11 * _delays(p.delay_accuracy).n_buckets
    return params_part + users + urls + delays
