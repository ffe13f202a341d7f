"""The ``clickstream-agg`` header on the records the HTTP ingest writes (issue 18), through
the real routes, handler and producer into a real broker and read back from ``clicks``:
right after ``clickstream-ingest`` and before a sampled request's ``traceparent``, its
value the contract's ``agg_header_value`` of the core.sketches hashes and normalised URL,
only on events with a user or a URL; and the worker's decoder still counts every record
from key and headers.  The header builder itself: tests/unit/ingest/test_agg_header.py."""
from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp.test_utils import TestClient, TestServer

from aggregator import tracing
from aggregator.broker import ensure_topics
from aggregator.core.contract import AGG_HEADER, INGEST_HEADER, agg_header_value, parse_ingest_header
from aggregator.core.sketches import normalise_url, url_hash, user_hash
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.producer import IngestProducer
from aggregator.metrics import Metrics
from aggregator.web.server import NoSnapshots, Routes
from aggregator.worker.decoder import RecordDecoder
from tests.integration.test_tracing import fetch

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def events(i: int) -> list[dict]:
    """30 events over 6 regions: every kind of (user, url) pair, half with a client ts."""
    out = []
    for k in range(30):
        ev: dict = {"region": f"r{k % 6}", "event_id": f"e{i}-{k}"}
        if k % 3 != 0:
            ev["user_id"] = f"u{i}-{k % 7}"
        if k % 5 != 0:
            ev["url"] = f"HTTPS://Shop.Example.com:443/p/{k % 4}?ref={k}" if k % 2 else f"/p/{k % 4}#x"
        if k % 2:
            ev["ts"] = 1_700_000_000_000 + k
        out.append(ev)
    return out


def expected(ev: dict, keep_query: bool) -> bytes | None:
    user, url = ev.get("user_id"), ev.get("url")
    norm = None if url is None else normalise_url(url, keep_query)
    if user is None and norm is None:
        return None
    return agg_header_value(None if user is None else user_hash(user), None if norm is None else url_hash(norm), norm)


async def ingest(bootstrap: str, bodies: list[tuple[list[dict], dict[str, str]]], keep_query: bool) -> list[dict]:
    await ensure_topics(bootstrap, 4)
    producer = IngestProducer(bootstrap)
    await producer.start()
    try:
        deadline = time.monotonic() + 30
        while not producer.ready:
            assert time.monotonic() < deadline, "the ingest producer did not connect in 30 s"
            await asyncio.sleep(0.1)
        metrics = Metrics()
        handler = IngestHandler(producer, metrics, "", 1 << 20, 1000, aggregates=True, url_keep_query=keep_query)
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


async def test_records_carry_the_agg_header_after_the_ingest_header(broker, spans):
    sent = {1: events(1), 2: events(2)}
    answers = await ingest(broker.bootstrap, [(sent[1], {}), (sent[2], {"traceparent": TP})], keep_query=True)
    assert [a["accepted"] for a in answers] == [30, 30]
    fetched = await fetch(broker.bootstrap, 60)
    records = [r for recs in fetched.values() for r in recs]
    assert len(records) == 60 and len(fetched) > 1
    by_id = {ev["event_id"]: ev for evs in sent.values() for ev in evs}
    with_agg = 0
    for r in records:
        ev = by_id[orjson.loads(r.value)["event_id"]]
        names = [k for k, _ in r.headers]
        want = expected(ev, keep_query=True)
        assert names[0] == INGEST_HEADER and names[-1] == tracing.TRACEPARENT, names  # traceparent stays last
        if want is None:
            assert names == [INGEST_HEADER, tracing.TRACEPARENT], (ev, names)
        else:
            with_agg += 1
            assert names == [INGEST_HEADER, AGG_HEADER, tracing.TRACEPARENT], (ev, names)
            assert r.headers[1][1] == want, ev
        its, cts, dedup = parse_ingest_header(r.headers[0][1])
        assert cts == ev.get("ts") and dedup is not None  # the ingest header as without aggregates
    assert 0 < with_agg < 60  # some events have neither a user nor a URL
    # the query string is kept (AGG_URL_KEEP_QUERY), the host lower-cased, the port dropped
    urls = {dict(r.headers)[AGG_HEADER].split(b",", 2)[2] for r in records if AGG_HEADER in dict(r.headers)}
    assert b"https://shop.example.com/p/1?ref=1" in urls and b"/p/2" in urls
    # the decoder counts every record from key and headers, as before
    decoder = RecordDecoder()
    now = int(time.time() * 1000)
    counted = 0
    for partition, recs in fetched.items():
        d = decoder.decode(recs, now, partition, False, None, now + 60_000)
        assert not d.rejected
        counted += len(d.events)
    assert counted == 60
