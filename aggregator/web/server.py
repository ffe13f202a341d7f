"""The HTTP routes (docs/contract.md §3), and nothing else.

What they serve comes in through small interfaces, so this module knows neither the
ingest nor the worker: a handler for ``POST /v1/events`` (None: this process does not
serve ingest), a source of recent snapshots, a callable that says why the process is
not ready (None: it is) and the metrics registry.  The server is a ``mode.Service``: started before, and stopped after, the
parts it serves (stopping finishes the requests in flight).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import mode
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

from aggregator.core.contract import Snapshot

log = logging.getLogger("aggregator.web")

Handler = Callable[[web.Request], Awaitable[web.Response]]
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotSource(Protocol):
    def query(self, region: str | None, since: int | None) -> list[Snapshot]: ...


class NoSnapshots:
    """The snapshot source of a process that runs no worker (``AGG_ROLE=ingest``)."""

    def query(self, region: str | None, since: int | None) -> list[Snapshot]:
        return []


class Routes:
    def __init__(self, registry: CollectorRegistry, snapshots: SnapshotSource, not_ready: Callable[[], str | None],
                 post_events: Handler | None, notes: dict[str, str] | None = None) -> None:
        self.notes = notes or {}  # shown in every /readyz answer
        self.registry = registry
        self.snapshots = snapshots
        self.not_ready = not_ready  # why this process is not ready, or None when it is
        self.post_events = post_events or self.no_ingest

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes + 1)
        app.add_routes([
            web.post("/v1/events", self.post_events),
            web.get("/metrics", self.get_metrics),
            web.get("/v1/snapshots", self.get_snapshots),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    async def no_ingest(self, request: web.Request) -> web.Response:
        return error(503, "this process does not serve ingest (AGG_ROLE=worker): send events to an ingest process",
                     {"Retry-After": "5"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        reason = self.not_ready()
        if reason is None:
            return web.json_response({"status": "ready", **self.notes})
        return web.json_response({"status": "not ready", "reason": reason, **self.notes}, status=503)

    async def get_metrics(self, request: web.Request) -> web.Response:
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            body, ctype = om_generate_latest(self.registry), OM_CONTENT_TYPE
        else:
            body, ctype = generate_latest(self.registry), PROMETHEUS_TEXT
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def get_snapshots(self, request: web.Request) -> web.Response:
        region = request.query.get("region")
        since_raw = request.query.get("since")
        try:
            since = int(since_raw) if since_raw is not None else None
        except ValueError:
            return error(400, "since must be epoch milliseconds")
        snaps = self.snapshots.query(region, since)
        return web.Response(body=orjson.dumps({"snapshots": snaps}), content_type="application/json")


class HttpServer(mode.Service):
    mundane_level = "debug"  # mode's "Starting..."/"Stopping..." lines

    def __init__(self, routes: Routes, host: str, port: int, max_body_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.routes = routes
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        # auto_decompress=False: aiohttp would otherwise inflate Content-Encoding bodies itself
        # (gzip then failed as "not valid gzip", and the raw-size limit did not apply to the
        # compressed bytes); ingest decompresses with its own bound instead.
        self.runner = web.AppRunner(self.routes.app(self.max_body_bytes), access_log=None, auto_decompress=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        log.info("HTTP listening on http://%s:%s", self.host, self.port)

    async def on_stop(self) -> None:
        if self.runner is not None:
            log.info("HTTP: stopping (finishing the requests in flight)")
            await self.runner.cleanup()  # stops listening, waits for the handlers in flight
            self.runner = None


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)
