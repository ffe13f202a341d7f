"""core.recordlog's cutting of a bucket's pending items into records of at most
RECORD_BYTES (by bisecting the running total of their sizes) must be the greedy cut:
a record takes items while their sizes add up to at most the bound, and always at least
one.  And core.dedup's sizes must bound each id's bytes in its record, and its record
values be what the per-item form gives."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from aggregator.core import recordlog
from aggregator.core.dedup import DedupStore, _record_value, event_key, request_key
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
                                    st.integers(0, 2000))), max_size=80))
def test_dedup_sizes_bound_each_id_and_values_are_the_per_item_ones(dids: list[Any]) -> None:
    store = DedupStore(600_000)
    items = [(0, did) for did in dids]
    # each id's own bytes in the record: its JSON string and a comma, or its index and a comma
    own = [len(orjson.dumps(did)) + 1 if isinstance(did, str) else len(str(did[1])) + 1 for did in dids]
    sizes = store._sizes(items)
    assert len(sizes) == len(dids) and all(s >= n for s, n in zip(sizes, own, strict=True)), (sizes, own)
    want: dict[str, Any] = {}
    for did in dids:  # the record value, one id at a time
        if isinstance(did, str):
            want.setdefault("e", []).append(did)
        else:
            want.setdefault("k", {}).setdefault(f"{did[0]:032x}", []).append(did[1])
    assert _record_value(did for did in dids) == want
