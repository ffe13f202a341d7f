"""POST /v1/events (docs/contract.md §2, §3) on the real endpoint: service processes, one for every
answer of the endpoint, one whose broker is stopped (503 + Retry-After).  The body parser
and record validation without a broker: tests/unit/ingest/test_body.py, tests/unit/core/.

Moved from tests/test_ingest.py."""
from __future__ import annotations

import gzip
import json
import socket
import time
from datetime import UTC
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aggregator.ingest.body import MAX_ERRORS
from tests.conftest import http, wait_for
from tests.integration.conftest import ON_REAL_KAFKA, Service
from tests.unit.ingest.test_body import CONTENT_TYPES, JSON, NDJSON, bodies


def now_rfc3339() -> str:
    from datetime import datetime
    return datetime.now(UTC).isoformat()


TOKEN = "s3cret"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


LIMIT = 4096


def items_in(body: bytes, content_type: str) -> int:
    """The items of a body the endpoint took (200), counted here apart from ingest/body.py:
    a JSON array's elements or one object; an NDJSON body's non-blank lines (RFC 7464's
    record separator at a line's start ignored)."""
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct in ("application/json", ""):
        obj = json.loads(body)
        return len(obj) if isinstance(obj, list) else 1
    assert ct in ("application/x-ndjson", "application/jsonl", "application/json-seq"), ct
    return sum(1 for line in body.split(b"\n") if line.lstrip(b"\x1e").strip())


def raw_post(url: str, head: list[bytes], parts: list[bytes], pause: float = 0.0) -> tuple[int, bytes]:
    """POST over a bare socket: header bytes as given, body sent in ``parts``."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=15) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(h + b"\r\n" for h in head)
                  + b"\r\n")
        for p in parts:
            s.sendall(p)
            time.sleep(pause)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    status = int(buf.split(b" ", 2)[1])
    return status, buf.split(b"\r\n\r\n", 1)[1]


@pytest.mark.integration
def test_endpoint_answers(service_factory):
    svc = service_factory("ingest", AGG_INGEST_TOKEN=TOKEN, AGG_MAX_BODY_BYTES=str(LIMIT)).start()
    # Kafka grants the idempotent producer; the embedded broker (Tansu), named as an external
    # one here, refuses it: ingest goes on without, says so in a line and in this gauge
    want = 1.0 if ON_REAL_KAFKA else 0.0
    assert f"\nclickstream_ingest_idempotent_producer {want}\n" in svc.metrics_text()
    if not ON_REAL_KAFKA:
        assert "refused Kafka's idempotent producer" in svc.log_path.read_text()
    counted: dict[str, int] = {}
    acks: set[tuple[str, int]] = set()  # (region, window start) of every acknowledged request
    W_MS = 2000

    def ok(events, ct=JSON, headers=None, region=None, n=None):
        status, _, ans = svc.post(events, content_type=ct, headers={**AUTH, **(headers or {})})
        assert status == 200, ans
        assert set(ans) == {"accepted", "rejected", "ingest_ts", "errors"}
        if region is not None:
            counted[region] = counted.get(region, 0) + ans["accepted"]
            acks.add((region, ans["ingest_ts"] - ans["ingest_ts"] % W_MS))
        if n is not None:
            assert ans["accepted"] == n, ans
        return ans

    # 200 with mixed valid and invalid records: valid ones accepted, bad ones by index
    ans = ok([{"region": "ing-mixed"}, {"region": "bad region"}, {"region": "ING-MIXED", "ts": now_rfc3339()},
              5, {"region": "ing-mixed", "user_id": "u" * 129}, {"region": "ing-mixed", "url": "/x", "x": [1]}],
             region="ing-mixed", n=3)
    assert ans["rejected"] == 3
    assert [e["index"] for e in ans["errors"]] == [1, 3, 4]
    assert all(e["error"] for e in ans["errors"])
    assert abs(ans["ingest_ts"] - time.time() * 1000) < 5000

    # NDJSON, with a bad line reported by index
    ans = ok(b'{"region": "ing-nd"}\n{oops\n{"region": "ing-nd"}\n', ct=NDJSON, region="ing-nd", n=2)
    assert ans["rejected"] == 1 and ans["errors"][0]["index"] == 1

    # gzip Content-Encoding (JSON and NDJSON)
    ok(gzip.compress(orjson.dumps([{"region": "ing-gz"}] * 3)), headers={"Content-Encoding": "gzip"},
       region="ing-gz", n=3)
    ok(gzip.compress(b'{"region": "ing-gz"}\n{"region": "ing-gz"}\n'), ct=NDJSON,
       headers={"Content-Encoding": "gzip"}, region="ing-gz", n=2)

    # a body that arrives in several TCP segments is read in full
    body = orjson.dumps([{"region": "ing-split", "user_id": f"u{i}"} for i in range(60)])
    assert 2000 < len(body) < LIMIT
    status, raw = raw_post(svc.url, [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode(),
                                     f"Authorization: Bearer {TOKEN}".encode()],
                           [body[:700], body[700:1500], body[1500:]], pause=0.15)
    assert status == 200, raw
    ans = json.loads(raw)
    assert ans["accepted"] == 60
    counted["ing-split"] = 60
    acks.add(("ing-split", ans["ingest_ts"] - ans["ingest_ts"] % W_MS))

    # 400 when the body cannot be parsed, with a message that says why
    for bad in (b"{", b"[1, 2", b"", b"\xff", b"7", b"[" * 3000):
        status, _, ans = svc.post(bad, headers=AUTH)
        assert status == 400, (bad[:20], ans)
        assert "JSON" in ans["error"]
    status, _, ans = svc.post(b"not gzip", headers={**AUTH, "Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in ans["error"]

    # 415: another content type, another encoding
    status, _, ans = svc.post([{"region": "ing-415"}], content_type="text/plain", headers=AUTH)
    assert status == 415 and "content type" in ans["error"]
    status, _, ans = svc.post([{"region": "ing-415"}], headers={**AUTH, "Content-Encoding": "br"})
    assert status == 415 and "encoding" in ans["error"]

    # 413: over AGG_MAX_BODY_BYTES raw, and after decompression
    big = orjson.dumps([{"region": "ing-413", "user_id": "u" * 100}] * 40)
    assert len(big) > LIMIT
    status, _, ans = svc.post(big, headers=AUTH)
    assert status == 413, ans
    assert len(gzip.compress(big)) < LIMIT
    status, _, ans = svc.post(gzip.compress(big), headers={**AUTH, "Content-Encoding": "gzip"})
    assert status == 413 and "decompression" in ans["error"]
    # ... also when the client sends no Content-Length (chunked)
    status, raw = raw_post(svc.url, [b"Content-Type: application/json", b"Transfer-Encoding: chunked",
                                     f"Authorization: Bearer {TOKEN}".encode()],
                           [b"%x\r\n%s\r\n" % (len(big), big), b"0\r\n\r\n"])
    assert status == 413, raw

    # 401 without the token, with a wrong one, with a non-ASCII one; 200 with the right one
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        status, hdrs, ans = svc.post([{"region": "ing-401"}], headers=headers)
        assert status == 401, (headers, ans)
        assert hdrs.get("WWW-Authenticate") == "Bearer"
    status, raw = raw_post(svc.url, [b"Content-Type: application/json", b"Content-Length: 2",
                                     "Authorization: Bearer s3cr\u00e9t".encode()], [b"[]"])
    assert status == 401, raw
    ok([{"region": "ing-auth"}], region="ing-auth", n=1)

    # random bodies at the endpoint: 4xx, or 200 with consistent counts; never 5xx
    seen: dict[int, int] = {}

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies, st.sampled_from(CONTENT_TYPES), st.booleans())
    @example(b'{"region": "eu"}\n\n{"region": 5}\n{oops\n', NDJSON, True)  # a 200 whatever is drawn
    def random_posts(body, ct, gz):
        headers = {**AUTH}
        sent = gzip.compress(body) if gz else body
        if gz:
            headers["Content-Encoding"] = "gzip"
        status, _, ans = svc.post(sent, content_type=ct, headers=headers)
        assert status < 500, (status, ans)
        seen[status] = seen.get(status, 0) + 1
        if status == 200:
            assert ans["accepted"] + ans["rejected"] == items_in(body, ct), (body[:200], ct, ans)
            assert len(ans["errors"]) == min(MAX_ERRORS, ans["rejected"])
        else:
            assert status in (400, 413, 415), (status, ans)
            assert ans["error"]

    random_posts()
    assert seen.get(200, 0) >= 1, seen
    assert http("GET", svc.url + "/healthz")[0] == 200

    # every acknowledged valid record is counted in a final snapshot of its window
    # (a region's first snapshot is for the window it was first seen in: wait per region)
    def all_closed():
        snaps = [s for s in svc.snapshots() if s["region"] in counted]
        got = {(s["region"], s["window_start"]) for s in snaps}
        return snaps if acks <= got else None

    snaps = wait_for(all_closed, 30, what="snapshots of the ingest test's windows")
    totals: dict[str, int] = {}
    for s in snaps:
        totals[s["region"]] = totals.get(s["region"], 0) + s["count"] + s["late"]
    assert totals == counted
    assert http("GET", svc.url + "/healthz")[0] == 200


@pytest.mark.integration
def test_broker_down_is_503_with_retry_after(stoppable_broker, tmp_path):
    """Only the 503 side: the records acknowledged before and after a restart are counted
    in tests/integration/test_broker_outage.py (the embedded broker keeps everything in memory, so a
    restarted one has lost the topics)."""
    broker = stoppable_broker
    svc = Service(broker.url, tmp_path / "down").start()
    try:
        status, _, ans = svc.post([{"region": "down"}])
        assert status == 200 and ans["accepted"] == 1
        broker.stop()
        t0 = time.monotonic()
        status, hdrs, ans = svc.post([{"region": "down"}, {"region": "bad region"}])
        took = time.monotonic() - t0
        assert status == 503, ans
        assert int(hdrs["Retry-After"]) > 0
        assert "broker" in ans["error"]
        print(f"first 503 after {took:.1f}s")
        assert took < 12.5, took
        # the process is still alive and answers; a body that is bad as a whole is still a 400
        assert http("GET", svc.url + "/healthz")[0] == 200
        assert svc.post(b"{")[0] == 400
        t0 = time.monotonic()
        status, hdrs, _ = svc.post([{"region": "down"}])
        print(f"second 503 after {time.monotonic() - t0:.1f}s")
        assert status == 503 and "Retry-After" in hdrs
        # /readyz says why (it answered 200 through an outage before), and /metrics answers too
        status, _, body = http("GET", svc.url + "/readyz")
        assert status == 503 and json.loads(body)["reason"] == "broker unreachable", body
        status, _, body = http("GET", svc.url + "/metrics")
        assert status == 200 and b"clickstream_broker_reachable 0.0" in body
    finally:
        svc.kill()
