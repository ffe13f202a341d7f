"""The worker's record decoder: ingest's records from key and header, other records
from their JSON value, one region rule shared with the HTTP ingest, dead letters."""
from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.core.contract import INGEST_HEADER, ingest_header
from aggregator.ingest.body import decode_slices, validate_records
from aggregator.worker.decoder import CACHE_MAX, RecordDecoder
from tests.unit.worker.records import fetched

NOW = 5_000_000
MAX_TS = NOW + 5_000


def test_ingest_records_are_taken_from_key_and_header_without_reading_the_value():
    recs = fetched([(b"eu", b"not json at all", ingest_header(1_000, None)),
                    (b"us", b"", ingest_header(2_000, 1_500))], base=40)
    events, offsets, rejected = RecordDecoder().decode(recs, NOW, 0, True, [], MAX_TS)[:3]
    assert events == [("eu", 1_000, None), ("us", 2_000, 1_500)]
    assert offsets == [40, 41]
    assert rejected == {}


def test_a_header_ingest_did_not_write_falls_back_to_the_value():
    recs = fetched([(b"eu", b'{"region": "EU", "ingest_ts": 7}', [(INGEST_HEADER, b"garbage")]),
                    (b"EU", b'{"region": "eu", "ingest_ts": 8}', ingest_header(9, None))])  # key not normalised
    events, _, _ = RecordDecoder().decode(recs, NOW, 0, False, None, MAX_TS)[:3]
    assert events == [("eu", 7, None), ("eu", 8, None)]


def test_value_records_take_ingest_ts_from_value_then_log_append_time_then_the_clock():
    value = [(b"eu", b'{"region": "Eu-West", "ingest_ts": 123, "ts": "1970-01-01T00:00:01Z"}', []),
             (None, b'{"region": "eu-west"}', [])]
    events, offsets, _ = RecordDecoder().decode(fetched(value, timestamp=9_000), NOW, 0, False, None, MAX_TS)[:3]
    assert events == [("eu-west", 123, 1_000), ("eu-west", NOW, None)]  # create time: not used
    assert offsets == []  # not asked for
    events, _, _ = RecordDecoder().decode(fetched(value, timestamp=9_000, log_append=True), NOW, 0, False, None,
                                          MAX_TS)[:3]
    assert events == [("eu-west", 123, 1_000), ("eu-west", 9_001, None)]  # the batch's append time


def test_bad_records_are_counted_by_reason_and_dead_lettered_with_what_they_were():
    recs = fetched([(b"k", b"{not json", []),
                    (None, b'{"region": "eu", "ingest_ts": "soon"}', []),
                    (None, b'{"region": "e u"}', []),
                    (None, b'{"region": "eu", "ts": "yesterday"}', []),
                    (None, b'{"region": "eu"}', []),
                    (None, None, [])], base=10)
    dead: list = []
    events, offsets, rejected = RecordDecoder().decode(recs, NOW, 3, True, dead, MAX_TS)[:3]
    assert events == [("eu", NOW, None)] and offsets == [14]
    assert rejected == {"undecodable": 2, "bad_ingest_ts": 1, "bad_region": 1, "bad_ts": 1}
    letters = [(k, orjson.loads(v)) for k, v in dead]
    assert [(k, d["reason"], d["partition"], d["offset"]) for k, d in letters] == [
        (b"k", "undecodable", 3, 10), (None, "bad_ingest_ts", 3, 11), (None, "bad_region", 3, 12),
        (None, "bad_ts", 3, 13), (None, "undecodable", 3, 15)]
    assert letters[0][1]["raw"] == "{not json" and letters[-1][1]["raw"] == ""
    assert all(d["error"] for _, d in letters)


def test_an_ingest_time_before_the_epoch_is_bad_ingest_ts_from_value_or_header():
    """A window book's stream time starts below 0: a negative ingest time would be filed
    late in a window never published, and keep the partition's state open for good."""
    recs = fetched([(None, b'{"region": "eu", "ingest_ts": -1}', []),
                    (b"eu", b'{"region": "eu", "ingest_ts": -60000}', ingest_header(-60_000, None)),
                    (b"eu", b'{"region": "eu"}', [(INGEST_HEADER, b"-5,3")]),  # the value decides
                    (b"eu", b'{"region": "eu"}', [(INGEST_HEADER, b"-5,,k0a.1")]),
                    (None, b'{"region": "eu", "ingest_ts": 0}', [])], base=0)
    for fast in (True, False):
        dead: list = []
        events, _, rejected = RecordDecoder(fast=fast).decode(recs, NOW, 0, True, dead, MAX_TS)[:3]
        assert rejected == {"bad_ingest_ts": 2}
        assert [orjson.loads(v)["reason"] for _, v in dead] == ["bad_ingest_ts"] * 2
        assert events == [("eu", NOW, None), ("eu", NOW, None), ("eu", 0, None)]


def test_no_dead_letters_when_not_asked():
    events, _, rejected = RecordDecoder().decode(fetched([(None, b"[]", [])]), NOW, 0, False, None, MAX_TS)[:3]
    assert events == [] and rejected == {"undecodable": 1}


# Unicode edge cases of the region rule: str.lower() folds several non-ASCII characters
# into ASCII (KELVIN SIGN -> "k"), so the rule checks ASCII first.
EDGE_REGIONS = [
    "\u212a", "eu-\u212aelvin", "\u0130stanbul", "\uff25\uff35", "stra\u00dfe", "\u00df", "eu\u0307",
    "EU-West", "ok.region_1", "a" * 64, "a" * 65, "", " eu", "eu\n", "K", "k",
]


@pytest.mark.parametrize("raw", EDGE_REGIONS)
def test_http_ingest_and_kafka_direct_records_agree_on_the_region(raw):
    good, _, http_reasons = validate_records([{"region": raw}])
    http = good[0].region if good else None
    # a record produced straight to Kafka with the region in its value, keyed as a producer would
    decoder = RecordDecoder()
    events, _, kafka_reasons, *_ = decoder.decode(
        fetched([(raw.encode(), orjson.dumps({"region": raw}), [])]), NOW, 0, False, [], MAX_TS)
    kafka = events[0][0] if events else None
    assert kafka == http
    assert kafka_reasons == http_reasons
    # and with ingest's header on a key that spells it raw: only a normalised key is taken as is
    events = decoder.decode(fetched([(raw.encode(), orjson.dumps({"region": raw}), ingest_header(1, None))]),
                            NOW, 0, False, [], MAX_TS).events
    assert (events[0][0] if events else None) == http
    if raw == "\u212a":
        assert http is None  # the Kelvin sign is no "k"


def _verdicts(raw: bytes) -> tuple:
    """What HTTP ingest and the worker (typed parse on, off) make of the JSON object
    ``raw``, as one body item and as the value of a keyless record produced straight to
    Kafka: (region, client ts) when accepted, else the rejection counts by reason."""
    items = [x for s in decode_slices(b"[" + raw + b"]", "application/json") for x in s]
    good, _, reasons = validate_records(items)
    out = [(good[0].region, good[0].ts) if good else reasons]
    for fast in (True, False):
        d = RecordDecoder(fast=fast).decode(fetched([(None, raw, [])]), NOW, 0, False, [], MAX_TS)
        out.append((d.events[0][0], d.events[0][2]) if d.events else d.rejected)
    return tuple(out)


EDGE_TS = [2**53 - 1, -(2**53) + 1, 2**53, -(2**53), 2**53 + 1, 2**60, -(2**60), 2**63 - 1, -(2**63), 2**63,
           2**64, -(2**64), 0, 1_700_000_000_000, 9007199254740992.0, 9007199254740991.0, -9007199254740992.0,
           1e300, 0.5, "1970-01-01T00:00:01Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "x"]


@pytest.mark.parametrize("ts", EDGE_TS)
def test_http_ingest_and_kafka_direct_records_agree_on_the_client_ts(ts):
    """One bound for a client ts (contract §2, "within ±2^53"; core.events.TS_MIN/TS_MAX):
    a number beyond it is bad_ts over HTTP and on Kafka, typed parse or not."""
    http, *kafka = _verdicts(json.dumps({"region": "eu", "ts": ts}).encode())  # json: ints beyond 64 bits too
    assert kafka == [http, http]
    if type(ts) is int and not -(2**53) < ts < 2**53:
        assert http == {"bad_ts": 1}


@pytest.mark.parametrize("region", [["eu"], [], {"a": 1}, {}, [["eu"]], 5, 1.5, True, None])
def test_http_ingest_and_kafka_direct_records_agree_on_a_region_not_a_string(region):
    """A region that is a list or an object is bad_region on Kafka too (it was undecodable:
    the region cache's lookup raised on an unhashable value)."""
    http, *kafka = _verdicts(orjson.dumps({"region": region}))
    assert http == {"bad_region": 1} and kafka == [http, http]


_JSON_TS = st.one_of(st.integers(-(2**65), 2**65), st.integers(-(2**53) - 3, -(2**53) + 3),
                     st.integers(2**53 - 3, 2**53 + 3), st.floats(allow_nan=False, allow_infinity=False),
                     st.booleans(), st.none(), st.text(max_size=12),
                     st.sampled_from(["2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00", "1e3"]))


_JSON_EVENT_ID = st.one_of(st.text(max_size=130), st.sampled_from(["", "x" * 128, "x" * 129]),
                           st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["eu", "EU", "e u"]) | st.lists(st.sampled_from(["eu", 1]), max_size=2)
       | st.dictionaries(st.sampled_from(["eu", "region"]), st.sampled_from(["eu", 1]), max_size=2)
       | st.integers() | st.booleans() | st.none(), _JSON_TS, st.none() | _JSON_EVENT_ID)
@example("eu", "x", 5)
@example("eu", 2**53, "x" * 129)
def test_http_ingest_and_kafka_direct_records_agree_on_region_ts_and_event_id(region, ts, eid):
    """The fields both check (contract §2): the same verdict, and the same reason when more
    than one is bad (region, then event_id, then ts)."""
    obj = {"region": region, "ts": ts} if eid is None else {"region": region, "ts": ts, "event_id": eid}
    http, *kafka = _verdicts(json.dumps(obj).encode())
    assert kafka == [http, http]


def test_region_caches_are_bounded():
    decoder = RecordDecoder()
    decoder.regions.update({f"r{i}": f"r{i}" for i in range(CACHE_MAX)})
    decoder.keys.update({b"r%d" % i: f"r{i}" for i in range(CACHE_MAX)})
    events = decoder.decode(fetched([(b"new", b'{"region": "NEW"}', ingest_header(1, None))]), NOW, 0,
                            False, None, MAX_TS).events
    assert events == [("new", 1, None)]
    assert len(decoder.regions) == len(decoder.keys) == CACHE_MAX


def test_ingest_times_past_the_bound_are_future_late_and_dead_lettered_not_events():
    day = 86_400_000
    recs = fetched([(b"eu", b'{"region": "eu"}', ingest_header(NOW + day, None)),   # ingest's header, a day ahead
                    (None, b'{"region": "eu", "ingest_ts": %d}' % (NOW + day), []),  # a value a day ahead
                    (None, b'{"region": "us"}', []),                                  # broker time a day ahead
                    (b"eu", b"{}", ingest_header(MAX_TS, None)),                      # on the bound: an event
                    (None, b'{"region": "us", "ingest_ts": %d}' % NOW, [])], base=7, timestamp=NOW + day,
                   log_append=True)
    dead: list = []
    out = RecordDecoder().decode(recs, NOW, 2, True, dead, MAX_TS)
    assert out.events == [("eu", MAX_TS, None), ("us", NOW, None)]
    assert out.offsets == [10, 11]
    assert out.future == {"eu": 2, "us": 1}
    assert out.rejected == {}
    letters = [orjson.loads(v) for _, v in dead]
    assert [(d["reason"], d["offset"], d["partition"]) for d in letters] == [
        ("future_ts", 7, 2), ("future_ts", 8, 2), ("future_ts", 9, 2)]
    assert "AGG_MAX_AHEAD_SECONDS" in letters[0]["error"]


def test_aggregates_of_kafka_direct_and_ingest_records_are_the_same_parts():
    """A record produced straight to Kafka is parsed into the hashes ingest puts in its agg
    header (the worker inlines core.sketches' hash; the URL is normalised once per distinct
    spelling)."""
    from aggregator.core.contract import AGG_HEADER, agg_header_value, parse_agg_header
    from aggregator.core.sketches import normalise_url, url_hash, user_hash

    url = "HTTPS://Shop.Example:443/a/b?q=1#f"
    text = normalise_url(url)
    assert text is not None
    header = agg_header_value(user_hash("ü-1"), url_hash(text), text)
    value = orjson.dumps({"region": "eu", "ingest_ts": 7, "user_id": "ü-1", "url": url})
    recs = fetched([(b"eu", value, []), (b"eu", value, []),
                    (b"eu", b"", [*ingest_header(7, None), (AGG_HEADER, header)])])
    dec = RecordDecoder(aggregates=True)
    aggs = dec.decode(recs, NOW, 0, False, None, MAX_TS).aggs
    assert aggs is not None
    direct, again, ingest = aggs
    u, h, t = parse_agg_header(ingest)  # type: ignore[arg-type]
    assert direct == again == (u, h, t.decode())  # type: ignore[union-attr]
    assert len(dec.url_cache.known) == 1
    # another spelling of the same page: its own cache key, the same entry (core.sketches.count_parts)
    other = orjson.dumps({"region": "eu", "ingest_ts": 7, "user_id": "ü-1", "url": "https://shop.example/a/b"})
    (spelled,) = dec.decode(fetched([(b"eu", other, [])]), NOW, 0, False, None, MAX_TS).aggs  # type: ignore[misc]
    assert spelled.url is direct.url and len(dec.url_cache.known) == 2  # type: ignore[union-attr]


def test_aggregates_of_kafka_direct_records_leave_out_what_is_not_a_string_or_url():
    from aggregator.core.sketches import normalise_url, url_hash, user_hash

    text = normalise_url("/a")
    assert text is not None and normalise_url("") is None
    values = [{"user_id": 5, "url": "/a"}, {"user_id": "u", "url": 5}, {"user_id": "u", "url": ""},
              {"url": ""}, {}, {"url": "/a"}, {"user_id": "u"}, {"user_id": "u", "url": "/a"}]
    recs = fetched([(None, orjson.dumps({"region": "eu", "ingest_ts": 7, **v}), []) for v in values])
    aggs = RecordDecoder(aggregates=True).decode(recs, NOW, 0, False, None, MAX_TS).aggs
    u, a = user_hash("u"), (url_hash(text), text)
    assert aggs == [(None, *a), (u, None, None), (u, None, None), None, None, (None, *a), (u, None, None), (u, *a)]


def test_a_null_ingest_header_value_leaves_the_record_to_its_value():
    """A producer writing straight to Kafka may send a clickstream-ingest header with a null
    value: the record is read from its value, and the rest of the batch still decodes."""
    recs = fetched([(b"eu", b'{"region": "eu", "ingest_ts": 5}', [(INGEST_HEADER, None)]),
                    (b"eu", b"{}", [(INGEST_HEADER, None)]),
                    (b"us", b"", ingest_header(6, None))])
    out = RecordDecoder().decode(recs, NOW, 0, False, None, MAX_TS)
    assert out.events == [("eu", 5, None), ("us", 6, None)]
    assert out.rejected == {"undecodable": 1}  # no region in its value


def test_the_url_entries_stay_as_bounded_as_the_url_cache():
    """One UrlEntry per URL hash, at most as many as the URL cache holds URLs (cleared when
    full, like it): a producer of ever new URLs cannot grow them."""
    dec = RecordDecoder(aggregates=True)
    dec.url_cache.max_entries = 4
    values = [orjson.dumps({"region": "eu", "ingest_ts": 7, "url": f"/p{i}"}) for i in range(10)]
    aggs = dec.decode(fetched([(b"eu", v, []) for v in values]), NOW, 0, False, None, MAX_TS).aggs
    assert aggs is not None and [a.as_tuple()[2] for a in aggs] == [f"/p{i}" for i in range(10)]  # type: ignore[union-attr]
    assert 0 < len(dec.url_entries) <= 4 and len(dec.url_cache.known) <= 4
