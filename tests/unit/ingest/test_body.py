"""POST /v1/events' body (docs/contract.md §2, §3), without a broker: ``decode_body`` /
``validate_records`` / ``gunzip_bounded``, plus hypothesis properties.  One event's
validation is in tests/unit/core/test_events.py, the header in test_contract.py, the real
endpoint in tests/integration/test_ingest.py (which uses this file's body strategies).
"""
from __future__ import annotations

import gzip
import zlib
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.ingest.body import (
    GZIP_FEED_BYTES,
    GZIP_MAX_MEMBERS,
    MAX_ERRORS,
    BodyError,
    decode_body,
    gunzip_bounded,
    validate_records,
)

NDJSON = "application/x-ndjson"
JSON = "application/json"
CONTENT_TYPES = [JSON, NDJSON, "application/json; charset=utf-8", "text/plain", "", "application/jsonl",
                 "multipart/form-data", "APPLICATION/JSON"]


def body_error(body: bytes, ct: str = JSON) -> BodyError:
    with pytest.raises(BodyError) as ei:
        decode_body(body, ct)
    return ei.value


# ------------------------------------------------------------------ decode_body


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
    assert [e.region for e in good] == ["eu", "us"]
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


class _Inflating:
    """Every ``zlib.decompressobj`` gunzip_bounded makes, with the bytes fed to it and the
    bytes it gave out: the work done, counted instead of timed."""

    def __init__(self) -> None:
        self.members = self.fed = self.inflated = 0
        self._make = zlib.decompressobj

    def __call__(self, *args: Any) -> _Inflating.Counted:
        self.members += 1
        return self.Counted(self, self._make(*args))

    class Counted:
        def __init__(self, tally: _Inflating, d: Any) -> None:
            self.tally, self.d = tally, d

        def decompress(self, data: Any, max_length: int = 0) -> bytes:
            out = self.d.decompress(data, max_length)
            self.tally.fed += len(data)
            self.tally.inflated += len(out)
            return out

        def __getattr__(self, name: str) -> Any:  # eof, unused_data, unconsumed_tail
            return getattr(self.d, name)


@pytest.fixture
def inflating(monkeypatch: pytest.MonkeyPatch) -> _Inflating:
    tally = _Inflating()
    monkeypatch.setattr(zlib, "decompressobj", tally)
    return tally


def test_gzip_bomb_is_413_without_decompressing_it_all(inflating):
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(comp.compress(zeros) for _ in range(100)) + comp.flush()  # 100 MiB of zeros
    assert len(bomb) < 200_000
    err = body_error_gz(bomb, 8 << 20)
    assert err.status == 413
    assert "after decompression" in err.message
    # one member, inflated only to the limit and a byte past it, not the 100 MiB
    assert inflating.members == 1 and inflating.inflated <= (8 << 20) + 1


def test_gzip_of_many_members_is_refused_at_once_and_a_few_still_work(inflating):
    member = gzip.compress(b"", mtime=0)  # 20 bytes: an 8 MiB body of them took 150 s, 1 MiB 1 s
    body = member * ((8 << 20) // len(member))  # 8 MiB
    err = body_error_gz(body, 8 << 20)
    assert err.status == 400 and f"more than {GZIP_MAX_MEMBERS} members" in err.message
    # at once: no member past the limit is started, and each one read a feed slice at most,
    # not the rest of the body (what made it quadratic): less than the body once in all
    assert inflating.members == GZIP_MAX_MEMBERS
    assert inflating.fed <= GZIP_MAX_MEMBERS * GZIP_FEED_BYTES < len(body)
    assert body_error_gz(member * (GZIP_MAX_MEMBERS + 1), 1000).status == 400
    assert gunzip_bounded(member * GZIP_MAX_MEMBERS, 1000) == b""
    # members larger than a feed slice, at the limit and one byte over it
    blob = bytes(range(256)) * 1024  # 256 KiB, 4 feed slices each
    two = gzip.compress(blob) + gzip.compress(blob)
    assert gunzip_bounded(two, 2 * len(blob)) == blob + blob
    assert body_error_gz(two, 2 * len(blob) - 1).status == 413
    assert body_error_gz(two[:-1], 2 * len(blob)).status == 400  # the second truncated
    assert body_error_gz(two + b"x" * 100_000, 4 * len(blob)).status == 400  # junk after, over a slice


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


# ------------------------------------------------------------------ properties
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
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
        assert set(msgspec.to_builtins(ev)) <= {"region", "user_id", "event_id", "url", "ts"}
        msgspec.json.encode(ev)  # what the server produces to Kafka


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
