"""Topic set-up shared by every broker (embedded or Apache Kafka)."""
from __future__ import annotations

import asyncio

from aggregator.broker.embedded import BrokerError
from aggregator.core.contract import CLICKS, DLQ, SNAPSHOTS


async def ensure_topics(bootstrap: str, partitions: int, retries: int = 30) -> None:
    """Create ``clicks``, ``clicks-dlq`` and ``click-snapshots`` with explicit configs.

    ``clicks`` asks for ``LogAppendTime``; brokers that ignore it are handled
    by the worker (it stamps the read time, docs/contract.md §1)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    specs = [
        NewTopic(CLICKS, partitions, 1, topic_configs={
            "message.timestamp.type": "LogAppendTime", "retention.ms": "604800000",
            "cleanup.policy": "delete"}),
        NewTopic(DLQ, 1, 1, topic_configs={"retention.ms": "604800000", "cleanup.policy": "delete"}),
        NewTopic(SNAPSHOTS, 1, 1, topic_configs={"retention.ms": "604800000", "cleanup.policy": "delete"}),
    ]
    last: Exception | None = None
    for _ in range(retries):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            todo = [t for t in specs if t.name not in existing]
            if todo:
                resp = await admin.create_topics(todo)
                for name, code, *_ in getattr(resp, "topic_errors", []):
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise BrokerError(f"cannot create topic {name}: error code {code}")
            return
        except BrokerError:
            raise
        except Exception as exc:  # noqa: BLE001 - broker not up yet: retry
            last = exc
            await asyncio.sleep(0.5)
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001
                pass
    raise BrokerError(f"cannot reach broker {bootstrap} to create topics: {last}")


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """The number of partitions of each of ``topics`` that exists.  Asks for every topic's
    metadata: a metadata request naming a topic makes brokers with automatic topic
    creation (the embedded one) create it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        described = await admin.describe_topics(None)
    finally:
        await admin.close()
    wanted = set(topics)
    return {t["topic"]: len(t["partitions"]) for t in described
            if t["topic"] in wanted and t["error_code"] == 0 and t["partitions"]}
