"""``--tracing``: the service processes export their spans over OTLP/HTTP to this receiver,
which counts and drops them, so the bench measures what tracing costs the service (making,
batching, serialising and sending every span) without a collector to run.

    sink = OtlpSink().start()
    os.environ.update(sink.env())   # inherited by every service process the bench starts
    ...
    sink.stop(); sink.stats()       # requests, bytes, spans, links received
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpSink:
    def __init__(self, keep: bool = False) -> None:
        self.requests = self.bytes = self.spans = self.links = 0
        self.keep = keep  # keep every span received (tests), as a dict
        self.kept: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.received(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpSink:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict[str, str]:
        """What turns tracing on in a service process, every request and batch sampled."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_TRACES_SAMPLER": "always_on",
                "OTEL_SERVICE_NAME": "clickstream-aggregator-bench"}

    def received(self, body: bytes) -> None:
        spans = links = 0
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    spans += len(ss.spans)
                    links += sum(len(s.links) for s in ss.spans)
                    if self.keep:
                        kept = [{"name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                 "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                 "service": {a.key: a.value.string_value for a in rs.resource.attributes}
                                 .get("service.name")} for s in ss.spans]
                        with self.lock:
                            self.kept += kept
        except Exception:  # noqa: BLE001 - no proto package, or not a trace request: count the bytes only
            pass
        with self.lock:
            self.requests += 1
            self.bytes += len(body)
            self.spans += spans
            self.links += links

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "bytes": self.bytes, "spans": self.spans, "links": self.links}
