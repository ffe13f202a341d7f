"""The ingest header (docs/contract.md §3): what the ingest writes on each record it produces.

Moved from tests/test_ingest.py."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core.contract import ingest_header, parse_agg_header, parse_hash64, parse_hashes64, parse_ingest_header
from aggregator.core.dedupid import id_field, parse_id_field


@given(st.integers(0, 2**53), st.one_of(st.none(), st.integers(-(2**53) + 1, 2**53 - 1)),
       st.one_of(st.none(), st.text(min_size=1, max_size=128).map(lambda t: "eu\n" + t),
                 st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 10**6))))
def test_ingest_header_round_trips(ingest_ts, client_ts, did):
    field = None if did is None else id_field(did)
    [(name, value)] = ingest_header(ingest_ts, client_ts, field)
    assert name == "clickstream-ingest"
    assert parse_ingest_header(value) == (ingest_ts, client_ts, field)
    if field is not None:
        assert parse_id_field(parse_ingest_header(value)[2], "eu") == did


@pytest.mark.parametrize("value", [b"", b"soon", b"1,", b",2", b"1,2,", b"1,,", b"1.5", b"1,x,e1"])
def test_ingest_header_that_ingest_did_not_write_is_refused(value):
    with pytest.raises(ValueError):
        parse_ingest_header(value)


@pytest.mark.parametrize("value", [b"0000000000000001,,", b"1,,", b"ffffffffffffffff,,", b"FF,ab,/a", b",ab,/a"])
def test_agg_header_hashes_of_1_to_16_hex_digits_are_read(value):
    u, h, url = parse_agg_header(value)
    assert all(x is None or 0 <= x < 2**64 for x in (u, h))


@pytest.mark.parametrize("value", [b"-1,,", b"+1,,", b"0x1,,", b"1_0,,", b" 1,,", b"1 ,,", b"1\n,,",
                                   b"1" * 17 + b",,", b"00000000000000001,,", b",-5,/x", b",0x5,/x",
                                   b",+5,/x", b"\xd9\xa1,,"])
def test_agg_header_hashes_int_would_take_are_refused(value):
    """int(x, 16) takes a sign, "0x", "_", whitespace and non-ASCII digits: a forged
    negative hash reached a cell and every later checkpoint raised OverflowError."""
    with pytest.raises(ValueError):
        parse_agg_header(value)


@given(st.lists(st.one_of(st.binary(max_size=18), st.sampled_from([b"0", b"ff", b"F" * 16, b"1" * 17, b"-1", b"0x1"])),
                max_size=6))
def test_the_batch_hash_parse_takes_and_refuses_what_the_single_one_does(texts):
    try:
        want = [parse_hash64(t) for t in texts]
    except ValueError:
        with pytest.raises(ValueError):
            parse_hashes64(texts)
    else:
        assert parse_hashes64(texts) == want
