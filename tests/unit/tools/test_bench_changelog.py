"""tools.bench.changelog: the bytes of a worker's window-state changelog by kind, and the
(region, window) cells of its aggregates' records, from records the real state code writes."""
from __future__ import annotations

import orjson

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.contract import agg_header_value
from aggregator.core.dedup import DedupStore
from aggregator.core.dedupid import request_key
from aggregator.core.sketches import normalise_url, url_hash, user_hash
from aggregator.core.statechunks import encode_chunks
from tools.bench.changelog import kind_of, summarise

W = 60_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % W


def _sent(records: list) -> list[tuple[bytes, bytes]]:
    """Records as the checkpoint sends them (JSON key and value)."""
    return [(orjson.dumps(key), orjson.dumps(value)) for key, value in records]


def test_bytes_by_kind_written_and_live_and_the_cells_of_the_aggregates_records():
    aggs = WindowAggregates()
    for ws in (T0, T0 + W):
        for region in ("eu", "us", "ap"):
            for i in range(50):
                text = normalise_url(f"https://example.com/p/{i % 7}")
                aggs.add(ws, region, agg_header_value(user_hash(f"u{i}"), url_hash(text), text), 100 + i)
    g_records, prepared = aggs.take_records(0)
    aggs.confirm(prepared)
    dedup = DedupStore(600_000)
    dedup.filter([("eu", T0, None)] * 10, [(request_key("k"), i) for i in range(10)])
    d_records, d_prepared = dedup.take_records(0)
    dedup.confirm(d_prepared)
    chunks, header = encode_chunks(0, orjson.dumps({"book": "x" * 300}), 0)

    sent = [*_sent(g_records), *_sent(d_records), *chunks, header]
    aggs.close(T0)  # the first window closed: its records are deleted by the next write
    more, prepared = aggs.take_records(0)
    aggs.confirm(prepared)
    gone = aggs.record_keys(0, aggs.take_expired())
    assert gone and not more
    sent += [(orjson.dumps(key), None) for key in gone]

    s = summarise(sent)
    g_bytes = sum(len(v) for _, v in _sent(g_records))
    closed = {orjson.dumps(key) for key in gone}
    assert s.records == len(sent)
    assert s.written["g"] == g_bytes
    assert s.live["g"] == sum(len(v) for k, v in _sent(g_records) if k not in closed) < g_bytes
    assert s.written["d"] == s.live["d"] == sum(len(v) for _, v in _sent(d_records)) > 0
    assert s.written["state"] == s.live["state"] == sum(len(v) for _, v in [*chunks, header])
    assert s.cells == 6 and s.live_cells == 3  # two windows of three regions; one window left


def test_a_key_written_again_counts_once_live():
    key = orjson.dumps("0/0/0")
    s = summarise([(key, b'{"c":"ab"}'), (key, b'{"c":"abcd"}')])
    assert s.written["state"] == 10 + 12 and s.live["state"] == 12


def test_kinds_of_keys():
    assert kind_of(b"3") == "state"  # a header
    assert kind_of(orjson.dumps("3/1/0")) == "state"  # a chunk
    assert kind_of(orjson.dumps("3/d/1700000/2")) == "d"
    assert kind_of(orjson.dumps("3/g/1700000000000/0")) == "g"
    assert kind_of(b"not json") == kind_of(None) == kind_of(orjson.dumps("a/b")) == "other"
