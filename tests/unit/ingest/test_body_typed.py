"""Ingest's typed parse (ingest/body.py ``Event``, ``_typed``) must give exactly what the
orjson path gives: the same accepted events (byte for byte the same record values), the
same errors at the same indices and the same reasons, for any body, in slices or whole.
It only speeds up bodies it takes; everything else the orjson path decides."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.core.events import LIMITS
from aggregator.ingest import body as ingest
from aggregator.ingest.body import BodyError, Event, decode_slices, validate_records
from tests.unit.ingest.test_body import JSON, NDJSON, bodies
from tests.unit.ingest.test_body import records as any_records

SEQ = "application/json-seq"


@contextmanager
def typed_off() -> Iterator[None]:
    """Every slice through the orjson path (as before the typed parse)."""
    saved = ingest._typed
    ingest._typed = lambda buf: None
    try:
        yield
    finally:
        ingest._typed = saved


def outcome(body: bytes, ct: str, slice_bytes: int) -> Any:
    """What the handler makes of ``body``: per slice, the accepted events' record values,
    their body indices, the errors and the reasons; or the body's error."""
    try:
        slices = decode_slices(body, ct, slice_bytes)
        out, total = [], 0
        for items in slices:
            indices: list[int] = []
            good, errors, reasons = validate_records(items, total, indices=indices)
            total += len(items)
            out.append(([msgspec.json.encode(e) for e in good], indices, errors, reasons))
        return out
    except BodyError as exc:
        return exc.status, exc.message


def both(body: bytes, ct: str, slice_bytes: int = 1 << 18) -> Any:
    for _ in range(2):  # twice: the first pass may fill the region cache
        on = outcome(body, ct, slice_bytes)
        with typed_off():
            off = outcome(body, ct, slice_bytes)
        assert on == off, body[:200]
    return on


EDGE = [
    b'{"region":"eu","user_id":"u1","url":"/a","ts":1700000000000}',
    b'{"region":"EU-West","user_id":"u1"}',                 # a region to normalise
    b'{"region":"eu","region":"us"}',                       # duplicate keys: the last one
    b'{"region":"eu","ts":1,"ts":"2024-05-01T10:00:00Z"}',
    b'{"region":"eu","ingest_ts":5}',                       # a client's ingest_ts is dropped
    b'{"region":"eu","ingest_ts":"x"}',
    b'{"region":"eu","ingest_ts":18446744073709551616}',
    b'{"region":"eu","user_id":null,"url":null,"ts":null,"event_id":null}',
    b'{"region":null}', b'{"user_id":"u"}', b'{}', b'[]', b'[1]', b'"x"', b'null',
    b'{"region":"eu","ts":9007199254740991}', b'{"region":"eu","ts":9007199254740992}',
    b'{"region":"eu","ts":-9007199254740991}', b'{"region":"eu","ts":-9007199254740992}',
    b'{"region":"eu","ts":1.0}', b'{"region":"eu","ts":1e2}', b'{"region":"eu","ts":-0}', b'{"region":"eu","ts":true}',
    b'{"region":"eu","ts":18446744073709551616}', b'{"region":"eu","ts":1e400}',
    b'{"region":"eu","user_id":"' + "\U0001f600".encode() * 128 + b'"}',   # 128 characters, 512 bytes
    b'{"region":"eu","user_id":"' + "\U0001f600".encode() * 129 + b'"}',
    b'{"region":"eu","url":"' + b"u" * LIMITS["url"] + b'"}', b'{"region":"eu","url":"' + b"u" * 2049 + b'"}',
    b'{"region":"eu","event_id":"' + b"e" * 128 + b'"}', b'{"region":"eu","event_id":"' + b"e" * 129 + b'"}',
    b'{"region":"eu","user_id":"\\ud800"}', b'{"region":"eu","user_id":"\\ud83d\\ude00"}',
    b'{"region":"eu","user_id":"\xff"}', b'\xef\xbb\xbf{"region":"eu"}',
    b'{"region":"eu","user_id":"a\\u0000b\\n\\"\\\\\\u2028</"}',
    b'{"region":"eu","extra":1}', b'{"region":"eu","extra":"\xff"}', b'{"region":"eu","extra":1e400}',
    b'{"region":"eu","user_id":{"a":1}}', b'{"region":"eu","user_id":5}', b'{"region":5}',
    b'{"region":"bad region"}', b'{"region":"\xe2\x84\xaaelvin"}', b'{"region":""}',
    b'{"region":"eu"} {"region":"us"}', b'{"region":"eu"},{"region":"us"}', b'{"region":"eu"}x',
]


def corpus() -> Iterator[tuple[bytes, str]]:
    lines = EDGE
    for ln in lines:
        yield ln, NDJSON
        yield ln, JSON
        yield b"[" + ln + b"]", JSON
        yield b'{"region":"eu"}\n' + ln + b'\n{"region":"us","ts":3}', NDJSON
        yield b'[{"region":"eu"},' + ln + b',{"region":"us","ts":3}]', JSON
    yield b"\n".join(lines), NDJSON
    yield b"\r\n".join(lines), NDJSON
    yield b"\n\n".join(lines) + b"\n\n", NDJSON
    yield b"\x1e" + b"\n\x1e".join(lines), SEQ
    yield b"[" + b",".join(lines) + b"]", JSON
    yield b"[ " + b" ,\n ".join(lines[:3]) + b" ]", JSON


@pytest.mark.parametrize("slice_bytes", [1 << 18, 64, 1])
def test_edge_bodies_give_the_same_outcome(slice_bytes: int) -> None:
    for body, ct in corpus():
        both(body, ct, slice_bytes)


def test_the_typed_parse_takes_the_common_body() -> None:
    """Not a check that cannot fail: with the typed parse off, nothing is an Event."""
    lines = [orjson.dumps({"region": "eu", "user_id": f"u{i}", "url": f"/p/{i}", "ts": 1_700_000_000_000 + i})
             for i in range(50)]
    for body, ct in ((b"\n".join(lines), NDJSON), (b"[" + b",".join(lines) + b"]", JSON)):
        for slice_bytes in (1 << 18, 500):
            parts = list(decode_slices(body, ct, slice_bytes))
            assert len(parts) >= (1 if slice_bytes > len(body) else 2)
            assert all(type(i) is Event for p in parts for i in p)
            with typed_off():
                assert all(type(i) is dict for p in decode_slices(body, ct, slice_bytes) for i in p)
        out = both(body, ct)
        assert sum(len(s[0]) for s in out) == 50
        assert out[0][0][0] == lines[0]  # the value is the event as it came (ingest_ts is added later)


def test_a_client_ingest_ts_is_not_kept() -> None:
    items = list(decode_slices(b'{"region":"eu","ingest_ts":5}', NDJSON))[0]
    assert items[0].ingest_ts == 5  # what the parse read
    good, _, _ = validate_records(items)
    assert msgspec.json.encode(good[0]) == b'{"region":"eu"}'


# the records the typed parse is meant for, with values near every limit
known = st.fixed_dictionaries(
    {"region": st.sampled_from(["eu", "EU", "us.east_1", "bad region", "x" * 65]) | st.text(max_size=5)},
    optional={"user_id": st.none() | st.text(max_size=130) | st.integers(),
              "url": st.none() | st.text(min_size=2040, max_size=2050) | st.text(max_size=20),
              "event_id": st.none() | st.text(max_size=130),
              "ts": st.none() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.booleans()
              | st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), "2024-05-01T10:00:00Z"]),
              "ingest_ts": st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=3)})


def encoded(rs: list[Any], ascii_only: bool, sep: bytes) -> bytes:
    # the standard library's encoder: big ints stay ints, and non-ASCII may be escaped
    return sep.join(json.dumps(r, ensure_ascii=ascii_only, separators=(",", ":")).encode() for r in rs)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(known | any_records, max_size=25), st.booleans(), st.sampled_from([1 << 18, 200, 1]))
def test_any_records_give_the_same_outcome(rs: list[Any], ascii_only: bool, slice_bytes: int) -> None:
    try:
        nd = encoded(rs, ascii_only, b"\n")
    except ValueError:  # a float the standard encoder will not write (nan)
        return
    both(nd, NDJSON, slice_bytes)
    both(b"[" + encoded(rs, ascii_only, b",") + b"]", JSON, slice_bytes)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies, st.sampled_from([JSON, NDJSON, SEQ]))
def test_any_body_gives_the_same_outcome(body: bytes, ct: str) -> None:
    both(body, ct, 256)
