"""A worker process that stands still (SIGSTOP: a VM paused, a machine swapping, a long
stop-the-world) must count exactly when it goes on (docs/contract.md §1).

* Alone, while records are written: it must not take the time it stood still for quiet
  time: the end offset it knows is as old as its last fetch.  Before the fix the first
  tick after the stop let the quiet partition's stream time follow the wall clock past the
  window's end, so every record written meanwhile was late (``closed_window``) and the
  window was published without them.
* Beside another worker, for longer than its session: the group gives its partitions to
  the other, and it must not write their state over the new owner's when it goes on.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

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


def _produce_steadily(bootstrap: str, stop: threading.Event, sent: list[int], rate: float = 150.0) -> None:
    """Events of eight regions (every partition) stamped now, at ``rate`` a second until ``stop``."""
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            i = 0
            while not stop.is_set():
                now = int(time.time() * 1000)
                for _ in range(15):
                    region = f"z{i % 8}"
                    await p.send(CLICKS, orjson.dumps({"region": region, "n": i, "ingest_ts": now}), key=region.encode())
                    i += 1
                await p.flush()
                sent[0] = i
                await asyncio.sleep(15 / rate)
        finally:
            await p.stop()

    asyncio.run(run())


def _state_offsets(bootstrap: str) -> dict[int, list[int]]:
    """Per partition, the next source offset of every state header in the changelog, in
    log order (each decoded from the chunks stored before it)."""
    from aggregator.core.contract import STATE_CHANGELOG
    from aggregator.core.statechunks import decode_state

    stored: dict[object, object] = {}
    out: dict[int, list[int]] = {}
    for key, value in read_topic(bootstrap, STATE_CHANGELOG, idle=2.0):
        k = orjson.loads(key)
        v = None if value is None else orjson.loads(value)
        stored[k] = v
        if isinstance(k, int) and v is not None:
            decoded = decode_state(k, v, stored.get)
            if decoded is not None:
                out.setdefault(k, []).append(decoded[0]["next_offset"])
    return out


def test_a_worker_the_group_dropped_while_it_stood_still_writes_nothing_of_its_old_partitions(broker, service_factory):
    """Two workers; one stands still (SIGSTOP) for twice the session timeout while events
    flow, so the group gives its partitions to the other, then goes on (SIGCONT).  Before
    the fence it wrote the states it held at once, over the new owner's (a partition's
    next source offset went back in the changelog); now it writes nothing until the group
    has it again, and every event is counted once."""
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 4))
    a = service_factory("a", AGG_ROLE="worker").start()
    b = service_factory("b", AGG_ROLE="worker").start()

    def assigned(svc) -> float:
        return svc.metric("clickstream_assigned_partitions", 0.0)

    wait_for(lambda: assigned(a) > 0 and assigned(b) > 0, 60, what="both workers with partitions")
    stop, sent = threading.Event(), [0]
    producer = threading.Thread(target=_produce_steadily, args=(bootstrap, stop, sent), daemon=True)
    producer.start()
    try:
        time.sleep(4)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: assigned(b) == 4, 60, what="the other worker with every partition")
            time.sleep(3)  # it counts on and writes their states
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        time.sleep(8)
    finally:
        stop.set()
        producer.join(30)
    total = sent[0]

    def counted() -> int | None:
        snaps = {(s["region"], s["window_start"]): s for s in b.snapshots() if s["region"].startswith("z")}
        n = sum(s["count"] + s["late"] for s in snaps.values())
        return n if n >= total else None

    assert wait_for(counted, 60, what=f"{total} events counted") == total, (a.tail(), b.tail())
    log_a = a.tail(400_000)
    a.kill()
    b.kill()  # the changelog stands still, to be read to its end
    went_back = {p: offs for p, offs in _state_offsets(bootstrap).items() if offs != sorted(offs)}
    assert not went_back, (went_back, log_a[-3000:])
    assert "held: the group dropped this worker" in log_a or "held: no heartbeat" in log_a, log_a[-3000:]
