"""The ``Expect`` header (docs/contract.md §3), over a real socket on 127.0.0.1 with the
real HttpServer: aiohttp's own expect handler runs before the middleware, and used to
answer an expectation other than ``100-continue`` with a plain-text 417 on every path
(``/v1/events`` before its token check), counted nowhere; and to send ``100 Continue``
before ingest's checks, so a client the token, the size or the budget refuses sent its
body anyway."""
from __future__ import annotations

import asyncio

from aggregator.ingest.budget import InflightBudget
from aggregator.ingest.handler import IngestHandler
from aggregator.metrics import Metrics
from aggregator.web.server import HttpServer, NoSnapshots, Routes

TOKEN = "s3cret"


def requests(m: Metrics, route: str, code: str) -> float | None:
    return m.registry.get_sample_value("clickstream_http_requests_total", {"route": route, "code": code})


async def server_for(m: Metrics, ingest: bool = True, budget: int = 1 << 22) -> tuple[HttpServer, IngestHandler]:
    h = IngestHandler(None, m, TOKEN, 1 << 20, 10, budget=InflightBudget(budget))  # type: ignore[arg-type]
    server = HttpServer(Routes(m, NoSnapshots(), lambda: None, h if ingest else None), "127.0.0.1", 0, 1 << 20)
    await server.on_start()
    return server, h


async def exchange(port: int, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Sends ``head``, reads the first answer's head (``100 Continue`` or the final one),
    then, unless that was final, sends ``body`` and reads the final answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if not first.startswith(b"HTTP/1.1 100 "):
            # (to the end of its JSON, not EOF: aiohttp lingers up to 10 s for a body it did not read,
            # until the client, told Connection: close, closes)
            return first, await asyncio.wait_for(reader.readuntil(b"}"), 5)
        writer.write(body)
        await writer.drain()
        return first, await asyncio.wait_for(reader.readuntil(b"}"), 5)
    finally:
        writer.close()


def post(expect: bytes, *, token: str = TOKEN, length: int = 2) -> bytes:
    return (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nExpect: %s\r\nContent-Length: %d\r\n\r\n"
            % (token.encode(), expect, length))


async def test_an_unknown_expectation_is_a_json_417_counted_on_every_path() -> None:
    m = Metrics()
    server, _ = await server_for(m)
    try:
        cases = [(b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", "/healthz"),
                 (b"GET /metrics HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", "/metrics"),
                 (post(b"200-ok"), "/v1/events"),
                 (b"POST /metrics HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n", "unmatched"),
                 (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", "unmatched")]
        for head, _ in cases:
            first, rest = await exchange(server.port, head)
            assert first.startswith(b"HTTP/1.1 417 "), first
            assert b"Content-Type: application/json" in first and b"Connection: close" in first, first
            assert rest == b"""{"error":"unsupported expectation '200-ok': only Expect: 100-continue is"}""", rest
        await asyncio.sleep(0.05)
        assert requests(m, "/healthz", "4xx") == 1
        assert requests(m, "/metrics", "4xx") == 1
        assert requests(m, "/v1/events", "4xx") == 1
        assert requests(m, "unmatched", "4xx") == 2
    finally:
        await server.on_stop()


async def test_ingest_refuses_on_its_headers_before_100_continue() -> None:
    """Token, size and budget are checked before ``100 Continue``: a client that waits for
    it is answered at once and sends no body; the token first (before a 417 too)."""
    m = Metrics()
    server, h = await server_for(m, budget=1000)
    try:
        for head, status in ((post(b"100-continue", token="wrong"), 401),
                             (post(b"200-ok", token="wrong"), 401),
                             (post(b"100-continue", length=2 << 20), 413),
                             (post(b"100-continue", length=1001), 503)):
            first, rest = await exchange(server.port, head, b"[]")
            assert first.startswith(b"HTTP/1.1 %d " % status), (head, first)
            assert b"Connection: close" in first and rest.startswith(b'{"error":'), (first, rest)
        assert h.budget.used == 0
        await asyncio.sleep(0.05)
        assert requests(m, "/v1/events", "4xx") == 3 and requests(m, "/v1/events", "5xx") == 1
        # one the headers let through is sent 100 Continue, then its body is read
        first, rest = await exchange(server.port, post(b"100-Continue"), b"[]")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n", first
        assert rest.startswith(b"HTTP/1.1 200 ") and b'{"accepted":0,' in rest, rest
    finally:
        await server.on_stop()


async def test_a_process_without_ingest_refuses_before_100_continue() -> None:
    m = Metrics()
    server, _ = await server_for(m, ingest=False)
    try:
        first, rest = await exchange(server.port, post(b"100-continue"), b"[]")
        assert first.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in first, first
        assert b"does not serve ingest" in rest
        # the other routes are sent 100 Continue, as aiohttp would
        first, rest = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n" and rest.startswith(b"HTTP/1.1 200 "), (first, rest)
    finally:
        await server.on_stop()


async def test_a_refusal_before_100_continue_is_a_request_span(spans) -> None:
    """With tracing on, a request refused on its headers before ``100 Continue`` gets the
    server span any answered ``POST /v1/events`` gets, with its status."""
    from aggregator import tracing

    m = Metrics()
    server, _ = await server_for(m)
    try:
        first, _ = await exchange(server.port, post(b"100-continue", token="wrong"), b"[]")
        assert first.startswith(b"HTTP/1.1 401 "), first
        first, rest = await exchange(server.port, post(b"100-continue"), b"[]")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n" and rest.startswith(b"HTTP/1.1 200 "), rest
        tracing.force_flush()
        done = [(s.name, s.kind.name, s.attributes.get("http.response.status_code"))
                for s in spans.get_finished_spans()]
        # one span each: the refused one, and the one let through (not a second for its 100 Continue)
        assert done == [("POST /v1/events", "SERVER", 401), ("POST /v1/events", "SERVER", 200)], done
    finally:
        await server.on_stop()
