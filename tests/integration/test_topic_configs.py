"""Topics a platform team made, found by `aggregator run` on Apache Kafka: a changelog that
is not compacted refuses the start in one line (the window state would be deleted by
retention); a short retention and CreateTime on ``clicks`` are warned of, once each, and
the start goes on (aggregator/broker/topiccheck.py; the rules: tests/unit/broker/)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from aggregator.core.contract import CLICKS, CLICKS_REPARTITION, DLQ, LEADER_TOPIC, SNAPSHOTS, STATE_CHANGELOG
from tests.integration.conftest import ON_REAL_KAFKA
from tools.harness import REPO

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not ON_REAL_KAFKA, reason="DescribeConfigs of real Kafka (make test-kafka)")]


def make_topics(bootstrap: str, changelog_policy: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    hour = {"retention.ms": "3600000"}
    specs = [NewTopic(CLICKS, 2, 1, topic_configs={"message.timestamp.type": "CreateTime", **hour}),
             NewTopic(CLICKS_REPARTITION, 2, 1, topic_configs=dict(hour)), NewTopic(DLQ, 1, 1),
             NewTopic(SNAPSHOTS, 1, 1), NewTopic(LEADER_TOPIC, 1, 1),
             NewTopic(STATE_CHANGELOG, 2, 1, topic_configs={"cleanup.policy": changelog_policy})]

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(specs)
        finally:
            await admin.close()

    asyncio.run(create())


def test_a_changelog_not_compacted_refuses_run_and_the_rest_is_warned_of(broker, tmp_path):
    bootstrap = broker.url.split("://")[1]
    make_topics(bootstrap, "delete")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    env.update(AGG_BROKER=broker.url, AGG_DATA_DIR=str(tmp_path / "data"), AGG_WEB_PORT="0")
    res = subprocess.run([sys.executable, "-m", "aggregator", "run"], env=env, cwd=str(REPO), capture_output=True,
                         text=True, timeout=90)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"error: topic {STATE_CHANGELOG} has cleanup.policy=delete: the window state must be compacted (its keys "
        "repeat; with delete the log grows without end and retention removes the latest state of a quiet "
        "partition, its counts with it): set cleanup.policy=compact"]
    warnings = [line for line in res.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: topic {t} keeps records 1 h (retention.ms): a partition uncounted longer (a worker down, a "
        "spill backlog draining) loses the events deleted meanwhile; keep a day or more"
        for t in (CLICKS, CLICKS_REPARTITION)] + [
        f"warning: topic {CLICKS} has message.timestamp.type=CreateTime: records produced straight to it without "
        "ingest_ts are stamped with the time a worker reads them, and a log that started over is noticed later "
        "(contract §1, §4); LogAppendTime is better"], res.stdout
    assert "Traceback" not in res.stdout + res.stderr and "HTTP on" not in res.stdout
