"""A tiny OAuth 2 token endpoint on loopback for the tests: the client-credentials grant
(client id and secret in HTTP basic auth, as Kafka's clients send them), answering unsigned
JWTs (``"alg":"none"``, ``sub`` = the client id, ``exp``) that Kafka's unsecured validator
takes (``scripts/kafka.sh --oauthbearer``).

``TokenEndpoint(clients={"id": "secret"}, lifetime_s=20)``: ``await start()`` in a running
event loop (unit tests), or ``start_in_thread()`` for a test that runs the service as a
child process; ``url``, ``issued`` (every token given, in order), ``requests``; ``delay_s``
slows each answer, ``expires_in=False`` leaves ``expires_in`` out (the JWT's ``exp`` only),
``jwt=False`` gives opaque tokens, ``fail_with`` answers every request with that
(status, JSON body)."""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import BasicAuth, web


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()


def unsigned_jwt(sub: str, lifetime_s: float, **claims: Any) -> str:
    """``header.payload.`` with ``"alg":"none"`` and an empty signature (RFC 7519 §6)."""
    now = int(time.time())
    return f'{b64url({"alg": "none"})}.{b64url({"sub": sub, "iat": now, "exp": now + int(lifetime_s), **claims})}.'


@dataclass
class Issued:
    client_id: str
    token: str
    at: float  # time.time() when it was given
    scope: str


class TokenEndpoint:
    def __init__(self, clients: dict[str, str], lifetime_s: float = 3600, *, expires_in: bool = True,
                 jwt: bool = True, delay_s: float = 0.0, fail_with: tuple[int, Any] | None = None) -> None:
        self.clients = dict(clients)
        self.lifetime_s = lifetime_s
        self.expires_in = expires_in
        self.jwt = jwt
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.issued: list[Issued] = []
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            status, body = self.fail_with
            return web.json_response(body, status=status) if not isinstance(body, str) else \
                web.Response(text=body, status=status)
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            auth = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            auth = None
        if auth is None or self.clients.get(auth.login) != auth.password:
            return web.json_response({"error": "invalid_client", "error_description": "Bad client credentials"},
                                     status=401, headers={"WWW-Authenticate": 'Basic realm="token"'})
        scope = str(form.get("scope", ""))
        token = unsigned_jwt(auth.login, self.lifetime_s, **({"scope": scope} if scope else {})) if self.jwt \
            else secrets.token_urlsafe(24)
        self.issued.append(Issued(auth.login, token, time.time(), scope))
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in:
            answer["expires_in"] = int(self.lifetime_s)
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def start(self, host: str = "127.0.0.1") -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}/oauth2/token"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self) -> TokenEndpoint:
        """Serve from a thread of its own (its own event loop) until ``stop_thread``."""
        started = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=serve, name="token-endpoint", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the token endpoint did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = self._loop = None
