"""Offsets of ``clicks`` deleted by retention while the worker was down (docs/contract.md §4,
"Offsets the log no longer holds"): on its restart the consumer's committed offset is out of
range and aiokafka resets it to the log's start, past the window state's offset.  The
worker tells that jump from the offsets it read (worker/consumer.py ``note_read``): it reads
the partition again from the state's offset, is reset past it again, and reports the
offsets lost, once, with their number; what follows is counted.  Real Apache Kafka only
(DeleteRecords moves the log's start as retention does)."""
from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs Apache Kafka (make test-kafka: AGG_TEST_BROKER=kafka)")]


def _count(svc, region: str) -> int:
    return sum(s["count"] for s in svc.snapshots() if s["region"] == region)


def _lost(svc) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(svc.metrics_text())}
    fam = fams.get("clickstream_source_offsets_lost")
    return sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0.0


async def _produce(bootstrap: str, first: int, n: int) -> None:
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        for i in range(first, first + n):
            await p.send(CLICKS, orjson.dumps({"region": "eu", "user_id": f"u{i}"}), key=b"eu", partition=0)
        await p.flush()
    finally:
        await p.stop()


async def _delete_before(bootstrap: str, offset: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.records_to_delete import RecordsToDelete
    from aiokafka.structs import TopicPartition
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(CLICKS, 0): RecordsToDelete(before_offset=offset)},
                                   timeout_ms=10000)
    finally:
        await admin.close()


@pytest.mark.parametrize("gone", [1, 30])  # one offset: no transaction marker (ingest's is not transactional)
def test_offsets_deleted_while_the_worker_was_down_are_said_lost_once(broker, service_factory, gone):
    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 1))
    svc = service_factory("gap", AGG_PARTITIONS="1")
    svc.start()
    asyncio.run(_produce(bootstrap, 0, 20))
    wait_for(lambda: _count(svc, "eu") >= 20 or None, 30, what="the first 20 counted")
    svc.stop()  # its state (offset 20) written, 20 committed
    asyncio.run(_produce(bootstrap, 20, gone))
    asyncio.run(_delete_before(bootstrap, 20 + gone))  # retention: never counted
    asyncio.run(_produce(bootstrap, 20 + gone, 5))
    svc.start()
    wait_for(lambda: _count(svc, "eu") >= 25 or None, 30, what="the 5 after the deleted ones counted")
    wait_for(lambda: _lost(svc) >= gone or None, 10, what="the deleted offsets reported lost")
    assert _count(svc, "eu") == 25 and _lost(svc) == gone
    said = [line for line in svc.tail().splitlines() if "no longer in the log" in line]
    assert len(said) == 1 and f"offsets 20..{19 + gone}" in said[0], said
    assert svc.proc.poll() is None
