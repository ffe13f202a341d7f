"""Another producer's partitioner (issue 15, fault 3; docs/contract.md §1 "Once per
(region, window)"): records of one region that arrive on several partitions of `clicks`
are forwarded to the region's home partition (`clicks-repartition`) and counted there, so
every (region, window) has one final count in `click-snapshots` — with two workers and one
of them SIGKILLed while records are forwarded.

(a) confluent-kafka with its default partitioner (librdkafka's consistent_random: CRC32
    of the key, not murmur2), keyed by region;
(b) aiokafka writing each record to a random partition."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, CLICKS_REPARTITION, SNAPSHOTS
from aggregator.core.repartition import home
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration
PARTITIONS = 4
REGIONS = [f"rp-{i}" for i in range(16)]
SECONDS = 9.0  # about four 2 s windows
RATE = 150  # events a second


def _plan(seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [rnd.choice(REGIONS) for _ in range(int(SECONDS * RATE))]


def _produce_confluent(bootstrap: str, regions: list[str], done: threading.Event) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})  # default partitioner
    failed: list = []
    try:
        for i, region in enumerate(regions):
            p.produce(CLICKS, orjson.dumps({"region": region, "event_id": str(i)}), key=region.encode(),
                      on_delivery=lambda err, msg: failed.append(err) if err else None)
            p.poll(0)
            time.sleep(1 / RATE)
        assert p.flush(30) == 0 and not failed, failed
    finally:
        done.set()


def _produce_random(bootstrap: str, regions: list[str], done: threading.Event) -> None:
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        rnd = random.Random(3)
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await p.start()
        try:
            futures = []
            for i, region in enumerate(regions):
                futures.append(await p.send(CLICKS, orjson.dumps({"region": region, "event_id": str(i)}),
                                            partition=rnd.randrange(PARTITIONS)))
                await asyncio.sleep(1 / RATE)
            await asyncio.gather(*futures)
        finally:
            await p.stop()

    try:
        asyncio.run(run())
    finally:
        done.set()


def _run(broker, service_factory, produce, regions: list[str]) -> None:
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, PARTITIONS))
    a = service_factory("a").start()
    b = service_factory("b").start()
    wait_for(lambda: _assigned(a) + _assigned(b) == PARTITIONS, 40, what="both workers assigned")
    done = threading.Event()
    t = threading.Thread(target=produce, args=(bootstrap, regions, done), daemon=True)
    t.start()
    time.sleep(SECONDS / 2)
    b.kill()  # SIGKILL: its unwritten state and unsent forwards are replayed by the survivor
    t.join(SECONDS + 30)
    assert done.is_set()
    produced: dict[str, int] = {}
    for r in regions:
        produced[r] = produced.get(r, 0) + 1

    last: dict[str, int] = {}

    def settled() -> tuple[dict, dict] | None:
        by_window: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for _, v in read_topic(bootstrap, SNAPSHOTS, idle=1.0):
            s = orjson.loads(v)
            by_window.setdefault((s["region"], s["window_start"]), set()).add((s["count"], s["late"]))
        totals: dict[str, int] = {}
        for (region, _), contents in by_window.items():
            count, late = max(contents)
            totals[region] = totals.get(region, 0) + count + late
        last.clear()
        last.update(totals)
        return (by_window, totals) if totals == produced else None

    try:
        by_window, totals = wait_for(settled, 60, interval=1.0, what="every produced event in a final snapshot")
    except AssertionError as exc:  # slow, or wrong: say which regions differ, and by how much
        diff = {r: (last.get(r, 0), n) for r, n in produced.items() if last.get(r, 0) != n}
        raise AssertionError(f"{exc}: (published, produced) {diff}\n{a.tail(12000)}") from None
    doubled = {k: v for k, v in by_window.items() if len(v) != 1}
    assert not doubled, f"(region, window)s with more than one final count: {doubled}"
    forwarded = read_topic(bootstrap, CLICKS_REPARTITION, idle=1.0)
    assert forwarded, "nothing was forwarded: the test did not test repartitioning"
    assert _repartitioned(a) > 0
    assert a.proc.poll() is None


def _families(svc) -> dict:
    return {f.name: f for f in text_string_to_metric_families(svc.metrics_text())}


def _assigned(svc) -> int:
    return int(_families(svc)["clickstream_assigned_partitions"].samples[0].value)


def _repartitioned(svc) -> float:
    return _families(svc)["clickstream_repartitioned_events"].samples[0].value


def test_librdkafka_default_partitioner_one_final_count_per_region_and_window(broker, service_factory):
    assert len({home(r, PARTITIONS) for r in REGIONS}) > 1
    _run(broker, service_factory, _produce_confluent, _plan(1))


def test_random_partitions_one_final_count_per_region_and_window(broker, service_factory):
    _run(broker, service_factory, _produce_random, _plan(2))


def test_a_repartition_topic_with_another_partition_count_is_refused(broker):
    """A region's home is one partition number in both topics: ensure_topics (and so
    `aggregator run`, one line) refuses a clicks-repartition of another count."""
    from aiokafka.admin import NewTopic

    from aggregator.broker import BrokerError

    asyncio.run(_create(broker.bootstrap, [NewTopic(CLICKS, PARTITIONS, 1), NewTopic(CLICKS_REPARTITION, 2, 1)]))
    with pytest.raises(BrokerError, match=f"{CLICKS_REPARTITION} has 2 partitions but {CLICKS} has {PARTITIONS}"):
        asyncio.run(ensure_topics(broker.bootstrap, PARTITIONS, retries=1))


def test_the_repartition_topic_gets_the_partitions_clicks_has(broker):
    from aiokafka.admin import NewTopic

    from aggregator.broker import partition_counts

    asyncio.run(_create(broker.bootstrap, [NewTopic(CLICKS, 3, 1)]))  # made by someone else
    asyncio.run(ensure_topics(broker.bootstrap, 5))  # AGG_PARTITIONS says 5: clicks has 3, and so does this
    counts = asyncio.run(partition_counts(broker.bootstrap, [CLICKS, CLICKS_REPARTITION]))
    assert counts == {CLICKS: 3, CLICKS_REPARTITION: 3}


async def _create(bootstrap: str, topics: list) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(topics)
    finally:
        await admin.close()
