"""The ingest fast path (web/ingest.py ``_validate_fast`` and the region cache) must give
exactly what ``core.events.validate`` gives: the same accepted events (same keys, same
order, so the same bytes on ``clicks``), the same errors and the same reasons."""
from __future__ import annotations

import msgspec
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aggregator.core.events import EventError, validate
from aggregator.ingest import body as ingest
from aggregator.ingest.body import validate_records

REGIONS = ["eu-west", "EU-West", "us.east_1", "bad region", "\u212aelvin", "", "x" * 65, "r00"]
values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**60), max_value=2**60),
                   st.floats(allow_nan=True), st.text(max_size=140), st.sampled_from(["2024-05-01T10:00:00Z",
                   "2024-05-01T10:00:00", "u" * 129]), st.lists(st.integers(), max_size=2))
records = st.one_of(
    st.fixed_dictionaries({"region": st.one_of(st.sampled_from(REGIONS), values)},
                          optional={"event_id": values, "user_id": values, "url": values, "ts": values,
                                    "extra": values}),
    values,
)


def slow(items):
    """validate_records as it was: ``validate`` on every record."""
    good, errors, reasons = [], [], {}
    for i, obj in enumerate(items):
        try:
            good.append(validate(obj))
        except EventError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            errors.append({"index": i, "error": str(exc)})
        except Exception:  # noqa: BLE001
            reasons["invalid"] = reasons.get("invalid", 0) + 1
            errors.append({"index": i, "error": "invalid record"})
    return good, errors[:100], reasons


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(records, max_size=30))
def test_fast_path_equals_validate(items):
    # twice: the first pass fills the region cache, the second goes through the fast path
    for _ in range(2):
        good, errors, reasons = validate_records(items)
        want = slow(items)
        assert [msgspec.json.encode(e) for e in good] == [orjson.dumps(e) for e in want[0]]
        assert (errors, reasons) == want[1:]


def test_fast_path_is_taken_for_known_regions_and_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ingest, "_REGION_CACHE", {})
    monkeypatch.setattr(ingest, "_REGION_CACHE_MAX", 3)
    validate_records([{"region": "EU-West"}])
    assert ingest._REGION_CACHE == {"EU-West": "eu-west"}
    assert ingest._validate_fast({"region": "EU-West", "user_id": "u1", "ts": 5}) == \
        ingest.Event("eu-west", user_id="u1", ts=5)
    assert ingest._validate_fast({"region": "EU-West", "ts": 1.5}) is None      # full check decides
    assert ingest._validate_fast({"region": "EU-West", "url": "x" * 2049}) is None
    assert ingest._validate_fast({"region": ["EU-West"]}) is None
    validate_records([{"region": f"r{i}"} for i in range(10)] + [{"region": "bad region"}])
    assert len(ingest._REGION_CACHE) == 3 and "bad region" not in ingest._REGION_CACHE


# NDJSON: one orjson.loads of the lines joined into an array must give exactly the
# line-by-line result, or step aside.  Fragments that span lines, several values on one
# line, blank and whitespace lines, separators inside strings, json-seq RS.
FRAGMENTS = [b'{"region":"eu"}', b'{"region":"us","u":"},{"}', b'{"a":[{}', b'{}]}', b'{"region":"eu"},{"region":"eu"}',
             b'{"region":"eu"} , {"region":"us"}', b"1,2", b"[1", b"2]", b"", b"  ", b"\r", b'"x"', b"{", b"}",
             b'{"region":"eu"}\r', b"\x1e{}", b"\x0c{}", b"\t{ }", b"null", b"{}", b'{"a":1,', b'"b":2}']


def _shape(items):
    return [("bad", x.message) if isinstance(x, ingest._BadLine) else ("ok", x) for x in items]


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=8), st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]))
# an object spanning two lines, made up for by two objects on one line: same count, other items
@example([b'{"a":[{}', b'{}]}', b'{"region":"eu"} , {"region":"us"}'], b"")
@example([b'{"region":"eu","a":[{}', b'{}]}', b'{"region":"eu"},{"region":"eu"}'], b"\n")
def test_ndjson_array_parse_is_the_line_by_line_parse(lines, end):
    body = b"\n".join(lines) + end
    fast = ingest._ndjson_objects(body)
    if fast is not None:
        assert _shape(fast) == _shape(ingest._ndjson_lines(body))
    assert _shape(ingest.decode_body(body, "application/x-ndjson")) == _shape(ingest._ndjson_lines(body))


def test_ndjson_array_parse_takes_the_common_body():
    body = b"\n".join(orjson.dumps({"region": "eu", "user_id": f"u{i}", "url": "/a},{b"[:2]}) for i in range(100))
    assert ingest._ndjson_objects(body) == [orjson.loads(line) for line in body.split(b"\n")]
