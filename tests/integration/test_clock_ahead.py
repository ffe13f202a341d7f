"""A clock ahead (docs/contract.md §1, late reason ``future_ts``): one record a day in the
future, produced straight to Kafka, must not move stream time.  Before the fix the events
after it on the same partition were never counted and hundreds of empty snapshots went out;
now the record is late with reason ``future_ts`` (and a dead letter), and every event after
it is counted in its own window."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, DLQ, ingest_header
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration
DAY_MS = 86_400_000


async def _produce(bootstrap: str, batches: list[list[tuple[bytes, bytes, list | None]]], pause: float) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for batch in batches:
            for key, value, headers in batch:
                await p.send_and_wait(CLICKS, value, key=key, headers=headers, partition=0)
            await asyncio.sleep(pause)
    finally:
        await p.stop()


def test_a_record_a_day_ahead_is_late_future_ts_and_moves_nothing(broker, service_factory):
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("ahead").start()
    now = int(time.time() * 1000)
    ahead = [
        (b"fut", orjson.dumps({"region": "fut", "ingest_ts": now + DAY_MS}), None),      # a value a day ahead
        (b"fut", orjson.dumps({"region": "fut"}), ingest_header(now + DAY_MS, None)),   # ingest's header too
    ]
    # then ordinary events on the same partition, over three 2 s windows
    normal = [[(b"fut", orjson.dumps({"region": "fut", "n": i}), None) for i in range(100)] for _ in range(3)]
    asyncio.run(_produce(bootstrap, [ahead, *normal], pause=2.0))

    def settled():
        snaps = [s for s in svc.snapshots() if s["region"] == "fut"]
        done = sum(s["count"] for s in snaps) == 300 and sum(s["late"] for s in snaps) == 2
        return snaps if done else None

    snaps = wait_for(settled, 40, what="300 events counted and 2 late")
    assert sum(s["late_by_reason"]["future_ts"] for s in snaps) == 2
    assert all(s["window_end"] <= int(time.time() * 1000) + 5_000 for s in snaps), "stream time moved ahead"
    assert len(snaps) < 30, f"{len(snaps)} snapshots: empty windows were emitted"
    letters = [orjson.loads(v) for _, v in read_topic(bootstrap, DLQ, idle=1.0)]
    assert [d["reason"] for d in letters] == ["future_ts", "future_ts"]
    text = svc.metrics_text()
    assert 'clickstream_late_events_total{reason="future_ts",region="fut"} 2.0' in text


def test_repeats_of_an_event_a_day_ahead_are_late_once_and_not_counted_again(broker, service_factory):
    """An ``event_id`` sent twice a day ahead, then once with a sane clock: one event, late
    (``future_ts``) once; the two repeats are duplicates, counted nowhere."""
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("ahead-dup").start()
    now = int(time.time() * 1000)
    ahead = [(b"dup", orjson.dumps({"region": "dup", "ingest_ts": now + DAY_MS, "event_id": "x"}), None)] * 2
    normal = [(b"dup", orjson.dumps({"region": "dup", "event_id": "x"}), None)]
    normal += [(b"dup", orjson.dumps({"region": "dup", "n": i}), None) for i in range(10)]
    asyncio.run(_produce(bootstrap, [ahead, normal], pause=2.0))

    def settled():
        snaps = [s for s in svc.snapshots() if s["region"] == "dup"]
        return snaps if sum(s["count"] for s in snaps) >= 10 and sum(s["late"] for s in snaps) >= 1 else None

    wait_for(settled, 40, what="10 events counted and 1 late")
    time.sleep(4.5)  # two more windows close: a repeat counted late would show
    snaps = [s for s in svc.snapshots() if s["region"] == "dup"]
    assert sum(s["count"] for s in snaps) == 10
    assert sum(s["late_by_reason"]["future_ts"] for s in snaps) == sum(s["late"] for s in snaps) == 1
    assert 'clickstream_duplicate_events_total{region="dup",source="event_id"} 2.0' in svc.metrics_text()
