"""A worker process that stands still (SIGSTOP: a VM paused, a machine swapping, a long
stop-the-world) while records are written must not take the time it stood still for
quiet time (docs/contract.md §1): the end offset it knows is as old as its last fetch.
Before the fix the first tick after the stop let the quiet partition's stream time follow
the wall clock past the window's end, so every record written meanwhile was late
(``closed_window``) and the window was published without them."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
N = 100


async def _produce(bootstrap: str, region: str, n: int, ingest_ts: int | None) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for i in range(n):
            value = {"region": region, "n": i} if ingest_ts is None else {"region": region, "n": i,
                                                                         "ingest_ts": ingest_ts}
            await p.send(CLICKS, orjson.dumps(value), key=region.encode())
        await p.flush()
    finally:
        await p.stop()


@pytest.mark.parametrize("round_", range(2))  # before the fix, 2 rounds in 3 failed
def test_records_written_while_the_worker_stood_still_are_counted_in_their_window(broker, service_factory,
                                                                                     round_):
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("stall").start()
    asyncio.run(_produce(bootstrap, "still", 1, None))
    wait_for(lambda: any(s["region"] == "still" for s in svc.snapshots()), 30, what="the first record's window")
    window_ms = 2000
    # stop early in a window, so that its end and grace pass while the worker stands still
    while (now := int(time.time() * 1000)) % window_ms > 300:
        time.sleep(0.05)
    start = now - now % window_ms
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        asyncio.run(_produce(bootstrap, "still", N, now))
        time.sleep(max(0.0, (start + window_ms + 1000 + 2000) / 1000 - time.time()))  # end + grace + 2 s
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)
    snap = wait_for(lambda: next((s for s in svc.snapshots() if s["region"] == "still"
                                  and s["window_start"] == start), None), 30, what=f"window {start}")
    assert snap["count"] == N, (snap, svc.tail())
