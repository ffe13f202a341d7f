"""The ingest fast path (web/ingest.py ``_validate_fast`` and the region cache) must give
exactly what ``core.events.validate`` gives: the same accepted events (same keys, same
order, so the same bytes on ``clicks``), the same errors and the same reasons."""
from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.core.events import EventError, validate
from aggregator.web import ingest
from aggregator.web.ingest import validate_records

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
        assert [orjson.dumps(e) for e in good] == [orjson.dumps(e) for e in want[0]]
        assert (errors, reasons) == want[1:]


def test_fast_path_is_taken_for_known_regions_and_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ingest, "_REGION_CACHE", {})
    monkeypatch.setattr(ingest, "_REGION_CACHE_MAX", 3)
    validate_records([{"region": "EU-West"}])
    assert ingest._REGION_CACHE == {"EU-West": "eu-west"}
    assert ingest._validate_fast({"region": "EU-West", "user_id": "u1", "ts": 5}) == \
        {"region": "eu-west", "user_id": "u1", "ts": 5}
    assert ingest._validate_fast({"region": "EU-West", "ts": 1.5}) is None      # full check decides
    assert ingest._validate_fast({"region": "EU-West", "url": "x" * 2049}) is None
    assert ingest._validate_fast({"region": ["EU-West"]}) is None
    validate_records([{"region": f"r{i}"} for i in range(10)] + [{"region": "bad region"}])
    assert len(ingest._REGION_CACHE) == 3 and "bad region" not in ingest._REGION_CACHE
