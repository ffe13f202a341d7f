"""POST /v1/events (CONTRACT §2, §3): the body parser, record validation, and the real endpoint.

Pure tests of ``decode_body`` / ``validate_records`` / ``gunzip_bounded`` (plus hypothesis
properties) run without a broker; the ``integration`` tests start real service processes:
one for every answer of the endpoint, one whose broker is stopped (503 + Retry-After).
"""
from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.core.contract import ingest_header, parse_ingest_header
from aggregator.core.events import EventError, validate
from aggregator.ingest.body import MAX_ERRORS, BodyError, decode_body, gunzip_bounded, validate_records
from tests.conftest import Service, http, wait_for

NDJSON = "application/x-ndjson"
JSON = "application/json"
CONTENT_TYPES = [JSON, NDJSON, "application/json; charset=utf-8", "text/plain", "", "application/jsonl",
                 "multipart/form-data", "APPLICATION/JSON"]


def body_error(body: bytes, ct: str = JSON) -> BodyError:
    with pytest.raises(BodyError) as ei:
        decode_body(body, ct)
    return ei.value


# ------------------------------------------------------------------ decode_body
@given(st.integers(0, 2**53), st.one_of(st.none(), st.integers(-(2**53) + 1, 2**53 - 1)))
def test_ingest_header_round_trips(ingest_ts, client_ts):
    [(name, value)] = ingest_header(ingest_ts, client_ts)
    assert name == "clickstream-ingest"
    assert parse_ingest_header(value) == (ingest_ts, client_ts)


@pytest.mark.parametrize("value", [b"", b"soon", b"1,", b",2", b"1,2,3", b"1.5"])
def test_ingest_header_that_ingest_did_not_write_is_refused(value):
    with pytest.raises(ValueError):
        parse_ingest_header(value)


def test_json_array_and_single_object():
    assert decode_body(b'[{"region": "eu"}, {"region": "us"}]', JSON) == [{"region": "eu"}, {"region": "us"}]
    assert decode_body(b'{"region": "eu"}', JSON) == [{"region": "eu"}]
    assert decode_body(b'[]', "application/json; charset=utf-8") == []
    # a missing Content-Type is treated as JSON
    assert decode_body(b'{"region": "eu"}', "") == [{"region": "eu"}]


def test_ndjson_bad_line_is_rejected_by_index_and_the_rest_accepted():
    body = b'{"region": "eu"}\n{not json\n\n{"region": "us"}\r\n[1, 2]\n'
    items = decode_body(body, NDJSON)
    assert len(items) == 4  # blank lines are skipped
    good, errors, reasons = validate_records(items)
    assert [e["region"] for e in good] == ["eu", "us"]
    assert [e["index"] for e in errors] == [1, 3]
    assert "invalid JSON" in errors[0]["error"]
    assert reasons == {"bad_json": 1, "not_an_object": 1}


def test_json_seq_record_separators():
    items = decode_body(b'\x1e{"region": "eu"}\n\x1e{"region": "us"}\n', "application/json-seq")
    assert items == [{"region": "eu"}, {"region": "us"}]


def test_gzip_body():
    raw = orjson.dumps([{"region": "eu"}] * 10)
    assert decode_body(gunzip_bounded(gzip.compress(raw), 1 << 20), JSON) == [{"region": "eu"}] * 10
    # a multi-member gzip body (e.g. concatenated .gz files) is decompressed in full, not cut short
    two = gzip.compress(b'[{"region": "a"}') + gzip.compress(b', {"region": "b"}]')
    assert decode_body(gunzip_bounded(two, 1000), JSON) == [{"region": "a"}, {"region": "b"}]


def test_gzip_errors():
    assert body_error_gz(b"not gzip at all", 1000).status == 400
    assert body_error_gz(gzip.compress(b"[]" * 100)[:-12], 1000).status == 400          # truncated
    assert body_error_gz(gzip.compress(b"[]") + b"trailing junk", 1000).status == 400   # junk after
    assert body_error_gz(b"", 1000).status == 400
    # exactly at the limit is fine, one byte over is 413
    assert gunzip_bounded(gzip.compress(b"x" * 100), 100) == b"x" * 100
    assert body_error_gz(gzip.compress(b"x" * 101), 100).status == 413
    # the limit holds across members too
    assert body_error_gz(gzip.compress(b"x" * 60) * 2, 100).status == 413


def body_error_gz(data: bytes, limit: int) -> BodyError:
    with pytest.raises(BodyError) as ei:
        gunzip_bounded(data, limit)
    return ei.value


def test_gzip_bomb_is_413_without_decompressing_it_all():
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(comp.compress(zeros) for _ in range(100)) + comp.flush()  # 100 MiB of zeros
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    err = body_error_gz(bomb, 8 << 20)
    assert err.status == 413
    assert "after decompression" in err.message
    assert time.perf_counter() - t0 < 1.0


def test_415_for_other_content_types():
    for ct in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        err = body_error(b'{"region": "eu"}', ct)
        assert err.status == 415
        assert "content type" in err.message


def test_400_for_unparseable_json_with_a_message():
    for body in (b"{", b"", b"   ", b"nope", b'[{"region": "eu"},]', b"\xff\xfe", b"[" * 100_000, b"1e400"):
        err = body_error(body)
        assert err.status == 400, body[:20]
        assert "not valid JSON" in err.message and len(err.message) > 25
    for body in (b"5", b'"x"', b"null", b"true"):
        err = body_error(body)
        assert err.status == 400
        assert "array" in err.message


def test_errors_list_is_capped_but_counts_are_not():
    good, errors, reasons = validate_records([{"region": "bad region"}] * 250 + [{"region": "ok"}])
    assert len(good) == 1
    assert len(errors) == MAX_ERRORS
    assert [e["index"] for e in errors] == list(range(MAX_ERRORS))
    assert reasons == {"bad_region": 250}


# ------------------------------------------------------------------ records (§2)
@pytest.mark.parametrize("region,expected", [
    ("a" * 64, "a" * 64), ("a.b", "a.b"), ("a-b", "a-b"), ("a_b", "a_b"), ("EU", "eu"),
    ("0", "0"), ("Us-East-1", "us-east-1"),
])
def test_regions_accepted(region, expected):
    assert validate({"region": region})["region"] == expected


@pytest.mark.parametrize("region", [
    "a" * 65, "a/b", "ü", "a b", "", 5, None, "a\n", "../x", "\u212a", "İ", True, ["eu"], {"r": 1},
])
def test_regions_rejected(region):
    with pytest.raises(EventError) as ei:
        validate({"region": region})
    assert ei.value.reason == "bad_region"


def test_region_required_and_event_must_be_an_object():
    with pytest.raises(EventError):
        validate({"user_id": "u"})
    for obj in (5, "eu", None, [{"region": "eu"}]):
        with pytest.raises(EventError) as ei:
            validate(obj)
        assert ei.value.reason == "not_an_object"


@pytest.mark.parametrize("ts,ms", [
    (1_700_000_000_000, 1_700_000_000_000),
    (1_700_000_000_000.9, 1_700_000_000_000),
    ("2024-01-01T00:00:00Z", 1_704_067_200_000),
    ("2024-01-01T01:00:00+01:00", 1_704_067_200_000),
    ("2024-01-01T00:00:00.250-00:00", 1_704_067_200_250),
])
def test_ts_accepted(ts, ms):
    assert validate({"region": "eu", "ts": ts})["ts"] == ms


@pytest.mark.parametrize("ts", [
    "2024-01-01T00:00:00", "yesterday", "2024-13-01T00:00:00Z", "", "1700000000000", True,
    [1], {"t": 1}, 2 ** 60, -(2 ** 60), 1e300, "2024-01-01T00:00:00Z" + " " * 40,
])
def test_bad_ts_rejected(ts):
    with pytest.raises(EventError) as ei:
        validate({"region": "eu", "ts": ts})
    assert ei.value.reason == "bad_ts"


def test_field_lengths_and_types():
    ok = validate({"region": "eu", "user_id": "u" * 128, "event_id": "e" * 128, "url": "h" * 2048,
                   "unknown": {"ignored": True}})
    assert set(ok) == {"region", "user_id", "event_id", "url"}
    for field, n in (("user_id", 129), ("event_id", 129), ("url", 2049)):
        with pytest.raises(EventError) as ei:
            validate({"region": "eu", field: "x" * n})
        assert ei.value.reason == "bad_field"
    for bad in (5, ["u"], {"u": 1}, True):
        with pytest.raises(EventError):
            validate({"region": "eu", "user_id": bad})


# ------------------------------------------------------------------ properties
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"region": json_values | st.text(max_size=70) | st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)},
                          optional={"ts": json_values | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.text(max_size=45),
                                    "user_id": json_values | st.text(max_size=130),
                                    "url": json_values, "event_id": json_values}),
)
bodies = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda n: b"[" * n, st.integers(0, 200_000)),
    st.builds(lambda n: b'{"region": "eu", "ts": ' + b"9" * n + b"}", st.integers(1, 5000)),
    st.builds(lambda rs: orjson.dumps(rs), st.lists(records, max_size=20)),
    st.builds(lambda rs: b"\n".join(orjson.dumps(r) for r in rs), st.lists(records, max_size=20)),
    st.builds(lambda b, i: b[:i] + b"\xff\xc0" + b[i:],
              st.builds(lambda rs: orjson.dumps(rs), st.lists(records, max_size=5)), st.integers(0, 50)),
)
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_body(body: bytes, ct: str) -> None:
    try:
        items = decode_body(body, ct)
    except BodyError as exc:
        assert exc.status in (400, 413, 415)
        assert exc.message
        return
    assert isinstance(items, list)
    good, errors, reasons = validate_records(items)
    assert len(good) + sum(reasons.values()) == len(items)
    assert len(errors) == min(MAX_ERRORS, sum(reasons.values()))
    for ev in good:
        assert set(ev) <= {"region", "user_id", "event_id", "url", "ts"}
        orjson.dumps(ev)  # what the server produces to Kafka


@PROPS
@given(bodies, st.sampled_from(CONTENT_TYPES))
def test_property_decode_body_raises_only_body_errors(body, ct):
    check_body(body, ct)


@PROPS
@given(st.lists(st.one_of(records, json_values), max_size=30))
def test_property_validate_records_never_raises(items):
    good, errors, reasons = validate_records(items)
    assert len(good) + sum(reasons.values()) == len(items)


@PROPS
@given(st.binary(max_size=3000), st.integers(1, 5000))
def test_property_gunzip_bounded(data, limit):
    for blob in (data, gzip.compress(data)):
        try:
            out = gunzip_bounded(blob, limit)
        except BodyError as exc:
            assert exc.status in (400, 413)
        else:
            assert len(out) <= limit
            assert out == gzip.decompress(blob)


# ------------------------------------------------------------------ the real endpoint
def now_rfc3339() -> str:
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).isoformat()


TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 4096


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
    seen: dict[str, int] = {}

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies, st.sampled_from(CONTENT_TYPES), st.booleans())
    def random_posts(body, ct, gz):
        headers = {**AUTH}
        if gz:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        status, _, ans = svc.post(body, content_type=ct, headers=headers)
        assert status < 500, (status, ans)
        if status == 200:
            assert ans["accepted"] >= 0 and ans["rejected"] >= 0
            assert len(ans["errors"]) == min(MAX_ERRORS, ans["rejected"])
            seen[status] = seen.get(status, 0) + 1
        else:
            assert status in (400, 413, 415), (status, ans)
            assert ans["error"]

    random_posts()
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
    in tests/test_broker_outage.py (the embedded broker keeps everything in memory, so a
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
    finally:
        svc.kill()
