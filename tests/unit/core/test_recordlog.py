"""core.recordlog's cutting of a bucket's pending items into records of at most
RECORD_BYTES (by bisecting the running total of their sizes) must be the greedy cut:
a record takes items while their sizes add up to at most the bound, and always at least
one.  And core.dedup's sizes must bound each id's bytes in its record, and its record
values be what the per-item form gives."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.core import recordlog
from aggregator.core.dedup import DedupStore, _record_value
from aggregator.core.dedupid import event_key, request_key
from aggregator.core.recordlog import RecordLog


class _Sized(RecordLog):
    TAG = "t"

    def _sizes(self, items: Sequence[Any]) -> list[int]:
        return [item[2] for item in items]

    def _value(self, items: Sequence[Any]) -> dict[str, Any]:
        return {"ids": [item[1] for item in items]}


def greedy(sizes: list[int], bound: int) -> list[list[int]]:
    """The cut as a loop over the items (what take_records did before the bisect)."""
    parts: list[list[int]] = []
    part: list[int] = []
    size = 0
    for n, s in enumerate(sizes):
        if part and size + s > bound:
            parts.append(part)
            part, size = [], 0
        part.append(n)
        size += s
    if part:
        parts.append(part)
    return parts


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 150)), max_size=60), st.integers(1, 300))
def test_records_are_the_greedy_cut_of_each_bucket(items: list[tuple[int, int]], bound: int) -> None:
    saved = recordlog.RECORD_BYTES
    recordlog.RECORD_BYTES = bound
    try:
        log = _Sized()
        log.written = {2: 5}  # a bucket with records already: its sequence numbers go on
        log.pending = [(b, n, size) for n, (b, size) in enumerate(items)]
        records, prepared = log.take_records(7)
    finally:
        recordlog.RECORD_BYTES = saved
    want: list[tuple[str, list[int]]] = []
    index = {2: 5}
    for b in sorted({b for b, _ in items}):
        mine = [(n, size) for n, (bb, size) in enumerate(items) if bb == b]
        seq = index.get(b, 0)
        for part in greedy([size for _, size in mine], bound):
            want.append((f"7/t/{b}/{seq}", [mine[k][0] for k in part]))
            seq += 1
        index[b] = seq
    assert [(key, value["ids"]) for key, value in records] == want
    assert prepared.index == index and prepared.n_pending == len(items)


@given(st.lists(st.one_of(st.text(max_size=8).map(lambda t: event_key("eu", t)),
                          st.tuples(st.sampled_from([request_key("a"), request_key("b"), 5]),
                                    st.integers(0, 2_000_000_000), st.integers(0, 3))), max_size=80))
def test_dedup_sizes_bound_each_id_and_values_are_the_per_item_ones(raw: list[Any]) -> None:
    # pending items as DedupStore.filter appends them: event ids, and runs [key, first, last]
    dids = [r if isinstance(r, str) else [r[0], r[1], r[1] + r[2]] for r in raw]
    store = DedupStore(600_000)
    items = [(0, did) for did in dids]
    # each item's own bytes in the record: its JSON string, its index or its [first,last], and a comma
    own = [len(orjson.dumps(did)) + 1 if isinstance(did, str) else len(orjson.dumps(did[1:])) + 1
           if did[2] - did[1] >= 2 else sum(len(str(i)) + 1 for i in range(did[1], did[2] + 1)) for did in dids]
    sizes = store._sizes(items)
    assert len(sizes) == len(dids) and all(s >= n for s, n in zip(sizes, own, strict=True)), (sizes, own)
    want: dict[str, Any] = {}
    for did in dids:  # the record value, one item at a time
        if isinstance(did, str):
            want.setdefault("e", []).append(did)
        else:
            runs = want.setdefault("k", {}).setdefault(f"{did[0]:032x}", [])
            if did[2] - did[1] >= 2:
                runs.append([did[1], did[2]])
            else:
                runs.extend(range(did[1], did[2] + 1))
    assert _record_value(did for did in dids) == want


_op = st.one_of(st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 40)),  # an item of a bucket
                # a write: 0 nothing stored, 1 its records but not its header, 2 both but no
                # acknowledgement (a timeout), 3 acknowledged
                st.tuples(st.just("write"), st.integers(0, 3), st.just(0)),
                st.tuples(st.just("drop"), st.integers(0, 3), st.just(0)))  # a bucket ends, all at once


@settings(max_examples=400, deadline=None)
@example([("add", 0, 1), ("write", 2, 0), ("add", 0, 1), ("write", 1, 0)])  # the review's case
@given(st.lists(_op, max_size=60))
def test_no_header_a_failed_write_may_have_stored_names_other_content(ops: list[tuple[str, int, int]]) -> None:
    """Writes fail (a timeout: stored or not) and succeed in any order, items arrive between
    them, buckets end: every header that may be the latest stored one (the last acknowledged
    and any stored after it) finds in the changelog exactly the items it was taken with.
    Before, a retry rewrote the keys of a failed write with more items."""
    saved = recordlog.RECORD_BYTES
    recordlog.RECORD_BYTES = 60  # a few items a record: cuts fall everywhere
    try:
        log = _Sized()
        changelog: dict[str, list[int]] = {}
        items: dict[int, list[int]] = {}  # bucket -> its item ids, in order, while it lives
        headers: list[tuple[dict[int, int], dict[int, list[int]]]] = []  # may be the latest stored
        ended: set[int] = set()
        n = 0
        for op, a, size in ops:
            if op == "add":
                if a in ended:
                    continue  # a bucket that ended never takes items again (a window closed, ...)
                log.pending.append((a, n, size))
                items.setdefault(a, []).append(n)
                n += 1
            elif op == "drop":
                log.pending = [item for item in log.pending if item[0] != a]
                if a in log.written:
                    log.expiring.append((a, log.written.pop(a)))
                items.pop(a, None)
                ended.add(a)
            else:
                expired = log.take_expired()
                records, prepared = log.take_records(7)
                if a == 0:
                    log.expired[:0] = expired  # the deletes failed too: given back
                    continue
                for key in log.record_keys(7, expired):
                    changelog.pop(key, None)
                changelog.update((key, value["ids"]) for key, value in records)
                if a == 3:
                    log.confirm(prepared)
                    headers = []
                if a >= 2:
                    headers.append((dict(prepared.index), {b: list(ids) for b, ids in items.items()}))
                for index, covered in headers:
                    for b, count in index.items():
                        got = [i for seq in range(count) for i in changelog[f"7/t/{b}/{seq}"]]
                        assert got == covered[b], (b, got, covered[b])
    finally:
        recordlog.RECORD_BYTES = saved


def test_a_retry_sends_the_failed_records_again_and_then_the_new_ones() -> None:
    log = _Sized()
    log.pending = [(1, 0, 10), (1, 1, 10)]
    first, _ = log.take_records(0)  # fails: not confirmed
    log.pending.append((1, 2, 10))
    again, prepared = log.take_records(0)
    assert again == first + [("0/t/1/1", {"ids": [2]})]
    assert prepared.index == {1: 2}
    log.confirm(prepared)
    assert log.unconfirmed == {} and log.pending == [] and log.written == {1: 2}


def test_a_bucket_that_ends_after_a_failed_write_expires_with_the_records_sent() -> None:
    log = _Sized()
    log.pending = [(1, 0, 10)]
    log.confirm(log.take_records(0)[1])  # 1/0 written
    log.pending = [(1, 1, 10), (2, 2, 10)]
    log.take_records(0)  # 1/1 and 2/0 sent, not confirmed
    log.pending = []  # both buckets end
    log.expiring.append((1, log.written.pop(1)))
    _, prepared = log.take_records(0)
    assert sorted(log.expiring) == [(1, 2), (2, 1)]  # every record sent goes, not only the written one
    log.confirm(prepared)
    assert sorted(log.record_keys(0, log.take_expired())) == ["0/t/1/0", "0/t/1/1", "0/t/2/0"]


def test_aggregates_recovered_from_a_header_that_timed_out_count_each_event_once() -> None:
    """The review's case (/tmp/rev9/r9): a state write times out but is stored; the retry,
    with ten more events, is stored without its header; the worker restarts from the stored
    header (offset 20) and reads events 20-29 again.  The retry rewrote the aggregates
    record that header names with events 10-29 in it: the top URLs counted 40 events of 30."""
    from aggregator.core.aggstate import WindowAggregates
    from aggregator.core.windows import WindowBook

    w = 60_000
    t0 = 1_700_000_000_000 - 1_700_000_000_000 % w
    events = [("eu", t0 + i, t0 + i - 10) for i in range(30)]
    aggs = [(None, 1000 + i % 3, f"/p{i % 3}") for i in range(30)]
    changelog: dict[str, Any] = {}

    def write(book: WindowBook, header_stored: bool, acked: bool) -> None:
        assert book.aggs is not None
        records, prepared = book.aggs.take_records(0)
        changelog.update((k, orjson.loads(orjson.dumps(v))) for k, v in records)
        if header_stored:
            changelog["header"] = (orjson.loads(orjson.dumps(book.to_dict())), prepared.to_json())
        if acked:
            book.aggs.confirm(prepared)

    def new_book() -> WindowBook:
        return WindowBook(w, 0, 10**9, 10**9, 100, WindowAggregates())

    live = new_book()
    live.apply(events[:10], 10, 0, aggs[:10])
    write(live, True, True)
    live.apply(events[10:20], 20, 0, aggs[10:20])
    write(live, True, False)  # stored, the acknowledgement timed out
    live.apply(events[20:], 30, 0, aggs[20:])
    write(live, False, False)  # the records stored, the header lost; then a crash
    state, index = changelog["header"]
    again = new_book()
    again.load(state)
    assert again.aggs is not None
    again.aggs.load(0, index, changelog.get, set(again.counts))
    assert again.next_offset == 20
    again.apply(events[20:], 30, 0, aggs[20:])  # read again from the header's offset
    again.aggs.flush()
    top = again.aggs.cells[t0]["eu"].result(10)["top_urls"]
    assert [u["count"] for u in top] == [10, 10, 10], top
