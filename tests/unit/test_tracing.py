"""aggregator/tracing.py: when the OTEL_* variables turn tracing on, the traceparent codec,
the links of a batch, the batch span, and trace ids in log lines."""
from __future__ import annotations

import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from aggregator import tracing
from aggregator.logs import JsonFormatter
from aggregator.tracing import TracingConfig, TracingError, config_from_env
from tests.conftest import OTLP_EXPORTER, require_module
from tests.unit.worker.records import fetched


def finished(mem: InMemorySpanExporter) -> list:
    tracing.force_flush()
    return list(mem.get_finished_spans())


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("env", [
    {},
    {"OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_TRACES_EXPORTER": " "},
    {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"},
    {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
])
def test_off(env):
    assert config_from_env(env) is None


def test_off_by_default_in_this_process():
    assert tracing.tracer is None
    assert tracing.current_ids() is None


@pytest.mark.parametrize(("env", "exporters", "sampler", "arg", "protocol"), [
    ({"OTEL_TRACES_EXPORTER": "console"}, ("console",), "parentbased_always_on", None, "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "otlp,console,none,otlp"}, ("otlp", "console"), "parentbased_always_on", None,
     "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "OTLP", "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_SAMPLER": "traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("otlp",), "traceidratio", 0.25,
     "grpc"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
     ("otlp",), "parentbased_traceidratio", 1.0, "http/protobuf"),
    # the protocol is only checked when otlp is asked for
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, ("console",),
     "parentbased_always_on", None, "http/json"),
])
def test_on(env, exporters, sampler, arg, protocol):
    assert config_from_env(env) == TracingConfig(exporters, sampler, arg, protocol)


@pytest.mark.parametrize(("env", "names"), [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
])
def test_bad_settings_are_one_line(env, names):
    with pytest.raises(TracingError) as err:
        config_from_env(env)
    msg = str(err.value)
    assert names in msg and "\n" not in msg


def test_setup_from_env_off_makes_nothing(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.setup_from_env() is False
    assert tracing.tracer is None and tracing._provider is None


def test_service_name(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    cfg = TracingConfig(("console",), "always_on", None, "http/protobuf")
    try:
        tracing.setup(cfg, exporters=[InMemorySpanExporter()], install_global=False)
        assert tracing._provider.resource.attributes["service.name"] == "clickstream-aggregator"
    finally:
        tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-ingest")
    try:
        tracing.setup(cfg, exporters=[InMemorySpanExporter()], install_global=False)
        assert tracing._provider.resource.attributes["service.name"] == "edge-ingest"
    finally:
        tracing.shutdown()


def test_otlp_exporter_is_made_from_env(monkeypatch):
    require_module(OTLP_EXPORTER, "pip install '.[otlp]'")  # fails under CI when missing
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    exp = tracing._exporter("otlp", "http/protobuf")
    try:
        assert type(exp).__module__.startswith("opentelemetry.exporter.otlp.proto.http")
        assert exp._endpoint == "http://127.0.0.1:4318/v1/traces"
    finally:
        exp.shutdown()


# ------------------------------------------------------------------ traceparent
def test_traceparent_round_trip(spans):
    with tracing.tracer.start_as_current_span("req") as span:
        tp = tracing.traceparent(span)
    ctx = span.get_span_context()
    assert ctx.trace_flags.sampled
    assert tp == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}".encode()
    back = tracing.parse_traceparent(tp)
    assert (back.trace_id, back.span_id, back.trace_flags.sampled, back.is_remote) == \
        (ctx.trace_id, ctx.span_id, True, True)


def test_unsampled_span_has_no_traceparent():
    mem = InMemorySpanExporter()
    tracing.setup(TracingConfig(("console",), "always_off", None, "http/protobuf"), exporters=[mem],
                  install_global=False)
    try:
        with tracing.tracer.start_as_current_span("req") as span:
            assert tracing.traceparent(span) is None
        assert finished(mem) == []
    finally:
        tracing.shutdown()


@pytest.mark.parametrize("value", [
    b"", b"garbage", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01",  # zero trace id
    b"00-" + b"1" * 32 + b"-" + b"0" * 16 + b"-01",  # zero span id
    b"ff-" + b"1" * 32 + b"-" + b"1" * 16 + b"-01",  # forbidden version
    b"00-" + b"1" * 31 + b"-" + b"1" * 16 + b"-01",  # short trace id
    b"00-" + b"g" * 32 + b"-" + b"1" * 16 + b"-01",  # not hex
    b"00-" + b"1" * 32 + b"-" + b"1" * 16 + b"-01-extra",  # version 00 has four fields
])
def test_parse_rejects(value):
    assert tracing.parse_traceparent(value) is None


def test_parse_future_version_with_more_fields():
    ctx = tracing.parse_traceparent(b"01-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00-what-comes-next")
    assert ctx is not None and ctx.trace_id == int("a" * 32, 16) and not ctx.trace_flags.sampled


# ------------------------------------------------------------------ batch links
def tp_of(i: int) -> bytes:
    return b"00-%032x-%016x-01" % (i + 1, i + 1)


def test_batch_links_distinct_in_order_from_the_last_header():
    recs = fetched([
        (b"eu", b"{}", [("clickstream-ingest", b"1"), ("traceparent", tp_of(1))]),
        (b"eu", b"{}", [("clickstream-ingest", b"1"), ("traceparent", tp_of(1))]),
        (b"eu", b"{}", []),
        (b"eu", b"{}", [("clickstream-ingest", b"2")]),
        (b"eu", b"{}", [("traceparent", b"not one")]),
        (b"us", b"{}", [("other", b"x"), ("traceparent", tp_of(2))]),  # a Kafka-direct producer's
        (b"eu", b"{}", [("clickstream-ingest", b"1"), ("traceparent", tp_of(0))]),
        (b"us", b"{}", [("traceparent", tp_of(7)), ("baggage", b"k=v")]),  # not last: not looked at
    ])
    links = tracing.batch_links(recs)
    assert [link.context.trace_id for link in links] == [2, 3, 1]
    assert all(link.context.is_remote for link in links)


def test_batch_links_bounded():
    recs = fetched([(b"eu", b"{}", [("traceparent", tp_of(i))]) for i in range(300)])
    links = tracing.batch_links(recs)
    assert len(links) == tracing.MAX_LINKS == 128
    assert links[-1].context.trace_id == 128
    assert len(tracing.batch_links(recs, limit=3)) == 3


class TP:
    topic = "clicks"
    partition = 2


def test_traced_batches_off_calls_through_without_a_span():
    seen = []

    def handler(tp, records):
        seen.append((len(records), trace.get_current_span().get_span_context().is_valid))

    recs = fetched([(b"eu", b"{}", [("traceparent", tp_of(1))])])
    tracing.TracedBatches(handler)(TP(), recs)
    assert seen == [(1, False)]


def test_traced_batches_on_makes_a_linked_consumer_span(spans):
    inside = []

    def handler(tp, records):
        inside.append(trace.get_current_span().get_span_context())

    recs = fetched([(b"eu", b"{}", [("traceparent", tp_of(4))]), (b"eu", b"{}", [])], base=40)
    tracing.TracedBatches(handler)(TP(), recs)
    [span] = finished(spans)
    assert span.name == "process clicks" and span.kind is SpanKind.CONSUMER
    assert span.context == inside[0]
    assert [link.context.trace_id for link in span.links] == [5]
    assert span.attributes["messaging.destination.partition.id"] == "2"
    assert span.attributes["messaging.batch.message_count"] == 2
    assert (span.attributes["messaging.kafka.offset.first"], span.attributes["messaging.kafka.offset.last"]) == (40, 41)
    # a root span: a batch has many parents, so it links to them instead
    assert span.parent is None


def test_traced_batches_span_records_an_exception(spans):
    def handler(tp, records):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tracing.TracedBatches(handler)(TP(), fetched([(b"eu", b"{}", [])]))
    [span] = finished(spans)
    assert not span.status.is_ok and span.events[0].name == "exception"


# ------------------------------------------------------------------ log lines
def line(msg: str) -> dict:
    rec = logging.LogRecord("aggregator.test", logging.INFO, __file__, 1, msg, None, None)
    return json.loads(JsonFormatter().format(rec))


def test_log_line_has_trace_id_inside_a_span(spans):
    assert "trace_id" not in line("outside")
    with tracing.tracer.start_as_current_span("req") as span:
        out = line("inside")
    ctx = span.get_span_context()
    assert out["trace_id"] == f"{ctx.trace_id:032x}" and out["span_id"] == f"{ctx.span_id:016x}"
    assert out["msg"] == "inside"


def test_log_line_without_tracing_has_no_trace_id():
    # a span of some other provider is current, but tracing is off: no ids
    from opentelemetry.sdk.trace import TracerProvider
    other = TracerProvider().get_tracer("other")
    with other.start_as_current_span("x"):
        assert "trace_id" not in line("off")


def test_traced_batches_as_the_consumers_class_attribute():
    # BatchConsumer keeps the handler as a class attribute and calls self.batch_handler(tp, records):
    # the wrapper must not be bound as a method there
    from aggregator.worker.consumer import BatchConsumer

    seen = []

    class Consumer(BatchConsumer):
        pass

    Consumer.batch_handler = tracing.TracedBatches(lambda tp, records: seen.append(len(records)))
    Consumer.__new__(Consumer).batch_handler(TP(), fetched([(b"eu", b"{}", [])]))
    assert seen == [1]
