"""The worker's per-event work in one process, without a broker: decode, window book and
aggregates flush over real fetched records (aiokafka's record batches, as the worker's
consumer hands them over), beside a bare ``orjson.loads`` loop over the same values.

    python -m tools.worker_micro                      # 200,000 records produced straight to Kafka
    python -m tools.worker_micro --events 50000 --runs 3
    # instructions an event of one case, free of the machine's noise: the difference of two
    # runs under valgrind (cachegrind's "I refs"), divided by passes * events
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        python -m tools.worker_micro --events 50000 --case on --passes 0   # then --passes 2

Each cost is the median of ``--runs`` runs in µs per event, for the aggregates on and off
and for the decoder's typed parse (msgspec, worker/decoder.py) on and off; the records are
the ones figure 1c of ``make bench`` produces (16 regions, a user of 5000, a URL of 1000
pages with a query string, a client ``ts``, an ``ingest_ts``).  It is what the worker adds
on its own to a consumer's cost; ``make bench`` measures the whole process against a bare
consumer reading the same backlog from a broker."""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.windows import WindowBook
from aggregator.worker.decoder import RecordDecoder
from tools.bench.common import backlog_event
from tools.records import fetched

BATCH = 2000  # records per fetched batch (the worker's are up to a partition's fetch)
NOW_MS = 1_800_000_000_000


def backlog(n: int) -> list[list[Any]]:
    """``n`` records in fetched batches of BATCH, values as tools.bench.common.produce_backlog
    writes them (key = region), ingest times within one window."""
    batches = []
    for start in range(0, n, BATCH):
        specs = []
        for i in range(start, min(n, start + BATCH)):
            region = f"r{i % 16}"
            its = NOW_MS - 30_000
            specs.append((region.encode(), orjson.dumps(backlog_event(i, region, its)), []))
        batches.append(fetched(specs, base=start))
    return batches


class Pass(NamedTuple):
    """One pass: its seconds, the events the decoder handed over, and the window book it
    filled (left empty without ``book_too``): what the tests check a pass did."""

    seconds: float
    decoded: int
    book: WindowBook


def worker_pass(batches: Sequence[list[Any]], aggregates: bool, typed: bool,
                dec: RecordDecoder | None = None, book_too: bool = True) -> Pass:
    """Decode, count and (aggregates on) flush every batch, one partition: with a new
    decoder, or ``dec`` (its caches as an earlier pass left them); without ``book_too``,
    the decoder alone."""
    if dec is None:
        dec = RecordDecoder(1, None, aggregates=aggregates, fast=typed)
    aggs = WindowAggregates() if aggregates and book_too else None
    book = WindowBook(60_000, 5_000, 60_000, 600_000, 1000, aggs)
    decoded = 0
    t = time.perf_counter()
    for b in batches:
        d = dec.decode(b, NOW_MS, 0, False, None, NOW_MS + 60_000)
        decoded += len(d.events)
        if book_too:
            book.apply(d.events, b[-1].offset + 1, NOW_MS, d.aggs)
    if aggs is not None:
        aggs.flush()
    return Pass(time.perf_counter() - t, decoded, book)


def bare_pass(batches: Sequence[list[Any]]) -> tuple[float, dict[str, int]]:
    """Seconds of the bare loop, and its count per region."""
    loads = orjson.loads
    counts: dict[str, int] = {}
    t = time.perf_counter()
    for b in batches:
        for rec in b:
            region = loads(rec.value)["region"]
            counts[region] = counts.get(region, 0) + 1
    return time.perf_counter() - t, counts


CASES = ("bare", "off", "decode", "on")


def warm_passes(batches: Sequence[list[Any]], case: str, passes: int) -> tuple[float, int]:
    """Seconds of ``passes`` passes of one case after a first one, and the events those
    passes counted (decoded, for ``decode``), with the decoder (and its
    caches of regions and URLs) kept across them, as a running worker keeps it: for counting
    a case's instructions (``--case``, run under valgrind twice, the passes' difference).
    ``decode``: the decoder alone, aggregates on; ``on``/``off``: decode, window book and
    flush with the aggregates on / off; ``bare``: the bare loop."""
    aggregates = case in ("on", "decode")
    dec = RecordDecoder(1, None, aggregates=aggregates)
    runs: list[tuple[float, int]] = []
    for _ in range(passes + 1):
        if case == "bare":
            t, counts = bare_pass(batches)
            runs.append((t, sum(counts.values())))
        else:
            one = worker_pass(batches, aggregates, True, dec, case != "decode")
            runs.append((one.seconds, one.decoded if case == "decode" else sum(one.book.open_total().values())))
    return sum(t for t, _ in runs[1:]), sum(n for _, n in runs[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--case", choices=CASES, help="only this case, --passes warm passes (for valgrind)")
    ap.add_argument("--passes", type=int, default=2)
    a = ap.parse_args(argv)
    batches = backlog(a.events)
    gc.set_threshold(500_000, 20, 10)  # the worker role's (aggregator/cli.py)
    if a.case:
        t, _ = warm_passes(batches, a.case, a.passes)
        print(f"{a.case}: {a.passes} warm passes, {t / max(1, a.passes * a.events) * 1e6:.3f} µs/event")
        return 0
    cases = {"bare loop (orjson.loads, a dict count)": lambda: bare_pass(batches)[0]}
    for aggregates in (True, False):
        for typed in (True, False):
            label = (f"worker, aggregates {'on' if aggregates else 'off'}, "
                     f"typed parse {'on' if typed else 'off'}")
            cases[label] = lambda ag=aggregates, ty=typed: worker_pass(batches, ag, ty).seconds
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.runs):  # interleaved, so that a slow moment of the machine hits every case
        for label, run in cases.items():
            times[label].append(run())
    for label, ts in times.items():
        print(f"{label:<48} {statistics.median(ts) / a.events * 1e6:6.3f} µs/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
