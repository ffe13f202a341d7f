"""``POST /v1/events`` (docs/contract.md §3): authenticate, read the body within its
bound, parse, validate, produce to ``clicks``, and answer once the broker has
acknowledged every accepted record.

One ``ingest_ts`` per request (its receipt time).  Records are grouped by region
(order within a region kept) and appended, without an await per record, to the shared
per-partition record batches of ``producer.BatchProducer``.

What each record carries is ingest/records.py's: with aggregates on (``AGG_AGGREGATES``),
a record of an event with a ``user_id`` or a ``url`` has ``clickstream-agg`` right after
``clickstream-ingest``: the hashes and the normalised URL the worker's sketches need
(core.contract), computed there once per event.

With tracing on (``aggregator.tracing``, docs/tracing.md) a request is a span, and a
sampled one's ``traceparent`` follows ``clickstream-ingest`` (and ``clickstream-agg``) in
its records' headers.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from aggregator import tracing
from aggregator.core.contract import OTHER_REGION
from aggregator.core.dedupid import event_key, id_field, key_id_fields, other_region_id, request_key
from aggregator.ingest.body import MAX_ERRORS, BodyError, Event, decode_slices, gunzip_bounded, validate_records
from aggregator.ingest.budget import InflightBudget, Reservation
from aggregator.ingest.producer import IngestProducer, ProducerBusy
from aggregator.ingest.records import AggHeaders, Records
from aggregator.metrics import Metrics

log = logging.getLogger("aggregator.ingest")
INGEST_TIMEOUT_S = 5.0  # then 503 + Retry-After: the broker cannot take the records now
READ_CHUNK = 1 << 16
BUSY_POLL_S = 0.005  # a slice waits this long between looks at a partition with too many batches waiting
REGION_SWEEP_S = 1.0  # at the region cap, idle regions are looked for at most this often
IDEMPOTENCY_KEY_MAX = 255  # characters of an Idempotency-Key (visible ASCII)
# a body must end, or grow by BODY_IDLE_BYTES, within every BODY_IDLE_S, else 408 (docs/contract.md §3)
BODY_IDLE_S = 5.0
BODY_IDLE_BYTES = 16 << 10


class IngestHandler:
    """Owns the regions ingest has let through (at most ``max_regions`` seen within
    ``region_idle_ms``; the rest are sent as ``__other__``) and the in-flight budget."""

    def __init__(self, producer: IngestProducer, metrics: Metrics, token: str, max_body_bytes: int,
                 max_regions: int, region_idle_ms: int = 3_600_000, budget: InflightBudget | None = None,
                 body_timeout_s: float = 30.0, dedup: bool = True, aggregates: bool = False,
                 url_keep_query: bool = False) -> None:
        self.producer = producer
        self.metrics = metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_regions = max_regions
        self.region_idle_ms = region_idle_ms
        self.regions: dict[str, int] = {}  # region -> time (ms) of the last request that had it
        self._swept_ms = 0
        self.budget = budget or InflightBudget(4 * max_body_bytes)
        self.body_timeout_s = body_timeout_s
        self.body_idle_s = BODY_IDLE_S
        self.dedup = dedup  # events get dedup ids (core.dedup): AGG_DEDUP_SECONDS > 0
        # AGG_AGGREGATES: the clickstream-agg header of each event with a user_id or url
        self.agg = AggHeaders(url_keep_query) if aggregates else None

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
        refused = self.refusal(request)
        if refused is not None:
            return refused
        key = request.headers.get("Idempotency-Key") if self.dedup else None
        held = Reservation(self.budget)
        try:
            return await self._handle(request, span, held, ingest_ts, t0, key)
        finally:
            held.release()

    def refusal_before_continue(self, request: web.Request) -> web.Response | None:
        """``refusal`` as the HTTP layer asks it before it sends ``100 Continue``
        (web.server): with tracing on, a request refused there is a server span too, like
        one this handler answers."""
        resp = self.refusal(request)
        tracer = tracing.tracer
        if resp is not None and tracer is not None:
            with tracing.request_span(tracer, "POST /v1/events", "/v1/events", request.method,
                                      request.headers) as span:
                tracing.end_request(span, resp.status)
        return resp

    def refusal(self, request: web.Request) -> web.Response | None:
        """The answer to a request its headers alone refuse (token, ``Content-Length``,
        ``Idempotency-Key``, the budget), else None.  The HTTP layer asks it before it sends
        ``100 Continue`` (``refusal_before_continue``), so a client that waits for one sends
        no body to be refused."""
        if self.token:
            # the scheme is case-insensitive (RFC 9110 §11.1): ``bearer x`` is ``Bearer x``
            scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
            # headers arrive as surrogate-escaped UTF-8: a non-ASCII header must be a 401, not a 500
            if not (hmac.compare_digest(cred.lstrip(" ").encode("utf-8", "surrogateescape"),
                                        self.token.encode("utf-8", "surrogateescape"))
                    and scheme.lower() == "bearer"):
                return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return error(413, f"body exceeds {limit} bytes")
        keys = request.headers.getall("Idempotency-Key", [])
        if len(keys) > 1:  # which one would a retry repeat?
            return error(400, "more than one Idempotency-Key header: send one key per body")
        key = keys[0] if keys else None
        if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()
                                    and " " not in key):
            return error(400, f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters")
        # a body that cannot fit now is refused before a byte of it is read; one that may
        # takes its bytes as they arrive, so a connection that sends none holds none
        if not self.budget.fits(request.content_length or 0):
            return over_budget(self.budget)
        return None

    async def _handle(self, request: web.Request, span: Any, held: Reservation, ingest_ts: int,
                      t0: float, key: str | None) -> web.Response:
        """``key``: the request's ``Idempotency-Key`` (None: none, or dedup off)."""
        m = self.metrics
        limit = self.max_body_bytes
        try:
            try:
                body = await read_body(request, limit, held, self.body_timeout_s, self.body_idle_s)
            except BodyTimeout as exc:
                m.ingest_failed()
                resp = error(408, str(exc))
                resp.force_close()
                return resp
            except (ConnectionError, HttpProcessingError) as exc:
                # the client went away mid-body (connection lost, chunked or Content-Length
                # body cut short): its failure, not ours; nothing of it is produced
                m.ingest_failed()
                log.debug("ingest: the body was cut short: %r", exc)
                resp = error(400, "the body was cut short: the connection was lost before its end")
                resp.force_close()
                return resp
            if body is None:
                m.ingest_failed()
                return over_budget(self.budget)
            if span is not None:
                span.set_attribute("http.request.body.size", len(body))
            # the codings in the order applied, over every Content-Encoding line (RFC 9110 §8.4)
            codings = [c for c in (c.strip().lower() for h in request.headers.getall("Content-Encoding", [])
                                   for c in h.split(",")) if c not in ("", "identity")]
            for enc in codings:
                if enc not in ("gzip", "x-gzip"):
                    raise BodyError(415, f"unsupported content encoding {enc!r}: use gzip or none")
            if len(codings) > 1:  # each layer inflates up to the body limit, on the event loop: one
                raise BodyError(415, "more than one gzip layer: compress the body once")
            for _ in codings:
                body = gunzip_bounded(body, limit)
                if not held.take(len(body) - held.held):  # what it inflated to counts
                    m.ingest_failed()
                    return over_budget(self.budget)
            # the key and the body it names (core.dedupid): another body under the same key is
            # another request, counted; a retry sends the same one
            kh = None if key is None else request_key(key, body)
            slices = decode_slices(body, request.headers.get("Content-Type", "application/json"))
        except BodyError as exc:
            m.ingest_failed()
            return error(exc.status, exc.message)
        traceparent = None if span is None else tracing.traceparent(span)
        indices: list[int] | None = [] if kh is not None else None
        total = accepted = 0
        errors: list[dict] = []
        reasons: dict[str, int] = {}
        per_region: dict[str, int] = {}
        waits: set[asyncio.Future] = set()
        try:
            for items in slices:
                if total:
                    await asyncio.sleep(0)  # other requests go on between the slices of a big body
                if indices is not None:
                    indices.clear()
                good, errs, why = validate_records(items, total, MAX_ERRORS - len(errors), indices)
                total += len(items)
                del items
                errors += errs
                for reason, n in why.items():
                    reasons[reason] = reasons.get(reason, 0) + n
                if good:
                    m.ingest_waiting(len(good))
                    accepted += len(good)
                    ids = self._ids(good, kh, indices) if self.dedup else None
                    await self._submit(good, ingest_ts, per_region, waits, traceparent, ids)
            if waits:
                await self._acknowledged(waits, per_region)
                self.producer.acknowledged()
        except Exception as exc:  # noqa: BLE001 - any broker failure is a 503
            if reasons:
                m.rejected(reasons)
            m.ingest_failed(accepted)
            refused = self.producer.refusing(exc)  # an authorization error: said once, and in /readyz
            if refused is not None:
                return error(503, refused, {"Retry-After": "2"})
            log.warning("ingest: broker did not take %d records: %r", accepted, exc)
            return error(503, "the broker did not acknowledge the records in time; part of them may have "
                              "been stored", {"Retry-After": "2"})
        finally:
            if accepted:
                m.ingest_waiting(-accepted)
        if span is not None:
            span.set_attributes({"clickstream.events.accepted": accepted,
                                 "clickstream.events.rejected": total - accepted})
        if reasons:
            m.rejected(reasons)
        m.ingest_accepted(per_region, total, t0)
        return web.Response(body=orjson.dumps({
            "accepted": accepted, "rejected": total - accepted,
            "ingest_ts": ingest_ts, "errors": errors}), content_type="application/json")

    async def _acknowledged(self, waits: set[asyncio.Future], regions: Iterable[str]) -> None:
        """Until every batch of ``waits`` is delivered (raises the broker's error), or
        INGEST_TIMEOUT_S pass in which none of them is delivered and the broker takes no
        batch of the partitions of ``regions`` (the request's) (TimeoutError): one stalled
        partition is not waited for while the others move."""
        batcher = self.producer.batcher
        assert batcher is not None
        pending = waits
        partitions = {batcher.partition_of(r) for r in regions}
        mark = batcher.progress(partitions)
        while pending:
            # asyncio.wait, not gather: a request that gives up must not cancel the futures
            # other requests' records share
            done, pending = await asyncio.wait(pending, timeout=INGEST_TIMEOUT_S,
                                               return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                fut.result()  # raises the broker's error
            if not done:
                sent = batcher.progress(partitions)
                if sent == mark:
                    raise TimeoutError(f"the broker acknowledged nothing within {INGEST_TIMEOUT_S} s")
                mark = sent

    @staticmethod
    def _ids(events: list[Event], kh: int | None, indices: list[int] | None) -> list[bytes | None] | None:
        """The dedup id of each event as its ingest header carries it (core.dedup.id_field):
        its ``event_id`` (with its region, the record's key), else (the request's
        ``Idempotency-Key``, its index in the body); None: no event has one.  A keyed
        request's fields in bulk (core.dedup.key_id_fields: the key's hex once per request)."""
        eids = [ev.event_id for ev in events]
        keyed = None if kh is None or indices is None else key_id_fields(kh, indices)
        if keyed is not None and eids.count(None) == len(eids):
            return cast(list[bytes | None], keyed)
        ids: list[bytes | None] | None = None
        for n, eid in enumerate(eids):
            if eid is not None:
                did: bytes | None = id_field(event_key(events[n].region, eid))
            elif keyed is not None:
                did = keyed[n]
            else:
                continue
            if ids is None:
                ids = [None] * len(events)
            ids[n] = did
        return ids

    def _region(self, region: str, now_ms: int) -> str:
        """``region`` when it is let through (its time noted), else ``__other__``: at the cap,
        regions not seen within ``region_idle_ms`` are forgotten (at most every REGION_SWEEP_S),
        so a new region can take the place of one gone idle.  A client's own ``__other__``
        is counted as such and takes no place, as at the worker (core.regioncap)."""
        regions = self.regions
        if region == OTHER_REGION:
            return region
        if region in regions or len(regions) < self.max_regions:
            regions[region] = now_ms
            return region
        if now_ms - self._swept_ms >= REGION_SWEEP_S * 1000:
            self._swept_ms = now_ms
            cutoff = now_ms - self.region_idle_ms
            idle = [r for r, seen in regions.items() if seen < cutoff]
            for r in idle:
                del regions[r]
            if self.producer is not None and self.producer.batcher is not None:
                self.producer.batcher.forget(idle)  # its routes go with them
            if len(regions) < self.max_regions:
                regions[region] = now_ms
                return region
        return OTHER_REGION

    async def _submit(self, events: list[Event], ingest_ts: int, per_region: dict[str, int],
                      waits: set[asyncio.Future], traceparent: bytes | None = None,
                      ids: list[bytes | None] | None = None) -> None:
        """Append ``events`` to the open record batches of ``clicks``; their delivery futures
        go into ``waits``.  A record's value is serialised as it is appended (so the
        serialised form of a slice never lives at once); with a ``traceparent`` (a sampled
        request span), every record carries it as a second header.  ``ids``: the events'
        dedup ids, carried in their ingest headers.  Waits, up to
        INGEST_TIMEOUT_S, while a partition has too many batches waiting (then raises)."""
        batcher = self.producer.batcher
        if batcher is None:
            raise RuntimeError("the ingest producer has not started")
        if not batcher.has_metadata():
            await asyncio.wait_for(batcher.ensure_metadata(), timeout=INGEST_TIMEOUT_S)
        # region -> (its events, their dedup ids or None)
        by_region: dict[str, tuple[list[Event], list[bytes | None] | None]] = {}
        for n, ev in enumerate(events):
            region = ev.region
            entry = by_region.get(region)
            if entry is None:
                region = self._region(region, ingest_ts)
                if region is OTHER_REGION:
                    if ids is not None and (did := ids[n]) is not None:  # an event id keeps its region
                        ids[n] = other_region_id(did, ev.region)  # (core.dedup; idempotent)
                    ev.region = region
                entry = by_region.get(region)
                if entry is None:
                    entry = by_region[region] = ([], None if ids is None else [])
            ev.ingest_ts = ingest_ts
            entry[0].append(ev)
            if ids is not None:
                entry[1].append(ids[n])  # type: ignore[union-attr]
        records = Records(ingest_ts, traceparent, self.agg)
        partitions = {batcher.partition_of(r) for r in by_region}
        mark, deadline = batcher.progress(partitions), time.monotonic() + INGEST_TIMEOUT_S
        while True:
            try:
                waits |= batcher.submit({r: records.of(*entry) for r, entry in by_region.items()}, ingest_ts)
                break
            except ProducerBusy:
                # wait for room while the broker takes batches of these partitions; give up
                # after INGEST_TIMEOUT_S without one (not after INGEST_TIMEOUT_S of waiting:
                # the slices of concurrent big bodies take turns)
                now, sent = time.monotonic(), batcher.progress(partitions)
                if sent != mark:
                    mark, deadline = sent, now + INGEST_TIMEOUT_S
                elif now >= deadline:
                    raise
                await asyncio.sleep(BUSY_POLL_S)
        for region, entry in by_region.items():
            per_region[region] = per_region.get(region, 0) + len(entry[0])


class BodyTimeout(Exception):
    """A body that did not arrive in time (408); the message says which bound it missed."""


async def read_body(request: web.Request, limit: int, held: Reservation | None, timeout_s: float,
                    idle_s: float) -> bytes | None:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes; with ``held``,
    its bytes are taken from the in-flight budget as they arrive: None when they do not fit.
    BodyTimeout when it has not ended ``timeout_s`` after the read began, or when
    ``idle_s`` pass in which it neither ends nor grows by BODY_IDLE_BYTES: a client that
    stalls (or trickles) mid-body would otherwise keep what it sent of the budget until
    ``timeout_s``, and a few such could lock every other client out."""
    # StreamReader.read(n) returns what is buffered, not n bytes: read to EOF
    chunks: list[bytes] = []
    size = mark = 0  # mark: the size when the idle timer was last set
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    try:
        async with asyncio.timeout_at(min(end, loop.time() + idle_s)) as bound:
            while True:
                chunk = await request.content.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"body exceeds {limit} bytes")
                if held is not None and size > held.held and not held.take(size - held.held):
                    return None
                chunks.append(chunk)
                if size - mark >= BODY_IDLE_BYTES:  # per 16 KiB at most
                    mark = size
                    bound.reschedule(min(end, loop.time() + idle_s))
    except TimeoutError:
        if bound.when() == end:
            raise BodyTimeout(f"the body did not arrive within {timeout_s:g} s") from None
        raise BodyTimeout(f"the body stalled: less than {BODY_IDLE_BYTES} bytes of it came in {idle_s:g} s "
                          f"({size} bytes in all)") from None
    return b"".join(chunks)


def over_budget(budget: InflightBudget) -> web.Response:
    """503 at once: the bodies in flight already fill ``AGG_INGEST_MAX_INFLIGHT_BYTES``."""
    resp = error(503, f"ingest is at its in-flight limit ({budget.limit} bytes of bodies): retry later",
                 {"Retry-After": "1"})
    resp.force_close()  # the body is not read (to its end): do not keep the connection to drain it
    return resp


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)
