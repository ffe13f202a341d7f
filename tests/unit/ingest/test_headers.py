"""Header edge cases of ``POST /v1/events``, on the real routes and IngestHandler over a real
socket, with a producer that acknowledges every record (no broker): Content-Encoding over
several lines or as a list is one list of codings (RFC 9110 §8.4), two Idempotency-Key
headers are ambiguous (400), and the Authorization scheme is case-insensitive (§11.1)."""
from __future__ import annotations

import gzip
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from aggregator.ingest.budget import InflightBudget
from aggregator.ingest.handler import IngestHandler
from aggregator.metrics import Metrics
from aggregator.web.server import NoSnapshots, Routes
from tests.unit.ingest.test_dedup_ids import _Producer

TOKEN = "s3cret"
BODY = orjson.dumps([{"region": "eu"}, {"region": "us"}])


async def client_for() -> tuple[TestClient, Any]:
    m = Metrics(5.0, 60.0)
    producer = _Producer()
    h = IngestHandler(producer, m, TOKEN, 1 << 20, 10, budget=InflightBudget(1 << 22))  # type: ignore[arg-type]
    server = TestServer(Routes(m, NoSnapshots(), lambda: None, h).app(1 << 20), host="127.0.0.1")
    await server.start_server(auto_decompress=False)  # as HttpServer runs it: ingest inflates the body itself
    client = TestClient(server)
    await client.start_server()
    return client, producer


async def post(client: TestClient, body: bytes, *headers: tuple[str, str]) -> tuple[int, dict]:
    hdrs = CIMultiDict([("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")])
    for k, v in headers:
        if k == "Authorization":
            hdrs.popall(k)
        hdrs.add(k, v)
    r = await client.post("/v1/events", data=body, headers=hdrs, skip_auto_headers=["Accept-Encoding"])
    return r.status, await r.json()


async def test_content_encoding_lines_and_lists_are_one_list_of_codings():
    client, producer = await client_for()
    try:
        gz = gzip.compress(BODY)
        for headers in ([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")],  # was a 400: gzip as JSON
                        [("Content-Encoding", "identity, gzip")],
                        [("Content-Encoding", "gzip"), ("Content-Encoding", "identity")],
                        [("Content-Encoding", "GZIP")]):
            assert await post(client, gz, *headers) == (200, {"accepted": 2, "rejected": 0, "ingest_ts": any_ts,
                                                              "errors": []}), headers
        # gzip applied twice: refused, as every layer would inflate up to the body limit on the
        # event loop (1,500 layers in one header line took 0.8 s of a 1 MiB limit)
        twice = gzip.compress(gz)
        for headers in ([("Content-Encoding", "gzip"), ("Content-Encoding", "x-gzip")],
                        [("Content-Encoding", "gzip, gzip")], [("Content-Encoding", ", ".join(["gzip"] * 1000))]):
            status, ans = await post(client, twice, *headers)
            assert status == 415 and "one gzip layer" in ans["error"], (headers, ans)
        for headers in ([("Content-Encoding", "identity"), ("Content-Encoding", "br")],
                        [("Content-Encoding", "gzip, deflate")], [("Content-Encoding", "br")]):
            status, ans = await post(client, gz, *headers)
            assert status == 415 and "encoding" in ans["error"], (headers, ans)
        assert len(producer.batcher.out) == 2 * 4
    finally:
        await client.close()


async def test_two_idempotency_keys_are_a_400():
    client, producer = await client_for()
    try:
        status, ans = await post(client, BODY, ("Idempotency-Key", "a"), ("Idempotency-Key", "b"))
        assert status == 400 and "more than one Idempotency-Key" in ans["error"]
        status, ans = await post(client, BODY, ("Idempotency-Key", "a"), ("Idempotency-Key", "a"))
        assert status == 400
        assert producer.batcher.out == []  # nothing of them stored
        assert (await post(client, BODY, ("Idempotency-Key", "a")))[0] == 200
    finally:
        await client.close()


async def test_the_bearer_scheme_is_case_insensitive():
    client, _ = await client_for()
    try:
        for auth in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer {TOKEN}", f"bEaReR  {TOKEN}"):
            assert (await post(client, BODY, ("Authorization", auth)))[0] == 200, auth
        for auth in (f"bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "bearer", f"bearer{TOKEN}", f"Bearer {TOKEN.upper()}"):
            status, ans = await post(client, BODY, ("Authorization", auth))
            assert status == 401 and "bearer token" in ans["error"], auth
    finally:
        await client.close()


class _AnyTs:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)


any_ts = _AnyTs()
