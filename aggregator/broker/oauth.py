"""SASL/OAUTHBEARER tokens for every Kafka client of the process (docs/contract.md §7).

Two sources, one of them per process (``KafkaSecurity`` checks that):

- ``TokenEndpoint``: the OAuth 2 client-credentials grant, as Kafka's Java client does it
  (``sasl.oauthbearer.token.endpoint.url``): a form POST of ``grant_type=client_credentials``
  (and ``scope``) with the client id and secret as HTTP basic auth.  The access token is kept
  and a new one fetched once 80 % of its lifetime has passed (the lifetime from
  ``expires_in``, else the JWT's ``exp`` claim, else ``DEFAULT_LIFETIME_S``); one fetch at a
  time however many connections log in at once, in whichever thread and event loop (Faust's
  consumer runs its own); every request bounded by ``timeout_s``.
- ``TokenFile``: a token another process keeps fresh on disk (a sidecar, a Kubernetes
  projected service-account token), read again whenever the file changes.

Both are aiokafka ``AbstractTokenProvider``s: aiokafka calls ``token()`` at each SASL login
of each connection; Faust gets the same object through ``faust.OAuthCredentials``.  A token
that cannot be had raises ``OAuthTokenError`` (one line naming the setting): a
``KafkaConnectionError``, so a running client retries its connection as after any other
failed connect, while ``check_login`` turns it into a refusal at start.

aiokafka (0.14) takes a broker's refusal of a token for a successful login: the broker
answers the token with an error challenge (RFC 7628 §3.2.2, ``{"status":"invalid_token"}``)
and waits for the client's %x01 before it ends the login with an error, but aiokafka
stops at the challenge and sends its next request into the unfinished login, which gets
an answer it misreads (a metadata answer with no brokers).  ``_finish_refused_logins``
makes its OAUTHBEARER login send the %x01, so a refused token is the
``SaslAuthenticationFailed`` (with the broker's message) that PLAIN and SCRAM give.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from aiokafka import conn as _aiokafka_conn
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError

log = logging.getLogger(__name__)

URL_SETTING = "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"
CLIENT_SETTINGS = "AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_ID / AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"
SCOPE_SETTING = "AGG_KAFKA_SASL_OAUTHBEARER_SCOPE"
FILE_SETTING = "AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE"
EXTENSION_KEY = re.compile(r"[A-Za-z]+")  # RFC 7628 §3.1 (and Kafka's check); "auth" is the token's own
DEFAULT_LIFETIME_S = 60.0  # a token with neither expires_in nor exp: assumed short-lived
REFRESH_FRACTION = 0.8     # a new token once this much of the lifetime has passed (Kafka's default)
MIN_REFRESH_S = 1.0        # however short-lived the tokens: not more than one fetch a second
RETRY_S = 2.0              # after a failed refresh, while the old token is still valid
# without a valid token, failed requests are not repeated for 2, 4, ... up to 30 s: every
# client's reconnects (aiokafka's, several a second) ask for a token
MAX_BACKOFF_S = 30.0
TIMEOUT_S = 10.0           # one token request, connection to the last byte
MAX_ANSWER_BYTES = 1 << 20
# the OAuth error codes (RFC 6749 §5.2) that name a setting to check
ERROR_SETTINGS = {"invalid_client": CLIENT_SETTINGS, "unauthorized_client": CLIENT_SETTINGS,
                  "invalid_scope": SCOPE_SETTING}


class OAuthTokenError(KafkaConnectionError):
    """No token to log in with: the token endpoint refused the client or could not be
    reached, or the token file is missing or empty.  One line naming the setting.
    ``passing``: the endpoint could not be reached, timed out or answered 408, 429 or 5xx, which
    asking again later may mend (`run` waits for a token as it waits for its broker)."""

    def __init__(self, message: str, passing: bool = False) -> None:
        super().__init__(message)
        self.passing = passing

    def __str__(self) -> str:  # KafkaError's would prefix the class name
        return str(self.args[0]) if self.args else ""


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (seconds since the epoch) of a JWT, unverified; None when the token
    is not a JWT or has none."""
    parts = token.split(".")
    if len(parts) < 2:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        exp = json.loads(payload).get("exp")
    except (ValueError, binascii.Error, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def parse_extensions(text: str) -> dict[str, str]:
    """``AGG_KAFKA_SASL_OAUTHBEARER_EXTENSIONS``: ``key=value,key=value`` (SASL extensions sent
    with the token, e.g. Confluent Cloud's ``logicalCluster`` and ``identityPoolId``);
    ValueError naming the first bad item."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not EXTENSION_KEY.fullmatch(key) or key == "auth" or not value.isprintable():
            raise ValueError(f"{item!r} is not key=value with a key of letters (not auth) and a printable value")
        out[key] = value
    return out


class _Extensions(AbstractTokenProvider):
    """The SASL extensions aiokafka sends with each token."""

    extensions_given: dict[str, str]

    def extensions(self) -> dict[str, str]:
        return dict(self.extensions_given)


class TokenEndpoint(_Extensions):
    """Access tokens from an OAuth 2 token endpoint (client-credentials grant)."""

    def __init__(self, url: str, client_id: str, client_secret: str, scope: str = "", *,
                 timeout_s: float = TIMEOUT_S, clock: Callable[[], float] = time.monotonic,
                 extensions: dict[str, str] | None = None) -> None:
        self.extensions_given = extensions or {}
        self.url = url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.timeout_s = timeout_s
        self._clock = clock
        self._token = ""
        self._refresh_at = self._expires_at = self._retry_at = 0.0
        self._failed: OAuthTokenError | None = None  # why the last request failed while no token was valid
        self._failed_until = 0.0
        self._backoff_s = 0.0
        # the fetch in flight: a thread-safe future, since Faust's consumer runs an event loop
        # of its own in a thread of its own, beside the one of everything else
        self._guard = threading.Lock()
        self._inflight: concurrent.futures.Future[str] | None = None
        self.fetches = 0  # tokens asked for (tests, logs)
        self._answered = 0  # of those, requests that ended (answered, refused, failed): not cut off waiting

    def __repr__(self) -> str:
        return f"TokenEndpoint({self.url!r}, client_id={self.client_id!r})"

    def asking(self) -> bool:
        """Whether it has no token yet and a request for one is under way (`run`'s start-up
        wait names the endpoint, not the broker, when it ends meanwhile)."""
        return not self._token and self.fetches > self._answered

    def _current(self) -> str | None:
        """The token when no fetch is due (or one failed a moment ago and it is still valid)."""
        now = self._clock()
        if self._token and (now < self._refresh_at or (now < self._retry_at and now < self._expires_at)):
            return self._token
        return None

    async def token(self) -> str:
        current = self._current()
        if current is not None:
            return current
        with self._guard:
            fetching = self._inflight
            if fetching is None:
                current = self._current()  # a fetch ended since the look above
                if current is not None:
                    return current
                mine = self._inflight = concurrent.futures.Future()
                # running: a waiter that is cancelled (aiokafka cancels fetches on a revoke) can
                # no longer cancel the shared future under every other waiter and the fetcher
                mine.set_running_or_notify_cancel()
        if fetching is not None:  # another login (of any thread) is fetching: its result
            return await asyncio.wrap_future(fetching)
        try:
            token = await self._refresh()
        except asyncio.CancelledError:
            if not mine.done():
                mine.set_exception(OAuthTokenError(f"the token request to {self.url} was cancelled", passing=True))
            raise
        except BaseException as exc:
            if not mine.done():
                mine.set_exception(exc)
            raise
        else:
            if not mine.done():
                mine.set_result(token)
        finally:
            with self._guard:
                self._inflight = None
        return token

    async def _refresh(self) -> str:
        if self._failed is not None and self._clock() < self._failed_until:
            raise OAuthTokenError(str(self._failed), self._failed.passing)  # asked again too soon: the last answer stands
        try:
            token, lifetime = await self._fetch()
        except OAuthTokenError as exc:
            if self._token and self._clock() < self._expires_at:
                log.warning("could not refresh the Kafka OAuth token (the current one is valid for "
                            "%.0f s more): %s", self._expires_at - self._clock(), exc)
                self._retry_at = self._clock() + RETRY_S
                return self._token
            # before its first token, only the start-up check asks (every 0.5 s): an endpoint
            # back within AGG_BROKER_WAIT_SECONDS is asked again within RETRY_S
            self._backoff_s = min(MAX_BACKOFF_S, max(RETRY_S, 2 * self._backoff_s)) if self._token else RETRY_S
            self._failed, self._failed_until = exc, self._clock() + self._backoff_s
            if self._token:  # it had one (at start, a failure is the one line of the refusal)
                log.error("no Kafka OAuth token (asked again in %.0f s): %s", self._backoff_s, exc)
            raise
        self._failed, self._backoff_s = None, 0.0
        now = self._clock()
        self._token = token
        self._expires_at = now + lifetime
        self._refresh_at = now + max(MIN_REFRESH_S, lifetime * REFRESH_FRACTION)
        log.info("got a Kafka OAuth token for client %r from %s, valid for %.0f s", self.client_id, self.url, lifetime)
        return token

    async def _fetch(self) -> tuple[str, float]:
        """One token request: (access token, lifetime in seconds)."""
        import aiohttp

        self.fetches += 1
        form = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        # as Kafka's Java client sends them (not URL-encoded: its default)
        basic = base64.b64encode(f"{self.client_id}:{self._secret}".encode()).decode()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        where = f"the OAuth token endpoint {self.url}"
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    self.url, data=form, headers={"Authorization": f"Basic {basic}", "Accept": "application/json",
                                                  "Cache-Control": "no-cache"},
                    allow_redirects=False) as resp:
                body = b""  # (read(n) gives what has come so far: a token in several packets came short)
                while len(body) < MAX_ANSWER_BYTES:
                    chunk = await resp.content.read(MAX_ANSWER_BYTES - len(body))
                    if not chunk:
                        break
                    body += chunk
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._answered += 1
            what = f"no answer within {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else _one_line(exc)
            # an untrusted certificate is a setting to fix, not a failure that passes
            untrusted = isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError))
            raise OAuthTokenError(f"cannot reach {where} ({what}): check {URL_SETTING}", passing=not untrusted) from None
        self._answered += 1
        answer = _json(body)
        if status != 200:
            raise OAuthTokenError(_refusal(where, self.client_id, status, answer, body),
                                  passing=status >= 500 or status in (408, 429))
        token = answer.get("access_token") if answer is not None else None
        if not isinstance(token, str) or not token.strip():
            got = f"a JSON object with {', '.join(sorted(answer)) or 'no keys'}" if answer is not None \
                else f"{len(body)} bytes that are not a JSON object"  # never the body: it may hold a token
            raise OAuthTokenError(f"{where} answered HTTP 200 without an access_token (got {got}): "
                                  f"check {URL_SETTING}")
        return token.strip(), _lifetime(token.strip(), answer)


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _lifetime(token: str, answer: dict[str, Any] | None) -> float:
    expires_in = answer.get("expires_in") if answer else None
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return float(expires_in)
    exp = jwt_expiry(token)
    if exp is not None:
        return max(0.0, exp - time.time())
    return DEFAULT_LIFETIME_S


def _refusal(where: str, client_id: str, status: int, answer: dict[str, Any] | None, body: bytes) -> str:
    """The one line for an error answer: the OAuth error and its description when given."""
    code = answer.get("error") if answer else None
    if isinstance(code, str):
        desc = answer.get("error_description") if answer else None
        said = code + (f": {_one_line(desc)}" if isinstance(desc, str) and desc.strip() else "")
    else:
        said = _snippet(body) or "no body"
    if isinstance(code, str) and code in ERROR_SETTINGS:
        check = ERROR_SETTINGS[code]
    else:  # 400 invalid_request, invalid_grant, ...: the client's settings; 404, 5xx: the address
        check = CLIENT_SETTINGS if status in (400, 401, 403) else URL_SETTING
    if status >= 500:
        return f'{where} failed to answer client "{client_id}" (HTTP {status}, {said}): check {check}'
    return f'{where} refused client "{client_id}" (HTTP {status}, {said}): check {check}'


def _one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _snippet(body: bytes) -> str:
    return _one_line(body.decode("utf-8", "replace"))


class TokenFile(_Extensions):
    """The token in a file that something else keeps fresh: read again when the file changes
    (its inode, size or modification time: a rename over it, as Kubernetes does, too)."""

    def __init__(self, path: str, extensions: dict[str, str] | None = None) -> None:
        self.extensions_given = extensions or {}
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None
        self._token = ""
        self.reads = 0

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r})"

    async def token(self) -> str:
        return self._read()  # a stat per login, a read per change: small enough for the loop

    def _read(self) -> str:
        try:
            st = os.stat(self.path)
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if seen != self._seen or not self._token:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    text = f.read().strip()
                self.reads += 1
                if text:
                    self._token, self._seen = text, seen
                elif not self._token:
                    raise OAuthTokenError(f"{FILE_SETTING}: {self.path} is empty (no token to log in to Kafka with)")
                else:  # caught between a sidecar's truncate and write: read it again next time
                    log.warning("%s is empty: logging in with the token read before", self.path)
        except OSError as exc:
            if self._token:  # between a sidecar's writes: the last token it wrote
                log.warning("cannot read %s again (%s): logging in with the token read before", self.path,
                            exc.strerror or exc)
                return self._token
            raise OAuthTokenError(f"{FILE_SETTING}: cannot read {self.path} ({exc.strerror or exc})") from None
        return self._token


@functools.lru_cache(maxsize=4)
def provider(url: str, client_id: str, client_secret: str, scope: str, token_file: str,
             extensions: str = "") -> AbstractTokenProvider:
    """The one token provider of the process per set of settings, shared by every client
    (``Settings.kafka_security()`` makes a new ``KafkaSecurity`` per call)."""
    if token_file:
        return TokenFile(token_file, parse_extensions(extensions))
    return TokenEndpoint(url, client_id, client_secret, scope, extensions=parse_extensions(extensions))


class _OAuthLogin(_aiokafka_conn.OAuthAuthenticator):
    """aiokafka's OAUTHBEARER login, with the client's %x01 after an error challenge."""

    _acked = False

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if self._token_sent and payload and not self._acked:  # the broker refused the token
            self._acked = True
            return b"\x01", True  # the broker now ends the login with its error
        result: tuple[bytes, bool] | None = await super().step(payload)
        return result


def _finish_refused_logins() -> None:
    def authenticator_oauth(self: Any) -> _OAuthLogin:
        return _OAuthLogin(sasl_oauth_token_provider=self._sasl_oauth_token_provider)

    _aiokafka_conn.AIOKafkaConnection.authenticator_oauth = authenticator_oauth


_finish_refused_logins()
