"""Slow bodies cannot hold the in-flight budget (docs/contract.md §3, "Slow clients"), on the
real routes and IngestHandler over a real socket on 127.0.0.1, without a broker (an empty
array is answered 200 with nothing to produce).

A request takes its body's bytes from the budget as they arrive, and used to keep them
until the whole-body timeout (30 s): four connections that each sent all but the last
byte of a maximal body and stopped held the whole default budget, and every other POST
was answered 503 for those 30 s."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp.test_utils import TestClient

from aggregator.ingest.handler import BODY_IDLE_BYTES, IngestHandler
from tests.unit.ingest.test_bounds import ingest_client as bounds_client

MAX_BODY = 1 << 20
JSON = {"Content-Type": "application/json"}


async def ingest_client(idle_s: float, body_timeout: float = 30.0) -> tuple[TestClient, IngestHandler]:
    """``test_bounds.ingest_client`` with room for four maximum-size bodies and ``idle_s``."""
    client, h = await bounds_client(4 * MAX_BODY, body_timeout)
    h.body_idle_s = idle_s
    return client, h


async def stalled_post(client: TestClient, sent: int, length: int) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % length + b" " * sent)
    await writer.drain()
    return reader, writer


async def test_bodies_that_stall_are_cut_off_within_the_idle_timeout_and_others_are_served() -> None:
    client, h = await ingest_client(idle_s=0.5)
    try:
        stalled = [await stalled_post(client, MAX_BODY - 1, MAX_BODY) for _ in range(4)]
        t0 = time.monotonic()
        for _ in range(500):  # the bytes reach the handlers
            if h.budget.used == 4 * (MAX_BODY - 1):
                break
            await asyncio.sleep(0.01)
        assert h.budget.used == 4 * (MAX_BODY - 1)  # the budget is full of stalled bodies
        r = await client.post("/v1/events", data=b"[    ]", headers=JSON)
        assert r.status == 503  # (the lock-out, while they hold it: 4 bytes are free)
        # (the answers, not EOF: aiohttp lingers up to 10 s for the rest of a body it did not read)
        answers = [await asyncio.wait_for(rd.readuntil(b"}"), 5) for rd, _ in stalled]
        cut_after = time.monotonic() - t0
        for _, w in stalled:
            w.close()
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in a, a[:200]
            assert b'{"error":"the body stalled: less than 16384 bytes of it came in 0.5 s' in a, a[-200:]
        assert cut_after < 3.0  # the idle timeout, not the 30 s of the whole-body one
        assert h.budget.used == 0
        r = await client.post("/v1/events", data=b"[    ]", headers=JSON)
        assert r.status == 200 and (await r.json())["accepted"] == 0  # served, not 503
    finally:
        await client.close()


async def test_a_body_that_trickles_is_cut_off_like_one_that_stalls() -> None:
    """A byte every tenth of a second never leaves the idle timer: what counts as progress
    is BODY_IDLE_BYTES (or the end), not a byte."""
    client, h = await ingest_client(idle_s=0.5)
    try:
        reader, writer = await stalled_post(client, 1000, 100_000)
        t0 = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - t0 < 5:
            writer.write(b" ")
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"}"), 0.1)
            except TimeoutError:
                pass
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"the body stalled" in answer, answer[:200]
        assert time.monotonic() - t0 < 2.0
        assert h.budget.used == 0
    finally:
        await client.close()


async def steady(steps: int, every_s: float) -> Any:
    """A JSON body of ``steps`` runs of BODY_IDLE_BYTES, one every ``every_s``."""
    yield b"["
    for _ in range(steps):
        await asyncio.sleep(every_s)
        yield b" " * BODY_IDLE_BYTES
    yield b"]"


async def test_a_body_that_keeps_coming_is_not_cut_by_the_idle_timeout() -> None:
    """BODY_IDLE_BYTES every 0.2 s for 1.2 s, past two idle timeouts of 0.5 s: the timer is
    set again at each step, and the body is read to its end (here: valid JSON, 200)."""
    client, _ = await ingest_client(idle_s=0.5)
    try:
        r = await client.post("/v1/events", data=steady(6, 0.2), headers=JSON)
        assert r.status == 200, await r.text()
    finally:
        await client.close()


async def test_the_whole_body_timeout_still_bounds_a_body_that_keeps_coming() -> None:
    client, _ = await ingest_client(idle_s=0.5, body_timeout=0.5)
    try:
        r = await client.post("/v1/events", data=steady(10, 0.1), headers=JSON)
        assert r.status == 408
        assert (await r.json())["error"] == "the body did not arrive within 0.5 s"
    finally:
        await client.close()
