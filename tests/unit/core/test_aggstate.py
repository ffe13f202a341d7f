"""core.aggstate: the aggregates of open windows as exactly-once state -- logged input,
rebuilt identically, bounded records, closed windows' records deleted."""
from __future__ import annotations

import collections
import random
from binascii import unhexlify

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core.aggstate import FLUSH_CELL_EVENTS, FLUSH_EVENTS, FLUSH_MIN, WindowAggregates
from aggregator.core.contract import agg_bytes, agg_header_value
from aggregator.core.recordlog import RECORD_BYTES
from aggregator.core.sketches import (
    MAX_URL_CHARS,
    CellAggregates,
    Parts,
    SketchParams,
    UrlEntry,
    normalise_url,
    url_hash,
    user_hash,
)
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
    [[region, users, _, url_counts, texts, _, _, _]] = records[0][1]["c"]  # one batch of one cell
    # the users that changed the cell (each of the 4 once: repeats change nothing), every URL's count
    assert region == "eu" and users == [user_hash(f"u{i}") for i in range(4)] and sorted(url_counts) == [1, 2, 3, 5]
    assert sorted(t for _, t in texts) == ["/a", "/b", "/c", "/d"]  # one text per distinct URL, each read
    book.advance_to(T0 + W + 6_000)
    [snap] = book.outbox
    assert snap["count"] == 11 and snap["unique_users"] == 4
    assert snap["top_urls"] == [{"url": "/a", "count": 5}, {"url": "/b", "count": 3}, {"url": "/c", "count": 2}]
    assert 0.99 * 240 <= snap["client_delay_ms"]["p50"] <= 1.01 * 240


@pytest.mark.parametrize("n", [7, 3000])  # few delays (counted with a Counter) and many (in a list)
def test_client_delays_staged_by_apply_give_the_cell_of_one_by_one_adds(n):
    """Delays of 0, below 0, within the bucket table and past it (up to the late rule's
    300 s), staged as codes by ``WindowBook.apply``: the cell's delays as ``add`` makes them."""
    rng = random.Random(n)
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    direct = CellAggregates()
    events, aggs = [], []
    for i in range(n):
        delay = rng.choice([0, -rng.randrange(1, 10**6), rng.randrange(1, 16_384), rng.randrange(16_384, 300_000)])
        events.append(("eu", T0 + i, T0 + i - delay))
        aggs.append(None)
        direct.add(None, None, None, delay)
    book.apply(events, len(events), T0, aggs)
    book.aggs.flush()
    assert orjson.dumps(book.aggs.cells[T0]["eu"].to_json()) == orjson.dumps(direct.to_json())


def test_events_without_aggregates_or_drained_from_the_spill_are_counted_not_aggregated():
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    book.apply([("eu", T0, None), ("eu", T0 + 1, None)], 2, T0, [None, None])
    book.apply([("eu", T0 + 2, T0)], 3, T0)  # no aggs: a spill drain
    book.advance_to(T0 + W + 6_000)
    [snap] = book.outbox
    assert snap["count"] == 3 and snap["unique_users"] == 0 and snap["top_urls"] == []
    assert snap["client_delay_ms"] is None


def test_aggregates_do_not_depend_on_batch_boundaries_across_window_closes():
    """One batch spanning several windows (each closing inside it) and the same events seven
    at a time publish the same snapshots, aggregates included (URLs few enough to be exact)."""
    rng = random.Random(5)
    events, aggs = [], []
    for i in range(3000):
        region = f"r{rng.randrange(4)}"
        its = T0 + i * 97  # about five windows
        text = f"/p/{rng.randrange(60)}"
        events.append((region, its, its - rng.randrange(3000) if i % 3 else None))
        aggs.append((user_hash(f"u{rng.randrange(400)}"), url_hash(text), text) if i % 5 else None)
    one = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    one.apply(events, len(events), T0, aggs)
    many = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    for i in range(0, len(events), 7):
        many.apply(events[i:i + 7], i + 7, T0, aggs[i:i + 7])
    for b in (one, many):
        b.advance_to(T0 + 10 * W)
    assert sum(s["count"] + s["late"] for s in one.outbox) == len(events)
    assert sum(s["unique_users"] > 0 for s in one.outbox) == 4 * 5  # five windows with events
    assert one.outbox == many.outbox


def test_records_stay_under_the_state_record_bound():
    aggs = WindowAggregates()
    long_url = "/" + "\x01" * 190
    for i in range(20_000):
        aggs.add(T0, f"region-{i % 50:02d}" * 4, (i, i, f"{long_url}{i}"), 5)
    records, prepared = aggs.take_records(0)
    assert len(records) > 1 and sum(prepared.index.values()) == len(records)
    assert max(len(orjson.dumps(v)) for _, v in records) <= RECORD_BYTES + 1000 < MAX_RECORD_BYTES


@pytest.mark.parametrize("url_capacity", [128, 300, 4096])
def test_a_batch_of_one_cell_stays_under_the_record_bound_at_any_url_capacity(url_capacity):
    """Every event of a cell with a new URL of MAX_URL_CHARS control characters (six JSON
    bytes each): the batch is cut so that its texts still fit a record."""
    aggs = WindowAggregates(SketchParams(url_capacity=url_capacity))
    region = "r" * 64
    for i in range(3 * aggs.chunk):
        aggs.add(T0, region, (i, i, f"{i:06d}" + "\x01" * (MAX_URL_CHARS - 6)), i % 20_000)
    records, _ = aggs.take_records(0)
    assert max(len(orjson.dumps(v)) for _, v in records) <= RECORD_BYTES


def _book() -> WindowBook:
    return WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates(top_n=5))


def test_agg_headers_read_in_bulk_give_the_cells_of_their_parsed_parts():
    """Ingest's records carry the agg header as it came (read a cell at a time, in bulk);
    records produced straight to Kafka carry parsed parts: the same events, the same cells."""
    events, parts = _events(random.Random(3), 6000, T0)
    headers = [None if a is None else agg_header_value(*a) for a in parts]
    mixed = [h if i % 3 else p for i, (h, p) in enumerate(zip(headers, parts, strict=True))]
    books = [_book() for _ in range(3)]
    for b, aggs in zip(books, (parts, headers, mixed), strict=True):
        b.apply(events, len(events), T0, aggs)
        b.aggs.flush()
    assert _cells(books[0].aggs) == _cells(books[1].aggs) == _cells(books[2].aggs)
    assert books[1].aggs.malformed == 0


def test_padded_and_unpadded_user_hashes_give_the_same_cells():
    """Ingest pads the user hash to 16 digits (read in bulk); a header of an earlier ingest,
    unpadded, is read one by one: the same cells, small hashes (leading zeros) included."""
    rng = random.Random(6)
    events, parts = _events(rng, 3000, T0)
    # every event with a user (a cell's batch with an event without one is read one by one),
    # every fourth user hash short of 16 digits
    parts = [a if a is None else (rng.randrange(1 << (4 * (i % 15))) if i % 4 == 0 else a[0] or i, *a[1:])
             for i, a in enumerate(parts)]
    padded = [None if a is None else agg_header_value(*a) for a in parts]
    assert {len(h.partition(b",")[0]) for h in padded if h is not None} <= {0, 16}
    unpadded = [None if a is None else b"%s,%x,%s" % (b"" if a[0] is None else b"%x" % a[0], a[1], a[2])
                for a in parts]
    assert padded != unpadded
    books = [_book() for _ in range(3)]
    for b, aggs in zip(books, (parts, padded, unpadded), strict=True):
        b.apply(events, len(events), T0, aggs)
        b.aggs.flush()
    assert _cells(books[0].aggs) == _cells(books[1].aggs) == _cells(books[2].aggs)
    assert books[1].aggs.malformed == books[2].aggs.malformed == 0
    assert len(books[0].aggs.cells[T0 - T0 % W]) == 5


def test_padded_user_hashes_are_read_in_one_call(monkeypatch):
    from aggregator.core import aggstate

    calls = []
    monkeypatch.setattr(aggstate, "unhexlify", lambda b: calls.append(len(b)) or unhexlify(b))
    aggs = [agg_header_value(user_hash(f"u{i}"), url_hash("/a"), "/a") for i in range(50)]
    users, urls, _ = WindowAggregates()._columns(aggs)  # type: ignore[arg-type]
    assert calls == [16 * 50] and users == [user_hash(f"u{i}") for i in range(50)] and urls == {url_hash("/a"): 50}
    calls.clear()
    unpadded = [b"%x,%x,/a" % (user_hash(f"u{i}") >> 8, url_hash("/a")) for i in range(50)]
    assert WindowAggregates()._columns(unpadded)[0] == [user_hash(f"u{i}") >> 8 for i in range(50)]  # type: ignore[arg-type]
    assert calls == []


def test_headers_that_are_not_16_hex_digits_are_read_as_before_in_bulk():
    """A comma at 16 that is not after 16 hex digits (a header without a user and a 15-digit
    url hash) is read by the bulk path; a user part int() takes but that is not hex digits
    only (a sign) is malformed, and so is a negative url hash, there as in the one-by-one
    reading."""
    url_h = next(h for i in range(1000) if 1 << 56 <= (h := url_hash(f"/p{i}")) < 1 << 60)  # 15 digits
    no_user = b",%x,/p" % url_h
    assert no_user.index(b",", 1) == 16
    wa = WindowAggregates()
    assert wa._columns([no_user, b"1,,", b"0000000000000002,,"]) == ([1, 2], {url_h: 1}, {url_h: b"/p"})
    assert wa.malformed == 0
    assert wa._columns([no_user, b"+000000000000001,,", b"0000000000000002,,"]) == ([2], {url_h: 1}, {url_h: b"/p"})
    assert wa.malformed == 1
    wa.malformed = 0
    assert wa._columns([b"0000000000000001,,", b"0000000000000002,-5,"]) == ([1], {}, {})
    assert wa.malformed == 1


def test_a_padded_user_hash_that_is_not_hex_spoils_only_its_own_event():
    good = [agg_header_value(user_hash(f"u{i}"), url_hash("/a"), "/a") for i in range(3)]
    bad = b"0123456789abcdeg," + good[0][17:]  # 16 characters, one not a hex digit
    book = _book()
    book.apply([("eu", T0 + i, None) for i in range(4)], 4, T0, [*good[:2], bad, good[2]])
    records, _ = book.aggs.take_records(0)
    assert book.aggs.malformed == 1
    [[_, users, _, url_counts, _, _, _, _]] = records[0][1]["c"]
    assert users == [user_hash(f"u{i}") for i in range(3)] and url_counts == [3]


def test_a_malformed_agg_header_adds_nothing_and_is_counted():
    good = agg_header_value(user_hash("u1"), url_hash("/a"), "/a")
    bad = [b"zz,1,/a", b"no commas", b"%x,," % (1 << 70), b"1,ab,", None]
    book = _book()
    book.apply([("eu", T0 + i, None) for i in range(6)], 6, T0, [good, *bad])
    records, _ = book.aggs.take_records(0)
    assert book.aggs.malformed == 4
    [[_, users, url_hs, url_counts, texts, _, _, _]] = records[0][1]["c"]
    assert users == [user_hash("u1")] and (url_hs, url_counts) == ([url_hash("/a")], [1])
    assert texts == [[url_hash("/a"), "/a"]]
    orjson.dumps(records)  # every hash fits in 64 bits


@pytest.mark.parametrize("forged", [b"-1,,", b" -1,,", b"0x1,,", b"1_0,,", b",-5,/x", b"0000000000000001,-5,/x",
                                    b",0x5,/x", b"0000000000000001, 5,/x"])
@pytest.mark.parametrize("mixed", [False, True])
def test_a_hash_that_is_not_1_to_16_hex_digits_is_malformed_on_every_path(forged, mixed):
    """A forged agg header with a negative hash (any producer can write one) reached a cell,
    and every later checkpoint then raised OverflowError: the partition was stuck."""
    good = [b"%016x,," % (i + 1) for i in range(10)]
    aggs = WindowAggregates()
    for a in [*good, forged, *([(user_hash("u"), None, None)] if mixed else [])]:
        aggs.add(T0, "eu", a, None)
    aggs.flush()
    assert aggs.malformed == 1
    cell = aggs.cells[T0]["eu"]
    assert cell.urls._urls == {} and cell.users._users == set(range(1, 11)) | ({user_hash("u")} if mixed else set())
    stored: dict = {}
    _checkpoint(aggs, 0, stored)
    again = WindowAggregates()
    again.load(0, {str(T0): 1}, stored.get, {T0})
    assert _cells(again) == _cells(aggs)


def test_only_short_agg_header_tails_are_cached():
    """Forged headers with long URLs were cached whole, up to TAILS_MAX of them (2,000 of
    10 KB held 40 MB after their window closed); a long tail is parsed each time instead,
    to the same cells."""
    from aggregator.core.aggstate import TAIL_MAX_BYTES

    long = [b"%016x,%x,/%s%d" % (i + 1, i + 1, b"x" * 10_000, i) for i in range(50)]
    longest = "/" + "x" * (MAX_URL_CHARS - 1)
    short = [agg_header_value(user_hash(f"u{i}"), url_hash(longest), longest) for i in range(3)]
    aggs = WindowAggregates()
    for _ in range(2):
        for a in [*long, *short]:
            aggs.add(T0, "eu", a, None)
        aggs.flush()
    assert list(aggs.tails) == [short[0][17:]] and len(short[0]) - 17 <= TAIL_MAX_BYTES
    cell = aggs.cells[T0]["eu"]
    assert cell.urls._urls[1] == 2 and len(cell.urls._texts[1]) == MAX_URL_CHARS
    assert cell.urls._urls[url_hash(longest)] == 6
    aggs.close(T0)
    assert sum(map(len, aggs.tails)) < 1000


def test_a_compaction_that_fails_leaves_the_log_as_it_was():
    """The bases are built before the log changes: an exception there (a cell that does not
    serialise: a user hash beyond 64 bits, which the header parsers refuse, put in by hand)
    leaves pending, written and expiring as they were, for the next try."""
    from aggregator.core import aggstate

    aggs = WindowAggregates()
    aggs.add(T0, "eu", (1, 7, "/a"), 5)
    _checkpoint(aggs, 0, {})
    aggs.add(T0, "eu", (2, 7, "/a"), 5)
    aggs.flush()
    aggs.input_bytes[T0] = aggstate.COMPACT_BYTES + 1
    before = (list(aggs.pending), dict(aggs.written), list(aggs.expiring), dict(aggs.bucket_of))

    users = aggs.cells[T0]["eu"].users._users
    assert users is not None  # exact mode
    users.add(1 << 64)
    with pytest.raises(OverflowError):
        aggs.take_records(0)
    assert (aggs.pending, aggs.written, aggs.expiring, aggs.bucket_of) == before
    users.discard(1 << 64)
    records, _ = aggs.take_records(0)  # compacts now
    assert [k for k, _ in records] == [aggs.record_key(0, T0 * 1000 + 1, 0)]


def test_a_record_of_the_earlier_one_entry_per_event_format_is_still_replayed():
    events, aggs = _events(random.Random(4), 500, T0)
    ws = T0
    value = {"r": [], "u": [], "h": [], "d": [], "t": {}}
    direct: dict[str, CellAggregates] = {}
    for i, ((region, its, cts), a) in enumerate(zip(events, aggs, strict=True)):
        user, url_h, text = a if a is not None else (None, None, None)
        delay = None if cts is None else its - cts
        cell = direct.setdefault(region, CellAggregates())
        if url_h is not None and not cell.holds_url(url_h):
            value["t"][str(i)] = text.decode()
        cell.add(user, url_h, text, delay)
        for k, v in zip("ruhd", (region, user, url_h, delay), strict=True):
            value[k].append(v)
    again = WindowAggregates()
    stored = {again.record_key(0, ws, 0): orjson.loads(orjson.dumps(value))}
    again.load(0, {str(ws): 1}, stored.get, {ws})
    assert {r: orjson.dumps(c.to_json()) for r, c in again.cells[ws].items()} == \
        {r: orjson.dumps(c.to_json()) for r, c in direct.items()}


GOOD_BATCH = ["eu", [1, 2], [9], [3], [[9, "/a"]], [4], [2], 1]


@pytest.mark.parametrize("at, bad", [
    (1, ["zz", "yy"]), (1, [-1]), (1, [2**64]), (1, [1.5]), (1, "12"), (2, [-9]), (3, [-3]), (3, [0]),
    (3, [1, 1]), (4, [[9, "x" * (MAX_URL_CHARS + 1)]]), (4, [[9, 5]]), (4, [[-9, "/a"]]), (4, ["ab"]),
    (5, [10**6]), (5, [-1]), (6, [-2]), (7, -4), (7, 1.5), (0, 5), (0, ""),
])
def test_a_malformed_logged_batch_is_refused_at_recovery(at, bad):
    """Values that do not fit a cell were half-accepted: added to it, to fail later (a
    string user hash at the next checkpoint) or count wrongly (a negative count)."""
    stored = {WindowAggregates().record_key(0, T0, 0): {"c": [GOOD_BATCH]}}
    good = WindowAggregates()
    good.load(0, {str(T0): 1}, stored.get, {T0})
    assert good.cells[T0]["eu"].result()["top_urls"] == [{"url": "/a", "count": 3}]
    entry = list(GOOD_BATCH)
    entry[at] = bad
    stored = {good.record_key(0, T0, 0): {"c": [entry]}}
    with pytest.raises(ValueError):
        WindowAggregates().load(0, {str(T0): 1}, stored.get, {T0})


@pytest.mark.parametrize("value", [
    {"c": [GOOD_BATCH[:7]]}, {"c": 5}, {"b": [["eu", {"p": [12, 256, 128, 0.01], "o": "1"}]]}, {"b": [[5, {}]]},
    {"r": ["eu"], "u": ["zz"], "h": [None], "d": [None]}, {"r": ["eu"], "u": [None], "h": [-1], "d": [None]},
    {"r": ["eu"], "u": [None], "h": [None], "d": [1.5]}, {"r": ["eu"], "u": [1], "h": [None]},
])
def test_a_malformed_aggregates_record_is_a_value_error(value):
    stored = {WindowAggregates().record_key(0, T0, 0): value}
    with pytest.raises(ValueError):
        WindowAggregates().load(0, {str(T0): 1}, stored.get, {T0})


def test_top_urls_merged_a_batch_at_a_time_stay_within_the_misra_gries_bound():
    """1,000 URLs evenly, plus one with a tenth of the events, over 128 counters, in batches
    of up to 1,000 distinct URLs: the leader's count is off by at most the offset taken off,
    and that is at most 2N/capacity."""
    rng = random.Random(6)
    cell = CellAggregates()
    truth = collections.Counter()
    n = 0
    for _ in range(40):
        batch = collections.Counter()
        for _ in range(1000):
            u = 0 if rng.random() < 0.1 else rng.randrange(1, 1001)
            batch[url_hash(f"/p/{u}")] += 1
        truth.update(batch)
        n += 1000
        cell.add_batch([], dict(batch), {h: f"/{h}" for h in batch}, {})
    leader = url_hash("/p/0")
    [top] = cell.top_urls(1)
    assert top["url"] == f"/{leader}"
    assert truth[leader] - cell.offset <= top["count"] <= truth[leader]
    assert cell.offset <= 2 * n / cell.params.url_capacity


def test_a_window_closed_with_events_still_staged_is_forgotten_whole():
    aggs = WindowAggregates()
    aggs.add(T0, "eu", (user_hash("u"), None, None), 5)
    aggs.close(T0)  # no result asked (no snapshot of that cell)
    aggs.flush()
    records, _ = aggs.take_records(0)
    assert aggs.cells == {} and records == []


def test_a_busy_window_logs_its_cells_as_a_base_so_its_records_stay_bounded(monkeypatch):
    """A window's logged input is replaced by its cells once it outgrows them: the records a
    window keeps stay bounded however many events it gets, the old bucket's records are
    deleted once a state naming the new one is durable, and recovery from any of those
    states rebuilds the cells byte for byte (a failed write prepared again included)."""
    from aggregator.core import aggstate

    monkeypatch.setattr(aggstate, "COMPACT_BYTES", 200_000)
    rng = random.Random(8)
    book = WindowBook(W, 5_000, 300_000, 3_600_000, 100, WindowAggregates())
    stored: dict = {}
    sizes = []
    buckets = set()
    for step in range(30):
        events, aggs = _events(rng, 2000, T0 + step, regions=8)  # every event in the first window
        book.apply([(r, T0 + step, c if c is None else T0 + step - 40) for r, _, c in events], 0, T0, aggs)
        if step == 12:
            book.aggs.take_records(0)  # a write that fails: prepared again next time, whole
        index = _checkpoint(book.aggs, 0, stored)
        buckets |= set(index)
        sizes.append(sum(len(orjson.dumps(v)) for v in stored.values()))
        again = WindowAggregates()
        again.load(0, index, stored.get, {T0})
        assert _cells(again) == _cells(book.aggs), step
        assert (again.input_bytes, again.base_bytes) == (book.aggs.input_bytes, book.aggs.base_bytes), step
    assert len(book.aggs.cells) == 1 and len(buckets) > 3  # compacted several times
    assert len(index) == 1  # a state names one bucket of the window
    assert max(sizes) < 3 * 200_000 + 2 * max_cells_bytes(book.aggs)
    assert sizes[-1] < sizes[len(sizes) // 2] * 2  # not growing with the events


def max_cells_bytes(aggs: WindowAggregates) -> int:
    return sum(len(orjson.dumps(c.to_json())) for per in aggs.cells.values() for c in per.values())


def test_a_restart_does_not_allow_another_compact_bytes_of_records(monkeypatch):
    """load() restored bucket_of but not input_bytes/base_bytes, so each recovery forgot the
    input already logged and the window's records grew by up to COMPACT_BYTES a restart."""
    from aggregator.core import aggstate

    monkeypatch.setattr(aggstate, "COMPACT_BYTES", 100_000)
    stored: dict = {}
    aggs = WindowAggregates()
    n, sizes = 0, []
    for _ in range(5):
        for _ in range(4):
            for _ in range(1000):
                n += 1
                aggs.add(T0, "eu", (user_hash(f"u{n}"), None, None), None)
            index = _checkpoint(aggs, 0, stored)
        sizes.append(sum(len(orjson.dumps(v)) for v in stored.values()))
        logged = (aggs.input_bytes, aggs.base_bytes)
        aggs = WindowAggregates()
        aggs.load(0, index, stored.get, {T0})  # a crash and recovery
        assert (aggs.input_bytes, aggs.base_bytes) == logged
    assert max(sizes) < 2 * 100_000


@pytest.mark.parametrize("ws", [T0, 60_000 * 1000, 0])
def test_a_window_starting_before_1973_is_not_compacted_and_keeps_its_cells(monkeypatch, ws):
    """window_of() tells a compaction's bucket (start * 1000 + generation) from a window
    start by >= 10**14: the bucket of a start before 10**11 ms read as a closed window's,
    its base was dropped and the cells were gone after recovery. Such a window is not
    compacted (its records are its input, as before compaction existed)."""
    from aggregator.core import aggstate

    aggs = WindowAggregates()
    for i in range(300):
        aggs.add(ws, "eu", (i + 1, 7, "/a"), 5)
    stored: dict = {}
    _checkpoint(aggs, 0, stored)
    aggs.add(ws, "eu", (1000, 7, "/a"), 5)
    aggs.flush()
    aggs.input_bytes[ws] = aggstate.COMPACT_BYTES + 1
    _checkpoint(aggs, 0, stored)
    index = _checkpoint(aggs, 0, stored)
    assert list(index) == [str(ws * 1000 + 1 if ws == T0 else ws)]
    again = WindowAggregates()
    again.load(0, index, stored.get, {ws})
    assert _cells(again) == _cells(aggs) and (ws, "eu") in _cells(again)


def test_recovery_counts_every_record_of_a_base_that_takes_several():
    """Found by a review (/tmp/rev12/base_bytes_reload.py): a compaction's bases over more
    than one record (a few dozen busy regions) were counted from the last record only, so a
    recovered window compacted again much earlier than the uninterrupted one."""
    import random

    from aggregator.core.contract import agg_header_value

    rnd = random.Random(2)
    ws = 1_700_000_000_000
    w = WindowAggregates()
    for r in range(40):
        for _ in range(1500):
            page = rnd.randrange(300)  # a cell keeps 128 URL texts of ~200 bytes: ~30 KB each
            url = b"/u%d/" % page + b"x" * 190
            w.add(ws, f"r{r:02d}", agg_header_value(rnd.getrandbits(64), page + 1, url), rnd.randrange(1, 5000))
    w.flush()
    w.input_bytes[ws] = 10**9  # past the threshold: compacted at this checkpoint
    records, prepared = w.take_records(0)
    w.confirm(prepared)
    assert sum(1 for _, v in records if v.get("b")) >= 2  # the base takes several records
    again = WindowAggregates()
    again.load(0, prepared.to_json(), dict(records).get, {ws})
    assert (again.base_bytes[ws], again.input_bytes[ws]) == (w.base_bytes[ws], w.input_bytes[ws])


_HASH = st.integers(0, (1 << 64) - 1)


@given(st.lists(st.tuples(st.one_of(st.none(), _HASH),
                          st.one_of(st.none(), st.tuples(st.sampled_from([1, 2, 3, (1 << 64) - 1]),
                                                         st.sampled_from(["/a", "/b", "https://x.example/c"])))),
                max_size=60))
def test_parts_of_kafka_direct_records_are_read_in_bulk_as_one_by_one(raw):
    """The decoder's parts (user hash, url hash, url; None where the event has none) read by
    ``_columns`` all at once give what the one-by-one reading gives: users in order, each
    URL's count, each URL's first text."""
    parts = [(u, None, None) if url is None else (u, url[0], f"{url[1]}#{i}") for i, (u, url) in enumerate(raw)]
    wa = WindowAggregates()
    bulk = wa._columns(list(parts))  # type: ignore[arg-type]
    assert bulk == wa._columns_each(list(parts))  # type: ignore[arg-type]
    assert bulk[0] == [u for u, _, _ in parts if u is not None]
    assert bulk[1] == dict(collections.Counter(h for _, h, _ in parts if h is not None))
    assert all(bulk[2][h] == next(t for _, h2, t in parts if h2 == h) for h in bulk[2])


_ENTRIES = [UrlEntry(1, "/a"), UrlEntry(1, "/a"), UrlEntry(2, "/b"), UrlEntry((1 << 64) - 1, "https://x.example/c")]


@given(st.lists(st.lists(st.tuples(st.one_of(st.none(), _HASH), st.one_of(st.none(), st.sampled_from(_ENTRIES))),
                         max_size=40), max_size=4),
       st.integers(0, 3))
def test_the_decoders_parts_counted_in_their_url_entries_give_the_tuples_columns(batches, stale):
    """``Parts`` (user hash, URL entry; the decoder's, of records produced straight to Kafka)
    are counted in their entries (``count_parts``): each batch gives the columns of the same
    events as tuples, whatever the batch before left in the entries (two entries of one hash,
    as after the decoder's entries were cleared, are summed), and a mix of parts, tuples
    and agg headers is read one by one alike."""
    wa = WindowAggregates()
    _ENTRIES[stale].n = 999  # a count left by an earlier batch: not this one's
    for raw in batches:
        parts = [Parts(u, e) for u, e in raw]
        tuples = [p.as_tuple() for p in parts]
        got = wa._columns(list(parts))  # type: ignore[arg-type]
        assert got == wa._columns_parts(tuples)  # type: ignore[arg-type]
        assert got[1] == dict(collections.Counter(h for _, h, _ in tuples if h is not None))
        mixed = [a if i % 3 else agg_header_value(*a.as_tuple()) if i % 2 else a.as_tuple() for i, a in enumerate(parts)]
        users, urls, texts = wa._columns(mixed)  # type: ignore[arg-type]
        assert (users, urls) == got[:2]
        assert {h: t.decode() if isinstance(t, bytes) else t for h, t in texts.items()} == got[2]  # headers': bytes
        assert [agg_bytes(p) for p in parts] == [agg_header_value(*t) for t in tuples]
        if parts:  # parts first, then another kind: counted again the general way, nothing twice
            assert wa._columns([parts[0], None, *tuples[1:]]) == got  # type: ignore[arg-type]


def test_staged_events_are_added_sooner_when_their_cells_are_few():
    """``WindowBook.apply`` adds the staged events at FLUSH_MIN once their cells get
    FLUSH_CELL_EVENTS each on average, and at FLUSH_EVENTS whatever they get."""
    def staged_after(regions: int, n: int) -> int:
        book = WindowBook(W, 5_000, 300_000, 3_600_000, 10_000, WindowAggregates())
        events = [(f"r{i % regions}", T0 + i % 1000, None) for i in range(n)]
        book.apply(events, n, T0, [(i, None, None) for i in range(n)])
        return book.aggs.n_staged

    assert staged_after(4, FLUSH_MIN - 1) == FLUSH_MIN - 1  # too few to add yet
    assert staged_after(4, FLUSH_MIN) == 0  # few cells: added at FLUSH_MIN
    many = FLUSH_MIN // FLUSH_CELL_EVENTS + 1  # cells that would get fewer than FLUSH_CELL_EVENTS each
    assert staged_after(many, FLUSH_MIN) == FLUSH_MIN
    assert staged_after(1000, FLUSH_EVENTS) == 0  # many cells: added at FLUSH_EVENTS
