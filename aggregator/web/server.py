"""aiohttp routes: ingest, metrics, snapshots, health (CONTRACT §3)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Callable

import orjson
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

from aggregator.core.contract import CLICKS
from aggregator.config import Settings
from aggregator.core.contract import OTHER_REGION, ingest_header
from aggregator.core.snapshots import SnapshotStore
from aggregator.ingest.body import BodyError, decode_body, gunzip_bounded, validate_records
from aggregator.metrics import Metrics
from aggregator.ingest.producer import BatchProducer

log = logging.getLogger("aggregator.web")
INGEST_TIMEOUT_S = 5.0  # then 503 + Retry-After: the broker cannot take the records now


class WebService:
    def __init__(self, settings: Settings, metrics: Metrics, snapshots: SnapshotStore,
                 ready: Callable[[], bool], producer: Any | None) -> None:
        self.s = settings
        self.m = metrics
        self.snapshots = snapshots
        self.ready = ready
        self.producer = producer  # aiokafka producer, or None (no ingest)
        self.regions: set[str] = set()
        self.batcher: BatchProducer | None = None
        # labelled metric children looked up once, not per request
        self._ingested: dict[str, Any] = {}
        self._processed = metrics.stage_processed.labels("ingest")
        self._duration = metrics.stage_duration.labels("ingest")
        self._pending = metrics.stage_pending.labels("ingest")  # records waiting for the broker's ack
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes + 1)
        app.add_routes([
            web.post("/v1/events", self.post_events),
            web.get("/metrics", self.get_metrics),
            web.get("/v1/snapshots", self.get_snapshots),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    async def start(self) -> None:
        # auto_decompress=False: aiohttp would otherwise inflate Content-Encoding bodies itself
        # (gzip then failed in gunzip_bounded as "not valid gzip", and the raw-size limit did not
        # apply to the compressed bytes); ingest decompresses with its own bound instead.
        self.runner = web.AppRunner(self.app(), access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.s.web_host, self.s.web_port)
        await site.start()
        log.info("HTTP listening on http://%s:%s", self.s.web_host, self.s.web_port)

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    # ---------------------------------------------------------------- routes
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    async def get_metrics(self, request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        if "application/openmetrics-text" in accept:
            body, ctype = om_generate_latest(self.m.registry), OM_CONTENT_TYPE
        else:
            body, ctype = generate_latest(self.m.registry), "text/plain; version=0.0.4; charset=utf-8"
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def get_snapshots(self, request: web.Request) -> web.Response:
        region = request.query.get("region")
        since_raw = request.query.get("since")
        try:
            since = int(since_raw) if since_raw is not None else None
        except ValueError:
            return _error(400, "since must be epoch milliseconds")
        snaps = self.snapshots.query(region, since)
        return web.Response(body=orjson.dumps({"snapshots": snaps}), content_type="application/json")

    async def post_events(self, request: web.Request) -> web.Response:
        ingest_ts = int(time.time() * 1000)
        t0 = time.perf_counter()
        m = self.m
        if self.s.ingest_token:
            auth = request.headers.get("Authorization", "")
            # headers arrive as surrogate-escaped UTF-8: a non-ASCII header must be a 401, not a 500
            if not hmac.compare_digest(auth.encode("utf-8", "surrogateescape"),
                                       f"Bearer {self.s.ingest_token}".encode("utf-8", "surrogateescape")):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if self.producer is None:
            return _error(503, "this process does not serve ingest (AGG_ROLE=worker): send events to an ingest process", {"Retry-After": "5"})
        limit = self.s.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body exceeds {limit} bytes")
        try:
            # StreamReader.read(n) returns what is buffered, not n bytes: read to EOF
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await request.content.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"body exceeds {limit} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            enc = request.headers.get("Content-Encoding", "").strip().lower()
            if enc in ("gzip", "x-gzip"):
                body = gunzip_bounded(body, limit)
            elif enc not in ("", "identity"):
                raise BodyError(415, f"unsupported content encoding {enc!r}: use gzip or none")
            items = decode_body(body, request.headers.get("Content-Type", "application/json"))
        except BodyError as exc:
            m.stage_errors.labels("ingest").inc()
            return _error(exc.status, exc.message)
        good, errors, reasons = validate_records(items)
        if reasons:
            Metrics.add_counts(m.rejected, reasons)
        per_region: dict[str, int] = {}
        if good:
            self._pending.inc(len(good))
            try:
                await self._produce(good, ingest_ts, per_region)  # bounded by INGEST_TIMEOUT_S
            except Exception as exc:  # noqa: BLE001 - any broker failure is a 503
                log.warning("ingest: broker did not take %d records: %r", len(good), exc)
                m.stage_errors.labels("ingest").inc(len(good))
                return _error(503, "the broker did not acknowledge the records in time; part of them may have been stored",
                              {"Retry-After": "2"})
            finally:
                self._pending.dec(len(good))
        children = self._ingested
        for region, n in per_region.items():
            child = children.get(region)
            if child is None:  # at most max_regions + 1 of them (the cap of _produce)
                child = children[region] = m.ingested.labels(region)
            child.inc(n)
        self._processed.inc(len(items))
        self._duration.observe(time.perf_counter() - t0)
        return web.Response(body=orjson.dumps({
            "accepted": len(good), "rejected": len(items) - len(good),
            "ingest_ts": ingest_ts, "errors": errors}), content_type="application/json")

    async def _produce(self, events: list[dict], ingest_ts: int, per_region: dict[str, int]) -> None:
        """Send ``events`` to ``clicks`` and return once the broker has acknowledged all of
        them (raises otherwise).  Records are grouped by region (order within a region is
        kept) and appended, without an await per record, to the shared per-partition record
        batches of ``BatchProducer`` (aggregator/web/produce.py)."""
        batcher = self.batcher
        if batcher is None or batcher.producer is not self.producer:
            batcher = self.batcher = BatchProducer(self.producer, CLICKS)
        if not batcher.has_metadata():
            await asyncio.wait_for(batcher.ensure_metadata(), timeout=INGEST_TIMEOUT_S)
        regions = self.regions
        cap = self.s.max_regions
        dumps = orjson.dumps
        plain = ingest_header(ingest_ts, None)  # shared by the records without a client ts
        by_region: dict[str, list[tuple[bytes, list]]] = {}
        for ev in events:
            region = ev["region"]
            values = by_region.get(region)
            if values is None:
                if region not in regions:
                    if len(regions) >= cap:
                        region = ev["region"] = OTHER_REGION
                    else:
                        regions.add(region)
                values = by_region.get(region)
                if values is None:
                    values = by_region[region] = []
            ev["ingest_ts"] = ingest_ts
            cts = ev.get("ts")
            values.append((dumps(ev), plain if cts is None else ingest_header(ingest_ts, cts)))
        waits = batcher.submit(by_region, ingest_ts)
        # asyncio.wait, not gather: a request that gives up must not cancel the futures
        # other requests' records share
        done, pending = await asyncio.wait(waits, timeout=INGEST_TIMEOUT_S)
        if pending:
            raise TimeoutError(f"the broker did not acknowledge within {INGEST_TIMEOUT_S} s")
        for fut in done:
            fut.result()  # raises the broker's error
        for region, values in by_region.items():
            per_region[region] = len(values)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)
