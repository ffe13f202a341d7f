"""The OAUTHBEARER settings (``AGG_KAFKA_SASL_OAUTHBEARER_*``): exactly one token source,
one line per problem, none of them without OAUTHBEARER; what aiokafka and Faust are handed
(one token provider per process); and ``check_login`` refusing a token source that gives
no token before it connects to any broker."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka.abc import AbstractTokenProvider
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from aggregator import cli, config, config_load
from aggregator.broker.oauth import TokenEndpoint, TokenFile
from aggregator.broker.security import KafkaLoginError, KafkaSecurity, TokenUnavailable, check_login
from tests.unit.broker.test_oauth import closed_port
from tools.oauth_endpoint import TokenEndpoint as Endpoint

URL = "https://login.example.com/oauth2/token"
OAUTH = {"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_MECHANISM": "oauthbearer"}
ENDPOINT = {**OAUTH, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": URL,
            "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "svc", "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s3cret"}


def test_a_token_endpoint_over_sasl_ssl() -> None:
    s = config_load.load(env={**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka"})
    sec = s.kafka_security()
    kw = sec.aiokafka_kwargs()
    provider = kw.pop("sasl_oauth_token_provider")
    assert isinstance(provider, TokenEndpoint) and isinstance(provider, AbstractTokenProvider)
    assert (provider.url, provider.client_id, provider.scope) == (URL, "svc", "kafka")
    assert kw == {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "ssl_context": sec.ssl_context}
    assert sec.ssl_context is not None
    # every client of the process shares the one provider (its cached token, its one fetch)
    assert s.kafka_security().token_provider is provider
    creds = sec.faust_settings()["broker_credentials"]
    assert isinstance(creds, faust.OAuthCredentials) and creds.oauth_cb is provider
    assert credentials_to_aiokafka_auth(creds) == sec.aiokafka_kwargs()
    assert "s3cret" not in repr(sec) + repr(provider) + sec.describe()
    assert sec.describe() == f'SASL_SSL, OAUTHBEARER with client "svc" of {URL}'


def test_a_token_file_over_sasl_plaintext(tmp_path: Path) -> None:
    sec = config_load.load(env={**OAUTH, "AGG_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE": str(tmp_path / "token")}).kafka_security()
    kw = sec.aiokafka_kwargs()
    assert isinstance(kw.pop("sasl_oauth_token_provider"), TokenFile)
    assert kw == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER"}
    creds = sec.faust_settings()["broker_credentials"]
    assert credentials_to_aiokafka_auth(creds) == {**sec.aiokafka_kwargs(), "ssl_context": None}


def test_the_client_secret_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")
    env = {k: v for k, v in ENDPOINT.items() if k != "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"}
    s = config_load.load(env={**env, "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE": str(tmp_path / "secret")})
    assert s.kafka_security().oauth_client_secret == "from-a-file"
    assert "kafka_sasl_oauthbearer_client_secret" in config.Settings.SECRETS
    assert "from-a-file" not in repr(s)


def without(*names: str) -> dict[str, str]:
    return {k: v for k, v in ENDPOINT.items() if k not in names}


@pytest.mark.parametrize(("env", "says"), [
    (OAUTH, "AGG_KAFKA_SASL_MECHANISM=OAUTHBEARER needs a token source: AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL "
            "with _CLIENT_ID and _CLIENT_SECRET, or AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE"),
    ({**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE": "/run/token"},
     "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE and AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, "
     "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID, AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET: give one token source"),
    (without("AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
     "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL is needed with AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID"),
    (without("AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"),
     "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET (or AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE) is needed with "
     "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
    (without("AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID"),
     "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID is needed with AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
    ({**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "login.example.com/token"},
     "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: expected an http:// or https:// URL, got 'login.example.com/token'"),
    ({**ENDPOINT, "AGG_KAFKA_SASL_USERNAME": "u"}, "AGG_KAFKA_SASL_USERNAME/PASSWORD are for PLAIN and SCRAM"),
    # any of them without OAUTHBEARER
    ({"AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE": "/run/token"},
     "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE set but AGG_KAFKA_SASL_MECHANISM is PLAIN and AGG_KAFKA_SECURITY_PROTOCOL "
     "PLAINTEXT: they need OAUTHBEARER over SASL_SSL (or SASL_PLAINTEXT)"),
    ({**ENDPOINT, "AGG_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "AGG_KAFKA_SASL_USERNAME": "u",
      "AGG_KAFKA_SASL_PASSWORD": "p"}, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, "
     "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID, AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET set but AGG_KAFKA_SASL_MECHANISM "
     "is SCRAM-SHA-512"),
    ({**ENDPOINT, "AGG_KAFKA_SECURITY_PROTOCOL": "SSL"}, "set but AGG_KAFKA_SASL_MECHANISM is OAUTHBEARER and "
     "AGG_KAFKA_SECURITY_PROTOCOL SSL"),
    ({"AGG_KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka"}, "AGG_KAFKA_SASL_OAUTHBEARER_SCOPE set but"),
    ({"AGG_KAFKA_SASL_MECHANISM": "OAUTH"}, "AGG_KAFKA_SASL_MECHANISM / --kafka-sasl-mechanism: expected "
     "one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER"),
    ({"AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE": "/nonexistent/secret"},
     "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE: cannot read '/nonexistent/secret'"),
])
def test_bad_oauth_settings_fail_in_one_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(config.SettingsError) as ei:
        config_load.load(env=env).kafka_security()
    lines = ei.value.lines
    assert len(lines) == 1 and says in lines[0], lines
    assert "s3cret" not in lines[0]


async def test_check_login_refuses_a_token_endpoint_that_refuses_the_client() -> None:
    endpoint = await Endpoint({"svc": "right"}).start()
    try:
        sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                            oauth_token_endpoint_url=endpoint.url + "?wrong", oauth_client_id="svc",
                            oauth_client_secret="wrong")
        # before any broker is asked: nobody listens on the bootstrap address
        with pytest.raises(KafkaLoginError) as ei:
            await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)
        assert str(ei.value).startswith(f'the OAuth token endpoint {endpoint.url}?wrong refused client "svc" (HTTP 401')
        ok = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                           oauth_token_endpoint_url=endpoint.url + "?right", oauth_client_id="svc",
                           oauth_client_secret="right")
        await check_login(f"127.0.0.1:{closed_port()}", ok, timeout_s=2)  # a token: the broker left to the retries
        assert len(endpoint.issued) == 1
    finally:
        await endpoint.stop()


async def test_check_login_refuses_a_missing_token_file(tmp_path: Path) -> None:
    sec = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", oauth_token_file=str(tmp_path / "none"))
    with pytest.raises(KafkaLoginError, match=r"^AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE: cannot read"):
        await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)


async def test_check_login_tells_a_token_endpoint_that_is_down_from_one_that_refuses() -> None:
    """429 and 5xx answers and an endpoint not listening are ``TokenUnavailable`` (``run``
    asks again while it waits for its broker); a 4xx refusal is not."""
    sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                        oauth_token_endpoint_url=f"http://127.0.0.1:{closed_port()}/token",
                        oauth_client_id="svc", oauth_client_secret="s")
    with pytest.raises(TokenUnavailable, match="cannot reach"):
        await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)
    for status, passing in ((503, True), (500, True), (429, True), (400, False), (403, False)):
        endpoint = await Endpoint({"svc": "s"}, fail_with=(status, {"error": "some_error"})).start()
        try:
            sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                                oauth_token_endpoint_url=f"{endpoint.url}?{status}", oauth_client_id="svc",
                                oauth_client_secret="s")
            with pytest.raises(KafkaLoginError, match=f"HTTP {status}, some_error") as ei:
                await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)
            assert isinstance(ei.value, TokenUnavailable) is passing, status
            # asked again too soon (the back-off): the same answer, the same kind
            with pytest.raises(KafkaLoginError) as again:
                await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)
            assert isinstance(again.value, TokenUnavailable) is passing and endpoint.requests == 1
        finally:
            await endpoint.stop()


def _start_up_wait(wait: str, query: str, **endpoint: Any) -> tuple[str, Any]:
    """``run``'s start-up wait (``cli.wait_for_topics``) of ``wait`` seconds with a token
    endpoint served as ``endpoint`` says, and no broker: (the line it ends with, the endpoint)."""
    from tools.oauth_endpoint import TokenEndpoint as Served

    served = Served({"svc": "s"}, **endpoint).start_in_thread()
    try:
        s = config_load.load(env={**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": served.url + query,
                                  "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s",
                                  "AGG_BROKER": f"kafka://127.0.0.1:{closed_port()}", "AGG_BROKER_WAIT_SECONDS": wait})
        with pytest.raises(cli.Failure) as ei:
            cli.wait_for_topics(s)
        return str(ei.value), served
    finally:
        served.stop_thread()


def test_run_waits_for_a_token_as_for_its_broker_then_names_the_token() -> None:
    """``run``'s start-up wait asks a failing token endpoint again until
    AGG_BROKER_WAIT_SECONDS is over, then ends on the endpoint's line, not on "no broker
    answered" (no broker is asked without a token)."""
    line, endpoint = _start_up_wait("2.5", "?wait", fail_with=(503, {"error": "temporarily_unavailable"}))
    assert line == (f'the OAuth token endpoint {endpoint.url}?wait failed to answer client "svc" (HTTP 503, '
                    "temporarily_unavailable): check AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL "
                    "(for 2.5 s, AGG_BROKER_WAIT_SECONDS)")
    assert endpoint.requests == 2  # at 0 and 2 s: the back-off, not one a retry


def test_sasl_extensions_go_with_every_token() -> None:
    from aggregator.broker.oauth import _OAuthLogin

    env = {**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": URL + "?ext",
           "AGG_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": " logicalCluster=lkc-abc12, identityPoolId=pool-XyZ "}
    provider = config_load.load(env=env).kafka_security().token_provider
    assert provider.extensions() == {"logicalCluster": "lkc-abc12", "identityPoolId": "pool-XyZ"}
    login = _OAuthLogin(sasl_oauth_token_provider=provider)  # what aiokafka sends (RFC 7628 §3.1)
    assert login._build_oauth_client_request("tok", login._token_extensions()) == \
        "n,,\x01auth=Bearer tok\x01logicalCluster=lkc-abc12\x01identityPoolId=pool-XyZ\x01\x01"


@pytest.mark.parametrize("bad", ["logicalCluster", "logical-cluster=x", "auth=x", "a=b\x01c"])
def test_bad_sasl_extensions_fail_in_one_line(bad: str) -> None:
    with pytest.raises(config.SettingsError) as ei:
        config_load.load(env={**ENDPOINT, "AGG_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": bad}).kafka_security()
    assert len(ei.value.lines) == 1
    assert ei.value.lines[0].startswith("AGG_KAFKA_SASL_OAUTHBEARER_EXTENSIONS: "), ei.value.lines


def test_run_names_a_token_endpoint_that_never_answers_not_the_broker() -> None:
    """An endpoint that takes the request and never answers (its 10 s bound beyond a shorter
    wait): the wait ends on the endpoint's line, not on "no Kafka broker answered"."""
    line, endpoint = _start_up_wait("1", "?silent", delay_s=5)
    assert line == (f"no answer from the OAuth token endpoint {endpoint.url}?silent within 1 s "
                    "(AGG_BROKER_WAIT_SECONDS): check AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")


async def test_an_untrusted_token_endpoint_certificate_is_not_waited_for(tmp_path: Path) -> None:
    """TLS verification failing at the endpoint is a setting to fix: a refusal at once, not a
    failure that passes (which `run` would wait out)."""
    import ssl

    from aiohttp import web

    from tests.conftest import require_tool
    from tools.kafka import make_test_ca

    require_tool("openssl", "apt-get install openssl")
    ca = make_test_ca(tmp_path / "ca")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(ca.broker)
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t"})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    port = closed_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        sec = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                            oauth_token_endpoint_url=f"https://127.0.0.1:{port}/token", oauth_client_id="svc",
                            oauth_client_secret="s")
        with pytest.raises(KafkaLoginError, match="cannot reach") as ei:
            await check_login(f"127.0.0.1:{closed_port()}", sec, timeout_s=2)
        assert not isinstance(ei.value, TokenUnavailable), ei.value
    finally:
        await runner.cleanup()
