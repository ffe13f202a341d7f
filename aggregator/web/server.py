"""The HTTP routes (docs/contract.md §3), and nothing else.

What they serve comes in through small interfaces, so this module knows neither the
ingest nor the worker: a handler for ``POST /v1/events`` (None: this process does not
serve ingest), a source of recent snapshots, a callable that says why the process is
not ready (None: it is) and the metrics registry.  The server is a ``mode.Service``: started before, and stopped after, the
parts it serves (stopping finishes the requests in flight).

Every answer is counted by route template and status class (``clickstream_http_requests_total``,
``clickstream_http_request_duration_seconds``) in one middleware: the label is the matched
route's template (``/v1/events``), never the raw path, and ``unmatched`` for paths and methods
no route serves, so scanners cannot grow the label set.  A request with an ``Expect`` header
is answered first by ``Routes.expect`` (aiohttp runs it before the middleware: it counts what
it answers itself), which checks ``POST /v1/events``'s headers before ``100 Continue``.
"""
from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import mode
import orjson
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from aiohttp.typedefs import Handler as AioHandler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from aggregator.web.gate import REFUSED_LOG_INTERVAL, ConnectionGate, _Conn  # noqa: F401 (re-exported)
from aggregator.web.snapshots import (  # noqa: F401 (re-exported: what roles and tests know it by)
    SNAPSHOT_SEND_S,
    SNAPSHOT_VIEWS,
    SNAPSHOTS_LIMIT,
    SNAPSHOTS_MAX_LIMIT,
    NoSnapshots,
    SnapshotSource,
    snapshot_answer,
    snapshot_query,
)

log = logging.getLogger("aggregator.web")

Handler = Callable[[web.Request], Awaitable[web.Response]]
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
UNMATCHED = "unmatched"  # the route label of requests no route serves (404, 405)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpMetrics(Protocol):
    """What the routes need of the process's metrics (aggregator.metrics.Metrics)."""

    registry: CollectorRegistry

    def http_routes(self, routes: Iterable[str]) -> None: ...

    def http_request(self, route: str, status: int, seconds: float | None) -> None: ...

    def http_connections_refused(self, n: int = 1) -> None: ...


def _alive() -> None:
    return None


class Routes:
    def __init__(self, metrics: HttpMetrics, snapshots: SnapshotSource, not_ready: Callable[[], str | None],
                 post_events: Handler | None, notes: dict[str, str] | None = None,
                 not_alive: Callable[[], str | None] | None = None) -> None:
        self.notes = notes or {}  # shown in every /readyz answer
        # why this process should be restarted (/healthz 503), or None while it should not
        self.not_alive = not_alive or _alive
        self.metrics = metrics
        self.registry = metrics.registry
        self.snapshots = snapshots
        self.not_ready = not_ready  # why this process is not ready, or None when it is
        self.post_events = post_events or self.no_ingest
        # the answer to a POST /v1/events its headers alone refuse, else None: asked before
        # ``100 Continue`` is sent (the ingest handler's ``refusal_before_continue``; without
        # ingest: no_ingest's 503)
        self.post_refusal: Callable[[web.Request], web.Response | None] = (
            getattr(post_events, "refusal_before_continue", _never) if post_events is not None else _no_ingest)
        self.gate: ConnectionGate | None = None  # the server's, which learns when a handler runs
        self.snapshot_views = 0  # GET /v1/snapshots answers being built or sent
        self.max_snapshot_views = SNAPSHOT_VIEWS
        self.snapshot_send_s = SNAPSHOT_SEND_S

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes + 1, middlewares=[self.count_requests])
        expect = self.expect
        app.add_routes([
            web.post("/v1/events", self.post, expect_handler=expect),
            web.get("/metrics", self.get_metrics, expect_handler=expect),
            web.get("/v1/snapshots", self.get_snapshots, expect_handler=expect),
            web.get("/healthz", self.healthz, expect_handler=expect),
            web.get("/readyz", self.readyz, expect_handler=expect),
        ])
        self.metrics.http_routes([*(r.canonical for r in app.router.resources()), UNMATCHED])
        return app

    @web.middleware
    async def count_requests(self, request: web.Request, handler: AioHandler) -> web.StreamResponse:
        started = time.perf_counter()
        route = _route(request)
        status = 500  # a handler that raises something else than an HTTP answer: aiohttp answers 500
        gate = self.gate
        if gate is not None:
            gate.begin(request.transport)
        try:
            response = await handler(request)
            status = response.status
            return response
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:  # the router's: JSON like every error
            status = exc.status
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error(status, f"{exc.reason.lower()}: {request.method} {request.path}"[:200], allow)
        except web.HTTPException as exc:  # an answer raised by a handler
            status = exc.status
            raise
        except Exception:  # a bug in a handler: logged with its traceback, answered in JSON like every error
            if request.writer is not None and request.writer.output_size > 0:
                raise  # its answer has begun: aiohttp cuts the connection (a second answer would break it)
            log.exception("%s %s: the handler failed", request.method, request.path)
            return error(500, "internal server error: the service logged it")
        finally:
            if gate is not None:
                gate.end(request.transport)
            self.metrics.http_request(route, status, time.perf_counter() - started)

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """The ``expect_handler`` of every route: aiohttp runs it for a request with an
        ``Expect`` header, before the middleware, so an answer it gives it counts itself.
        ``POST /v1/events`` is refused first as its headers alone refuse it (token, size,
        ``Idempotency-Key``, budget): the client that waits for ``100 Continue`` is answered
        without sending its body.  Then ``100-continue`` is sent ``100 Continue``; any other
        expectation is a 417 (RFC 9110 §10.1.1).  An HTTP/1.0 request's ``Expect`` is
        ignored, as aiohttp does."""
        if request.version != HttpVersion11:
            return None
        started = time.perf_counter()
        expect = request.headers.get(hdrs.EXPECT, "")
        route = _route(request)
        resp = self.post_refusal(request) if route == "/v1/events" else None
        if resp is None:
            if expect.strip().lower() == "100-continue":
                await request.writer.write(CONTINUE)
                request.writer.output_size = 0  # the answer has not begun (as aiohttp's own handler)
                return None
            resp = expectation_failed(expect)
        resp.force_close()  # its body, if the client sends one, is not read
        self.metrics.http_request(route, resp.status, time.perf_counter() - started)
        return resp

    def expect_unmatched(self, handle: ServerHandler) -> ServerHandler:
        """The server's request handler ``handle`` (the app's), answering in JSON, counted, an
        ``Expect`` other than ``100-continue`` on a path or method no route serves (aiohttp's
        own expect handler there answers 417 in plain text, before the middleware)."""
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await handle(request)
            except web.HTTPExpectationFailed:
                resp = expectation_failed(request.headers.get(hdrs.EXPECT, ""))
                resp.force_close()
                self.metrics.http_request(UNMATCHED, resp.status, None)
                return resp
        return handler

    async def post(self, request: web.Request) -> web.Response:
        # a coroutine function for aiohttp (a handler object's __call__ is deprecated there)
        return await self.post_events(request)

    async def no_ingest(self, request: web.Request) -> web.Response:
        return _no_ingest(request)

    async def healthz(self, request: web.Request) -> web.Response:
        reason = self.not_alive()
        if reason is None:
            return web.json_response({"status": "alive"})
        return web.json_response({"status": "stuck", "reason": reason}, status=503)

    async def readyz(self, request: web.Request) -> web.Response:
        reason = self.not_ready()
        if reason is None:
            return web.json_response({"status": "ready", **self.notes})
        return web.json_response({"status": "not ready", "reason": reason, **self.notes}, status=503)

    async def get_metrics(self, request: web.Request) -> web.Response:
        # the text format, or OpenMetrics when asked (Accept), gzipped when the scraper takes it
        # (Prometheus sends Accept-Encoding: gzip); prometheus_client's own negotiation
        encoder, ctype = choose_encoder(request.headers.get("Accept", ""))
        # ``?name[]=a&name[]=b``: only those samples, as prometheus_client's own exposition
        # answers it (a poller that wants one counter does not pay for the whole registry)
        names = request.query.getall("name[]", [])
        body = encoder(self.registry.restricted_registry(names) if names else self.registry)
        headers = {"Content-Type": ctype, "Vary": "Accept, Accept-Encoding"}
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def get_snapshots(self, request: web.Request) -> web.StreamResponse:
        """The newest snapshots, or a page from ``since`` or ``after`` on (web.snapshots), written
        within its view's slot: at most ``max_snapshot_views`` pages are in memory at once."""
        src = self.snapshots
        query = snapshot_query(request.query, src.instance)
        if isinstance(query, str):
            return error(400, query)
        if self.snapshot_views >= self.max_snapshot_views:
            return error(503, "too many snapshot requests at once: retry in a second", {"Retry-After": "1"})
        self.snapshot_views += 1
        try:
            body = orjson.dumps(snapshot_answer(src, query))
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(body)
            try:
                async with asyncio.timeout(self.snapshot_send_s):
                    await resp.prepare(request)
                    await resp.write(body)
                    await resp.write_eof()
            except TimeoutError:  # a client that does not read: its page is dropped with the connection
                if request.transport is not None:
                    request.transport.abort()
            except ConnectionError:  # the client went away
                pass
            return resp
        finally:
            self.snapshot_views -= 1


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, for one server: a request aiohttp's own parser refuses (a
    malformed request line, header or chunk size: the client's error, which aiohttp answers
    400 and closes) is counted as ``clickstream_http_requests_total{route="unmatched",
    code="4xx"}`` and logged as one warning line per ``REFUSED_LOG_INTERVAL`` at most, with
    the number since the last one, instead of an error with a traceback per request;
    everything else goes to aiohttp's logger as before."""

    def __init__(self, metrics: HttpMetrics) -> None:
        super().__init__(server_logger, {})
        self.metrics = metrics
        self.malformed = 0
        self._logged = 0  # self.malformed at the last warning
        self._next_log = 0.0

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if not self._refused(exc_info, args):
            self.logger.error(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: object, **kw: Any) -> None:  # a first request not HTTP at all
        if not self._refused(kw.get("exc_info"), args):
            self.logger.debug(msg, *args, **kw)

    def _refused(self, exc: object, args: tuple[object, ...]) -> bool:
        if not isinstance(exc, HttpProcessingError) or not 400 <= exc.code < 500:
            return False
        self.malformed += 1
        self.metrics.http_request(UNMATCHED, exc.code, None)
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + REFUSED_LOG_INTERVAL
            first = str(exc.message).strip().splitlines()[0].rstrip(":") if exc.message else type(exc).__name__
            log.warning("HTTP: %d malformed request(s) answered %d since the last such line, the last from %s: %s",
                        self.malformed - self._logged, exc.code, args[0] if args else "?", first[:200])
            self._logged = self.malformed
        return True


class _Site(web.TCPSite):
    """``TCPSite`` whose connections go through a ``ConnectionGate``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: ConnectionGate) -> None:
        super().__init__(runner, host, port)
        self.gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner (what TCPSite.start does first)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.gate.protocol(server), self._host, self._port)

    def bound_port(self) -> int | None:
        """The port of the first listening socket (None before start)."""
        srv = self._server
        sockets = getattr(srv, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else None


class HttpServer(mode.Service):
    mundane_level = "debug"  # mode's "Starting..."/"Stopping..." lines

    def __init__(self, routes: Routes, host: str, port: int, max_body_bytes: int, max_connections: int = 1000,
                 header_timeout: float = 10.0, on_listening: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        """``on_listening``: called with the port bound (a free one for ``port`` 0) once listening."""
        super().__init__(**kwargs)
        self.routes = routes
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.on_listening = on_listening
        self.gate = ConnectionGate(max_connections, header_timeout, routes.metrics.http_connections_refused)
        routes.gate = self.gate
        self.runner: web.AppRunner | None = None
        self.sweeper: asyncio.Task | None = None

    async def on_start(self) -> None:
        # auto_decompress=False: aiohttp would otherwise inflate Content-Encoding bodies itself
        # (gzip then failed as "not valid gzip", and the raw-size limit did not apply to the
        # compressed bytes); ingest decompresses with its own bound instead.
        # keepalive_timeout: an idle connection is closed by the gate's header timeout anyway
        self.runner = web.AppRunner(self.routes.app(self.max_body_bytes), access_log=None, auto_decompress=False,
                                    keepalive_timeout=self.gate.header_timeout,
                                    logger=ServerLog(self.routes.metrics))
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        server.request_handler = self.routes.expect_unmatched(server.request_handler)
        site = _Site(self.runner, self.host, self.port, self.gate)
        await site.start()
        self.port = site.bound_port() or self.port  # AGG_WEB_PORT=0: the free port the system chose
        self.sweeper = asyncio.get_running_loop().create_task(self.gate.run())
        log.info("HTTP listening on http://%s:%s", self.host, self.port)
        if self.on_listening is not None:
            self.on_listening(self.port)

    async def on_stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if self.runner is not None:
            log.info("HTTP: stopping (finishing the requests in flight)")
            await self.runner.cleanup()  # stops listening, waits for the handlers in flight
            self.runner = None


def _never(request: web.Request) -> None:
    return None


def _no_ingest(request: web.Request) -> web.Response:
    return error(503, "this process does not serve ingest (AGG_ROLE=worker): send events to an ingest process",
                 {"Retry-After": "5"})


def _route(request: web.Request) -> str:
    """The route label of ``request``: its resource's path, or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def expectation_failed(expect: str) -> web.Response:
    return error(417, f"unsupported expectation {expect[:100]!r}: only Expect: 100-continue is")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)
