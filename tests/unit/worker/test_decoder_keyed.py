"""The decoder reads a keyed request's ingest header (``<ingest_ts>,[<ts>],k<hex>.<index>``)
inline, with the key's digest parsed once per run of its records; it must take exactly
what core.contract.parse_ingest_header and core.dedup.parse_id_field take, with the same
result, and leave everything else to the record's value."""
from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core.contract import INGEST_HEADER, parse_ingest_header
from aggregator.core.dedupid import parse_id_field, request_key
from aggregator.worker.decoder import RecordDecoder
from tests.unit.worker.records import fetched

NOW = 1_800_000_000_000
MAX_TS = NOW + 60_000
VALUE_TS = 7  # the value's ingest_ts: an event with it was decided by its value
KEYS = [b"k%x" % request_key("a"), b"k%x" % request_key("b"), b"k0", b"k+1f", b"kZZ", b"k", b"k 1f ", b"e",
        b"k" + b"f" * 33]  # a digest longer than any request key's
fields = st.one_of(
    st.builds(lambda k, i: k + b"." + i, st.sampled_from(KEYS),
              st.sampled_from([b"0", b"7", b"999", b"", b"x", b" 3", b"1.2", b"-1", b"16777215", b"16777216",
                               b"99999999999"])),
    st.sampled_from([b"kabc", b"", b"e", b"eid-1", b"e" + b"x" * 128, b"e" + b"x" * 129]),
)
headers = st.builds(lambda its, cts, f: b"%s,%s,%s" % (its, cts, f),
                    st.sampled_from([b"1799999999000", b"12", b"", b"x"]),
                    st.sampled_from([b"", b"1799999998000", b"-5", b"y"]), fields)


def reference(header: bytes, region: str) -> tuple[int, int | None, Any] | None:
    """(ingest_ts, ts, dedup id) as the generic parse gives them, None where it refuses."""
    try:
        its, cts, raw = parse_ingest_header(header)
        return its, cts, (None if raw is None else parse_id_field(raw, region))
    except (ValueError, TypeError):
        return None


@settings(max_examples=300, deadline=None)
@given(st.lists(headers, min_size=1, max_size=12))
def test_keyed_headers_decode_as_the_generic_parse(hs: list[bytes]) -> None:
    recs = fetched([(b"eu", orjson.dumps({"region": "eu", "ingest_ts": VALUE_TS}), [(INGEST_HEADER, h)])
                    for h in hs])
    d = RecordDecoder().decode(recs, NOW, 0, False, None, MAX_TS)
    ids = d.ids if d.ids is not None else [None] * len(d.events)
    assert len(d.events) == len(hs)
    for h, ev, did in zip(hs, d.events, ids, strict=True):
        want = reference(h, "eu")
        if want is None:  # the value decided: its ingest_ts, no dedup id
            assert (ev[1], did) == (VALUE_TS, None), h
        else:
            assert (ev[0], ev[1], ev[2], did) == ("eu", *want), h


def test_runs_of_keys_use_each_key_s_own_digest() -> None:
    ka, kb = request_key("a"), request_key("b")
    hs = [b"5,,k%x.%d" % (k, i) for k, i in ((ka, 0), (ka, 1), (kb, 0), (ka, 2), (kb, 1))]
    recs = fetched([(b"eu", b"{}", [(INGEST_HEADER, h)]) for h in hs])
    d = RecordDecoder().decode(recs, NOW, 0, False, None, MAX_TS)
    assert d.ids == [(ka, 0), (ka, 1), (kb, 0), (ka, 2), (kb, 1)]
