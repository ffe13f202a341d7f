"""The configs of topics `run` finds, judged against what the service needs
(aggregator/broker/topiccheck.py; the run against a real Kafka is in
tests/integration/test_topic_configs.py)."""
from __future__ import annotations

from aggregator.broker.topiccheck import judge
from aggregator.core.contract import CLICKS, CLICKS_REPARTITION, STATE_CHANGELOG

GOOD = {CLICKS: {"cleanup.policy": "delete", "retention.ms": "604800000", "max.message.bytes": "1048588",
                 "message.timestamp.type": "LogAppendTime"},
        CLICKS_REPARTITION: {"cleanup.policy": "delete", "retention.ms": "604800000"},
        STATE_CHANGELOG: {"cleanup.policy": "compact", "max.message.bytes": "1048588"}}


def with_(topic: str, **changes: str) -> dict:
    return {t: dict(c, **(changes if t == topic else {})) for t, c in GOOD.items()}


def test_what_the_service_creates_passes_quietly():
    assert judge(GOOD, {CLICKS: 3, STATE_CHANGELOG: 3}, 3, worker=True) == (None, [])
    assert judge({}, {}, 1, worker=True) == (None, [])  # nothing described (no right): nothing judged


def test_a_changelog_that_is_not_compacted_is_refused_for_a_worker_only():
    configs = with_(STATE_CHANGELOG, **{"cleanup.policy": "delete"})
    problem, _ = judge(configs, {}, 1, worker=True)
    assert problem is not None and problem.startswith(f"topic {STATE_CHANGELOG} has cleanup.policy=delete: the "
                                                      "window state must be compacted")
    assert judge(configs, {}, 1, worker=False) == (None, [])  # ingest never reads it
    problem, warnings = judge(with_(STATE_CHANGELOG, **{"cleanup.policy": "compact,delete", "retention.ms": "86400000"}),
                              {}, 1, worker=True)
    assert problem is None and warnings == [
        f"topic {STATE_CHANGELOG} has cleanup.policy=compact,delete: retention (retention.ms=86400000) can remove "
        "the latest state of a partition not written since, its counts with it: prefer compact alone"]
    problem, _ = judge(with_(STATE_CHANGELOG, **{"max.message.bytes": "100000"}), {}, 1, worker=True)
    assert problem == (f"topic {STATE_CHANGELOG} has max.message.bytes=100000: the window state is written in "
                       "records of up to 524288 bytes, which it would refuse: raise it")


def test_short_retention_small_messages_create_time_and_thin_replicas_are_warned_of():
    configs = with_(CLICKS, **{"retention.ms": "3600000", "max.message.bytes": "500000",
                               "message.timestamp.type": "CreateTime"})
    problem, warnings = judge(configs, {CLICKS: 1, STATE_CHANGELOG: 3}, 5, worker=True)
    assert problem is None
    assert warnings == [
        f"topic {CLICKS} keeps records 1 h (retention.ms): a partition uncounted longer (a worker down, a spill "
        "backlog draining) loses the events deleted meanwhile; keep a day or more",
        f"topic {CLICKS} has max.message.bytes=500000: ingest writes record batches of up to 1048576 bytes, which "
        "it would refuse: raise it to 1048588",
        f"topic {CLICKS} has message.timestamp.type=CreateTime: records produced straight to it without ingest_ts "
        "are stamped with the time a worker reads them, and a log that started over is noticed later "
        "(contract §1, §4); LogAppendTime is better",
        f"topics {CLICKS} have fewer replicas than the cluster's 5 brokers allow (up to 3): a broker lost loses "
        "their records; AGG_TOPIC_REPLICATION_FACTOR sets it for the topics the service creates"]
    # retention -1 (forever): no retention warning; a compacted clicks: one of its own
    assert judge(with_(CLICKS, **{"retention.ms": "-1"}), {}, 1, worker=True) == (None, [])
    assert judge(with_(CLICKS, **{"cleanup.policy": "compact"}), {}, 1, worker=True) == (None, [
        f"topic {CLICKS} is compacted (cleanup.policy=compact): its records are keyed by region, so compaction "
        "keeps the last of each region and events not counted yet (a backlog, a spill rebuild) are lost: use "
        "cleanup.policy=delete"])


def test_only_what_the_broker_says_is_judged():
    """The embedded broker (Tansu) describes only the configs a topic was created with: a
    changelog without a cleanup.policy in its answer is not taken for a deleting one."""
    assert judge({STATE_CHANGELOG: {"min.insync.replicas": "2"}}, {}, 1, worker=True) == (None, [])
    # compact,delete with retention -1 deletes nothing
    assert judge(with_(STATE_CHANGELOG, **{"cleanup.policy": "compact,delete", "retention.ms": "-1"}), {}, 1,
                 worker=True) == (None, [])
    # one broker: one replica is all there can be
    assert judge(GOOD, {CLICKS: 1}, 1, worker=True) == (None, [])
