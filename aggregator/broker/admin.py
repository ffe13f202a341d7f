"""Topic set-up shared by every broker (embedded or Apache Kafka)."""
from __future__ import annotations

import asyncio
from typing import Any

from aggregator.broker.embedded import BrokerError
from aggregator.broker.security import PLAINTEXT, KafkaSecurity, TokenUnavailable, check_login
from aggregator.core.topics import DEFAULT, Topics

VISIBLE_WAIT_S = 10.0  # how long topics just created may take to show in the broker's metadata


async def ensure_topics(bootstrap: str, partitions: int, retries: int = 30, *,
                        security: KafkaSecurity = PLAINTEXT, replication_factor: int = 1,
                        min_insync_replicas: int = 0, worker: bool = False,
                        errors: list[Exception] | None = None, topics: Topics = DEFAULT) -> None:
    """Create ``clicks``, ``clicks-dlq``, ``click-snapshots`` and ``clicks-repartition``
    (``worker``: and the worker's window-state changelog, compacted, and Faust's leader
    topic, which Faust itself is not let create: it would ask to create them even where they
    exist, which a principal without CREATE is refused) with explicit configs,
    ``replication_factor`` replicas each and, when > 0, ``min.insync.replicas``.
    ``clicks-repartition`` and the changelog get as many partitions as ``clicks`` has
    (which may differ from ``partitions`` when it exists already); when
    ``clicks-repartition`` exists with another count, ``BrokerError`` says so (a region's
    home is its partition in both).  Each failed try's error is appended to ``errors``.

    ``clicks`` asks for ``LogAppendTime``; brokers that ignore it are handled
    by the worker (it stamps the read time, docs/contract.md §1).  A refused login or an
    untrusted broker certificate raises ``KafkaLoginError`` at once (no retries); an OAuth
    token endpoint not up (``TokenUnavailable``) is retried like the broker.  The names
    are those of ``topics`` (AGG_TOPIC_PREFIX before each)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    clicks, repart = topics.clicks, topics.clicks_repartition
    common = {"retention.ms": "604800000", "cleanup.policy": "delete"}
    if min_insync_replicas > 0:
        common["min.insync.replicas"] = str(min_insync_replicas)
    specs = [
        NewTopic(clicks, partitions, replication_factor,
                 topic_configs={"message.timestamp.type": "LogAppendTime", **common}),
        NewTopic(topics.dlq, 1, replication_factor, topic_configs=dict(common)),
        NewTopic(topics.snapshots, 1, replication_factor, topic_configs=dict(common)),
    ]
    last: Exception | None = None
    for _ in range(retries):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                    **security.aiokafka_kwargs())
        try:
            await check_login(bootstrap, security)
            await admin.start()
            existing = set(await admin.list_topics())
            counts = _counts(await admin.describe_topics([t for t in (clicks, repart)
                                                          if t in existing])) if existing else {}
            if clicks in existing and clicks not in counts:  # listed, not described (yet): the count decides
                raise ConnectionError(f"{clicks} exists but was not described")  # the changelog's: try again
            n = counts.get(clicks, partitions)
            if repart in counts and counts[repart] != n:
                raise BrokerError(
                    f"{repart} has {counts[repart]} partitions but {clicks} has {n}: a "
                    f"region's home partition is the same in both; once every window is published and "
                    f"{repart} is consumed, delete it (it is created again with {n})")
            forwarded = NewTopic(repart, n, replication_factor, topic_configs=dict(common))
            insync = {k: v for k, v in common.items() if k == "min.insync.replicas"}
            compact = {"cleanup.policy": "compact", **insync}
            faust = [NewTopic(topics.state_changelog, n, replication_factor, topic_configs=compact),
                     NewTopic(topics.leader_topic, 1, replication_factor, topic_configs=dict(insync))] if worker else []
            todo = [t for t in [*specs, forwarded, *faust] if t.name not in existing]
            if todo:
                resp = await admin.create_topics(todo)
                for name, code, *_ in getattr(resp, "topic_errors", []):
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise BrokerError(f"cannot create topic {name} (replication factor {replication_factor}"
                                          f"{f', min.insync.replicas {min_insync_replicas}' if min_insync_replicas else ''}"
                                          f"): {for_code(code).__name__} ({_message(resp, name) or code})")
                await _visible(admin, [t.name for t in todo])
            return
        except Exception as exc:  # broker (or token endpoint) not up yet: retry
            if isinstance(exc, BrokerError) and not isinstance(exc, TokenUnavailable):
                raise
            last = exc
            if errors is not None:
                errors.append(exc)
                del errors[:-1]
            await asyncio.sleep(0.5)
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001
                pass
    via = "" if security.protocol == "PLAINTEXT" else f" over {security.describe()}"
    raise BrokerError(f"cannot reach broker {bootstrap}{via} to create topics: {last}")


async def _visible(admin: Any, names: list[str]) -> None:
    """Until the broker's metadata has each of ``names`` with its partitions (at most
    VISIBLE_WAIT_S): Kafka answers CreateTopics before its metadata shows the topics, and
    `run` counts their partitions next (two deployments creating theirs at once: ~0.1 s)."""
    deadline = asyncio.get_running_loop().time() + VISIBLE_WAIT_S
    while not set(names) <= set(_counts(await admin.describe_topics(names))):
        if asyncio.get_running_loop().time() > deadline:
            return  # the partition check that follows says what is missing
        await asyncio.sleep(0.1)


def _counts(described: list) -> dict[str, int]:
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0 and t["partitions"]}


def _message(resp: object, topic: str) -> str:
    """The broker's error message for ``topic`` in a CreateTopics response (v1+), or ''."""
    for row in getattr(resp, "topic_errors", []):
        if row[0] == topic and len(row) > 2 and row[2]:
            return str(row[2])
    return ""


async def partition_counts(bootstrap: str, topics: list[str], *,
                           security: KafkaSecurity = PLAINTEXT) -> dict[str, int]:
    """The number of partitions of each of ``topics`` that exists.  Asks for every topic's
    metadata: a metadata request naming a topic makes brokers with automatic topic
    creation (the embedded one) create it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **security.aiokafka_kwargs())
    await admin.start()
    try:
        described = await admin.describe_topics(None)
    finally:
        await admin.close()
    wanted = set(topics)
    return {k: v for k, v in _counts(described).items() if k in wanted}
