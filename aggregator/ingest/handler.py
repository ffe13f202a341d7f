"""``POST /v1/events`` (docs/contract.md §3): authenticate, read the body within its
bound, parse, validate, produce to ``clicks``, and answer once the broker has
acknowledged every accepted record.

One ``ingest_ts`` per request (its receipt time).  Records are grouped by region
(order within a region kept) and appended, without an await per record, to the shared
per-partition record batches of ``producer.BatchProducer``.

With tracing on (``aggregator.tracing``, docs/tracing.md) a request is a span, and a
sampled one's ``traceparent`` follows ``clickstream-ingest`` in its records' headers.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from aggregator import tracing
from aggregator.core.contract import OTHER_REGION, Header, ingest_header
from aggregator.ingest.body import BodyError, decode_body, gunzip_bounded, validate_records
from aggregator.ingest.producer import IngestProducer
from aggregator.metrics import Metrics

log = logging.getLogger("aggregator.ingest")
INGEST_TIMEOUT_S = 5.0  # then 503 + Retry-After: the broker cannot take the records now
READ_CHUNK = 1 << 16


class IngestHandler:
    """Owns the set of regions ingest has let through (capped at ``max_regions``; the
    rest are sent as ``__other__``)."""

    def __init__(self, producer: IngestProducer, metrics: Metrics, token: str, max_body_bytes: int,
                 max_regions: int) -> None:
        self.producer = producer
        self.metrics = metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_regions = max_regions
        self.regions: set[str] = set()

    async def __call__(self, request: web.Request) -> web.Response:
        tracer = tracing.tracer
        if tracer is None:
            return await self.handle(request, None)
        with tracing.request_span(tracer, "POST /v1/events", "/v1/events", request.method, request.headers) as span:
            resp = await self.handle(request, span)
            tracing.end_request(span, resp.status)
            return resp

    async def handle(self, request: web.Request, span: Any) -> web.Response:
        """The request; ``span`` (tracing on: its server span, else None) gets its sizes and
        counts, and its sampled context goes into the records' headers."""
        ingest_ts = int(time.time() * 1000)
        t0 = time.perf_counter()
        m = self.metrics
        if self.token:
            auth = request.headers.get("Authorization", "")
            # headers arrive as surrogate-escaped UTF-8: a non-ASCII header must be a 401, not a 500
            if not hmac.compare_digest(auth.encode("utf-8", "surrogateescape"),
                                       f"Bearer {self.token}".encode("utf-8", "surrogateescape")):
                return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return error(413, f"body exceeds {limit} bytes")
        try:
            body = await read_body(request, limit)
            if span is not None:
                span.set_attribute("http.request.body.size", len(body))
            enc = request.headers.get("Content-Encoding", "").strip().lower()
            if enc in ("gzip", "x-gzip"):
                body = gunzip_bounded(body, limit)
            elif enc not in ("", "identity"):
                raise BodyError(415, f"unsupported content encoding {enc!r}: use gzip or none")
            items = decode_body(body, request.headers.get("Content-Type", "application/json"))
        except BodyError as exc:
            m.ingest_failed()
            return error(exc.status, exc.message)
        good, errors, reasons = validate_records(items)
        if span is not None:
            span.set_attributes({"clickstream.events.accepted": len(good),
                                 "clickstream.events.rejected": len(items) - len(good)})
        if reasons:
            m.rejected(reasons)
        per_region: dict[str, int] = {}
        if good:
            m.ingest_waiting(len(good))
            try:
                await self._produce(good, ingest_ts, per_region,  # bounded by INGEST_TIMEOUT_S
                                    None if span is None else tracing.traceparent(span))
            except Exception as exc:  # noqa: BLE001 - any broker failure is a 503
                log.warning("ingest: broker did not take %d records: %r", len(good), exc)
                m.ingest_failed(len(good))
                return error(503, "the broker did not acknowledge the records in time; part of them may have "
                                  "been stored", {"Retry-After": "2"})
            finally:
                m.ingest_waiting(-len(good))
        m.ingest_accepted(per_region, len(items), t0)
        return web.Response(body=orjson.dumps({
            "accepted": len(good), "rejected": len(items) - len(good),
            "ingest_ts": ingest_ts, "errors": errors}), content_type="application/json")

    async def _produce(self, events: list[dict[str, Any]], ingest_ts: int, per_region: dict[str, int],
                       traceparent: bytes | None = None) -> None:
        """Send ``events`` to ``clicks`` and return once the broker has acknowledged all of
        them (raises otherwise); with a ``traceparent`` (a sampled request span), every
        record carries it as a second header."""
        batcher = self.producer.batcher
        if batcher is None:
            raise RuntimeError("the ingest producer has not started")
        if not batcher.has_metadata():
            await asyncio.wait_for(batcher.ensure_metadata(), timeout=INGEST_TIMEOUT_S)
        regions = self.regions
        cap = self.max_regions
        dumps = orjson.dumps
        plain = ingest_header(ingest_ts, None)  # shared by the records without a client ts
        headers = ingest_header if traceparent is None else _with_header((tracing.TRACEPARENT, traceparent))
        if traceparent is not None:
            plain.append((tracing.TRACEPARENT, traceparent))
        by_region: dict[str, list[tuple[bytes, list[Header]]]] = {}
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
            values.append((dumps(ev), plain if cts is None else headers(ingest_ts, cts)))
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


def _with_header(extra: Header) -> Callable[[int, int | None], list[Header]]:
    """``ingest_header`` followed by ``extra`` (the request span's ``traceparent``)."""
    def headers(ingest_ts: int, client_ts: int | None) -> list[Header]:
        out = ingest_header(ingest_ts, client_ts)
        out.append(extra)
        return out
    return headers


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    # StreamReader.read(n) returns what is buffered, not n bytes: read to EOF
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)
