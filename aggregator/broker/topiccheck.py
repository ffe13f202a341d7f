"""The configs of the topics ``aggregator run`` finds (made by a platform team, or by an
earlier version), against what the service needs (README, "If a platform team creates the
topics").  ``judge`` is pure; ``topic_facts`` asks the broker."""
from __future__ import annotations

from collections.abc import Mapping

from aggregator.broker.security import PLAINTEXT, KafkaSecurity
from aggregator.core.statechunks import MAX_RECORD_BYTES
from aggregator.core.topics import DEFAULT, Topics

RETENTION_FLOOR_MS = 24 * 3600 * 1000  # a worker down over a weekend night, a spill backlog draining
INGEST_BATCH_BYTES = 1 << 20  # ingest's record batches (ingest/producer.py), plus Kafka's batch overhead
BATCH_OVERHEAD = 12


def judge(configs: Mapping[str, Mapping[str, str]], replicas: Mapping[str, int], brokers: int,
          worker: bool, topics: Topics = DEFAULT) -> tuple[str | None, list[str]]:
    """-> (why `run` must not start, or None; what it should say, starting or not).
    ``configs``: topic -> its config (name -> value) as the broker describes it (topics it
    would not describe are left out); ``replicas``: topic -> replicas of its partitions;
    ``brokers``: how many brokers the cluster has; ``topics``: the names (AGG_TOPIC_PREFIX)."""
    warnings: list[str] = []
    problem: str | None = None
    changelog = configs.get(topics.state_changelog)
    if worker and changelog is not None and "cleanup.policy" in changelog:  # judged on what the broker says
        policy = {p.strip() for p in changelog["cleanup.policy"].split(",")}
        limit = _int(changelog.get("max.message.bytes"))
        if "compact" not in policy:
            problem = (f"topic {topics.state_changelog} has cleanup.policy={','.join(sorted(policy))}: the window state "
                       "must be compacted (its keys repeat; with delete the log grows without end and retention "
                       "removes the latest state of a quiet partition, its counts with it): set cleanup.policy=compact")
        elif limit is not None and limit < MAX_RECORD_BYTES + BATCH_OVERHEAD:
            problem = (f"topic {topics.state_changelog} has max.message.bytes={limit}: the window state is written in "
                       f"records of up to {MAX_RECORD_BYTES} bytes, which it would refuse: raise it")
        elif "delete" in policy and changelog.get("retention.ms") != "-1":
            warnings.append(f"topic {topics.state_changelog} has cleanup.policy=compact,delete: retention "
                            f"(retention.ms={changelog.get('retention.ms')}) can remove the latest state of a "
                            "partition not written since, its counts with it: prefer compact alone")
    for topic in (topics.clicks, topics.clicks_repartition):
        c = configs.get(topic)
        if c is None:
            continue
        if "compact" in c.get("cleanup.policy", ""):
            warnings.append(f"topic {topic} is compacted (cleanup.policy={c['cleanup.policy']}): its records are "
                            "keyed by region, so compaction keeps the last of each region and events not counted "
                            "yet (a backlog, a spill rebuild) are lost: use cleanup.policy=delete")
        retention = _int(c.get("retention.ms"))
        if retention is not None and 0 <= retention < RETENTION_FLOOR_MS and "delete" in c.get("cleanup.policy", ""):
            warnings.append(f"topic {topic} keeps records {retention / 3_600_000:g} h (retention.ms): a partition "
                            "uncounted longer (a worker down, a spill backlog draining) loses the events deleted "
                            "meanwhile; keep a day or more")
        limit = _int(c.get("max.message.bytes"))
        if limit is not None and limit < INGEST_BATCH_BYTES + BATCH_OVERHEAD:
            warnings.append(f"topic {topic} has max.message.bytes={limit}: "
                            + ("ingest writes" if topic == topics.clicks else "workers forward")
                            + f" record batches of up to {INGEST_BATCH_BYTES} bytes, which it would refuse: raise it "
                            "to 1048588")
    if configs.get(topics.clicks, {}).get("message.timestamp.type") == "CreateTime":
        warnings.append(f"topic {topics.clicks} has message.timestamp.type=CreateTime: records produced straight to it "
                        "without ingest_ts are stamped with the time a worker reads them, and a log that started "
                        "over is noticed later (contract §1, §4); LogAppendTime is better")
    thin = sorted(t for t, n in replicas.items() if n < min(3, brokers))
    if thin:
        warnings.append(f"topics {', '.join(thin)} have fewer replicas than the cluster's {brokers} brokers allow "
                        "(up to 3): a broker lost loses their records; AGG_TOPIC_REPLICATION_FACTOR sets it for the "
                        "topics the service creates")
    return problem, warnings


def _int(v: str | None) -> int | None:
    try:
        return None if v is None else int(v)
    except ValueError:
        return None


async def topic_facts(bootstrap: str, topics: list[str], *, security: KafkaSecurity = PLAINTEXT,
                      ) -> tuple[dict[str, dict[str, str]], dict[str, int], int]:
    """(topic -> config, for those of ``topics`` the broker describes; topic -> replicas of
    its first partition; the number of brokers).  A config the broker will not describe (no
    DescribeConfigs right, an old broker) is left out, not an error."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **security.aiokafka_kwargs())
    try:
        await admin.start()
        described = await admin.describe_topics(topics)
        replicas = {t["topic"]: len(t["partitions"][0]["replicas"]) for t in described
                    if t["error_code"] == 0 and t["partitions"]}
        brokers = len((await admin.describe_cluster())["brokers"])
        configs: dict[str, dict[str, str]] = {}
        try:
            resps = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in replicas])
        except Exception:  # noqa: BLE001 - not allowed, or not known to the broker: nothing to judge
            resps = []
        for resp in resps:
            for res in resp.to_object()["resources"]:
                if res["error_code"] == 0:
                    configs[res["resource_name"]] = {e["config_names"]: e["config_value"]
                                                     for e in res["config_entries"] if e["config_value"] is not None}
    finally:
        await admin.close()
    return configs, replicas, brokers


def check_topics(bootstrap: str, security: KafkaSecurity, worker: bool,
                 topics: Topics = DEFAULT) -> tuple[str | None, list[str]]:
    """``judge`` of the topics a role of ``aggregator run`` uses (``worker``: the changelog and
    the assignor topic too), as the broker describes them; a broker that cannot be asked
    gives a warning and no refusal."""
    import asyncio

    try:
        configs, replicas, brokers = asyncio.run(topic_facts(bootstrap, list(topics.topics(worker)),
                                                             security=security))
    except Exception as exc:  # noqa: BLE001 - a check, not a condition to start
        return None, [f"the topics' configs could not be checked ({type(exc).__name__}: {exc})"]
    return judge(configs, replicas, brokers, worker, topics)
