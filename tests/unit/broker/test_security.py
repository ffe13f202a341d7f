"""``KafkaSecurity`` (aggregator/broker/security.py): what each protocol hands to aiokafka
and to Faust, the settings' validation (one line per problem), the secrets read from
``AGG_*_FILE``, and ``check_login``'s verdict on a TLS server whose certificate is not
trusted (a real TLS listener on loopback, certificates from a throwaway CA).  The login to
a real Apache Kafka is in tests/integration/test_kafka_security.py."""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from aggregator import config, config_load
from aggregator.broker.security import PLAINTEXT, KafkaLoginError, KafkaSecurity, check_login
from tests.conftest import require_tool
from tools.kafka import ThrowawayCA, make_test_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    require_tool("openssl", "apt-get install openssl")  # fails under CI when missing
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def test_plaintext_changes_nothing() -> None:
    assert PLAINTEXT.aiokafka_kwargs() == {}
    assert PLAINTEXT.faust_settings() == {}
    assert PLAINTEXT.ssl_context is None
    assert config_load.load(env={}).kafka_security() == PLAINTEXT


def test_sasl_ssl_scram(ca: ThrowawayCA) -> None:
    sec = KafkaSecurity(protocol="sasl_ssl", sasl_mechanism="scram-sha-512", sasl_username="alice",
                        sasl_password="s3cret", ssl_cafile=str(ca.ca))
    kw = sec.aiokafka_kwargs()
    ctx = kw.pop("ssl_context")
    assert kw == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                  "sasl_plain_username": "alice", "sasl_plain_password": "s3cret"}
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # the throwaway CA is what the context trusts
    assert any("throwaway" in str(c.get("subject")) for c in ctx.get_ca_certs())
    # one context for every client, however often the settings are turned into a KafkaSecurity
    again = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="alice",
                          sasl_password="s3cret", ssl_cafile=str(ca.ca))
    assert again.ssl_context is ctx and again == sec
    # Faust turns its settings into exactly the same aiokafka arguments
    creds = sec.faust_settings()["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert credentials_to_aiokafka_auth(creds) == sec.aiokafka_kwargs()
    assert "s3cret" not in repr(sec) and "s3cret" not in repr(creds)


def test_sasl_plaintext_has_no_tls() -> None:
    sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    assert sec.aiokafka_kwargs() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                     "sasl_plain_username": "u", "sasl_plain_password": "p"}
    creds = sec.faust_settings()["broker_credentials"]
    assert credentials_to_aiokafka_auth(creds) == {**sec.aiokafka_kwargs(), "ssl_context": None}


def test_ssl_only_uses_the_system_trust_store_without_a_cafile() -> None:
    sec = KafkaSecurity(protocol="SSL")
    kw = sec.aiokafka_kwargs()
    assert set(kw) == {"security_protocol", "ssl_context"} and kw["security_protocol"] == "SSL"
    assert kw["ssl_context"].cert_store_stats()["x509_ca"] == ssl.create_default_context().cert_store_stats()["x509_ca"]
    creds = sec.faust_settings()["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(creds) == kw


@pytest.mark.parametrize(("env", "says"), [
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "TLS"}, "AGG_KAFKA_SECURITY_PROTOCOL / --kafka-security-protocol: expected one of "
     "PLAINTEXT, SSL"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_PASSWORD": "p"},
     "AGG_KAFKA_SASL_USERNAME / --kafka-sasl-username: required with AGG_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_USERNAME": "u"},
     "AGG_KAFKA_SASL_PASSWORD / --kafka-sasl-password: required"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_USERNAME": "u", "AGG_KAFKA_SASL_PASSWORD": "p",
      "AGG_KAFKA_SASL_MECHANISM": "GSSAPI"}, "AGG_KAFKA_SASL_MECHANISM / --kafka-sasl-mechanism: expected one of PLAIN"),
    ({"AGG_KAFKA_SASL_USERNAME": "u", "AGG_KAFKA_SASL_PASSWORD": "p"}, "set it to SASL_SSL"),
    ({"AGG_KAFKA_SSL_CAFILE": "/etc/hostname"}, "set it to SSL or SASL_SSL"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "SSL", "AGG_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
     "AGG_KAFKA_SSL_CAFILE / --kafka-ssl-cafile: no readable file '/nonexistent/ca.pem'"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "SSL", "AGG_KAFKA_SSL_CAFILE": "/etc/hostname"},
     "AGG_KAFKA_SSL_*: cannot load the TLS files"),
    ({"AGG_TOPIC_REPLICATION_FACTOR": "0"}, "AGG_TOPIC_REPLICATION_FACTOR / --topic-replication-factor: must be >= 1"),
    ({"AGG_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"}, "AGG_KAFKA_SASL_PASSWORD_FILE: cannot read '/nonexistent/pw'"),
])
def test_bad_settings_fail_in_one_line_per_problem(env: dict[str, str], says: str) -> None:
    # config_load.load checks the model; kafka_security() what only a KafkaSecurity can (TLS files
    # loadable, credentials without a SASL protocol); the CLI runs both before anything starts
    with pytest.raises(config.SettingsError) as ei:
        config_load.load(env=env).kafka_security()
    lines = ei.value.lines
    assert any(says in line for line in lines), lines
    assert len(lines) <= 2


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-a-file\n")
    s = config_load.load(env={"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "AGG_KAFKA_SASL_USERNAME": "u",
                                "AGG_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw")})
    assert s.kafka_security().sasl_password == "from-a-file"
    # the variable and its file at once: refused, whichever was meant
    with pytest.raises(config.SettingsError, match="set one of them, not both"):
        config_load.load(env={"AGG_KAFKA_SASL_PASSWORD": "direct", "AGG_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw"),
                                "AGG_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "AGG_KAFKA_SASL_USERNAME": "u"})


async def _tls_server(ca: ThrowawayCA) -> asyncio.Server:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(ca.broker))

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # answers nothing: not a Kafka broker, only its TLS
        writer.close()

    return await asyncio.start_server(hold, "127.0.0.1", 0, ssl=server_ctx)


async def test_check_login_reports_an_untrusted_certificate_in_one_line(ca: ThrowawayCA) -> None:
    server = await _tls_server(ca)
    port = server.sockets[0].getsockname()[1]
    try:
        # the system trust store does not know the throwaway CA
        with pytest.raises(KafkaLoginError) as ei:
            await check_login(f"127.0.0.1:{port}", KafkaSecurity(protocol="SSL"), timeout_s=5)
        msg = str(ei.value)
        assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "AGG_KAFKA_SSL_CAFILE" in msg
        assert "not trusted" in msg
        # trusting the CA: the handshake passes; the silent server is then "not up", left to retries
        await check_login(f"127.0.0.1:{port}", KafkaSecurity(protocol="SSL", ssl_cafile=str(ca.ca)), timeout_s=1)
    finally:
        server.close()
        await server.wait_closed()


async def test_check_login_leaves_an_unreachable_broker_to_the_retries() -> None:
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there
    sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    await check_login(f"127.0.0.1:{port}", sec, timeout_s=2)  # returns: not a login problem
