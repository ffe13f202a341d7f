"""The ``clickstream-agg`` header ingest puts on its records (issue 18): its value is
core.contract's ``agg_header_value`` of the core.sketches hashes and normalised URL, it
sits right after ``clickstream-ingest`` (before a ``traceparent``), only on events with a
user or a URL, and only with aggregates on.  The records through a real broker:
tests/integration/test_ingest_agg.py."""
from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core.contract import AGG_HEADER, INGEST_HEADER, parse_agg_header, parse_ingest_header
from aggregator.core.contract import agg_header_value as reference
from aggregator.core.sketches import normalise_url, url_hash, user_hash
from aggregator.ingest.body import Event
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.records import AggHeaders, Records
from aggregator.metrics import Metrics
from aggregator.tracing import TRACEPARENT

URLS = ["/home", "/Home?x=1#top", "HTTPS://User:pw@Example.COM:443/A/b?q#f", "http://example.com", "/café menu",
        "?only=query", "", "  ", "/" + "x" * 300]
TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def expected(user: str | None, url: str | None, keep_query: bool = False) -> bytes | None:
    norm = None if url is None else normalise_url(url, keep_query)
    if user is None and norm is None:
        return None
    return reference(None if user is None else user_hash(user), None if norm is None else url_hash(norm), norm)


@given(user=st.none() | st.text(max_size=130), url=st.none() | st.sampled_from(URLS) | st.text(max_size=300),
       keep_query=st.booleans())
def test_value_is_the_contract_value_of_the_sketch_hashes(user: str | None, url: str | None, keep_query: bool) -> None:
    agg = AggHeaders(keep_query, max_entries=4)
    want = expected(user, url, keep_query)
    assert agg.value(user, url) == want
    assert agg.value(user, url) == want  # again, from what it remembered
    if want is not None:
        uh, h, text = parse_agg_header(want)
        assert uh == (None if user is None else user_hash(user))
        norm = None if url is None else normalise_url(url, keep_query)
        assert (h, text) == ((None, None) if norm is None else (url_hash(norm), norm.encode()))


def test_keep_query_is_followed_and_neither_part_means_no_value() -> None:
    assert parse_agg_header(AggHeaders(False).value(None, "/a?b=1"))[2] == b"/a"  # type: ignore[arg-type]
    assert parse_agg_header(AggHeaders(True).value(None, "/a?b=1"))[2] == b"/a?b=1"  # type: ignore[arg-type]
    agg = AggHeaders()
    assert agg.value(None, None) is None
    assert agg.value(None, "?only=query") is None  # nothing to count
    assert agg.value("u1", "?only=query") == b"%x,," % user_hash("u1")
    assert agg.value("u1", None) == b"%x,," % user_hash("u1")


def test_what_it_remembers_is_bounded() -> None:
    agg = AggHeaders(max_entries=100)
    for i in range(1000):
        assert agg.value(f"user-{i}", f"/p/{i}") == expected(f"user-{i}", f"/p/{i}")
        assert len(agg._urls) <= 100
    long = "/" + "y" * 1000
    agg.value("z" * 128, long)
    assert long not in agg._urls  # long URLs are normalised every time, not kept


def records(events: list[Event], traceparent: bytes | None, agg: AggHeaders | None
            ) -> list[tuple[dict[str, Any], list[tuple[str, bytes]]]]:
    for ev in events:
        ev.ingest_ts = 1_700_000_000_123
    ids = [None, None, None, b"e:abc", None]  # the fourth event has a dedup id
    return [(orjson.loads(v), h) for v, h in Records(1_700_000_000_123, traceparent, agg).of(events, ids)]


def sample() -> list[Event]:
    return [
        Event("eu", user_id="u1", url="/a?x=1", ts=1_700_000_000_000),
        Event("eu"),                                             # neither: no agg header
        Event("eu", url="https://Shop.example.com/p/1"),         # url only
        Event("eu", user_id="u2"),                               # user only, a dedup id
        Event("eu", url="#frag", ts=1_699_999_999_000),          # a url that is nothing to count
    ]


def test_records_carry_the_agg_header_second() -> None:
    for tp in (None, TP):
        out = records(sample(), tp, AggHeaders())
        names = [[n for n, _ in h] for _, h in out]
        with_agg = [INGEST_HEADER, AGG_HEADER] + ([TRACEPARENT] if tp else [])
        without = [INGEST_HEADER] + ([TRACEPARENT] if tp else [])
        assert names == [with_agg, without, with_agg, with_agg, without], tp
        values = [dict(h) for _, h in out]
        assert values[0][AGG_HEADER] == expected("u1", "/a")
        assert values[2][AGG_HEADER] == expected(None, "https://shop.example.com/p/1")
        assert values[3][AGG_HEADER] == expected("u2", None)
        # the ingest header as without aggregates: client ts, dedup id
        assert parse_ingest_header(values[0][INGEST_HEADER]) == (1_700_000_000_123, 1_700_000_000_000, None)
        assert parse_ingest_header(values[3][INGEST_HEADER]) == (1_700_000_000_123, None, b"e:abc")
        assert parse_ingest_header(values[4][INGEST_HEADER]) == (1_700_000_000_123, 1_699_999_999_000, None)
        assert out[3][0] == {"region": "eu", "user_id": "u2", "ingest_ts": 1_700_000_000_123}  # no id in the value
        assert out[0][0] == {"region": "eu", "user_id": "u1", "url": "/a?x=1", "ts": 1_700_000_000_000,
                             "ingest_ts": 1_700_000_000_123}  # the value is the event as it came


def test_aggregates_off_writes_the_headers_of_before() -> None:
    on, off = records(sample(), TP, AggHeaders()), records(sample(), TP, None)
    assert [ev for ev, _ in on] == [ev for ev, _ in off]
    assert [[(n, v) for n, v in h if n != AGG_HEADER] for _, h in on] == [h for _, h in off]
    assert all(AGG_HEADER not in dict(h) for _, h in off)


def test_the_handler_follows_the_settings() -> None:
    def handler(**kw: Any) -> IngestHandler:
        return IngestHandler(None, Metrics(5.0, 60.0), "", 1 << 20, 10, **kw)  # type: ignore[arg-type]

    assert handler().agg is None
    assert handler(aggregates=False, url_keep_query=True).agg is None
    on = handler(aggregates=True, url_keep_query=True).agg
    assert on is not None and on.keep_query


@given(st.lists(st.tuples(st.none() | st.integers(-(2**53) + 1, 2**53 - 1),
                          st.none() | st.sampled_from([b"k1f.0", b"k" + b"f" * 32 + b".999", b"e\xc3\xbc-2"])),
                max_size=8), st.booleans(), st.booleans())
def test_every_record_carries_the_contract_ingest_header(evs: list, traced: bool, aggregates: bool) -> None:
    """Whatever path ``Records`` takes (ids or not, traced or not, aggregates or not), each
    record's headers start with core.contract's ``ingest_header``."""
    from aggregator.core.contract import ingest_header
    events = [Event("eu", user_id="u", ts=ts) for ts, _ in evs]
    ids = [did for _, did in evs]
    its = 1_700_000_000_123
    out = list(Records(its, TP if traced else None, AggHeaders() if aggregates else None).of(
        events, ids if any(d is not None for d in ids) else None))
    assert [h[0] for _, h in out] == [ingest_header(its, ts, did)[0] for ts, did in evs]
    assert all((TRACEPARENT, TP) in h for _, h in out) == traced or not out
