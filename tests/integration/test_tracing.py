"""Traces across the broker: a ``POST /v1/events`` request span's context lands in the Kafka
headers of its records, and the worker's batch span over those records links to it.

Real parts in one process: the broker (embedded, or the shared real Kafka), the HTTP routes
with the real ``IngestHandler`` and ``IngestProducer``, the records fetched back from
``clicks`` and handed, a partition's batch at a time, to the worker's batch code
(``tracing.TracedBatches`` around the ``RecordDecoder``, as ``WorkerService`` wires it).
Spans go to an in-memory exporter."""
from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from aggregator import tracing
from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, INGEST_HEADER
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.producer import IngestProducer
from aggregator.metrics import Metrics
from aggregator.web.server import NoSnapshots, Routes
from aggregator.worker.decoder import RecordDecoder
from tests.conftest import OTLP_EXPORTER, require_module, wait_for
from tools.bench.otlp_sink import OtlpSink

CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


async def ingest(bootstrap: str, bodies: list[tuple[list[dict], dict[str, str]]]) -> list[dict]:
    """POST each body (with its headers) through the real routes, handler and producer."""
    await ensure_topics(bootstrap, 4)
    producer = IngestProducer(bootstrap)
    await producer.start()
    try:
        deadline = time.monotonic() + 30
        while not producer.ready:
            assert time.monotonic() < deadline, "the ingest producer did not connect in 30 s"
            await asyncio.sleep(0.1)
        metrics = Metrics()
        handler = IngestHandler(producer, metrics, "", 1 << 20, 1000)
        app = Routes(metrics, NoSnapshots(), lambda: None, handler, None).app(1 << 20)
        answers = []
        async with TestClient(TestServer(app)) as client:
            for body, headers in bodies:
                resp = await client.post("/v1/events", json=body, headers=headers)
                assert resp.status == 200, await resp.text()
                answers.append(await resp.json())
        return answers
    finally:
        await producer.stop()


async def fetch(bootstrap: str, n: int) -> dict[int, list]:
    """The first ``n`` records of ``clicks``, per partition, as the consumer fetched them."""
    c = AIOKafkaConsumer(CLICKS, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                         enable_auto_commit=False)
    await c.start()
    out: dict[int, list] = {}
    try:
        deadline = time.monotonic() + 30
        while sum(map(len, out.values())) < n:
            assert time.monotonic() < deadline, f"read {sum(map(len, out.values()))} of {n} records in 30 s"
            for tp, recs in (await c.getmany(timeout_ms=500)).items():
                out.setdefault(tp.partition, []).extend(recs)
    finally:
        await c.stop()
    return out


class Worker:
    """The worker's batch step for the test: decode the batch, note the current span."""

    def __init__(self) -> None:
        self.decoder = RecordDecoder()
        self.events: list = []
        self.span_ids: list[int] = []

    def on_batch(self, tp, records) -> None:
        now = int(time.time() * 1000)
        d = self.decoder.decode(records, now, tp.partition, False, None, now + 60_000)
        assert not d.rejected
        self.events += d.events
        self.span_ids.append(trace.get_current_span().get_span_context().span_id)


def batches(worker: Worker, by_partition: dict[int, list]) -> None:
    handle = tracing.TracedBatches(worker.on_batch)
    for partition, recs in sorted(by_partition.items()):
        handle(type("TP", (), {"topic": CLICKS, "partition": partition})(), recs)


def events(i: int) -> list[dict]:
    """Events over several regions (so several partitions), half with a client ts."""
    return [{"region": f"r{k % 6}", "user_id": f"u{i}-{k}", **({"ts": 1_700_000_000_000 + k} if k % 2 else {})}
            for k in range(30)]


async def test_request_span_context_rides_the_records_and_batch_spans_link_to_it(broker, spans):
    client_tp = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
    answers = await ingest(broker.bootstrap, [(events(1), {}), (events(2), {"traceparent": client_tp})])
    assert [a["accepted"] for a in answers] == [30, 30]
    tracing.force_flush()
    requests = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(requests) == 2
    first, second = requests
    assert first.name == "POST /v1/events" and first.parent is None
    assert first.attributes["clickstream.events.accepted"] == 30
    assert first.attributes["clickstream.events.rejected"] == 0
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["http.request.body.size"] > 0
    # the second continues the client's trace
    assert second.context.trace_id == CLIENT_TRACE and second.parent.span_id == CLIENT_SPAN

    fetched = await fetch(broker.bootstrap, 60)
    records = [r for recs in fetched.values() for r in recs]
    assert len(fetched) > 1, "the events should spread over partitions"
    by_tp: dict[bytes, int] = {}
    for r in records:
        names = [k for k, _ in r.headers]
        assert names == [INGEST_HEADER, tracing.TRACEPARENT], names  # ingest's header stays first
        by_tp[r.headers[1][1]] = by_tp.get(r.headers[1][1], 0) + 1
    expected = {tracing.traceparent(s): 30 for s in requests}
    assert by_tp == expected  # each record carries the context of the request that produced it

    worker = Worker()
    spans.clear()
    batches(worker, fetched)
    assert len(worker.events) == 60  # the worker still counts them from key + header
    tracing.force_flush()
    batch_spans = list(spans.get_finished_spans())
    assert len(batch_spans) == len(fetched)
    assert [s.context.span_id for s in batch_spans] == worker.span_ids  # the step ran inside its span
    linked = set()
    for s in batch_spans:
        assert s.kind is SpanKind.CONSUMER and s.name == f"process {CLICKS}"
        partition = int(s.attributes["messaging.destination.partition.id"])
        assert s.attributes["messaging.batch.message_count"] == len(fetched[partition])
        # every batch links to exactly the requests whose records it holds
        holds = {tracing.parse_traceparent(r.headers[1][1]).span_id for r in fetched[partition]}
        assert {link.context.span_id for link in s.links} == holds
        linked |= {(link.context.trace_id, link.context.span_id) for link in s.links}
    assert linked == {(r.context.trace_id, r.context.span_id) for r in requests}


async def test_tracing_off_adds_no_header_and_makes_no_span(broker):
    assert tracing.tracer is None
    seen: list = []

    class Probe(Worker):
        def on_batch(self, tp, records) -> None:
            super().on_batch(tp, records)
            seen.append(trace.get_current_span().get_span_context().is_valid)

    answers = await ingest(broker.bootstrap, [(events(3), {"traceparent": f"00-{CLIENT_TRACE:032x}-"
                                                                         f"{CLIENT_SPAN:016x}-01"})])
    assert answers[0]["accepted"] == 30
    fetched = await fetch(broker.bootstrap, 30)
    for recs in fetched.values():
        for r in recs:
            assert [k for k, _ in r.headers] == [INGEST_HEADER]
    worker = Probe()
    batches(worker, fetched)
    assert len(worker.events) == 30
    assert seen and not any(seen)  # no span around the batch step


# ------------------------------------------------------------------ the real service
def test_service_with_tracing_on_exports_linked_spans(service_factory):
    """``aggregator run`` with the standard OTEL_* variables: the request spans and the batch
    spans linked to them reach an OTLP/HTTP receiver."""
    require_module(OTLP_EXPORTER, "pip install '.[otlp]'")  # fails under CI when missing
    sink = OtlpSink(keep=True).start()
    try:
        env = dict(sink.env(), OTEL_SERVICE_NAME="agg-under-test", OTEL_BSP_SCHEDULE_DELAY="200")
        svc = service_factory(**env).start()
        for i in range(3):
            status, _, ans = svc.post(events(i))
            assert status == 200 and ans["accepted"] == 30, ans

        def linked():
            kept = list(sink.kept)
            reqs = {(s["trace_id"], s["span_id"]) for s in kept if s["name"] == "POST /v1/events"}
            links = {link for s in kept if s["name"] == f"process {CLICKS}" for link in s["links"]}
            return (reqs, kept) if len(reqs) == 3 and reqs <= links else None

        reqs, kept = wait_for(linked, timeout=30, what="3 request spans, each linked from a batch span")
        assert {s["service"] for s in kept} == {"agg-under-test"}
    finally:
        sink.stop()


def test_bad_otel_setting_is_one_line(service_factory):
    svc = service_factory(OTEL_TRACES_EXPORTER="jaeger").start(wait_ready=None)
    assert svc.proc.wait(60) == 2
    err = [line for line in svc.tail().splitlines() if line.startswith("error:")]
    assert err == ["error: OTEL_TRACES_EXPORTER: unknown exporter 'jaeger': use console, otlp or none"]
    assert "Traceback" not in svc.tail()
    assert "embedded broker on" not in svc.tail(), "refused only after the broker had started"
