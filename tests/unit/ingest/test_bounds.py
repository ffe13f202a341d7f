"""What keeps ingest memory bounded, without a broker: a body decoded in slices gives
exactly what it gives whole (``decode_slices``), the in-flight budget, and the region
cap that forgets idle regions.  The real process under load: tests/integration/test_ingest_bounds.py."""
from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core.contract import CLICKS, OTHER_REGION
from aggregator.ingest.body import SLICE_BYTES, BodyError, Event, decode_body, decode_slices, validate_records
from aggregator.ingest.budget import InflightBudget, Reservation
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.producer import BatchProducer, IngestProducer
from aggregator.metrics import Metrics
from tests.unit.ingest.test_body import JSON, NDJSON, PROPS, bodies, records


def shown(items: list[Any]) -> list[Any]:
    """Items comparable across two decodes (a bad NDJSON line by its message; an Event of
    the typed parse as the dict of its fields, a field with a JSON null left out as the
    typed parse leaves it out)."""
    out = []
    for i in items:
        if isinstance(i, Event):
            i = msgspec.to_builtins(i)
        elif type(i) is dict:
            i = {k: v for k, v in i.items() if v is not None}
        out.append(getattr(i, "message", i))
    return out


def same_as_whole(body: bytes, ct: str, slice_bytes: int) -> None:
    try:
        whole = decode_body(body, ct)
    except BodyError as exc:
        with pytest.raises(BodyError) as ei:
            list(decode_slices(body, ct, slice_bytes))
        assert ei.value.status == exc.status
        return
    parts = list(decode_slices(body, ct, slice_bytes))  # raises nothing either
    assert shown([i for p in parts for i in p]) == shown(whole)
    # validation slice by slice: the same events, errors with their index in the whole body
    good, errors, reasons = validate_records(whole)
    sgood: list = []
    serrors: list = []
    sreasons: dict[str, int] = {}
    first = 0
    for p in parts:
        g, e, r = validate_records(p, first, 100 - len(serrors))
        first += len(p)
        sgood += g
        serrors += e
        for k, v in r.items():
            sreasons[k] = sreasons.get(k, 0) + v
    assert (sgood, serrors, sreasons) == (good, errors, reasons)


tricky = st.lists(st.fixed_dictionaries({"region": st.sampled_from(["eu", "us", "Bad Region"])}, optional={
    "url": st.sampled_from(['/a},{"b', "}, {", '"},{"', "/x"]),
    "nested": st.sampled_from([[{"a": 1}, {"b": 2}], {"c": [{}, {}]}]),
}) | records, max_size=40)


@given(body=bodies, slice_bytes=st.integers(1, 64))
@PROPS
def test_slices_are_the_whole_body(body: bytes, slice_bytes: int) -> None:
    for ct in (JSON, NDJSON, "application/json-seq"):
        same_as_whole(body, ct, slice_bytes)


@given(rs=tricky, slice_bytes=st.integers(1, 200), sep=st.sampled_from([b",", b", ", b",\n ", b" ,\t"]),
       cut=st.integers(0, 10_000))
@PROPS
def test_array_cut_only_between_elements(rs: list, slice_bytes: int, sep: bytes, cut: int) -> None:
    """``},{`` inside strings and nested values is never taken for a boundary, and a body
    broken anywhere is refused whole, before any slice."""
    body = b"[" + sep.join(orjson.dumps(r) for r in rs) + b"]"
    same_as_whole(body, JSON, slice_bytes)
    same_as_whole(b"\n".join(orjson.dumps(r) for r in rs), NDJSON, slice_bytes)
    broken = body[:cut % (len(body) + 1)]
    same_as_whole(broken, JSON, slice_bytes)


def test_slices_hold_about_slice_bytes() -> None:
    line = b'{"region":"eu"}'
    n = 10_000
    for body, ct in ((b"\n".join([line] * n), NDJSON), (b"[" + b",".join([line] * n) + b"]", JSON)):
        parts = list(decode_slices(body, ct, 4096))
        assert sum(len(p) for p in parts) == n
        assert max(len(p) for p in parts) <= 4096 // len(line) + 2
        assert len(parts) >= len(body) // 4096 - 1


def test_a_big_body_that_is_not_json_is_refused_before_any_slice() -> None:
    body = b"[" + b",".join([b'{"region":"eu"}'] * 1000) + b",{]"
    with pytest.raises(BodyError) as ei:
        decode_slices(body, JSON, 512)  # not even the first slice: nothing would be produced
    assert ei.value.status == 400 and "not valid JSON" in ei.value.message


# ------------------------------------------------------------------ in-flight budget

def test_budget_refuses_what_does_not_fit_and_takes_it_back() -> None:
    b = InflightBudget(100)
    one, two = Reservation(b), Reservation(b)
    assert one.take(60) and one.take(0)
    assert not two.take(41) and two.held == 0 and b.used == 60  # refused: nothing taken
    assert two.take(40) and b.used == 100
    assert not two.take(1)
    one.release()
    one.release()  # idempotent
    assert b.used == 40 and one.held == 0
    assert one.take(60)
    one.release()
    two.release()
    assert b.used == 0
    with pytest.raises(AssertionError):
        b.give(1)
    with pytest.raises(ValueError):
        InflightBudget(0)


# ------------------------------------------------------------------ region cap

def handler(max_regions: int, idle_ms: int) -> IngestHandler:
    return IngestHandler(None, Metrics(5.0, 60.0), "", 1 << 20, max_regions, region_idle_ms=idle_ms)  # type: ignore[arg-type]


def test_idle_regions_leave_the_cap() -> None:
    h = handler(2, idle_ms=10_000)
    t = 1_000_000
    assert h._region("a", t) == "a" and h._region("b", t) == "b"
    assert h._region("c", t + 5_000) == OTHER_REGION          # both active: the cap holds
    assert h._region("a", t + 9_000) == "a"                    # a seen again
    # 10.5 s after b was last seen: b is idle and makes room; a (1.5 s ago) stays
    assert h._region("c", t + 10_500) == "c"
    assert set(h.regions) == {"a", "c"}
    # a region over the cap is looked at again at most every REGION_SWEEP_S, not per request
    h2 = handler(1, idle_ms=1_000)
    assert h2._region("x", t) == "x"
    assert h2._region("y", t + 500) == OTHER_REGION            # swept: x still active
    assert h2._region("y", t + 1_200) == OTHER_REGION          # x idle now, but swept 0.7 s ago
    assert h2._region("y", t + 1_600) == "y"
    assert list(h2.regions) == ["y"]


def test_routes_follow_the_regions_let_through() -> None:
    """Found by a review: ingest's producer kept a route for every region it had sent, so
    clients rotating region names grew it without bound under the cap; the routes of the
    regions the cap forgets (idle) now go with them."""
    prod = IngestProducer("127.0.0.1:9")
    prod.batcher = batcher = BatchProducer(None, CLICKS)
    batcher.parts = [0, 1, 2, 3]
    h = IngestHandler(prod, Metrics(5.0, 60.0), "", 1 << 20, 2, region_idle_ms=1_000)
    for n in range(50):
        batcher.partition_of(h._region(f"r{n}", 1_000_000 + n * 2_000))  # as _submit does
    assert len(h.regions) == 2 and set(batcher.route) <= {*h.regions, OTHER_REGION}


def test_a_clients_own_other_region_takes_no_place() -> None:
    """As at the worker (core.regioncap.RegionCap.admit): ``__other__`` from a client is
    counted under ``__other__`` and leaves the cap's places to named regions."""
    h = handler(1, idle_ms=3_600_000)
    assert h._region(OTHER_REGION, 1000) == OTHER_REGION
    assert h._region("eu", 1000) == "eu"
    assert h._region(OTHER_REGION, 2000) == OTHER_REGION
    assert list(h.regions) == ["eu"]


def test_cap_without_idle_regions_never_grows() -> None:
    h = handler(3, idle_ms=3_600_000)
    for i in range(100):
        h._region(f"r{i}", 1_000_000 + i * 2_000)
    assert len(h.regions) == 3 and set(h.regions) == {"r0", "r1", "r2"}


# ------------------------------------------------------------------ the handler's limits, over a real socket

async def ingest_client(budget: int, body_timeout: float = 5.0) -> tuple[Any, IngestHandler]:
    """The real routes and IngestHandler on 127.0.0.1 without a broker: every answer below
    comes before anything would be produced."""
    from aiohttp.test_utils import TestClient, TestServer

    from aggregator.web.server import NoSnapshots, Routes

    m = Metrics(5.0, 60.0)
    h = IngestHandler(None, m, "", 1 << 20, 10, budget=InflightBudget(budget),  # type: ignore[arg-type]
                      body_timeout_s=body_timeout)
    client = TestClient(TestServer(Routes(m, NoSnapshots(), lambda: None, h).app(1 << 20), host="127.0.0.1"))
    await client.start_server()
    return client, h


async def test_over_budget_is_503_at_once_by_content_length_or_as_chunks_arrive() -> None:
    import asyncio

    client, h = await ingest_client(budget=1000)
    try:
        # at once: the answer comes to the headers alone, before a byte of the body is sent
        # (a handler that read the body first would wait for it, then answer 408)
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                     b"Content-Length: 1001\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        writer.close()
        assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in head, head
        assert h.budget.used == 0
        r = await client.post("/v1/events", data=b"x" * 1001, headers={"Content-Type": NDJSON})
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "in-flight" in (await r.json())["error"]
        assert h.budget.used == 0

        async def chunks():  # chunked: no Content-Length, taken as the bytes arrive
            for _ in range(20):
                yield b"y" * 100
                await asyncio.sleep(0)
        r = await client.post("/v1/events", data=chunks(), headers={"Content-Type": NDJSON})
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert h.budget.used == 0  # given back
        # one that fits is read and parsed (400: not JSON; no broker is needed to say so)
        r = await client.post("/v1/events", data=b"x" * 1000, headers={"Content-Type": JSON})
        assert r.status == 400 and h.budget.used == 0
    finally:
        await client.close()


async def test_a_body_that_does_not_arrive_holds_none_of_the_budget() -> None:
    """Bytes are taken as they arrive: connections that announce bodies and send nothing do
    not lock others out; the bytes they did send count."""
    import asyncio

    client, h = await ingest_client(budget=1000)
    try:
        host, port = client.server.host, client.server.port
        stalled = []
        for _ in range(3):  # each announces 900 bytes, three send nothing, the last 600 of them
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                         b"Content-Length: 900\r\n\r\n")
            stalled.append(writer)
        stalled[-1].write(b"z" * 600)
        for w in stalled:
            await w.drain()
        for _ in range(100):  # the 600 bytes reach the handler
            if h.budget.used == 600:
                break
            await asyncio.sleep(0.01)
        assert h.budget.used == 600
        r = await client.post("/v1/events", data=b"x" * 400, headers={"Content-Type": JSON})
        assert r.status == 400  # read and parsed (not JSON): it fit beside them
        r = await client.post("/v1/events", data=b"x" * 401, headers={"Content-Type": JSON})
        assert r.status == 503 and r.headers["Retry-After"] == "1"  # 600 + 401 do not fit
        for w in stalled:
            w.close()
        for _ in range(100):
            if h.budget.used == 0:
                break
            await asyncio.sleep(0.01)
        assert h.budget.used == 0  # given back when they go
    finally:
        await client.close()


async def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    import asyncio

    client, h = await ingest_client(budget=1 << 20, body_timeout=0.3)
    try:
        async def slow():
            yield b'{"region":'
            await asyncio.sleep(1.0)
            yield b'"eu"}'
        r = await client.post("/v1/events", data=slow(), headers={"Content-Type": NDJSON})
        assert r.status == 408 and h.budget.used == 0
        assert r.headers.get("Connection", "").lower() == "close"
    finally:
        await client.close()


async def test_a_client_that_goes_away_mid_body_is_a_4xx_without_a_traceback(caplog: Any) -> None:
    """A body cut short (Content-Length not reached, a chunk not finished) and the
    connection closed: an ingest failure answered 400, not a 5xx with a traceback.  The
    app runs as HttpServer runs it (aiohttp's TestServer would cancel the handler)."""
    import asyncio
    import logging

    from aiohttp import web

    from aggregator.web.server import NoSnapshots, Routes

    m = Metrics(5.0, 60.0)
    h = IngestHandler(None, m, "", 1 << 20, 10, budget=InflightBudget(1 << 20))  # type: ignore[arg-type]
    runner = web.AppRunner(Routes(m, NoSnapshots(), lambda: None, h).app(1 << 20), access_log=None,
                           auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    def count(name: str, **labels: str) -> float:
        return m.registry.get_sample_value(name, labels) or 0.0

    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cut = [head + b"Content-Length: 100\r\n\r\n" + b'[{"region":"eu"}]',
           head + b"Transfer-Encoding: chunked\r\n\r\n" + b'40\r\n[{"region":"eu"}]']
    try:
        caplog.set_level(logging.DEBUG)
        for data in cut:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(data)
            await w.drain()
            w.write_eof()
            await asyncio.wait_for(r.read(), 5)
            w.close()
        for _ in range(200):
            if count("clickstream_http_requests_total", code="4xx", route="/v1/events") >= 2:
                break
            await asyncio.sleep(0.01)
        assert count("clickstream_http_requests_total", code="4xx", route="/v1/events") == 2
        assert count("clickstream_http_requests_total", code="5xx", route="/v1/events") == 0
        assert count("pipeline_stage_errors_total", stage="ingest") == 2
        assert h.budget.used == 0
        assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------ what one body may cost


def peak_of(body: bytes, ct: str) -> tuple[int, BodyError | None]:
    """(bytes allocated at the peak while ``body`` is decoded and validated slice by slice,
    the BodyError it was refused with, or None)."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        err = None
        try:
            for items in decode_slices(body, ct):
                validate_records(items)
                del items
        except BodyError as exc:
            err = exc
        return tracemalloc.get_traced_memory()[1] - base, err
    finally:
        tracemalloc.stop()


N = 2 << 20  # over SLICE_BYTES + ITEM_MAX_BYTES


def bound(body: bytes) -> int:
    """What a body may cost: a small multiple of it, plus the objects of one slice (a
    slice of the smallest items parses to some 30-40 times its size)."""
    return len(body) + 40 * SLICE_BYTES


@pytest.mark.parametrize("body, ct", [
    (b"[" + b"[]," * (N // 3) + b"[]]", JSON),                                  # items that are not objects
    (b"[" + b"[{}]," * (N // 5) + b"[{}]]", JSON),
    (b"[" + b'[{"region":"eu"}],' * (N // 18) + b'[{"region":"eu"}]]', JSON),
    (b'{"region":"eu","x":[' + b"[]," * (N // 3) + b"[]]}", JSON),               # one huge object
    (b'[{"region":"eu","x":[' + b"{}," * (N // 3) + b"{}]}]", JSON),             # one huge item
    (b'{"region":"eu"}\n' * 100 + b'{"region":"eu","x":[' + b"[]," * (N // 3) + b"[]]}", NDJSON),  # one huge line
], ids=["lists", "lists-of-objects", "lists-of-events", "object", "item", "ndjson-line"])
def test_a_body_that_cannot_be_cut_is_refused_without_being_parsed_whole(body: bytes, ct: str) -> None:
    """Parsed whole these took 30-40 times their size (an 8 MiB body: 267-314 MiB)."""
    peak, err = peak_of(body, ct)
    assert err is not None and err.status == 400
    assert "at most" in err.message or "cut" in err.message
    assert peak < bound(body)


def test_a_big_body_costs_a_small_multiple_of_itself() -> None:
    nest = b'{"region":"eu","p":{"items":[{"a":1},{"b":2},{"c":3}]}}'
    for body, ct in ((b"[" + b",".join([b'{"region":"eu"}'] * (N // 16)) + b"]", JSON),
                     (b"[" + b",".join([nest] * (N // len(nest))) + b"]", JSON),  # cuts in nested arrays first
                     (b"\n".join([b'{"region":"eu"}'] * (N // 16)), NDJSON)):
        peak, err = peak_of(body, ct)
        assert err is None and peak < bound(body)
    # items that are not objects among objects are still rejected one by one
    body = b"[" + b",".join([b'{"region":"eu"}', b'{"region":"eu"}', b"[]", b"7"] * (N // 38)) + b"]"
    assert len(list(decode_slices(body, JSON))) > 1
    reasons: dict[str, int] = {}
    for items in decode_slices(body, JSON):
        for k, v in validate_records(items)[2].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {"not_an_object": 2 * (N // 38)}
