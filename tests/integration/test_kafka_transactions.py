"""Transactional producers writing straight into ``clicks`` (docs/contract.md §1): the worker
reads read committed, so an aborted transaction's records are never counted and an open
one's only once it commits; a partition whose log ends in a transaction marker is still
caught up, so its last window closes by the clock.  Real Apache Kafka only: the embedded
broker's transactions are not what is under test here."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS
from aggregator.core.repartition import home
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs Apache Kafka (make test-kafka: AGG_TEST_BROKER=kafka)")]

PARTITIONS = 4  # Service's default AGG_PARTITIONS in the tests


def _totals(snaps: list[dict], region: str) -> tuple[int, int]:
    """(count, late) over the published snapshots of ``region``."""
    mine = [s for s in snaps if s["region"] == region]
    return sum(s["count"] for s in mine), sum(s["late"] for s in mine)


def _lags(svc) -> dict[str, float]:
    fams = {f.name: f for f in text_string_to_metric_families(svc.metrics_text())}
    return {s.labels["partition"]: s.value for s in fams["clickstream_consumer_lag"].samples}


def test_aborted_records_are_never_counted_and_a_quiet_partition_ending_in_a_marker_closes(broker,
                                                                                            service_factory):
    from aiokafka import AIOKafkaProducer

    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, PARTITIONS))
    svc = service_factory("txn").start()
    # each region written to its home partition: its windows are that partition's, whose
    # log then ends in a transaction's marker
    regions = ["eu", "us", "ap"]
    homes = {r: home(r, PARTITIONS) for r in regions}

    def value(region: str, i: int) -> bytes:
        return orjson.dumps({"region": region, "user_id": f"u{i}"})

    async def committed_and_aborted() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="txn-test-a")
        await p.start()
        try:
            async with p.transaction():
                for i in range(5):
                    await p.send(CLICKS, value("eu", i), key=b"eu", partition=homes["eu"])
            # a producer that aborts (and would retry): none of these may be counted
            await p.begin_transaction()
            for i in range(7):
                await p.send(CLICKS, value("eu", 100 + i), key=b"eu", partition=homes["eu"])
            for i in range(4):
                await p.send(CLICKS, value("us", 100 + i), key=b"us", partition=homes["us"])
            await p.flush()
            await p.abort_transaction()
            async with p.transaction():
                for i in range(3):
                    await p.send(CLICKS, value("us", i), key=b"us", partition=homes["us"])
        finally:
            await p.stop()

    asyncio.run(committed_and_aborted())

    def closed():
        snaps = svc.snapshots()
        return snaps if _totals(snaps, "eu")[0] >= 5 and _totals(snaps, "us")[0] >= 3 else None

    # published: the windows closed though the last thing of both partitions is a marker
    # (eu's an abort marker, us's a commit marker) and nothing is written after it
    snaps = wait_for(closed, 30, what="the committed records' windows closed and published")
    time.sleep(3.0)  # > window (2 s) + grace (1 s): anything aborted would be published by now
    snaps = svc.snapshots()
    assert _totals(snaps, "eu") == (5, 0)
    assert _totals(snaps, "us") == (3, 0)
    lags = wait_for(lambda: (lambda lag: lag if all(lag.get(str(homes[r])) == 0 for r in ("eu", "us")) else None)(
        _lags(svc)), 10, what="no lag on partitions ending in a marker")
    assert all(v == 0 for v in lags.values()), lags

    # an open transaction: counted only once it commits, and its partition's windows wait
    # for it (its records are counted in their windows, not late)
    async def open_then_commit() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="txn-test-b")
        await p.start()
        try:
            await p.begin_transaction()
            for i in range(4):
                await p.send(CLICKS, value("ap", i), key=b"ap", partition=homes["ap"])
            await p.flush()
            await asyncio.sleep(4.0)  # > window + grace
            assert _totals(svc.snapshots(), "ap") == (0, 0), "counted before its transaction committed"
            await p.commit_transaction()
        finally:
            await p.stop()

    asyncio.run(open_then_commit())
    wait_for(lambda: _totals(svc.snapshots(), "ap")[0] >= 4 or None, 30, what="the committed transaction counted")
    time.sleep(1.0)
    assert _totals(svc.snapshots(), "ap") == (4, 0)
    assert _totals(svc.snapshots(), "eu") == (5, 0)

    # records after the markers and the aborted batches, the states' offsets well before
    # them: the consumer read every offset between (docs/contract.md §4), nothing is lost
    async def after_the_markers() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="txn-test-a")
        await p.start()
        try:
            async with p.transaction():
                for region in ("eu", "us"):
                    for i in range(2):
                        await p.send(CLICKS, value(region, 200 + i), key=region.encode(), partition=homes[region])
        finally:
            await p.stop()

    asyncio.run(after_the_markers())
    wait_for(lambda: (_totals(svc.snapshots(), "eu")[0] >= 7 and _totals(svc.snapshots(), "us")[0] >= 5) or None,
             30, what="the records after the markers counted")
    assert _totals(svc.snapshots(), "eu") == (7, 0) and _totals(svc.snapshots(), "us") == (5, 0)
    assert "clickstream_source_offsets_lost_total{" not in svc.metrics_text()
    assert "no longer in the log" not in svc.tail()
    assert svc.proc.poll() is None
