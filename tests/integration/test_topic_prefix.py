"""Two deployments on one broker, told apart by AGG_TOPIC_PREFIX alone: each is fed by its
own `aggregator gen --kafka` and audited exactly by its own `aggregator audit --kafka`, and
the broker holds the prefixed topics and groups only (the embedded broker creates any topic
a client asks metadata of: an unprefixed name asked anywhere would show).  The names and
the checks: tests/unit/test_topic_prefix.py; prefixed ACLs on Kafka: test_kafka_security.py."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.core.topics import Topics
from tools.harness import REPO, wait_for

WINDOW_S = "2"  # Service.DEFAULTS
# the same regions (gen names them alike) with other counts: mixed topics would not audit
DEPLOYMENTS = {"team-a.": 21, "team_b-": 22}  # prefix -> gen's seed


def aggregator(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "aggregator", *args], env=full, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def topics_and_groups(bootstrap: str) -> tuple[set[str], set[str]]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def ask() -> tuple[set[str], set[str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:
            topics = {t for t in await admin.list_topics() if not t.startswith("__")}
            groups = {g[0] for g in await admin.list_consumer_groups()}
        finally:
            await admin.close()
        return topics, groups

    return asyncio.run(ask())


@pytest.mark.integration
def test_two_prefixed_deployments_on_one_broker_share_nothing(broker, service_factory, tmp_path: Path) -> None:
    services = {prefix: service_factory(f"svc-{seed}", AGG_TOPIC_PREFIX=prefix, AGG_PARTITIONS="2")
                for prefix, seed in DEPLOYMENTS.items()}
    for svc in services.values():
        svc.start(wait_ready=None)
    for svc in services.values():
        svc.wait_ready(90)

    truths: dict[str, Path] = {}
    for i, (prefix, seed) in enumerate(DEPLOYMENTS.items()):
        truths[prefix] = tmp_path / f"truth-{seed}.json"
        # the prefix as a flag for one, as the variable for the other
        flag, env = (("--topic-prefix", prefix), {}) if i == 0 else ((), {"AGG_TOPIC_PREFIX": prefix})
        res = aggregator("gen", "--kafka", broker.bootstrap, *flag, "--count", "500", "--rate", "0", "--regions",
                         "4", "--seed", str(seed), "--window-seconds", WINDOW_S, "--truth", str(truths[prefix]),
                         env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(truths[prefix].read_text())["accepted"] == 500

    for i, (prefix, svc) in enumerate(services.items()):
        flag, env = ((), {"AGG_TOPIC_PREFIX": prefix}) if i == 0 else (("--topic-prefix", prefix), {})
        res = aggregator("audit", "--kafka", broker.bootstrap, *flag, "--truth", str(truths[prefix]), "--wait", "40",
                         env=env, timeout=90)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + svc.tail()
        assert "match the ground truth exactly" in res.stdout
        svc.check_alive()
        # the snapshot view's history reads this deployment's snapshots (it asks no metadata of a
        # topic by name, so the topic list below would not show a wrong one)
        loaded = f"recent snapshots loaded from {prefix}click-snapshots"
        wait_for(lambda: loaded in svc.tail(400_000), 15, what=f"{loaded!r} in the log of {prefix}")  # noqa: B023
    # each deployment's snapshots are its own: one's truth against the other's topic fails
    a, b = DEPLOYMENTS
    res = aggregator("audit", "--kafka", broker.bootstrap, "--topic-prefix", b, "--truth", str(truths[a]))
    assert res.returncode == 1 and "AUDIT FAILED" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]

    topics, groups = topics_and_groups(broker.bootstrap)
    want = {name for prefix in DEPLOYMENTS for name in Topics(prefix).topics()}
    assert topics == want, f"unexpected {sorted(topics - want)}, missing {sorted(want - topics)}"
    assert groups == {Topics(prefix).app_id for prefix in DEPLOYMENTS}
