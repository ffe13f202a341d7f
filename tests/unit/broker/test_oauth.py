"""The OAUTHBEARER token sources (aggregator/broker/oauth.py) against a real token endpoint
on 127.0.0.1 (tools/oauth_endpoint.py, aiohttp): a token kept until 80 % of its lifetime
(``expires_in``, else the JWT's ``exp``, else the default), one fetch however many logins
ask at once, the endpoint's refusals and silences as one line naming the setting; and the
token file, read again when it changes.  The login to a real Kafka is in
tests/integration/test_kafka_oauth.py."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest

from aggregator.broker.oauth import (
    DEFAULT_LIFETIME_S,
    OAuthTokenError,
    TokenEndpoint,
    TokenFile,
    jwt_expiry,
)
from tools.oauth_endpoint import TokenEndpoint as Endpoint
from tools.oauth_endpoint import unsigned_jwt

CLIENT, SECRET = "svc-clicks", "s3cret"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def endpoint() -> Endpoint:
    ep = await Endpoint({CLIENT: SECRET}, lifetime_s=100).start()
    yield ep
    await ep.stop()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_the_token_is_kept_and_refreshed_before_it_expires(endpoint: Endpoint) -> None:
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    first = await tokens.token()
    assert first == endpoint.issued[0].token and endpoint.issued[0].client_id == CLIENT
    clock.now += 79  # within 80 % of expires_in=100: the same token, no request
    assert await tokens.token() == first
    assert endpoint.requests == 1
    clock.now += 2   # past 80 %, still 19 s before it expires: a new one
    second = await tokens.token()
    assert endpoint.requests == 2 and second == endpoint.issued[1].token
    clock.now += 50
    assert await tokens.token() == second and endpoint.requests == 2


async def test_one_fetch_however_many_logins_ask_at_once(endpoint: Endpoint) -> None:
    endpoint.delay_s = 0.3
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET)
    got = await asyncio.gather(*(tokens.token() for _ in range(25)))
    assert endpoint.requests == 1 and tokens.fetches == 1
    assert set(got) == {endpoint.issued[0].token}


def test_one_fetch_across_threads_and_their_event_loops() -> None:
    """Faust's consumer logs in from an event loop of its own, in a thread of its own."""
    import threading

    ep = Endpoint({CLIENT: SECRET}, lifetime_s=100, delay_s=0.3).start_in_thread()
    try:
        tokens = TokenEndpoint(ep.url, CLIENT, SECRET)
        got: list[str] = []

        async def logins() -> None:
            got.extend(await asyncio.gather(*(tokens.token() for _ in range(10))))

        threads = [threading.Thread(target=asyncio.run, args=(logins(),)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(got) == 30 and set(got) == {ep.issued[0].token}
        assert ep.requests == 1 and tokens.fetches == 1
    finally:
        ep.stop_thread()


async def test_the_lifetime_from_the_jwt_exp_without_expires_in(endpoint: Endpoint) -> None:
    endpoint.expires_in = False
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    token = await tokens.token()
    exp = jwt_expiry(token)
    assert exp is not None and abs(exp - (time.time() + 100)) < 3
    clock.now += 75
    assert await tokens.token() == token and endpoint.requests == 1
    clock.now += 10  # past 80 % of the exp claim's ~100 s
    await tokens.token()
    assert endpoint.requests == 2


async def test_an_opaque_token_without_expires_in_gets_the_default_lifetime(endpoint: Endpoint) -> None:
    endpoint.expires_in, endpoint.jwt = False, False
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    token = await tokens.token()
    assert jwt_expiry(token) is None
    clock.now += DEFAULT_LIFETIME_S * 0.8 - 1
    assert await tokens.token() == token and endpoint.requests == 1
    clock.now += 2
    await tokens.token()
    assert endpoint.requests == 2


async def test_the_scope_is_asked_for(endpoint: Endpoint) -> None:
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, "kafka.read kafka.write")
    await tokens.token()
    assert endpoint.issued[0].scope == "kafka.read kafka.write"


async def test_a_wrong_secret_is_one_line_naming_the_settings(endpoint: Endpoint) -> None:
    tokens = TokenEndpoint(endpoint.url, CLIENT, "not-the-secret")
    with pytest.raises(OAuthTokenError) as err:
        await tokens.token()
    msg = str(err.value)
    assert msg == (f'the OAuth token endpoint {endpoint.url} refused client "{CLIENT}" (HTTP 401, invalid_client: '
                   "Bad client credentials): check AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID / "
                   "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")
    assert "not-the-secret" not in msg


@pytest.mark.parametrize(("fail_with", "says"), [
    ((400, {"error": "invalid_scope", "error_description": "scope\n kafka is not\tallowed"}),
     "(HTTP 400, invalid_scope: scope kafka is not allowed): check AGG_KAFKA_SASL_OAUTHBEARER_SCOPE"),
    ((400, {"error": "invalid_request"}), "(HTTP 400, invalid_request): check AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID"),
    ((404, "<html>\n<body>Not Found</body>\n</html>"),
     "(HTTP 404, <html> <body>Not Found</body> </html>): check AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
    ((200, {"token_type": "Bearer"}), "answered HTTP 200 without an access_token"),
    ((502, "bad gateway"), 'failed to answer client "svc-clicks" (HTTP 502, bad gateway): check '
                           "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
])
async def test_error_answers_are_one_clear_line(endpoint: Endpoint, fail_with: tuple, says: str) -> None:
    endpoint.fail_with = fail_with
    with pytest.raises(OAuthTokenError) as err:
        await TokenEndpoint(endpoint.url, CLIENT, SECRET).token()
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


async def test_an_endpoint_that_is_not_there_or_silent(endpoint: Endpoint) -> None:
    url = f"http://127.0.0.1:{closed_port()}/oauth2/token"
    with pytest.raises(OAuthTokenError) as err:
        await TokenEndpoint(url, CLIENT, SECRET).token()
    assert str(err.value).startswith(f"cannot reach the OAuth token endpoint {url} (")
    assert str(err.value).endswith("): check AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
    endpoint.delay_s = 2
    started = time.monotonic()
    with pytest.raises(OAuthTokenError, match=r"\(no answer within 0.3 s\)"):
        await TokenEndpoint(endpoint.url, CLIENT, SECRET, timeout_s=0.3).token()
    assert time.monotonic() - started < 1.5


async def test_a_failed_refresh_keeps_the_valid_token_and_retries_later(endpoint: Endpoint) -> None:
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    first = await tokens.token()
    endpoint.fail_with = (503, "busy")
    clock.now += 85  # due for a refresh, 15 s left
    assert await tokens.token() == first and endpoint.requests == 2
    assert await tokens.token() == first and endpoint.requests == 2  # not at every login
    clock.now += 3
    endpoint.fail_with = None
    second = await tokens.token()
    assert endpoint.requests == 3 and second == endpoint.issued[-1].token and len(endpoint.issued) == 2
    endpoint.fail_with = (503, "busy")
    clock.now += 101  # expired: no token to fall back on
    with pytest.raises(OAuthTokenError, match="HTTP 503"):
        await tokens.token()


def test_jwt_expiry() -> None:
    assert abs(jwt_expiry(unsigned_jwt("a", 60)) - (time.time() + 60)) < 2  # type: ignore[operator]
    assert jwt_expiry("opaque-token") is None
    assert jwt_expiry("a.b.c") is None
    assert jwt_expiry(unsigned_jwt("a", 60).replace(".", "x", 1)) is None


async def test_the_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("token-one\n")
    tokens = TokenFile(str(path))
    assert await tokens.token() == "token-one"
    assert await tokens.token() == "token-one" and tokens.reads == 1  # unchanged: not read again
    # a sidecar writes the next one beside it and renames it over (as Kubernetes does)
    (tmp_path / "next").write_text("token-two")
    os.replace(tmp_path / "next", path)
    assert await tokens.token() == "token-two" and tokens.reads == 2
    # rewritten in place, the same size: the modification time tells
    st = path.stat()
    path.write_text("token-thr")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert await tokens.token() == "token-thr"
    # caught between a truncate and a write, or gone for a moment: the last token
    path.write_text("")
    assert await tokens.token() == "token-thr"
    path.unlink()
    assert await tokens.token() == "token-thr"
    path.write_text("token-four")
    assert await tokens.token() == "token-four"


async def test_a_missing_or_empty_token_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(OAuthTokenError) as err:
        await TokenFile(str(tmp_path / "nope")).token()
    assert str(err.value) == (f"AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE: cannot read {tmp_path / 'nope'} "
                              "(No such file or directory)")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(OAuthTokenError, match=r"AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE: .*empty is empty"):
        await TokenFile(str(tmp_path / "empty")).token()


async def test_a_cancelled_login_leaves_the_shared_fetch_to_the_others(endpoint: Endpoint) -> None:
    """aiokafka cancels a fetch on a revoke: that login's wait ends, and only it; the fetch
    and every other login waiting on it get the token (they got CancelledError and
    InvalidStateError, which stop aiokafka's sender loop without a word)."""
    endpoint.delay_s = 0.4
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET)
    fetcher = asyncio.ensure_future(tokens.token())
    await asyncio.sleep(0.05)  # the fetch is in flight
    other = asyncio.ensure_future(tokens.token())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tokens.token(), 0.1)  # a third, cancelled while it waits
    assert await fetcher == await other == endpoint.issued[0].token
    assert endpoint.requests == 1


async def test_without_a_valid_token_failures_are_not_asked_again_at_every_login(endpoint: Endpoint,
                                                                                 caplog) -> None:
    """A secret rotated or an identity provider down: each client's reconnects (several a
    second) must not each ask the endpoint; the answer stands 2, 4, ... up to 30 s."""
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    first = await tokens.token()
    endpoint.fail_with = (401, {"error": "invalid_client"})
    clock.now += 101  # expired
    for _ in range(20):
        with pytest.raises(OAuthTokenError, match="invalid_client"):
            await tokens.token()
    assert endpoint.requests == 2  # the first token's, and one failed
    waits, last = [], clock.now
    for _ in range(6):  # when does it ask again? (a login every half second)
        before = endpoint.requests
        while endpoint.requests == before:
            clock.now += 0.5
            with pytest.raises(OAuthTokenError):
                await tokens.token()
        waits.append(clock.now - last)
        last = clock.now
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert sum("no Kafka OAuth token (asked again in" in r.getMessage() for r in caplog.records) == 7
    endpoint.fail_with = None
    clock.now += 30
    before = endpoint.requests
    assert await tokens.token() == endpoint.issued[-1].token and endpoint.requests == before + 1
    assert len(endpoint.issued) == 2 and endpoint.issued[0].token == first


async def test_a_200_without_a_token_never_quotes_the_answer(endpoint: Endpoint) -> None:
    """A provider that names the field otherwise (accessToken) would put the token in a log line."""
    endpoint.fail_with = (200, {"accessToken": "eyJ-secret-material", "expires": 60})
    with pytest.raises(OAuthTokenError) as err:
        await TokenEndpoint(endpoint.url, CLIENT, SECRET).token()
    assert "secret-material" not in str(err.value)
    assert "a JSON object with accessToken, expires" in str(err.value)


async def test_a_token_answer_in_several_packets_is_read_whole() -> None:
    """A multi-KB JWT (Azure AD, Keycloak) comes in pieces over a real network: read(n) gave
    the first piece only, and the token was "not a JSON object"."""
    from aiohttp import web

    token = unsigned_jwt("svc", 600, padding="p" * 3000)
    body = json.dumps({"access_token": token, "expires_in": 600}).encode()

    async def pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:1400])
        await asyncio.sleep(0.05)
        await resp.write(body[1400:])
        return resp

    app = web.Application()
    app.router.add_post("/token", pieces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = closed_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        assert await TokenEndpoint(f"http://127.0.0.1:{port}/token", CLIENT, SECRET).token() == token
    finally:
        await runner.cleanup()


async def test_before_its_first_token_a_failing_endpoint_is_asked_every_two_seconds(endpoint: Endpoint) -> None:
    """At start only `run`'s wait asks (every 0.5 s, for AGG_BROKER_WAIT_SECONDS): a back-off
    of 2, 4, 8 s would ask an identity provider back at 6.5 s next at 14 s, after a 10 s
    wait has ended the start.  The back-off grows once a token was had (the test above)."""
    clock = Clock()
    tokens = TokenEndpoint(endpoint.url, CLIENT, SECRET, clock=clock)
    endpoint.fail_with = (503, {"error": "temporarily_unavailable"})
    asked_at, t0 = [], clock.now
    while clock.now - t0 < 6.5:
        before = endpoint.requests
        with pytest.raises(OAuthTokenError) as err:
            await tokens.token()
        assert err.value.passing
        if endpoint.requests > before:
            asked_at.append(clock.now - t0)
        clock.now += 0.5
    assert asked_at == [0.0, 2.0, 4.0, 6.0]
    endpoint.fail_with = None  # back at 6.5: asked at 8, within a 10 s wait
    while not endpoint.issued:
        try:
            await tokens.token()
        except OAuthTokenError:
            clock.now += 0.5
    assert clock.now - t0 == 8.0
