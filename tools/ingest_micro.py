"""Ingest's per-event work for ``POST /v1/events`` in one process, without HTTP or a
broker: the body's parse and validation, the dedup ids, the grouping by region, the
record values and headers, and aiokafka's record batches (``IngestHandler._submit``
appending to a ``BatchProducer`` whose batches are never sent).

    python -m tools.ingest_micro                      # 200 bodies of 1000 events
    python -m tools.ingest_micro --bodies 50 --runs 3

Each cost is the median of ``--runs`` runs in µs per event, with the typed parse
(ingest/body.py ``Event``) on and off, the aggregates header on and off, an
``Idempotency-Key`` on every body (as ``make bench`` sends them).  The bodies are the
load generator's (tools/bench/loadgen.py).  It is what ingest spends on events beside
aiohttp and the broker; ``make bench`` measures the whole process."""
from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time

from aiokafka import AIOKafkaProducer

from aggregator.core.dedupid import request_key
from aggregator.ingest import body as ingest_body
from aggregator.ingest.body import decode_slices, validate_records
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.producer import BatchProducer
from aggregator.metrics import Metrics
from tools.bench.loadgen import bodies

NDJSON = "application/x-ndjson"
PARTITIONS = [0, 1, 2, 3]


class _Unsent(BatchProducer):
    """A BatchProducer that knows its partitions without a broker; its pumps' sending
    tasks are cancelled before they run (``drop``), so batches are built, never sent."""

    def _partitions(self) -> list[int] | None:
        self.parts = PARTITIONS
        return self.parts

    def drop(self) -> None:
        for pump in self.pumps.values():
            if pump.task is not None:
                pump.task.cancel()
        self.pumps.clear()
        self.route.clear()


class _Producer:
    def __init__(self, batcher: BatchProducer) -> None:
        self.batcher = batcher


def handler(aggregates: bool, batcher: BatchProducer) -> IngestHandler:
    return IngestHandler(_Producer(batcher), Metrics(5.0, 60.0), "", 1 << 23, 10_000,  # type: ignore[arg-type]
                         aggregates=aggregates)


def one_pass(work: list[bytes], aggregates: bool, typed: bool, batcher: _Unsent) -> float:
    """Seconds for every body of ``work`` (the handler's steps between reading the body
    and waiting for the broker).  Runs inside the event loop: ``_submit`` never awaits
    here (partitions known, batches never full), so it is driven to its end in place."""
    h = handler(aggregates, batcher)
    saved = ingest_body._typed
    if not typed:
        ingest_body._typed = lambda buf: None
    spent = 0.0
    try:
        for n, body in enumerate(work):
            t = time.perf_counter()
            kh = request_key(f"micro-{n}", body)  # the handler's digest of key and body
            waits: set = set()
            per_region: dict[str, int] = {}
            total = 0
            for items in decode_slices(body, NDJSON):
                indices: list[int] = []
                good, _, _ = validate_records(items, total, indices=indices)
                total += len(items)
                coro = h._submit(good, 1_800_000_000_000, per_region, waits, None, h._ids(good, kh, indices))
                try:
                    coro.send(None)
                except StopIteration:
                    pass
                else:
                    raise RuntimeError("_submit waited: the micro benchmark assumes it never does")
            spent += time.perf_counter() - t
            batcher.drop()
    finally:
        ingest_body._typed = saved
    return spent


async def measure(work: list[bytes], runs: int) -> dict[str, list[float]]:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", max_batch_size=1 << 20)  # never started
    times: dict[str, list[float]] = {}
    for _ in range(runs):  # interleaved, so that a slow moment of the machine hits every case
        for aggregates in (False, True):
            for typed in (True, False):
                label = f"aggregates {'on' if aggregates else 'off'}, typed parse {'on' if typed else 'off'}"
                batcher = _Unsent(producer, "clicks")
                times.setdefault(label, []).append(one_pass(work, aggregates, typed, batcher))
                await asyncio.sleep(0)  # the cancelled pump tasks end
    await producer.stop()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bodies", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args(argv)
    work = [b for b, _ in bodies(a.batch, a.bodies, 1)]
    gc.set_threshold(50_000, 20, 10)  # the ingest role's (aggregator/cli.py)
    times = asyncio.run(measure(work, a.runs))
    events = a.bodies * a.batch
    for label, ts in times.items():
        print(f"ingest, {label:<36} {statistics.median(ts) / events * 1e6:6.3f} µs/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
