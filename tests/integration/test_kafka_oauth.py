"""The service logging in to Apache Kafka with SASL/OAUTHBEARER over SASL_SSL: a token
endpoint on loopback (tools/oauth_endpoint.py: the client-credentials grant, unsigned JWTs
with sub = the client id, a short lifetime) and a broker taking them (scripts/kafka.sh
--sasl-ssl --oauthbearer: Kafka's unsecured validator; connections.max.reauth.ms set, so
the broker ends each session when its token expires, and aiokafka, which cannot
re-authenticate, connects again with the token the provider has then).

Every Kafka client of ``aggregator run`` (admin, Faust consumer, producer and changelog,
ingest producer, snapshot history), ``gen --kafka`` (here with a token file) and ``audit
--kafka`` log in with tokens; events sent after several token lifetimes are still counted
exactly, so the refreshed tokens are the ones used.  A wrong client secret, a token file
that is missing, and a token the broker refuses each end ``run`` at start in one line; a
token endpoint failing at start is waited for (AGG_BROKER_WAIT_SECONDS).

Runs under ``make test-kafka`` only (it starts an Apache Kafka of its own, like
tests/integration/test_kafka_security.py); the unit side is tests/unit/broker/test_oauth*.py."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.conftest import ON_REAL_KAFKA, Service
from tests.integration.kafka_flows import Counts, aggregator, gen_and_audit, post, wait_counted
from tools.kafka import SaslSsl, ScriptKafka, make_test_ca
from tools.oauth_endpoint import TokenEndpoint, unsigned_jwt

pytestmark = pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs Apache Kafka (make test-kafka: AGG_TEST_BROKER=kafka)")

CLIENT, SECRET = "clicks-service", "client-secret-1"
LIFETIME_S = 15   # of each token: the broker ends a session when its token expires
REAUTH_MS = 60_000  # connections.max.reauth.ms: > 0 turns session expiry on (the token's is shorter)


@dataclass
class OAuthKafka:
    kafka: ScriptKafka
    endpoint: TokenEndpoint
    cafile: Path

    @property
    def bootstrap(self) -> str:
        return self.kafka.sasl_bootstrap

    def env(self, secret: str = SECRET) -> dict[str, str]:
        """The AGG_* settings of a client logging in with the token endpoint."""
        return {"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
                "AGG_KAFKA_SSL_CAFILE": str(self.cafile),
                "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": self.endpoint.url,
                "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": CLIENT, "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": secret,
                # as Confluent Cloud needs them; a broker that does not validate them ignores them
                "AGG_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster=lkc-test1,identityPoolId=pool-test1"}

    def file_env(self, token_file: Path) -> dict[str, str]:
        """The AGG_* settings of a client logging in with the token in ``token_file``."""
        return {"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
                "AGG_KAFKA_SSL_CAFILE": str(self.cafile), "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE": str(token_file)}


@pytest.fixture(scope="module")
def oauth_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthKafka]:
    require_tool("openssl", "apt-get install openssl")  # the throwaway CA: fails under CI when missing
    base = tmp_path_factory.mktemp("oauth-kafka")
    ca = make_test_ca(base / "ca")
    endpoint = TokenEndpoint({CLIENT: SECRET}, lifetime_s=LIFETIME_S).start_in_thread()
    try:
        kafka = ScriptKafka(base_dir=str(base), sasl=SaslSsl(ca, oauthbearer=True, reauth_ms=REAUTH_MS)).start()
        try:
            yield OAuthKafka(kafka, endpoint, ca.ca)
        finally:
            kafka.stop()
    finally:
        endpoint.stop_thread()


def refused_at_start(oauth_kafka: OAuthKafka, tmp_path: Path, env: dict[str, str]) -> str:
    """``aggregator run`` with ``env``: it must end at once with status 2 and one line; that line."""
    env = {**env, "AGG_BROKER": f"kafka://{oauth_kafka.bootstrap}", "AGG_DATA_DIR": str(tmp_path),
           "AGG_WEB_PORT": "0"}
    started = time.monotonic()
    res = aggregator("run", env=env, timeout=60)
    took = time.monotonic() - started
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "HTTP on" not in res.stdout
    assert took < 20, f"took {took:.1f}s"
    return lines[0]


def test_a_wrong_client_secret_ends_run_in_one_line(oauth_kafka: OAuthKafka, tmp_path: Path) -> None:
    line = refused_at_start(oauth_kafka, tmp_path, oauth_kafka.env(secret="not-the-secret"))
    assert line == (f'error: the OAuth token endpoint {oauth_kafka.endpoint.url} refused client "{CLIENT}" '
                    "(HTTP 401, invalid_client: Bad client credentials): check AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID / "
                    "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")


def test_a_missing_token_file_ends_run_in_one_line(oauth_kafka: OAuthKafka, tmp_path: Path) -> None:
    line = refused_at_start(oauth_kafka, tmp_path, oauth_kafka.file_env(tmp_path / "no-token"))
    assert line == f"error: AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE: cannot read {tmp_path / 'no-token'} " \
                   "(No such file or directory)"


def test_a_token_the_broker_refuses_ends_run_in_one_line(oauth_kafka: OAuthKafka, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(unsigned_jwt(CLIENT, -60) + "\n")  # expired a minute ago
    line = refused_at_start(oauth_kafka, tmp_path, oauth_kafka.file_env(token))
    assert line.startswith(f"error: Kafka at {oauth_kafka.bootstrap} refused the OAUTHBEARER token (SASL_SSL, "
                           f"OAUTHBEARER with the token in {token}; broker said: "), line
    assert "invalid_token" in line


def test_run_waits_for_a_token_endpoint_that_is_down_at_start(oauth_kafka: OAuthKafka, tmp_path: Path) -> None:
    """An identity provider failing (503) when `run` starts is asked again (2, 4, ... s apart)
    until AGG_BROKER_WAIT_SECONDS is over, as a broker not up yet is: down for the whole
    wait, `run` ends in one line naming the endpoint and the wait; up again within it, the
    service starts and counts."""
    flaky = TokenEndpoint({CLIENT: SECRET}, lifetime_s=LIFETIME_S,
                          fail_with=(503, {"error": "temporarily_unavailable"})).start_in_thread()
    try:
        env = {**oauth_kafka.env(), "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": flaky.url,
               "AGG_TOPIC_PREFIX": "token-wait."}  # its own topics and group on the module's Kafka
        line = refused_at_start(oauth_kafka, tmp_path / "down", {**env, "AGG_BROKER_WAIT_SECONDS": "3"})
        assert line == (f'error: the OAuth token endpoint {flaky.url} failed to answer client "{CLIENT}" '
                        "(HTTP 503, temporarily_unavailable): check AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL "
                        "(for 3 s, AGG_BROKER_WAIT_SECONDS)"), line
        assert flaky.requests >= 2 and not flaky.issued  # asked again within the wait

        asked = flaky.requests
        svc = Service(f"kafka://{oauth_kafka.bootstrap}", tmp_path / "up", **env, AGG_BROKER_WAIT_SECONDS="60")
        mended = threading.Timer(4, lambda: setattr(flaky, "fail_with", None))
        mended.start()
        try:
            svc.start(wait_ready=90)
            assert flaky.requests >= asked + 2 and flaky.issued  # refused at least once, then a token
            counts: Counts = {}
            post(svc, counts, "after-the-wait", "eu-west", 5)
            wait_counted(svc, counts, 30, what="events sent to a service that waited for its token")
        finally:
            mended.cancel()
            svc.stop()
    finally:
        flaky.stop_thread()


def test_the_broker_ends_a_session_when_its_token_expires(oauth_kafka: OAuthKafka) -> None:
    """What makes the service's later logins evidence of refreshed tokens: a session lives
    no longer than its token (aiokafka cannot re-authenticate, so the broker closes it)."""
    from aiokafka.abc import AbstractTokenProvider
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaConnectionError
    from aiokafka.protocol.metadata import MetadataRequest

    from aggregator.broker.security import KafkaSecurity

    class ShortLived(AbstractTokenProvider):
        async def token(self) -> str:
            return unsigned_jwt(CLIENT, 3)

    async def session_lifetime() -> float:
        tls = KafkaSecurity(protocol="SSL", ssl_cafile=str(oauth_kafka.cafile)).ssl_context
        host, port = oauth_kafka.bootstrap.rsplit(":", 1)
        conn = await create_conn(host, int(port), security_protocol="SASL_SSL", ssl_context=tls,
                                 sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=ShortLived())
        opened = time.monotonic()
        try:
            while time.monotonic() - opened < 15:
                await conn.send(MetadataRequest([]))
                await asyncio.sleep(0.5)
        except KafkaConnectionError:
            return time.monotonic() - opened
        finally:
            conn.close()
        raise AssertionError("the broker kept the session beyond its token's expiry")

    assert 1.5 < asyncio.run(session_lifetime()) < 6


def test_service_gen_and_audit_over_oauthbearer(oauth_kafka: OAuthKafka, tmp_path: Path) -> None:
    endpoint = oauth_kafka.endpoint
    url = f"kafka://{oauth_kafka.bootstrap}"
    svc = Service(url, tmp_path / "svc", **oauth_kafka.env())
    counts: Counts = {}

    try:
        before = len(endpoint.issued)
        svc.start(wait_ready=90)
        started = time.time()
        assert len(endpoint.issued) > before  # the service asked for its token
        post(svc, counts, "first", "eu-west", 30)
        post(svc, counts, "first", "us-east", 12)
        wait_counted(svc, counts, 30, what="the first HTTP events counted in published snapshots")

        # past three token lifetimes: every session the service opened with its first tokens
        # has been ended by the broker, so what it does now it does with refreshed tokens
        while time.time() < started + 3 * LIFETIME_S + 2:
            time.sleep(1)
            svc.check_alive()
        issued = [i for i in endpoint.issued if i.at >= started - 1]
        assert len(issued) >= 3, f"only {len(issued)} tokens issued in {time.time() - started:.0f}s"
        post(svc, counts, "later", "eu-west", 7)
        post(svc, counts, "later", "ap-south", 9)
        wait_counted(svc, counts, 40, what="the events sent after the first tokens expired, counted")
        svc.check_alive()

        # gen --kafka logs in with a token file; audit --kafka with the token endpoint
        token = tmp_path / "token"
        token.write_text(unsigned_jwt("clicks-gen", 600) + "\n")
        all_truth = gen_and_audit(oauth_kafka.bootstrap, tmp_path, svc, counts, oauth_kafka.file_env(token),
                                  oauth_kafka.env())

        # audit --kafka with a wrong secret: one line, no traceback
        res = aggregator("audit", "--kafka", oauth_kafka.bootstrap, "--truth", str(all_truth),
                         env=oauth_kafka.env(secret="nope"), timeout=60)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert f'refused client "{CLIENT}" (HTTP 401, invalid_client' in res.stderr
        svc.check_alive()
    finally:
        svc.stop()
