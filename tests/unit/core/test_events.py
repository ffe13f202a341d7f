"""One event's validation (docs/contract.md §2): region, ts and the optional fields.

Moved from tests/test_ingest.py."""
from __future__ import annotations

import pytest

from aggregator.core.events import EventError, validate


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
