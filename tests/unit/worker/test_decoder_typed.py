"""The decoder's typed parse of records produced straight to Kafka (``worker.click.Click``, msgspec)
must take only what the full path (``orjson.loads`` and its checks) accepts, with the same
values: every batch below decodes to the same events, dedup ids, aggregates, rejection
counts and dead letters with the typed parse on and off."""
from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregator.worker.decoder as decoder_module
from aggregator.worker.decoder import FAST_MISSES, RecordDecoder
from tests.unit.worker.records import fetched

NOW = 5_000_000
MAX_TS = NOW + 5_000


def both(values: list[bytes | None], aggregates: bool = True, log_append: bool = False) -> tuple:
    """(typed parse on, off): each decoder's answer and dead letters for the same batch."""
    out = []
    for fast in (True, False):
        dead: list = []
        dec = RecordDecoder(aggregates=aggregates, fast=fast)
        recs = fetched([(None, v, []) for v in values], base=7, log_append=log_append)
        # twice: the second batch finds the region spellings cached (the typed path's case)
        first = dec.decode(recs, NOW, 2, True, dead, MAX_TS)
        second = dec.decode(recs, NOW, 2, True, dead, MAX_TS)
        out.append((first, second, dead))
    return out[0], out[1]


EDGES = [
    b'{"region":"eu","region":"us"}',                       # duplicate key: the last one
    b'{"region":"eu","x":"\xff"}',                          # invalid UTF-8 in a field nobody reads
    b'{"region":"eu","x":"\xed\xa0\x80"}',                  # an encoded surrogate
    b'{"region":"eu","x":1e400}',                           # a number beyond a double
    b'{"region":"eu","ingest_ts":18446744073709551615}',    # u64: an int for orjson, future
    b'{"region":"eu","ingest_ts":18446744073709551616}',    # beyond: a float, bad_ingest_ts
    b'{"region":"eu","ingest_ts":-9223372036854775809}',
    b'{"region":"eu","ts":12345678901234567890123}', b'{"region":"eu","ts":9223372036854775807}',
    b'{"region":"eu","ts":9223372036854775808}', b'{"region":"eu","ingest_ts":-9223372036854775808}',
    b'{"region":"eu","ts":9007199254740991}', b'{"region":"eu","ts":9007199254740992}',  # the ts bound: 2^53
    b'{"region":"eu","ts":-9007199254740991}', b'{"region":"eu","ts":-9007199254740992}',
    b'{"region":"eu","ts":1.0}', b'{"region":"eu","ts":1e3}', b'{"region":"eu","ts":-0.0}',
    b'{"region":"eu","ts":true}', b'{"region":"eu","ts":"1970-01-01T00:00:01Z"}', b'{"region":"eu","ts":"x"}',
    b'{"region":"eu","ingest_ts":null,"ts":null,"event_id":null,"user_id":null,"url":null}',
    b'{"region":"eu","user_id":7,"url":["/a"]}', b'{"region":"eu","user_id":"","url":""}',
    b'{"region":"eu","url":"  "}', b'{"region":"eu","url":"https://Example.COM:443/A?q=1#f"}',
    b'{"region":"EU","user_id":"u1"}', b'{"region":"e u"}', b'{"region":null}', b'{"Region":"eu"}', b'{}',
    b'{"region":["eu"]}', b'{"region":{"eu":1}}', b'{"region":5}',  # not a string: bad_region
    b'{"region":"eu","event_id":""}', b'{"region":"eu","event_id":"' + b"x" * 129 + b'"}',
    b'{"region":"eu","event_id":"' + b"x" * 128 + b'"}', b'{"region":"eu","event_id":5}',
    b'{"region":"eu","url":"\\ud83d\\ude00"}', b'{"region":"eu","url":"\\udc00\\ud800"}',
    b'{"region":"eu","ingest_ts":5004000}', b'{"region":"eu","ingest_ts":5006000}',  # under and over MAX_TS
    b'\xef\xbb\xbf{"region":"eu"}', b' {"region":"eu"} \n', b'{"region":"eu"}x', b'{"region":"eu"}\x00',
    b'[]', b'"eu"', b'null', b'', None, b'{"region":"eu","x":NaN}', b'{"region":"eu","x":01}',
    b'{"region":"eu","session":"s","user_id":"u2","url":"/b","ts":4999000}',
]


@pytest.mark.parametrize("aggregates", [True, False])
def test_edge_values_decode_the_same_with_and_without_the_typed_parse(aggregates):
    on, off = both(EDGES, aggregates)
    assert on == off
    first = on[0]
    assert first.events and first.rejected  # the corpus has both kinds (not a vacuous comparison)
    assert ("eu", 5_004_000, None) in first.events and first.future == {"eu": 2}
    assert ("eu", NOW, 2**53 - 1) in first.events and ("eu", NOW, 2**53) not in first.events
    assert first.rejected["bad_region"] == 5  # "e u", null, a list, an object, a number


def test_log_append_time_is_the_same_on_both_paths():
    values = [b'{"region":"eu","user_id":"u"}', b'{"region":"eu","ingest_ts":5}']
    on, off = both(values, log_append=True)
    assert on == off and on[1].events == [("eu", 1_001, None), ("eu", 5, None)]


_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.integers(min_value=NOW - 10**6, max_value=MAX_TS + 10**6),
                    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**15, 2**53,
                                     2**53 - 1, -(2**53), -(2**53) + 1]),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                    st.sampled_from(["eu", "EU", "us-east", "", "e u", "2026-01-01T00:00:00+00:00",
                                     "/p/1?x=2", "http://A.b:80/x#y", "x" * 129]))
_field = st.sampled_from(["region", "ingest_ts", "ts", "event_id", "user_id", "url", "other"])
# half of them with a valid region, so that most take the typed path
_event = st.one_of(st.dictionaries(_field, _scalar, max_size=7),
                   st.builds(lambda region, rest: {**rest, "region": region}, st.sampled_from(["eu", "US-east", "a.b"]),
                             st.dictionaries(_field, _scalar, max_size=6)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, min_size=1, max_size=30), st.booleans())
def test_random_events_decode_the_same_with_and_without_the_typed_parse(objs, ascii_only):
    # the standard library's encoder: integers beyond 64 bits too, non-ASCII escaped or not
    values = [json.dumps(o, ensure_ascii=ascii_only).encode() for o in objs]
    on, off = both(values)
    assert on == off


def test_a_batch_of_values_the_typed_parse_refuses_stops_trying_it(monkeypatch):
    calls = []
    real = decoder_module.parse_click

    def counting(value):
        calls.append(value)
        return real(value)

    monkeypatch.setattr(decoder_module, "parse_click", counting)
    values = [orjson.dumps({"region": "eu", "session": i}) for i in range(50)]  # another field each
    on, off = both(values)
    assert on == off and len(on[0].events) == 50
    assert len(calls) == 2 * FAST_MISSES  # FAST_MISSES a batch, two batches, not fifty each
    calls.clear()
    ok = [orjson.dumps({"region": "eu", "user_id": f"u{i}"}) for i in range(50)]
    both(ok)
    assert len(calls) == 100  # values it takes: every record of both batches, each time


def test_the_typed_parse_leaves_a_ts_out_of_range_to_the_full_path():
    """The ts bound (core.events) is a constraint of ``Click``, checked in C: an
    out-of-range ts is refused there, and the full path rejects it as bad_ts."""
    take = decoder_module.parse_click
    assert take(b'{"region":"eu","ts":9007199254740991}').ts == 2**53 - 1
    assert take(b'{"region":"eu","ts":-9007199254740991}').ts == -(2**53) + 1
    for ts in (b"9007199254740992", b"-9007199254740992", b"1152921504606846976"):
        with pytest.raises(decoder_module._FAST_MISS):
            take(b'{"region":"eu","ts":%s}' % ts)
