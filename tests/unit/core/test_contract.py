"""The ingest header (docs/contract.md §3): what the ingest writes on each record it produces.

Moved from tests/test_ingest.py."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core.contract import ingest_header, parse_ingest_header
from aggregator.core.dedup import id_field, parse_id_field


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
