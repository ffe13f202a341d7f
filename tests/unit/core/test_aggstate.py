"""core.aggstate: the aggregates of open windows as exactly-once state -- logged input,
rebuilt identically, bounded records, closed windows' records deleted."""
from __future__ import annotations

import random

import orjson

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.recordlog import RECORD_BYTES
from aggregator.core.sketches import normalise_url, url_hash, user_hash
from aggregator.core.statechunks import MAX_RECORD_BYTES
from aggregator.core.windows import WindowBook

W = 60_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % W


def _events(rng: random.Random, n: int, t: int, regions: int = 5) -> tuple[list, list]:
    events, aggs = [], []
    for i in range(n):
        region = f"r{min(int(rng.expovariate(0.8)), regions - 1)}"
        user = user_hash(f"u{rng.randrange(2000)}") if rng.random() < 0.9 else None
        text = normalise_url(f"https://Example.com/p/{min(int(rng.expovariate(0.05)), 500)}?q={i}")
        agg = (user, url_hash(text), text.encode()) if rng.random() < 0.8 else None  # type: ignore[arg-type]
        its = t + i * 7
        events.append((region, its, its - rng.randrange(5000) if rng.random() < 0.7 else None))
        aggs.append(agg)
    return events, aggs


def _checkpoint(aggs: WindowAggregates, partition: int, stored: dict) -> dict[str, int]:
    records, prepared = aggs.take_records(partition)
    for key, value in records:
        stored[key] = orjson.loads(orjson.dumps(value))  # through JSON, as recovery reads it
    aggs.confirm(prepared)
    for key in aggs.record_keys(partition, aggs.take_expired()):
        stored.pop(key)
    return orjson.loads(orjson.dumps(prepared.to_json()))


def _cells(aggs: WindowAggregates) -> dict:
    return {(ws, r): orjson.dumps(c.to_json()) for ws, per in aggs.cells.items() for r, c in per.items()}


def test_a_book_rebuilt_from_its_checkpoints_publishes_identical_aggregates():
    rng = random.Random(5)
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    stored: dict = {}
    index: dict = {}
    state = None
    t = T0
    for _step in range(8):
        events, aggs = _events(rng, 3000, t)
        book.apply(events, 0, t, aggs)
        t += 3000 * 7
        index = _checkpoint(book.aggs, 0, stored)
        state = orjson.loads(orjson.dumps(book.to_dict()))
    # a crash here: a new book from the state and the records
    again = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    again.load(state)
    again.aggs.load(0, index, stored.get, set(again.counts))
    assert _cells(again.aggs) == _cells(book.aggs)
    assert book.outbox and all("unique_users" in s and "top_urls" in s for s in book.outbox)
    # the same events after the crash: the same snapshots, aggregates included
    events, aggs = _events(random.Random(9), 2000, t)
    for b in (book, again):
        b.apply(events, 0, t, aggs)
        b.advance_to(t + 10 * W)
    assert again.outbox[-5:] == book.outbox[-5:]
    assert {s["region"] for s in book.outbox if s["unique_users"] > 256}  # a cell past the exact mode
    assert any(s["client_delay_ms"] for s in book.outbox)
    # closed windows' records are deleted once a state no longer names them
    _checkpoint(book.aggs, 0, stored)
    _checkpoint(book.aggs, 0, stored)
    assert {int(k.split("/")[2]) for k in stored} <= set(book.aggs.cells)


def test_exact_results_match_a_direct_count_and_the_url_text_is_logged_only_when_read():
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates(top_n=3))
    events, aggs = [], []
    urls = ["/a"] * 5 + ["/b"] * 3 + ["/c"] * 2 + ["/d"]
    for i, u in enumerate(urls):
        events.append(("eu", T0 + i, T0 + i - 40 * (i + 1)))
        aggs.append((user_hash(f"u{i % 4}"), url_hash(u), u.encode()))
    book.apply(events, len(events), T0, aggs)
    records, _ = book.aggs.take_records(0)
    assert len(records[0][1]["t"]) == 4  # one text per distinct URL: a counter is there after
    book.advance_to(T0 + W + 6_000)
    [snap] = book.outbox
    assert snap["count"] == 11 and snap["unique_users"] == 4
    assert snap["top_urls"] == [{"url": "/a", "count": 5}, {"url": "/b", "count": 3}, {"url": "/c", "count": 2}]
    assert 0.99 * 240 <= snap["client_delay_ms"]["p50"] <= 1.01 * 240


def test_events_without_aggregates_or_drained_from_the_spill_are_counted_not_aggregated():
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    book.apply([("eu", T0, None), ("eu", T0 + 1, None)], 2, T0, [None, None])
    book.apply([("eu", T0 + 2, T0)], 3, T0)  # no aggs: a spill drain
    book.advance_to(T0 + W + 6_000)
    [snap] = book.outbox
    assert snap["count"] == 3 and snap["unique_users"] == 0 and snap["top_urls"] == []
    assert snap["client_delay_ms"] is None


def test_records_stay_under_the_state_record_bound():
    aggs = WindowAggregates()
    long_url = "/" + "\x01" * 190
    for i in range(20_000):
        aggs.add(T0, f"region-{i % 50:02d}" * 4, (i, i, f"{long_url}{i}"), 5)
    records, prepared = aggs.take_records(0)
    assert len(records) > 1 and sum(prepared.index.values()) == len(records)
    assert max(len(orjson.dumps(v)) for _, v in records) <= RECORD_BYTES + 1000 < MAX_RECORD_BYTES
