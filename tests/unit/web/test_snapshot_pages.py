"""GET /v1/snapshots on a real aiohttp server on 127.0.0.1: the newest snapshots by default, a
bounded page, paging from ``since`` with ``after`` = ``next`` that lists every snapshot once,
a small bound on the answers built or sent at once (503 beyond), a client that does not read
cut off, and the idle sweep aborting a connection whose answer is still unflushed (close()
would wait for it forever)."""
from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer

from aggregator.core.snapshots import SnapshotStore
from aggregator.metrics import Metrics
from aggregator.web.server import SNAPSHOTS_LIMIT, SNAPSHOTS_MAX_LIMIT, ConnectionGate, Routes, _Conn
from tests.unit.core.test_snapshot_store import snap


async def client_for(store: SnapshotStore) -> tuple[TestClient, Routes]:
    routes = Routes(Metrics(), store, lambda: None, None)
    client = TestClient(TestServer(routes.app(1 << 20), host="127.0.0.1"))
    await client.start_server()
    return client, routes


async def test_a_page_is_bounded_and_paging_lists_every_snapshot_once():
    store = SnapshotStore()
    store.add([snap(f"r{i % 700}", 60_000 * (i // 700), i) for i in range(2500)])  # 700 regions share a window_end
    client, _ = await client_for(store)
    try:
        first = await (await client.get("/v1/snapshots")).json()  # the newest, oldest first; older ones exist
        newest = [s["count"] for s in store.query(None, None)][-SNAPSHOTS_LIMIT:]
        assert [s["count"] for s in first["snapshots"]] == newest
        assert first["more"] is False and first["older"] is True
        one = await (await client.get("/v1/snapshots?region=r3")).json()  # all of them fit: no older
        assert one["snapshots"] == store.query("r3", None) and len(one["snapshots"]) == 4 and one["older"] is False
        for since in (0, 60_000):  # from the oldest (since=0) on, page by page
            seen: list[int] = []
            query = f"limit=300&since={since}"
            while True:
                r = await client.get("/v1/snapshots?" + query)
                assert r.status == 200
                page = await r.json()
                assert len(page["snapshots"]) <= 300
                seen += [s["count"] for s in page["snapshots"]]
                if not page["more"]:
                    break
                query = f"limit=300&after={page['next']}&since={since}"
            want = [s["count"] for s in store.query(None, since)]
            assert seen == want and len(set(seen)) == len(seen)  # every one, once, oldest first
        store.add([snap("late", 0, 9999)])  # stored after the last page: the next poll from its `next` has it
        for nxt in (page["next"], first["next"]):  # (the newest's `next` is the end too)
            got = await (await client.get(f"/v1/snapshots?after={nxt}")).json()
            assert [s["count"] for s in got["snapshots"]] == [9999] and got["more"] is False
        for bad in (f"limit={SNAPSHOTS_MAX_LIMIT + 1}", "limit=0", "limit=x", "after=12", "after=abc.x",
                    "after=deadbeef.5", "since=yesterday", f"after={store.instance}.{'9' * 5000}"):
            r = await client.get("/v1/snapshots?" + bad)
            assert r.status == 400, bad
            assert "error" in await r.json()
        assert (await client.get(f"/v1/snapshots?limit={SNAPSHOTS_MAX_LIMIT}")).status == 200
    finally:
        await client.close()


def big_store(n: int = 2000) -> SnapshotStore:
    """Pages of about 10 MB: more than loopback's socket buffers take from a client that reads nothing."""
    store = SnapshotStore()
    top = [{"url": f"/{i}/" + "p" * 240, "count": 1} for i in range(20)]
    store.add([{**snap(f"r{i}", 0, i), "top_urls": top} for i in range(n)])
    return store


async def stalled_reader(port: int, query: str = "limit=2000") -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v1/snapshots?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return writer


async def until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_over_the_bound_of_answers_at_once_is_503_with_retry_after():
    client, routes = await client_for(big_store())
    routes.max_snapshot_views = 2
    try:
        stalled = [await stalled_reader(client.server.port) for _ in range(2)]
        await until(lambda: routes.snapshot_views == 2)  # both answers stuck in the send
        r = await client.get("/v1/snapshots?limit=1")
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "too many" in (await r.json())["error"]
        for w in stalled:
            w.transport.abort()  # the clients go away: their slots are given back
        await until(lambda: routes.snapshot_views == 0)
        assert (await client.get("/v1/snapshots?limit=1")).status == 200
    finally:
        await client.close()


async def test_a_client_that_does_not_read_its_answer_is_cut_off():
    client, routes = await client_for(big_store())
    routes.snapshot_send_s = 0.3
    try:
        t = time.monotonic()
        w = await stalled_reader(client.server.port)
        await until(lambda: routes.snapshot_views == 1)
        await until(lambda: routes.snapshot_views == 0)
        assert time.monotonic() - t < 5
        assert (await client.get("/v1/snapshots?limit=1")).status == 200
        w.transport.abort()
    finally:
        await client.close()


class FakeTransport(asyncio.WriteTransport):
    def __init__(self, unflushed: int) -> None:
        super().__init__()
        self.unflushed = unflushed
        self.how: str | None = None

    def get_write_buffer_size(self) -> int:
        return self.unflushed

    def close(self) -> None:
        self.how = "close"

    def abort(self) -> None:
        self.how = "abort"


def test_the_idle_sweep_aborts_a_connection_whose_answer_is_unflushed():
    gate = ConnectionGate(10, header_timeout=1.0)
    ts = [FakeTransport(0), FakeTransport(5 << 20)]
    for t in ts:
        conn = _Conn(gate, asyncio.Protocol())
        conn.transport = t
        conn.idle_since = 0.0
        gate.conns[t] = conn
    assert gate.sweep(100.0) == 2
    assert [t.how for t in ts] == ["close", "abort"]
