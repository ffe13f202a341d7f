"""The service against Apache Kafka configured like a managed cluster: a SASL_SSL listener
with SCRAM-SHA-512 and a certificate from a throwaway CA made here (scripts/kafka.sh
--sasl-ssl).  Every Kafka client of ``aggregator run`` (admin, Faust consumer, producer and
changelog, ingest producer, snapshot history), ``gen --kafka`` and ``audit --kafka`` log in
over it; a wrong password or an untrusted certificate ends ``run`` at once, in one line.

Runs under ``make test-kafka`` only (it starts an Apache Kafka of its own, like
``stoppable_broker``); the unit side of the settings is tests/unit/broker/test_security.py."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.broker import ensure_topics
from aggregator.broker.security import KafkaSecurity
from aggregator.core.contract import (
    APP_ID,
    CLICKS,
    CLICKS_REPARTITION,
    DLQ,
    LEADER_TOPIC,
    SNAPSHOTS,
    STATE_CHANGELOG,
)
from aggregator.core.topics import Topics
from tests.conftest import require_tool
from tests.integration.conftest import ON_REAL_KAFKA, Service
from tests.integration.kafka_flows import Counts, aggregator, gen_and_audit, post, wait_counted
from tools.harness import wait_for
from tools.kafka import SaslSsl, ScriptKafka, make_test_ca

pytestmark = pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs Apache Kafka (make test-kafka: AGG_TEST_BROKER=kafka)")

USER, PASSWORD = "aggregator", "scram-secret-1"  # a super user (the authorizer is on)
APP, APP_PASSWORD = "clicks-app", "scram-secret-2"  # may do what its ACLs allow, no more
INGEST, INGEST_PASSWORD = "clicks-ingest", "scram-secret-3"  # likewise
NO_GROUP, NO_GROUP_PASSWORD = "clicks-no-group", "scram-secret-4"  # likewise
TEAM, TEAM_PASSWORD = "team-a-app", "scram-secret-5"  # ACLs on names under its prefix only
TEAM_PREFIX = "team-a."


class SecureKafka:
    def __init__(self, kafka: ScriptKafka, cafile: Path) -> None:
        self.kafka = kafka
        self.cafile = cafile
        self.bootstrap = kafka.sasl_bootstrap

    def security(self) -> KafkaSecurity:
        return KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER,
                             sasl_password=PASSWORD, ssl_cafile=str(self.cafile))

    def env(self, password: str = PASSWORD, cafile: bool = True, user: str = USER) -> dict[str, str]:
        """The AGG_* security settings of a client of this broker."""
        env = {"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
               "AGG_KAFKA_SASL_USERNAME": user, "AGG_KAFKA_SASL_PASSWORD": password}
        if cafile:
            env["AGG_KAFKA_SSL_CAFILE"] = str(self.cafile)
        return env


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    require_tool("openssl", "apt-get install openssl")  # the throwaway CA: fails under CI when missing
    base = tmp_path_factory.mktemp("sasl-kafka")
    ca = make_test_ca(base / "ca")
    kafka = ScriptKafka(base_dir=str(base),
                        sasl=SaslSsl(ca, {USER: PASSWORD, APP: APP_PASSWORD, INGEST: INGEST_PASSWORD,
                                     NO_GROUP: NO_GROUP_PASSWORD, TEAM: TEAM_PASSWORD},
                                     super_users=(USER,))).start()
    try:
        yield SecureKafka(kafka, ca.ca)
    finally:
        kafka.stop()


def topic_config(kafka: SecureKafka, topic: str, name: str) -> dict:
    """The DescribeConfigs entry of ``name`` for ``topic`` (asked over SASL_SSL)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def ask() -> dict:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka.security().aiokafka_kwargs())
        await admin.start()
        try:
            [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {name: None})])
        finally:
            await admin.close()
        [resource] = resp.to_object()["resources"]
        return next(e for e in resource["config_entries"] if e["config_names"] == name)

    return asyncio.run(ask())


@pytest.mark.parametrize(("case", "says"), [
    ("wrong password", f'refused the SASL login for user "{USER}" (SCRAM-SHA-512): check '
                       "AGG_KAFKA_SASL_USERNAME / AGG_KAFKA_SASL_PASSWORD"),
    ("unknown CA", "its TLS certificate is not trusted"),
])
def test_a_refused_login_ends_run_in_one_line(secure_kafka: SecureKafka, tmp_path: Path, case: str,
                                               says: str) -> None:
    env = secure_kafka.env(password="not-the-password") if case == "wrong password" else secure_kafka.env(cafile=False)
    env.update(AGG_BROKER=f"kafka://{secure_kafka.bootstrap}", AGG_DATA_DIR=str(tmp_path), AGG_WEB_PORT="0")
    started = time.monotonic()
    res = aggregator("run", env=env, timeout=60)
    took = time.monotonic() - started
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: Kafka at {secure_kafka.bootstrap}"), res.stderr
    assert says in lines[0]
    assert "Traceback" not in res.stdout + res.stderr and "HTTP on" not in res.stdout
    assert took < 15, f"took {took:.1f}s"


def test_service_gen_and_audit_over_sasl_ssl(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    url = f"kafka://{secure_kafka.bootstrap}"
    svc = Service(url, tmp_path / "svc", AGG_TOPIC_MIN_INSYNC_REPLICAS="1", **secure_kafka.env())
    try:
        svc.start(wait_ready=60)
        # the topics it created (the changelog too) carry AGG_TOPIC_MIN_INSYNC_REPLICAS as their own
        # setting, not the broker's default
        for topic in (CLICKS, STATE_CHANGELOG):
            entry = topic_config(secure_kafka, topic, "min.insync.replicas")
            assert entry["config_value"] == "1", entry
            assert entry["config_source"] == 1, entry  # DYNAMIC_TOPIC_CONFIG (broker default: 4 or 5)

        # events over HTTP: counted exactly, per region and window
        http_counts: Counts = {}
        for i, (region, n) in enumerate([("eu-west", 30), ("us-east", 12), ("eu-west", 5)]):
            post(svc, http_counts, f"http-{i}", region, n)
        wait_counted(svc, http_counts, 30, what="the HTTP events counted in published snapshots")

        # gen --kafka produces over SASL_SSL; audit --kafka reads click-snapshots over it
        all_truth = gen_and_audit(secure_kafka.bootstrap, tmp_path, svc, http_counts, secure_kafka.env(),
                                  secure_kafka.env())

        # and audit --kafka with a wrong password: one line, no traceback
        res = aggregator("audit", "--kafka", secure_kafka.bootstrap, "--truth", str(all_truth),
                         env=secure_kafka.env(password="nope"), timeout=60)
        assert res.returncode != 0
        assert "refused the SASL login" in res.stderr
        svc.check_alive()
    finally:
        svc.stop()


# Kafka's ACL codes (CreateAcls): resource, pattern, operation and permission types
TOPIC, GROUP, LITERAL, PREFIXED, ALLOW = 2, 3, 3, 4, 3
READ, WRITE, CREATE, DESCRIBE = 3, 4, 5, 8
# the README's ACL table, `--role all` (ingest and worker), the topics made by a platform team:
# no Create, and no Describe where Read or Write is granted (they imply it)
ALL_ROLE_ACLS = [(TOPIC, CLICKS, READ), (TOPIC, CLICKS, WRITE), (TOPIC, CLICKS_REPARTITION, READ),
                 (TOPIC, CLICKS_REPARTITION, WRITE), (TOPIC, DLQ, WRITE), (TOPIC, SNAPSHOTS, READ),
                 (TOPIC, SNAPSHOTS, WRITE), (TOPIC, STATE_CHANGELOG, READ), (TOPIC, STATE_CHANGELOG, WRITE),
                 (TOPIC, LEADER_TOPIC, READ), (GROUP, APP_ID, READ)]


def grant(kafka: ScriptKafka, user: str, acls: list[tuple[int, str, int]], pattern: int = LITERAL) -> None:
    """ACLs allowing ``user`` these (resource type, name, operation), made over the PLAINTEXT
    listener (a super user there); ``pattern`` PREFIXED: on every name that begins with it."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.admin import CreateAclsRequest

    async def send() -> None:
        client = AIOKafkaClient(bootstrap_servers=kafka.bootstrap)
        await client.bootstrap()
        try:
            node = next(iter(client.cluster.brokers())).nodeId
            for rt, name, op in acls:  # aiokafka's request carries one
                resp = await client.send(node, CreateAclsRequest(rt, name, pattern, f"User:{user}", "*", op, ALLOW))
                assert [r[0] for r in resp.creation_responses] == [0], (name, op, resp)
        finally:
            await client.close()

    asyncio.run(send())


def test_run_counts_with_the_documented_acls_and_no_create_right(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    """A managed cluster's platform team made the topics; the service's principal has the
    ACLs of the README's table and no Create.  Before, Faust asked to create the changelog
    and its leader topic at every start (they existed), Kafka refused it, and the worker
    stopped with TopicAuthorizationFailedError; now `run` makes every topic, and finds them."""
    asyncio.run(ensure_topics(secure_kafka.kafka.bootstrap, 4, worker=True))  # as a super user
    grant(secure_kafka.kafka, APP, ALL_ROLE_ACLS)
    svc = Service(f"kafka://{secure_kafka.bootstrap}", tmp_path / "svc",
                  **secure_kafka.env(user=APP, password=APP_PASSWORD))
    try:
        svc.start(wait_ready=90)
        counts: Counts = {}
        for region, n in {"acl-north": 21, "acl-south": 8}.items():
            post(svc, counts, region, region, n)
        wait_counted(svc, counts, 45, what="the events counted in published snapshots")
        svc.check_alive()
        log = svc.tail(400_000)
        assert "AuthorizationFailed" not in log and "Traceback" not in log, log[-4000:]
    finally:
        svc.stop()


def test_ingest_refused_its_writes_says_so_in_each_answer_and_readyz(secure_kafka: SecureKafka,
                                                                      tmp_path: Path) -> None:
    """A principal that may describe the topics but not write to ``clicks``: before, every
    POST was a 503 "did not acknowledge ... in time" and /readyz stayed 200.  Now the answer
    and /readyz name the refusal (one error line in the log), until a write is allowed."""
    from tools.harness import http

    asyncio.run(ensure_topics(secure_kafka.kafka.bootstrap, 4))  # made in advance, as a super user
    grant(secure_kafka.kafka, INGEST, [(TOPIC, t, DESCRIBE) for t in (CLICKS, CLICKS_REPARTITION, DLQ, SNAPSHOTS)])
    svc = Service(f"kafka://{secure_kafka.bootstrap}", tmp_path / "ingest", AGG_ROLE="ingest",
                  **secure_kafka.env(user=INGEST, password=INGEST_PASSWORD))
    says = (f"the broker refuses ingest's writes to {CLICKS} (TopicAuthorizationFailedError): grant this "
            f"principal Write on topic {CLICKS} (README, ACLs)")
    try:
        svc.start(wait_ready=60)
        for _ in range(2):
            status, _, ans = svc.post([{"region": "acl-east"}] * 3)
            assert (status, ans) == (503, {"error": says}), ans
        status, _, raw = http("GET", svc.url + "/readyz")
        assert (status, json.loads(raw)["reason"]) == (503, says)
        assert svc.tail(400_000).count(f"ingest: {says}") == 1  # one line, not one a request
        grant(secure_kafka.kafka, INGEST, [(TOPIC, CLICKS, WRITE)])

        def accepted() -> dict | None:
            status, _, ans = svc.post([{"region": "acl-east"}] * 3)
            return ans if status == 200 else None

        assert wait_for(accepted, 30, interval=1.0, what="a POST accepted once Write is granted")["accepted"] == 3
        assert http("GET", svc.url + "/readyz")[0] == 200
        assert "takes ingest's writes to clicks again" in svc.tail(400_000)
    finally:
        svc.stop()


def test_a_worker_refused_its_consumer_group_says_so_instead_of_waiting(secure_kafka: SecureKafka,
                                                                      tmp_path: Path) -> None:
    """No Read on the group: aiokafka keeps the GroupAuthorizationFailedError for a caller
    that never comes before an assignment, and the worker waited without a word (/readyz
    "starting", nothing logged).  Now /readyz and /healthz say why (one error line), so a
    liveness check restarts it until the right is granted."""
    from tools.harness import http

    asyncio.run(ensure_topics(secure_kafka.kafka.bootstrap, 4, worker=True))
    grant(secure_kafka.kafka, NO_GROUP, [a for a in ALL_ROLE_ACLS if a[0] != GROUP])
    svc = Service(f"kafka://{secure_kafka.bootstrap}", tmp_path / "svc",
                  **secure_kafka.env(user=NO_GROUP, password=NO_GROUP_PASSWORD))
    says = (f"the broker refuses this worker's consumer group {APP_ID} (GroupAuthorizationFailedError): grant this "
            "principal the ACLs of the README's table (Read on the group, Read and Write on the topics), then "
            "restart it")
    try:
        svc.start(wait_ready=None)

        def refused() -> bool:
            svc.check_alive()
            try:
                status, _, raw = http("GET", svc.url + "/readyz")
            except OSError:
                return False
            return status == 503 and json.loads(raw)["reason"] == says

        wait_for(refused, 60, what="/readyz naming the refused group")
        status, _, raw = http("GET", svc.url + "/healthz")
        assert status == 503 and says in raw.decode(), raw
        assert svc.tail(400_000).count(says) == 1  # one error line
    finally:
        svc.stop()


def test_run_counts_with_prefixed_acls_only(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    """A managed cluster that grants a team topics and groups under its prefix only (PREFIXED
    ACLs on ``team-a.``): with AGG_TOPIC_PREFIX=team-a. the service creates its topics there,
    joins group ``team-a.clickstream-aggregator`` and counts end to end; gen --kafka and
    audit --kafka, given the same prefix, write and read there too.  Any unprefixed name it
    asked for (the other tests' topics exist) would be refused: nothing is."""
    t = Topics(TEAM_PREFIX)
    grant(secure_kafka.kafka, TEAM, [(TOPIC, TEAM_PREFIX, op) for op in (READ, WRITE, CREATE)]
          + [(GROUP, TEAM_PREFIX, READ)], pattern=PREFIXED)
    env = {**secure_kafka.env(user=TEAM, password=TEAM_PASSWORD), "AGG_TOPIC_PREFIX": TEAM_PREFIX}
    svc = Service(f"kafka://{secure_kafka.bootstrap}", tmp_path / "svc", **env)
    try:
        svc.start(wait_ready=90)
        for topic, policy in ((t.clicks, "delete"), (t.state_changelog, "compact")):  # made by the service
            assert topic_config(secure_kafka, topic, "cleanup.policy")["config_value"] == policy
        counts: Counts = {}
        for region, n in {"team-north": 17, "team-south": 6}.items():
            post(svc, counts, region, region, n)
        wait_counted(svc, counts, 45, what="the HTTP events counted in published snapshots")
        gen_and_audit(secure_kafka.bootstrap, tmp_path, svc, counts, env, env, n=300, regions=3)
        svc.check_alive()
        log = svc.tail(400_000)
        assert "AuthorizationFailed" not in log and "Traceback" not in log, log[-4000:]
    finally:
        svc.stop()
