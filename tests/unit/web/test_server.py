"""The HTTP routes on a real aiohttp server on 127.0.0.1 (aiohttp's test server, a real socket):
requests counted by route template and status class, and /metrics negotiated and gzipped."""
from __future__ import annotations

import gzip

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import Metrics
from aggregator.web.server import NoSnapshots, Routes

ROUTES = ("/v1/events", "/metrics", "/v1/snapshots", "/healthz", "/readyz")


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug in a handler")


async def client_for(metrics: Metrics, post=None) -> TestClient:
    routes = Routes(metrics, NoSnapshots(), lambda: None, post)
    client = TestClient(TestServer(routes.app(1 << 20), host="127.0.0.1"), auto_decompress=False)
    await client.start_server()
    return client


def requests(m: Metrics, route: str, code: str) -> float | None:
    return m.registry.get_sample_value("clickstream_http_requests_total", {"route": route, "code": code})


async def test_every_route_starts_at_zero_for_every_status_class():
    m = Metrics()
    client = await client_for(m)
    try:
        for route in (*ROUTES, "unmatched"):  # (unmatched: a 404 ratio is 0, not absent, until one comes)
            for code in ("2xx", "4xx", "5xx"):
                assert requests(m, route, code) == 0, (route, code)
    finally:
        await client.close()


async def test_requests_counted_by_route_template_and_status_class():
    m = Metrics()
    client = await client_for(m)  # no ingest handler: POST /v1/events answers 503 (worker role)
    try:
        for _ in range(3):
            assert (await client.get("/healthz")).status == 200
        assert (await client.get("/v1/snapshots?region=eu&since=1")).status == 200
        assert (await client.get("/v1/snapshots?since=yesterday")).status == 400
        assert (await client.post("/v1/events", data=b"[]")).status == 503
        r = await client.get("/wp-admin/x.php")
        assert r.status == 404 and r.content_type == "application/json"
        assert (await r.json())["error"] == "not found: GET /wp-admin/x.php"  # JSON like every error answer
        r = await client.get("/v1/events")
        assert r.status == 405 and r.headers["Allow"] == "POST" and "error" in await r.json()
    finally:
        await client.close()
    assert requests(m, "/healthz", "2xx") == 3
    assert requests(m, "/v1/snapshots", "2xx") == 1  # the template: no query string, no raw path
    assert requests(m, "/v1/snapshots", "4xx") == 1
    assert requests(m, "/v1/events", "5xx") == 1
    assert requests(m, "unmatched", "4xx") == 2  # 404 and 405 share one series
    routes = {s.labels["route"] for fam in m.registry.collect() for s in fam.samples
              if s.name == "clickstream_http_requests_total"}
    assert routes == {*ROUTES, "unmatched"}
    assert m.registry.get_sample_value("clickstream_http_request_duration_seconds_count",
                                       {"route": "/healthz"}) == 3


async def test_a_handler_that_raises_is_counted_as_5xx(caplog):
    m = Metrics()
    client = await client_for(m, post=boom)
    try:
        r = await client.post("/v1/events", data=b"[]")
        assert r.status == 500 and (await r.json()) == {"error": "internal server error: the service logged it"}
    finally:
        await client.close()
    assert any("POST /v1/events: the handler failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert requests(m, "/v1/events", "5xx") == 1
    assert requests(m, "/v1/events", "2xx") == 0


async def test_metrics_gzipped_when_the_scraper_asks():
    m = Metrics()
    client = await client_for(m)
    try:
        plain = await client.get("/metrics", skip_auto_headers=["Accept-Encoding"])  # aiohttp sends gzip by default
        plain_body = await plain.read()
        zipped = await client.get("/metrics", headers={"Accept-Encoding": "gzip, deflate"})
        zipped_body = await zipped.read()
    finally:
        await client.close()
    assert "Content-Encoding" not in plain.headers
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.headers["Content-Type"] == plain.headers["Content-Type"]
    text = gzip.decompress(zipped_body).decode()
    assert len(zipped_body) < len(text) / 3  # worth it: the exposition compresses well
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert {"clickstream_build_info", "process_cpu_seconds_total", "clickstream_http_requests_total"} <= names
    assert b"clickstream_window_seconds 60.0" in plain_body


async def test_openmetrics_when_asked_also_gzipped():
    m = Metrics()
    client = await client_for(m)
    try:
        resp = await client.get("/metrics", headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            "Accept-Encoding": "gzip"})
        body = gzip.decompress(await resp.read()).decode()
    finally:
        await client.close()
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")


async def test_metrics_restricted_to_the_names_asked_for():
    m = Metrics()
    client = await client_for(m)
    try:
        assert (await client.get("/healthz")).status == 200
        full = await (await client.get("/metrics", skip_auto_headers=["Accept-Encoding"])).text()
        resp = await client.get("/metrics?name[]=clickstream_http_requests_total&name[]=process_cpu_seconds_total",
                                skip_auto_headers=["Accept-Encoding"])
        some = await resp.text()
    finally:
        await client.close()
    assert resp.status == 200
    names = {s.name for fam in text_string_to_metric_families(some) for s in fam.samples}
    assert names == {"clickstream_http_requests_total", "process_cpu_seconds_total"}
    everything = {s.name for fam in text_string_to_metric_families(full) for s in fam.samples}
    assert names < everything and "python_gc_collections_total" in everything  # the rest without name[]
    healthz = [s for fam in text_string_to_metric_families(some) for s in fam.samples
               if s.labels.get("route") == "/healthz" and s.labels.get("code") == "2xx"]
    assert [s.value for s in healthz] == [1.0]


async def test_healthz_answers_503_with_the_reason_while_the_process_should_be_restarted():
    stuck: list[str | None] = ["consumer group rebalance without progress for 600 s"]
    routes = Routes(Metrics(), NoSnapshots(), lambda: None, None, not_alive=lambda: stuck[0])
    client = TestClient(TestServer(routes.app(1 << 20), host="127.0.0.1"))
    await client.start_server()
    try:
        r = await client.get("/healthz")
        assert r.status == 503
        assert await r.json() == {"status": "stuck", "reason": stuck[0]}
        stuck[0] = None
        r = await client.get("/healthz")
        assert r.status == 200 and await r.json() == {"status": "alive"}
    finally:
        await client.close()



def refused(m: Metrics) -> float | None:
    return m.registry.get_sample_value("clickstream_http_connections_refused_total")


async def test_connections_over_the_cap_are_counted_and_logged_once_per_interval(caplog):
    """A connection refused over AGG_HTTP_MAX_CONNECTIONS used to be answered 503 with no
    metric and no log line; one warning per interval at most, however many are refused."""
    import asyncio
    import logging

    from aggregator.web.server import HttpServer

    m = Metrics()
    ports: list[int] = []
    server = HttpServer(Routes(m, NoSnapshots(), lambda: None, None), "127.0.0.1", 0, 1 << 20, max_connections=1,
                        on_listening=ports.append)
    assert refused(m) == 0  # exported at 0 from the start
    caplog.set_level(logging.WARNING, logger="aggregator.web")
    await server.on_start()
    try:
        assert ports == [server.port] and server.port != 0
        held = await asyncio.open_connection("127.0.0.1", server.port)  # takes the only slot
        await asyncio.sleep(0.05)
        answers = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            answers.append(await reader.read())
            writer.close()
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
        assert refused(m) == 3
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert lines == ["HTTP: 1 connection(s) refused with 503 since the last such line: 1 open, "
                         "AGG_HTTP_MAX_CONNECTIONS is 1"], lines
        held[1].close()
    finally:
        await server.on_stop()


async def test_requests_the_parser_refuses_are_counted_and_logged_without_a_traceback(caplog):
    """A malformed chunk size or header line is answered 400 by aiohttp's parser, before any
    route: it used to be logged as an error with a traceback per request (a client could
    fill the log) and counted nowhere.  Now: counted as unmatched 4xx, one warning line per
    interval, no traceback."""
    import asyncio
    import logging

    from aggregator.web.server import HttpServer

    m = Metrics()
    server = HttpServer(Routes(m, NoSnapshots(), lambda: None, None), "127.0.0.1", 0, 1 << 20)
    caplog.set_level(logging.DEBUG)
    await server.on_start()
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    try:
        answers = []
        for raw in (head + b"zz\r\nabc\r\n0\r\n\r\n", head + b"f" * 40 + b"\r\nx\r\n0\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"NOT-HTTP\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw)
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        assert all(a.startswith(b"HTTP/1.0 400 ") for a in answers), answers
        assert requests(m, "unmatched", "4xx") == 4
        assert server.runner is not None and requests(m, "/healthz", "2xx") == 0
        tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert tracebacks == []
        lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(
            "HTTP: 1 malformed request(s) answered 400 since the last such line, the last from 127.0.0.1: "
            "Invalid character in chunk size"), lines
    finally:
        await server.on_stop()


def test_other_errors_still_reach_aiohttps_logger_with_their_traceback(caplog):
    import logging

    from aggregator.web.server import ServerLog

    m = Metrics()
    log = ServerLog(m)
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    try:
        raise RuntimeError("a bug in a handler")
    except RuntimeError as exc:
        log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
    log.debug("Ignored premature client disconnection")
    assert [(r.name, r.levelno, bool(r.exc_info)) for r in caplog.records] == [
        ("aiohttp.server", logging.ERROR, True), ("aiohttp.server", logging.DEBUG, False)]
    assert requests(m, "unmatched", "4xx") is None  # not counted: no series made


async def half_written(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = 10
    await resp.prepare(request)
    await resp.write(b'{"a":')
    raise RuntimeError("a bug after the answer began")


async def test_a_handler_failing_after_its_answer_began_gets_its_connection_cut_not_a_second_answer():
    """A JSON 500 after a begun answer would put a second status line inside the first body,
    on a connection kept alive: the client would read the next answer from the wrong place."""
    import asyncio

    client = await client_for(Metrics(), post=half_written)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
        data = await asyncio.wait_for(reader.read(), 10)  # to EOF: the connection is cut
        writer.close()
    finally:
        await client.close()
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 200"), data
