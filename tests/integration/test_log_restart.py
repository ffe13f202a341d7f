"""A partition of ``clicks`` that starts over while a worker runs (issue 15, fault 1).

Before, the records of the new log below the offset the window state had applied were
skipped as "already applied": 600 acknowledged events vanished with no log line and lag 0.
Now the worker sees that the log started over (core.sourcelog), says so at error level
with the numbers, counts it in ``clickstream_source_log_resets_total``, and counts the new
log from its start; what it commits afterwards are offsets of the new log, so a worker
killed after the reset neither loses nor doubles anything.

On real Kafka the topic is deleted and created again (``make test-kafka``)."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, SNAPSHOTS, STATE_CHANGELOG
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA, Service, read_topic

pytestmark = pytest.mark.integration
N = 600  # the new log reaches exactly the offset the state had applied: only its records tell


def delete_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic], timeout_ms=10000)
            for _ in range(100):
                if topic not in await admin.list_topics():
                    return
                await asyncio.sleep(0.2)
            raise AssertionError(f"{topic} still listed")
        finally:
            await admin.close()

    asyncio.run(run())


async def create_changelog(bootstrap: str) -> None:
    """The window-state changelog as Faust creates it at start (an operator's restore)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(STATE_CHANGELOG, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


def counted(svc: Service, region: str) -> int:
    return sum(s["count"] for s in svc.snapshots() if s["region"] == region)


def post_until_accepted(svc: Service, events: list, timeout: float) -> None:
    """The ingest producer learns of the new topic by itself: 503s until it has."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = svc.post(events)
        if status == 200:
            assert body["accepted"] == len(events), body
            return
        assert status == 503, (status, body)
        if time.monotonic() > deadline:
            raise AssertionError(f"ingest still answers 503 after {timeout}s: {body}")
        time.sleep(0.5)


def wait_counted(svc: Service, region: str, n: int, timeout: float) -> None:
    try:
        wait_for(lambda: counted(svc, region) >= n, timeout, what=f"{n} events of {region} counted")
    except AssertionError as exc:
        snaps = [(s["window_start"], s["count"], s["late_by_reason"]) for s in svc.snapshots() if s["region"] == region]
        raise AssertionError(f"{exc}; counted {counted(svc, region)}: {snaps}\n{svc.tail(6000)}") from None


def published_totals(bootstrap: str) -> Counter:
    """Per region, the sum of its final snapshots on ``click-snapshots``; a window published
    twice (the outbox again after a crash) must carry the same count both times."""
    final: dict[tuple[str, int], int] = {}
    for _, value in read_topic(bootstrap, SNAPSHOTS):
        s = orjson.loads(value)
        key = (s["region"], s["window_start"])
        assert final.setdefault(key, s["count"]) == s["count"], f"two counts for {key}"
    totals: Counter = Counter()
    for (region, _), count in final.items():
        totals[region] += count
    return totals


def resets(svc: Service) -> float:
    return sum(float(line.split()[-1]) for line in svc.metrics_text().splitlines()
               if line.startswith('clickstream_source_log_resets_total{partition="0"}'))


@pytest.mark.skipif(not ON_REAL_KAFKA, reason="deletes a topic under a running worker: real Kafka (make test-kafka)")
def test_a_recreated_topic_is_counted_from_its_start(broker, service_factory):
    svc = service_factory("w", AGG_PARTITIONS="1").start()
    assert svc.post([{"region": "old"}] * N)[0] == 200
    wait_counted(svc, "old", N, 60)
    time.sleep(1.5)  # a checkpoint or two: the state's offset is durable, and committed

    delete_topic(broker.bootstrap, CLICKS)
    asyncio.run(ensure_topics(broker.bootstrap, 1))
    post_until_accepted(svc, [{"region": "new"}] * N, 60)
    wait_counted(svc, "new", N, 60)
    errors = [line for line in svc.tail(400_000).splitlines() if "started over" in line]
    assert len(errors) == 1 and '"level": "error"' in errors[0], errors
    assert "below 600" in errors[0] and "from offset 0" in errors[0], errors[0]
    assert resets(svc) == 1

    # counting goes on after the reset, and what was committed is of the new log: a worker
    # killed now starts where the new log's state says, neither losing nor doubling
    assert svc.post([{"region": "after"}] * 300)[0] == 200
    wait_counted(svc, "after", 300, 60)
    time.sleep(1.5)
    svc.kill()
    svc.start()
    assert svc.post([{"region": "back"}] * 200)[0] == 200
    wait_counted(svc, "back", 200, 60)
    time.sleep(1.0)
    totals = published_totals(broker.bootstrap)
    assert {r: totals[r] for r in ("old", "new", "after", "back")} == {"old": N, "new": N, "after": 300,
                                                                        "back": 200}, totals


@pytest.mark.skipif(ON_REAL_KAFKA, reason="the embedded broker forgets everything when restarted; Kafka keeps it")
def test_a_broker_back_empty_is_counted_from_its_start(tmp_path):
    from aggregator.broker import EmbeddedBroker

    b = EmbeddedBroker().start()
    # the broker's restart and the group's rejoin take a few seconds, during which the idle
    # partition's stream time follows the clock: a grace longer than that keeps the new
    # log's events in their windows (not late), so that their counts can be exact
    svc = Service(b.url, tmp_path / "w", AGG_PARTITIONS="1", AGG_GRACE_SECONDS="10")
    try:
        svc.start()
        assert svc.post([{"region": "old"}] * N)[0] == 200
        wait_counted(svc, "old", N, 60)
        time.sleep(1.5)
        b.stop()
        b = EmbeddedBroker(port=b.port).start()  # the same address, nothing in it
        asyncio.run(ensure_topics(b.bootstrap, 1))
        asyncio.run(create_changelog(b.bootstrap))
        post_until_accepted(svc, [{"region": "new"}] * N, 60)
        wait_counted(svc, "new", N, 60)
        assert counted(svc, "new") == N
        assert sum(s["late"] for s in svc.snapshots() if s["region"] == "new") == 0
        assert resets(svc) == 1
        errors = [line for line in svc.tail(400_000).splitlines() if "started over" in line]
        assert len(errors) == 1 and '"level": "error"' in errors[0], errors
    finally:
        svc.kill()
        b.stop()


def test_a_restart_with_nothing_new_to_read_still_closes_its_windows(broker, service_factory):
    # the other side of the check: a recovered state is not trusted to follow the clock
    # before its log is checked, unless the consumer stands where the state says (the same
    # log, nothing new); then its open window must still close and publish
    svc = service_factory("w", AGG_PARTITIONS="1", AGG_GRACE_SECONDS="6")
    svc.start()
    assert svc.post([{"region": "quiet"}] * 50)[0] == 200
    time.sleep(2.0)  # counted, its state written and committed; its window still open (grace)
    assert counted(svc, "quiet") == 0
    svc.kill()
    svc.start()
    wait_counted(svc, "quiet", 50, 60)
    assert counted(svc, "quiet") == 50
    assert resets(svc) == 0
