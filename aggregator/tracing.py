"""OpenTelemetry traces (docs/tracing.md): off by default, configured only by the standard
``OTEL_*`` variables.

Tracing is **on** when ``OTEL_TRACES_EXPORTER`` names at least one exporter other than
``none`` (``console``, ``otlp``; a comma-separated list) and ``OTEL_SDK_DISABLED`` is not
``true``.  Then ``OTEL_SERVICE_NAME`` (default ``clickstream-aggregator``) and
``OTEL_RESOURCE_ATTRIBUTES`` name the resource, ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` choose the sampler (default ``parentbased_always_on``),
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` picks OTLP over ``http/protobuf`` (default, the
``otlp`` extra) or ``grpc``, and the exporters and the batch span processor read the rest
of their ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_BSP_*`` variables themselves.

Spans: one per ``POST /v1/events`` (``request_span``), whose W3C ``traceparent`` goes into
the Kafka headers of the records it produced (only when it is sampled); one per fetched
batch of ``clicks`` in the worker (``TracedBatches``), linked to the distinct
``traceparent`` headers of its records (at most ``MAX_LINKS``).

While off, ``tracer`` is None and the SDK is never imported: the cost is one ``is None``
per request and per batch.
"""
from __future__ import annotations

import contextlib
import logging
import operator
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("aggregator.tracing")

TRACEPARENT = "traceparent"  # the W3C header name, also the Kafka record header's
MAX_LINKS = 128  # distinct request spans linked from one batch span (the SDK's default link limit)
DEFAULT_SERVICE_NAME = "clickstream-aggregator"
_headers = operator.attrgetter("headers")
EXPORTERS = ("console", "otlp")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
PROTOCOLS = ("http/protobuf", "grpc")

# None while tracing is off: the one thing the hot paths look at
tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


class TracingError(ValueError):
    """A bad ``OTEL_*`` setting; the message is one line, naming the variable."""


@dataclass(frozen=True)
class TracingConfig:
    exporters: tuple[str, ...]
    sampler: str
    sampler_arg: float | None
    protocol: str  # of the otlp exporter


def config_from_env(env: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The tracing configuration of ``env`` (default ``os.environ``); None when tracing is
    off.  Raises ``TracingError`` for a value that would otherwise be ignored with a warning."""
    env = os.environ if env is None else env
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in ("", "true", "false"):
        raise TracingError(f"OTEL_SDK_DISABLED={disabled!r}: use true or false")
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    for name in names:
        if name not in (*EXPORTERS, "none"):
            raise TracingError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}: use {', '.join(EXPORTERS)} or none")
    exporters = tuple(dict.fromkeys(n for n in names if n != "none"))
    if disabled == "true" or not exporters:
        return None
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise TracingError(f"OTEL_TRACES_SAMPLER: unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    arg: float | None = None
    raw_arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if sampler.endswith("traceidratio"):
        try:
            arg = float(raw_arg) if raw_arg else 1.0
        except ValueError:
            arg = -1.0
        if not 0.0 <= arg <= 1.0:
            raise TracingError(f"OTEL_TRACES_SAMPLER_ARG={raw_arg!r}: a ratio from 0 to 1 for {sampler}")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if "otlp" in exporters and protocol not in PROTOCOLS:
        raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use {' or '.join(PROTOCOLS)}")
    return TracingConfig(exporters, sampler, arg, protocol)


def _exporter(name: str, protocol: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise TracingError("OTEL_TRACES_EXPORTER=otlp over grpc needs the package "
                               "opentelemetry-exporter-otlp-proto-grpc") from exc
        return OTLPSpanExporter()  # type: ignore[no-any-return,unused-ignore]
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    except ImportError as exc:
        raise TracingError("OTEL_TRACES_EXPORTER=otlp needs the otlp extra: "
                           "pip install 'clickstream-aggregator[otlp]'") from exc
    return HttpExporter()


def setup(config: TracingConfig, exporters: Sequence[SpanExporter] = (), install_global: bool = True) -> None:
    """Turn tracing on: a tracer provider with a batch span processor per exporter (those
    of ``config``, or the given ones: tests pass an in-memory exporter)."""
    global tracer, _provider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace import sampling as s
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    samplers: dict[str, Callable[[], s.Sampler]] = {
        "always_on": lambda: s.ALWAYS_ON, "always_off": lambda: s.ALWAYS_OFF,
        "parentbased_always_on": lambda: s.DEFAULT_ON, "parentbased_always_off": lambda: s.DEFAULT_OFF,
        "traceidratio": lambda: s.TraceIdRatioBased(config.sampler_arg or 0.0),
        "parentbased_traceidratio": lambda: s.ParentBasedTraceIdRatio(config.sampler_arg or 0.0)}
    exps = list(exporters) or [_exporter(name, config.protocol) for name in config.exporters]
    resource = Resource.create({"service.version": _version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(sampler=samplers[config.sampler](), resource=resource)
    for exp in exps:
        provider.add_span_processor(BatchSpanProcessor(exp))
    if install_global:
        trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("aggregator", _version())
    log.info("tracing on: exporters %s, sampler %s", ", ".join(config.exporters) or "given", config.sampler)


def setup_from_env() -> bool:
    """``setup`` from the environment when it turns tracing on; -> whether it did.  Raises
    ``TracingError`` for bad settings (before any SDK part is made)."""
    config = config_from_env()
    if config is None:
        return False
    setup(config)
    return True


def shutdown() -> None:
    """Export what is pending and turn tracing off again."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def force_flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("clickstream-aggregator")
    except PackageNotFoundError:
        return "0+unknown"


# ------------------------------------------------------------------ ingest
@contextlib.contextmanager
def request_span(tr: trace.Tracer, name: str, route: str, method: str,
                 headers: Mapping[str, str]) -> Iterator[trace.Span]:
    """The server span of one HTTP request; continues the client's trace when its request
    has a ``traceparent``."""
    from opentelemetry.propagate import extract

    attrs = {"http.request.method": method, "http.route": route}
    with tr.start_as_current_span(name, context=extract(headers), kind=SpanKind.SERVER, attributes=attrs) as span:
        yield span


def end_request(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def traceparent(span: trace.Span) -> bytes | None:
    """The W3C ``traceparent`` of ``span`` for its records' headers, or None when the span
    is not sampled (its records then carry none)."""
    ctx = span.get_span_context()
    if not (ctx.is_valid and ctx.trace_flags.sampled):
        return None
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)


# ------------------------------------------------------------------ worker
def parse_traceparent(value: bytes) -> SpanContext | None:
    """The span context of a W3C ``traceparent`` header value (version 00 layout), or None."""
    try:
        parts = value.split(b"-")
        if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == b"ff" or len(parts[1]) != 32 or len(parts[2]) != 16 \
                or len(parts[3]) != 2 or (parts[0] == b"00" and len(parts) != 4):
            return None
        ctx = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                          trace_flags=TraceFlags(int(parts[3], 16) & 0xFF))
    except (ValueError, TypeError, AttributeError):
        return None
    return ctx if ctx.is_valid else None


def batch_links(records: Sequence[Any], limit: int = MAX_LINKS) -> list[Link]:
    """Links to the distinct valid ``traceparent`` headers of ``records`` (in the order first
    seen, at most ``limit``).

    Only a record's last header is looked at: that is where the ingest puts it (after its
    ``clickstream-ingest`` header) and where OpenTelemetry's Kafka instrumentations append
    it.  So the pass over the batch is one dict comprehension (0.1-0.25 µs a record here,
    only while tracing is on), and each distinct value is parsed once."""
    last = {hs[-1]: None for hs in map(_headers, records) if hs}
    links: list[Link] = []
    name = TRACEPARENT
    for k, v in last:
        if k == name:
            ctx = parse_traceparent(v)
            if ctx is not None:
                links.append(Link(ctx))
                if len(links) >= limit:
                    break
    return links


BatchHandler = Callable[[Any, Sequence[Any]], "int | None"]


class TracedBatches:
    """``handler`` (one call per fetched batch of a partition) inside a consumer span per
    batch, linked to the request spans of its records, while tracing is on.

    A callable object, not a closure: the consumer keeps its batch handler as a class
    attribute, where a plain function would be bound as a method."""

    __slots__ = ("handler",)

    def __init__(self, handler: BatchHandler) -> None:
        self.handler = handler

    def __call__(self, tp: Any, records: Sequence[Any]) -> int | None:
        tr = tracer
        if tr is None:
            return self.handler(tp, records)
        links = batch_links(records)
        attrs = {"messaging.system": "kafka", "messaging.operation.type": "process",
                 "messaging.destination.name": tp.topic, "messaging.destination.partition.id": str(tp.partition),
                 "messaging.batch.message_count": len(records),
                 "messaging.kafka.offset.first": records[0].offset if records else -1,
                 "messaging.kafka.offset.last": records[-1].offset if records else -1,
                 "clickstream.links": len(links)}
        with tr.start_as_current_span(f"process {tp.topic}", kind=SpanKind.CONSUMER, links=links, attributes=attrs):
            return self.handler(tp, records)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, when tracing is on and there is one."""
    if tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
