"""core.dedup: exact, bounded by the horizon, restored from its records, never applied twice."""
from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.core.contract import OTHER_REGION, ingest_header_value, parse_ingest_header
from aggregator.core.dedup import ID_MEMORY, KEY_MEMORY, DedupStore, HorizonClash
from aggregator.core.dedupid import (
    EVENT_ID,
    IDEMPOTENCY_KEY,
    MAX_KEY_INDEX,
    event_key,
    id_field,
    key_id_fields,
    other_region_id,
    parse_id_field,
    request_key,
)
from aggregator.core.events import LIMITS
from aggregator.core.recordlog import RECORD_BYTES
from aggregator.core.statechunks import MAX_RECORD_BYTES

H = 600_000  # the default horizon (ms)
T0 = 1_700_000_000_000


def _events(n: int, region: str = "eu", its: int = T0) -> list[tuple[str, int, None]]:
    return [(region, its, None) for _ in range(n)]


def test_ids_are_stable_per_region_and_round_trip_the_header_field() -> None:
    assert event_key("eu", "a") == event_key("eu", "a") != event_key("us", "a")
    assert event_key("eu", "a") != event_key("eu", "b")
    for did in (event_key("eu", "x"), event_key("eu", "a,b\nc ü"), (request_key("k-1"), 0),
                (request_key("k-1"), 7999), (request_key("k-1"), MAX_KEY_INDEX - 1), event_key("eu", "ü" * 128)):
        assert parse_id_field(id_field(did), "eu") == did
    assert request_key("a") != request_key("b") and request_key("a").bit_length() <= 128
    # a key names a body: the same key on another body (or length) is another request
    assert request_key("a", b"[1]") == request_key("a", b"[1]") != request_key("a", b"[2]")
    assert request_key("a", b"[1]") != request_key("a", b"[1] ") != request_key("a")
    # nor what ingest never writes: a body index out of any body, an over-long digest, event_id or region
    for bad in (b"", b"x12", b"kabc", b"kzz.1", b"e\xff", b"r", b"reu", b"r\nx", b"k1f.-1", b"k1f.%d" % MAX_KEY_INDEX,
                b"k" + b"f" * 33 + b".1", b"e" + b"x" * 129, b"reu\n" + b"x" * 129, b"r" + b"a" * 65 + b"\nx"):
        with pytest.raises(ValueError):
            parse_id_field(bad, "eu")
    # an empty event_id is an id like any other (contract §2: any string up to 128 characters)
    assert parse_id_field(b"e", "eu") == event_key("eu", "")
    assert parse_id_field(b"reu\n", "__other__") == event_key("eu", "")


def test_an_event_id_counted_under_another_region_keeps_its_own() -> None:
    """``__other__`` (the region cap) takes events of many regions: their ids stay apart."""
    for did in (event_key("b", "1"), event_key("c", "1"), event_key("b", "x\ny")):
        field = id_field(did, "__other__")
        assert field.startswith(b"r")
        assert parse_id_field(field, "__other__") == did
        assert parse_id_field(other_region_id(id_field(did), did.partition("\n")[0]), "__other__") == did
    assert id_field(event_key("b", "1"), "b") == id_field(event_key("b", "1")) == b"e1"
    assert other_region_id(id_field((request_key("k"), 3)), "b") == id_field((request_key("k"), 3))


# what ingest and the worker accept as an event_id (core.events.LIMITS, contract §2): any
# string of at most 128 characters -- empty, newlines and commas included; JSON cannot carry
# a lone surrogate (orjson and msgspec both refuse one), and neither does st.text
_EVENT_IDS = st.text(max_size=LIMITS["event_id"])
_REGIONS = st.from_regex(r"[a-z0-9._-]{1,64}", fullmatch=True) | st.just(OTHER_REGION)


@given(_REGIONS, _EVENT_IDS, _REGIONS, st.integers(0, (1 << 128) - 1), st.integers(0, MAX_KEY_INDEX - 1))
@example("eu", "", "zz", 0, 0)
@example("eu", "x" * LIMITS["event_id"], "zz", 1, 7)
@example("eu", "\n", "zz", 2, 8)
@example("eu", "a,b\nc\n", "zz", 3, 9)
@example("eu", "ü😀\u2028", OTHER_REGION, (1 << 128) - 1, 999)
def test_every_valid_dedup_id_round_trips_every_id_form(region: str, eid: str, other: str, kh: int, i: int) -> None:
    """``id_field``, ``other_region_id`` and ``parse_id_field`` are inverse over the whole
    validated domain, through the ingest header too: an event_id ingest or the worker
    accepted (the empty one included) is never refused (dead-lettered) or merged with
    another when read back; nor is a request key and index."""
    did = event_key(region, eid)
    assert parse_id_field(id_field(did), region) == did
    assert parse_id_field(id_field(did, region), region) == did
    if other != region:  # counted under another region (the cap): it keeps its own
        assert id_field(did, other).startswith(b"r")
        assert parse_id_field(id_field(did, other), other) == did
    moved = other_region_id(id_field(did), region)
    assert parse_id_field(moved, OTHER_REGION) == did
    assert other_region_id(moved, region) == moved  # idempotent
    keyed = id_field((kh, i))
    assert parse_id_field(keyed, region) == (kh, i) and key_id_fields(kh, [i]) == [keyed]
    assert other_region_id(keyed, region) == keyed
    for field in (moved, keyed):
        for cts in (None, -5, 1_700_000_000_000):
            assert parse_ingest_header(ingest_header_value(1_700_000_000_123, cts, field)) == (
                1_700_000_000_123, cts, field)


def test_key_id_fields_are_the_id_fields_of_the_key_and_each_index() -> None:
    kh = request_key("k-7")
    assert key_id_fields(kh, [0, 5, 999]) == [id_field((kh, i)) for i in (0, 5, 999)]
    assert [parse_id_field(f, "eu") for f in key_id_fields(kh, [3])] == [(kh, 3)]


def test_a_retried_body_counts_once_and_a_partial_first_attempt_is_completed() -> None:
    store = DedupStore(H)
    kh = request_key("retry-me")
    first = _events(40)
    kept, _, dups, _ = store.filter(first, [(kh, i) for i in range(0, 80, 2)])  # half the body arrived
    assert len(kept) == 40 and not dups
    retry = _events(80, its=T0 + 5_000)
    kept, _, dups, _ = store.filter(retry, [(kh, i) for i in range(80)])
    assert len(kept) == 40  # only the indices the first attempt did not store
    assert dups == {("eu", IDEMPOTENCY_KEY): 40}
    kept, _, dups, _ = store.filter(retry, [(kh, i) for i in range(80)])
    assert kept == [] and dups == {("eu", IDEMPOTENCY_KEY): 80}


def test_event_ids_repeat_within_a_batch_and_across_batches_and_events_without_ids_always_count() -> None:
    store = DedupStore(H)
    a, b = event_key("eu", "a"), event_key("eu", "b")
    events = _events(5)
    kept, offsets, dups, _ = store.filter(events, [a, a, None, b, None], [10, 11, 12, 13, 14])
    assert len(kept) == 4 and offsets == [10, 12, 13, 14]
    assert dups == {("eu", EVENT_ID): 1}
    kept, _, dups, _ = store.filter(_events(2), [b, None])
    assert len(kept) == 1 and dups == {("eu", EVENT_ID): 1}


def test_ids_are_forgotten_only_a_whole_horizon_after_their_bucket() -> None:
    store = DedupStore(H)
    did = event_key("eu", "old")
    store.filter(_events(1), [did])
    store.expire(T0 + H - 1)
    assert store.filter(_events(1, its=T0 + H - 1), [did])[0] == []  # still within the horizon
    store.expire(T0 + H + store.bucket_ms + 1)
    assert store.size() == (0, 0)
    assert len(store.filter(_events(1, its=T0 + H + store.bucket_ms + 1), [did])[0]) == 1


def _round_trip(store: DedupStore, partition: int, stored: dict[str, object]) -> DedupStore:
    """Write what ``store`` has pending as its checkpoint would (JSON), restore a new store."""
    records, prepared = store.take_records(partition)
    for key, value in records:
        stored[key] = orjson.loads(orjson.dumps(value))
    store.confirm(prepared)
    for key in store.record_keys(partition, store.take_expired()):
        stored.pop(key)
    index = orjson.loads(orjson.dumps(prepared.to_json()))
    again = DedupStore(H)
    again.load(partition, index, stored.get)
    return again


def test_restored_store_drops_what_the_original_would_and_keeps_nothing_twice() -> None:
    rng = random.Random(7)
    store = DedupStore(H)
    stored: dict[str, object] = {}
    seen: list[object] = []
    for step in range(6):
        ids: list[object] = []
        for _ in range(3000):
            if seen and rng.random() < 0.3:
                ids.append(rng.choice(seen))
            elif rng.random() < 0.5:
                ids.append(event_key("eu", f"e{rng.randrange(10**9)}"))
            else:
                ids.append((request_key(f"k{rng.randrange(50)}"), rng.randrange(2000)))
        store.filter(_events(len(ids), its=T0 + step * 70_000), ids)
        seen += ids[:100]
        store.expire()
        restored = _round_trip(store, 3, stored)
        probe = seen[-200:] + [event_key("eu", "never")]
        assert restored.filter(_events(len(probe), its=store.newest), probe)[0] == \
            store.filter(_events(len(probe), its=store.newest), probe)[0]
    assert all(key.startswith("3/d/") for key in stored)
    live = {int(k.split("/")[2]) for k in stored}
    assert live == set(store.buckets)  # expired buckets' records were deleted


def test_undo_forgets_exactly_the_last_batch() -> None:
    store = DedupStore(H)
    kh = request_key("k")
    store.filter(_events(2), [event_key("eu", "a"), (kh, 0)])
    before = (dict(store.events), {k: (b, bytes(m)) for k, (b, m, _, _) in store.keys.items()}, list(store.pending))
    batch = [event_key("eu", "b"), (kh, 1), event_key("eu", "a"), (kh, 9)]
    n_before = len(store.pending)
    kept, _, _, _ = store.filter(_events(4), batch)
    assert len(kept) == 3
    store.undo(len(store.pending) - n_before)
    assert store.events == before[0] and list(store.pending) == before[2]
    assert {k: (b, bytes(m).rstrip(b"\0")) for k, (b, m, _, _) in store.keys.items()} == \
        {k: (b, m.rstrip(b"\0")) for k, (b, m) in before[1].items()}
    assert len(store.filter(_events(4), batch)[0]) == 3  # offered again: the same answer


def test_undo_forgets_the_keys_the_batch_brought_and_their_bucket_entries() -> None:
    store = DedupStore(H)
    store.filter(_events(1), [event_key("eu", "a")])
    buckets = {b: list(ids) for b, ids in store.buckets.items()}
    n_before = len(store.pending)
    batch = [event_key("eu", "b"), (request_key("new"), 0), (request_key("new"), 1)]
    assert len(store.filter(_events(3), batch)[0]) == 3
    store.undo(len(store.pending) - n_before)
    assert store.buckets == buckets and store.size() == (1, 0)
    assert len(store.filter(_events(3), batch)[0]) == 3  # offered again
    store.expire(T0 + 2 * H)  # everything forgotten once past the horizon, keys included
    assert store.size() == (0, 0) and store.buckets == {}


def test_a_failed_write_is_sent_again_as_it_was_and_what_is_new_follows() -> None:
    """A failed write may have been stored, its header naming its records: a key is never
    rewritten with other ids (a header naming it would then remember ids of events after
    its offset, and drop them as repeats when they are read again)."""
    store = DedupStore(H)
    store.filter(_events(3), [event_key("eu", str(i)) for i in range(3)])
    records, first = store.take_records(0)  # not confirmed: the write failed
    store.filter(_events(2), [event_key("eu", str(i)) for i in range(3, 5)])
    again, prepared = store.take_records(0)
    assert again[:len(records)] == records  # the same keys, the same values
    assert len(again) == len(records) + 1 and len(again[-1][1]["e"]) == 2  # the new ids after them
    assert sum(prepared.index.values()) == len(again) and first.index != prepared.index
    store.confirm(prepared)
    assert store.take_records(0)[0] == []


def test_records_stay_under_the_state_record_bound() -> None:
    store = DedupStore(H)
    n = 60_000
    store.filter(_events(n), [event_key("eu", f"{i}-" + "x" * 100) for i in range(n)])
    kh = request_key("big")
    store.filter(_events(n), [(kh, i) for i in range(n)])
    records, prepared = store.take_records(0)
    store.filter(_events(5000), [event_key("eu", "\x01" * 120 + str(i)) for i in range(5000)])  # escapes: 6x
    # a key a request, one event each: the keys' hex, not their indices, fill the records
    store.filter(_events(n), [(request_key(f"req-{i}"), 0) for i in range(n)])
    records, prepared = store.take_records(0)
    assert len(records) >= 9
    assert max(len(orjson.dumps(v)) for _, v in records) <= RECORD_BYTES + 64 < MAX_RECORD_BYTES
    assert sum(prepared.index.values()) == len(records)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans(), st.integers(0, 40)), max_size=200),
       st.integers(1, 50))
def test_against_a_reference_set(stream: list[tuple[int, bool, int]], cut: int) -> None:
    """Any batching, with a checkpoint and restore in the middle, keeps exactly the first
    sighting of every id (all within one horizon)."""
    ids: list[object] = [event_key("r", str(x)) if is_event else (request_key(str(x % 3)), x)
                         for x, is_event, _ in stream]
    expected = []
    first: set[object] = set()
    for n, did in enumerate(ids):
        if did not in first:
            first.add(did)
            expected.append(n)
    store = DedupStore(H)
    events = [("r", T0 + n, n) for n in range(len(ids))]
    kept, _, _, _ = store.filter(events[:cut], ids[:cut])
    restored = _round_trip(store, 0, {})
    rest, _, _, _ = restored.filter(events[cut:], ids[cut:])
    assert [e[2] for e in kept + rest] == expected


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20)), max_size=120), st.integers(0, 120),
       st.integers(0, 120))
@settings(max_examples=300)
def test_far_apart_indices_against_a_reference_set(stream: list[tuple[int, int]], cut: int, undo_at: int) -> None:
    """Indices of a key far apart (a body whose items were mostly refused) go to a set, not a
    bitmap grown to them; near ones grow the bitmap and take in the set's; any batching, an
    undone batch and a restore keep exactly the first sighting of every (key, index)."""
    ids: list[object] = [(request_key(str(k)), i) for k, i in stream]
    expected = [n for n, did in enumerate(ids) if did not in ids[:n]]
    store = DedupStore(H)
    events = [("r", T0 + n, n) for n in range(len(ids))]
    cut = min(cut, len(ids))
    undo_at = min(undo_at, cut)
    kept, _, _, _ = store.filter(events[:undo_at], ids[:undo_at])
    n_before = len(store.pending)
    store.filter(events[undo_at:cut], ids[undo_at:cut])
    store.undo(len(store.pending) - n_before)  # not applied: offered again
    more, _, _, _ = store.filter(events[undo_at:cut], ids[undo_at:cut])
    restored = _round_trip(store, 0, {})
    rest, _, _, _ = restored.filter(events[cut:], ids[cut:])
    assert [e[2] for e in kept + more + rest] == expected


def test_a_key_costs_memory_by_its_events_not_by_its_body_length() -> None:
    """Found by a review: a key's bitmap grew to its highest index, and an index counts every
    item of the body, refused ones too: 2.8M items of ``{}`` then four events cost 350 KB a
    partition for the horizon.  Far indices go to a set now; dense ones stay a bit each."""
    kh = request_key("sparse")
    store = DedupStore(H)
    far = [2_800_000, 2_800_001, 2_800_002, 5_000_000]
    assert len(store.filter(_events(5), [(kh, 0), *((kh, i) for i in far)])[0]) == 5
    _, bitmap, spread, _ = store.keys[kh]
    assert len(bitmap) == 1 and spread == set(far)
    assert store.filter(_events(5), [(kh, 0), *((kh, i) for i in far)])[0] == []  # all repeats
    dense = request_key("dense")
    store.filter(_events(1000), [(dense, i) for i in range(0, 4000, 4)])  # one partition's share of a body
    assert len(store.keys[dense][1]) == 500 and store.keys[dense][2] is None
    restored = _round_trip(store, 0, {})
    assert restored.keys[kh][2] == set(far) and len(restored.keys[kh][1]) == 1
    assert restored.filter(_events(5), [(kh, 0), *((kh, i) for i in far)])[0] == []


def test_a_run_that_starts_far_grows_the_bitmap_and_a_run_below_far_ones_takes_them_in() -> None:
    """Found by a profile of the 503-retry test: a first attempt stored part of a body (its
    far indices went to the set), then the retry's run from index 0 grew the bitmap one
    step at a time, each step scanning the whole set: 55 s of one core for 150,000 events.
    Now the set hands over what the bitmap covers in order (a heap), and a dense run that
    starts far (a region's share of a body sorted by region) moves to the bitmap once the
    set would cost more."""
    from aggregator.core.keybits import FAR_BYTES, SPARSE_BYTES

    kh = request_key("sorted")
    store = DedupStore(H)
    tail = list(range(80_000, 120_000, 4))  # one partition's share, first seen far from 0
    assert len(store.filter(_events(len(tail)), [(kh, i) for i in tail])[0]) == len(tail)
    bitmap, far = store.keys[kh][1], store.keys[kh][2]
    assert far is None or len(far) * FAR_BYTES < SPARSE_BYTES * 8  # the set stayed small
    assert len(bitmap) == 120_000 // 8  # a bit an index, as if the run had started at 0
    head = list(range(0, 80_000, 4))  # the retry: the whole body, from its start
    kept, _, dups, _ = store.filter(_events(len(head) + len(tail)), [(kh, i) for i in head + tail])
    assert len(kept) == len(head) and sum(dups.values()) == len(tail)
    assert store.keys[kh][2] is None and len(store.keys[kh][1]) == 120_000 // 8
    restored = _round_trip(store, 0, {})
    assert restored.filter(_events(len(head)), [(kh, i) for i in head])[0] == []


def test_far_indices_undone_and_marked_again_keep_the_heap_bounded() -> None:
    """Found by a review: ``undo`` takes a far index out of the set but not out of its heap,
    and a batch held for the spill disk is offered again every tick: 2,000 rounds of 1,000
    far indices left a heap of 2,000,000.  The heap is rebuilt from the set once it holds
    over twice as many."""
    kh = request_key("held")
    store = DedupStore(H)
    store.filter(_events(1), [(kh, 0)])
    far = [(kh, 1_000_000 + 64 * i) for i in range(100)]  # sparse: they stay in the set
    for _ in range(200):
        n_before = len(store.pending)
        assert len(store.filter(_events(len(far)), far)[0]) == len(far)
        store.undo(len(store.pending) - n_before)
    assert len(store.filter(_events(len(far)), far)[0]) == len(far)
    entry = store.keys[kh]
    assert len(entry[2]) == len(far) and len(entry[2].heap) <= 2 * len(far) + 64
    assert store.filter(_events(len(far)), far)[0] == []  # every one a repeat now


def test_beyond_max_ids_the_oldest_buckets_go_first_and_are_counted() -> None:
    store = DedupStore(H, max_ids=250)
    step = H // 10
    for k in range(5):
        store.filter(_events(100, its=T0 + k * step), [event_key("eu", f"{k}-{i}") for i in range(100)])
    store.expire()
    assert store.size()[0] <= 250 and store.evicted == 300
    assert len(store.filter(_events(1, its=T0 + 5 * step), [event_key("eu", "0-1")])[0]) == 1  # evicted
    assert store.filter(_events(1, its=T0 + 5 * step), [event_key("eu", "4-1")])[0] == []  # kept


def test_events_too_far_ahead_are_deduped_without_moving_the_horizon() -> None:
    store = DedupStore(H)
    store.filter(_events(1), [event_key("eu", "seen")])
    ids = [("eu", event_key("eu", "x")), ("eu", event_key("eu", "x")), ("eu", event_key("eu", "seen")),
           ("us", event_key("us", "y"))]
    counts, dups = store.filter_late({"eu": 4, "us": 1, "ap": 2}, ids, T0 + 10 * H)
    assert counts == {"eu": 2, "us": 1, "ap": 2}  # eu: one x and the event without an id (ap has none)
    assert dups == {("eu", EVENT_ID): 2}
    assert store.newest == T0  # a day-ahead ingest time would have expired every id
    assert store.expire() == 0 and store.size() == (3, 0)
    assert store.filter(_events(1), [event_key("eu", "x")])[0] == []  # its copy with a sane clock


@pytest.mark.parametrize("first_write_ok", [False, True])
def test_a_dropped_bucket_is_not_made_again_under_keys_about_to_be_deleted(first_write_ok: bool) -> None:
    """Found by a review (/tmp/rev12/dedup_recreated_bucket.py): a bucket dropped (max_ids)
    then given an id again (an event of an old ingest time) got records at its keys from 0,
    and the same write deleted them (the dropped bucket's tombstones after the records): the
    durable state named a missing record and recovery failed.  Such an id goes to the lowest
    bucket not dropped."""
    changelog: dict[str, bytes] = {}
    store = DedupStore(H, max_ids=4)

    def write(ok: bool = True) -> Any:
        store.expire()
        records, prepared = store.take_records(0)
        expired = store.take_expired()
        changelog.update((k, orjson.dumps(v)) for k, v in records)
        if not ok:  # the header timed out: nothing confirmed, the deletes given back
            store.expired[:0] = expired
            return prepared
        for key in store.record_keys(0, expired):  # after the records, in the same flush
            changelog.pop(key, None)
        changelog["header"] = orjson.dumps(prepared.to_json())
        store.confirm(prepared)
        return prepared

    ev = [("eu", 1000, None), ("eu", 1001, None)]
    store.filter(ev, [event_key("eu", "a"), event_key("eu", "b")])
    write(first_write_ok)
    store.filter([("eu", 61_000, None), ("eu", 121_000, None), ("eu", 121_001, None)],
                 [event_key("eu", x) for x in "cde"])
    write()  # over max_ids: the oldest bucket goes
    store.filter([("eu", 2000, None)], [event_key("eu", "f")])  # its ingest time in the dropped bucket
    write()
    again = DedupStore(H, max_ids=4)
    again.load(0, orjson.loads(changelog["header"]),
               lambda k: orjson.loads(changelog[k]) if k in changelog else None)
    assert sorted(again.events) == sorted(event_key("eu", x) for x in "cdef")


def test_a_requests_indices_are_remembered_as_runs() -> None:
    """A request's consecutive indices that one batch brings are one pending item and one
    ``[first, last]`` in a record (a checkpoint of 1000 keyed events is a few bytes, not
    1000 numbers); a gap starts a new run; a later batch starts its own runs, so that
    ``undo`` takes back exactly what its call remembered."""
    kh = request_key("req")
    store = DedupStore(H)
    store.filter(_events(1000), [(kh, i) for i in range(1000)])
    assert len(store.pending) == 1
    before = len(store.pending)
    # a retry of part of it (dropped) and the rest of a larger body: runs of this call only
    kept, _, dups, _ = store.filter(_events(600), [(kh, i) for i in [*range(900, 1000), *range(1000, 1200),
                                                                     *range(1300, 1600)]])
    assert len(kept) == 500 and dups == {("eu", IDEMPOTENCY_KEY): 100}
    assert len(store.pending) - before == 2  # [1000, 1199] and [1300, 1599], not an extension of [0, 999]
    records, prepared = store.take_records(0)
    assert [v["k"] for _, v in records] == [{f"{kh:032x}": [[0, 999], [1000, 1199], [1300, 1599]]}]
    assert len(orjson.dumps(records[0][1])) < 100
    # undo of the second call forgets its runs and nothing of the first
    store.undo(len(store.pending) - before)
    kept, _, _, _ = store.filter(_events(3), [(kh, 999), (kh, 1000), (kh, 1599)])
    assert len(kept) == 2
    # restored from its records, whole runs and single indices alike
    stored: dict[str, object] = {}
    again = _round_trip(store, 0, stored)
    kept, _, _, _ = again.filter(_events(5), [(kh, 0), (kh, 999), (kh, 1000), (kh, 1599), (kh, 1600)])
    assert kept == _events(1)  # only 1600 is new


def test_records_of_single_indices_still_load_and_a_malformed_run_is_refused() -> None:
    """Records written before runs (a key's indices as numbers) load as they did; a run that
    is not ``[first, last]`` of integers, first <= last, is a ValueError (recovery refuses
    the state), not a silent bitmap."""
    kh = request_key("old")
    store = DedupStore(H)
    store.load(0, {"0": 1}, {"0/d/0/0": {"k": {f"{kh:032x}": [0, 1, 2, 7]}}}.get)
    kept, _, _, _ = store.filter(_events(5), [(kh, i) for i in (0, 1, 2, 3, 7)])
    assert len(kept) == 1
    for bad in ([5, 1], [1, "2"], [1.0, 2], [1, 2, 3]):
        with pytest.raises(ValueError):
            DedupStore(H).load(0, {"0": 1}, {"0/d/0/0": {"k": {f"{kh:032x}": [bad]}}}.get)


def _restored_under(h_old: int, h_new: int, now: int = T0) -> tuple[DedupStore, DedupStore, list[Any], dict[str, Any]]:
    """A store of horizon ``h_old`` holding event ids and one key's indices over three of
    its buckets, written as a checkpoint would; -> (it, a store of horizon ``h_new``
    restored from what it wrote, the ids, the stored records)."""
    old = DedupStore(h_old)
    kh = request_key("k")
    ids: list[Any] = []
    for step in range(3):
        batch = [event_key("eu", f"e{step}"), (kh, 3 * step), (kh, 3 * step + 1), (kh, 3 * step + 2)]
        old.filter(_events(len(batch), its=T0 + step * old.bucket_ms), batch)
        ids += batch
    records, prepared = old.take_records(0)
    stored = {key: orjson.loads(orjson.dumps(value)) for key, value in records}
    old.confirm(prepared)
    new = DedupStore(h_new)
    new.load(0, orjson.loads(orjson.dumps(prepared.to_json())), stored.get, old.bucket_ms, now)
    return old, new, ids, stored


@pytest.mark.parametrize("h_old,h_new", [(60_000, H), (H, 60_000), (H, H + 1_000)])
def test_a_changed_horizon_keeps_every_id_for_the_new_horizon_and_rewrites_its_records(h_old: int, h_new: int) -> None:
    """Found by a review: the state named buckets by number only, so a restart under another
    ``AGG_DEDUP_SECONDS`` read them at the new length (60 s -> 600 s: ``newest`` ten times the
    truth, every new id dropped at once, retries counted twice).  Now the length is stored
    and the ids move to the new buckets, each kept at least the new horizon."""
    old, new, ids, stored = _restored_under(h_old, h_new)
    assert new.bucket_ms == h_new // 10 != old.bucket_ms
    # a restored store's stream time is the end of its newest bucket, at the old length
    assert new.newest == (old.newest // old.bucket_ms + 1) * old.bucket_ms - 1
    assert new.size() == old.size() == (3, 1)
    first_end = (T0 // old.bucket_ms + 1) * old.bucket_ms - 1  # the end of the first ids' old bucket
    new.expire(first_end + h_new - 1)
    assert new.filter(_events(len(ids), its=new.newest), ids)[0] == []  # every id still a repeat
    # their records are written again under the new buckets, the old ones deleted once durable
    old_keys = set(stored)
    records, prepared = new.take_records(0)
    assert {int(k.split("/")[2]) for k, _ in records}.isdisjoint({int(k.split("/")[2]) for k in old_keys})
    stored.update({key: orjson.loads(orjson.dumps(value)) for key, value in records})
    new.confirm(prepared)
    deleted = set(new.record_keys(0, new.take_expired()))
    assert deleted == old_keys
    again = DedupStore(h_new)
    again.load(0, orjson.loads(orjson.dumps(prepared.to_json())), {k: v for k, v in stored.items()
                                                                   if k not in deleted}.get, new.bucket_ms, T0)
    assert again.size() == (3, 1) and again.filter(_events(len(ids), its=again.newest), ids)[0] == []
    assert again.key_bytes == new.key_bytes  # the moved keys cost what their records restore
    # and forgotten once a whole new horizon has passed the last bucket
    again.expire(T0 + 3 * old.bucket_ms + h_new + 2 * again.bucket_ms)
    assert again.size() == (0, 0)


def test_a_horizon_changed_too_little_for_its_records_to_move_is_refused() -> None:
    """Moving the ids writes them under the new bucket numbers while the old records wait to
    be deleted: a longer bucket numbers lower, and a horizon of hours raised by 0.1 s would
    reach the old numbers (the same keys): refused, never mixed."""
    ten_hours = 36_000_000
    with pytest.raises(HorizonClash, match="AGG_DEDUP_SECONDS back to 36000"):
        _restored_under(ten_hours, ten_hours + 100)
    _, new, ids, _ = _restored_under(ten_hours, 2 * ten_hours)  # numbers far apart: moved
    assert new.filter(_events(len(ids), its=new.newest), ids)[0] == []


def test_a_state_without_its_bucket_length_is_read_with_the_current_one() -> None:
    """A state of an earlier version names no length: read as before, not refused."""
    old = DedupStore(H)
    old.filter(_events(1), [event_key("eu", "x")])
    records, prepared = old.take_records(0)
    new = DedupStore(H)
    new.load(0, prepared.to_json(), dict(records).get)
    assert new.size() == (1, 0) and new.newest == old.bucket_ms * (T0 // old.bucket_ms + 1) - 1
    with pytest.raises(ValueError):
        DedupStore(H).load(0, prepared.to_json(), dict(records).get, "60000")


def test_the_buckets_a_state_leaves_out_are_deleted_by_the_store_that_restores_it() -> None:
    """The state names what it leaves out (``Prepared.gone``): a store restored from it
    deletes those records with its next write, and no id goes to one of those buckets
    before then (its new records would be deleted with them)."""
    store = DedupStore(H)
    store.filter(_events(1), [event_key("eu", "old")])
    records, prepared = store.take_records(0)
    stored = dict(records)
    store.confirm(prepared)
    store.filter(_events(1, its=T0 + 2 * H), [event_key("eu", "new")])
    store.expire()
    records, prepared = store.take_records(0)
    stored.update(records)
    first = T0 // store.bucket_ms
    assert prepared.gone == [(first, 1)]
    store.confirm(prepared)  # and the owner stops before its next write deletes them
    again = DedupStore(H)
    again.load(0, prepared.to_json(), stored.get, store.bucket_ms, T0, orjson.loads(orjson.dumps(prepared.gone_json())))
    assert again.record_keys(0, again.take_expired()) == [f"0/d/{first}/0"]
    assert again.size() == (1, 0) and again.floor == first + 1
    again.filter(_events(1), [event_key("eu", "late")])  # an old ingest time (another ingest's clock)
    assert again.events[event_key("eu", "late")] == first + 1
    for bad in ([[1]], [[1, -1]], [["1", 1]], "x"):
        with pytest.raises(ValueError):
            DedupStore(H).load(0, {}, stored.get, gone=bad)


def test_one_event_keyed_requests_are_bounded_by_max_ids_and_a_retry_within_it_is_a_repeat() -> None:
    """Found by a review (/work/review/review_ingest/repro_keys.py): request keys never
    counted toward AGG_DEDUP_MAX_IDS, so one-event requests with a key each (a beacon per
    click) were remembered for the whole horizon whatever the cap: 200,000 keys, 129 MB with
    ``max_ids=1000``.  A key counts now as the ids its memory would hold (about 2.3 for one
    event), and keys go with the oldest buckets as ids do, counted in ``evicted``."""
    store = DedupStore(H, max_ids=1000)
    step = H // 10
    for k in range(20):  # 100 one-event keyed requests a tenth of the horizon, for two horizons
        store.filter(_events(100, its=T0 + k * step), [(request_key(f"beacon-{k}-{j}", b"{}"), 0) for j in range(100)])
        store.expire()
        assert store.cost() <= 1000
    events, keys = store.size()
    assert events == 0 and 0 < keys < 1000 * ID_MEMORY // KEY_MEMORY
    assert store.evicted == 2000 - keys  # none lived to the horizon: each forgotten early, and counted
    assert store.key_bytes == (KEY_MEMORY + 1) * keys  # a byte of bitmap each
    # a retry of a key still remembered is a repeat; one of a key forgotten early counts again
    kept, _, dups, _ = store.filter(_events(1, its=T0 + 19 * step), [(request_key("beacon-19-5", b"{}"), 0)])
    assert kept == [] and dups == {("eu", IDEMPOTENCY_KEY): 1}
    assert len(store.filter(_events(1, its=T0 + 19 * step), [(request_key("beacon-10-5", b"{}"), 0)])[0]) == 1
    # event ids and keys share the cap: ids that fill it push the oldest keys out
    per_tenth = 100 * (KEY_MEMORY + 1) / ID_MEMORY  # in ids
    assert store.size() == (0, 100 * int(1000 // per_tenth) + 1)  # the newest tenths that fit, and that retry
    evicted = store.evicted
    store.filter(_events(800, its=T0 + 20 * step), [event_key("eu", f"id-{i}") for i in range(800)])
    store.expire()
    assert store.cost() == 800 and store.size() == (800, 0) and store.evicted == evicted + keys + 1


def _checkpoint(store: DedupStore, changelog: dict[str, Any]) -> Any:
    """What the worker's checkpoint does (worker/checkpoint.py): expire, write, delete."""
    store.expire()
    records, prepared = store.take_records(0)
    changelog.update((key, orjson.loads(orjson.dumps(value))) for key, value in records)
    store.confirm(prepared)
    for key in store.record_keys(0, store.take_expired()):
        changelog.pop(key, None)
    return orjson.loads(orjson.dumps(prepared.to_json()))


@pytest.mark.parametrize("seed", range(4))
def test_a_restored_store_evicts_the_same_keys_and_ids_as_the_original(seed: int) -> None:
    """Eviction by memory is part of the exactly-once state: a store restored from the
    changelog after a crash, given the same batches, forgets the same buckets, counts the
    same evictions and drops the same repeats as the store that wrote it.  Keys of one
    event, of a dense run, and of far indices (a set), with batches undone on the way."""
    rng = random.Random(seed)
    step = H // 10
    keys = [request_key(f"k{n}") for n in range(400)]

    def batch(k: int) -> list[Any]:
        ids: list[Any] = []
        for _ in range(150):
            r = rng.random()
            if r < 0.4:
                ids.append((rng.choice(keys), 0))  # a beacon, or its retry
            elif r < 0.6:
                kh = rng.choice(keys[:40])
                ids += [(kh, i) for i in range(rng.randrange(3000), rng.randrange(3000, 6000), 3)][:20]
            elif r < 0.7:
                ids.append((rng.choice(keys[:40]), rng.randrange(100_000, 3_000_000)))  # far
            elif r < 0.8:  # near a bitmap's end or past it: the order of indices shapes bitmap and set
                ids.append((rng.choice(keys[:40]), rng.choice((0, 2000, 4000, 20_000)) + rng.randrange(3000)))
            else:
                ids.append(event_key("eu", f"e{rng.randrange(3000)}"))
        return ids

    # (its, batch, a batch the spill disk refused first: undone, offered again later)
    stream = [(T0 + k * step // 3, batch(k), batch(k) if k % 5 == 3 else []) for k in range(60)]
    crash = 30
    original = DedupStore(H, max_ids=2000)
    changelog: dict[str, Any] = {}
    index: Any = None
    evicted = 0
    for k, (its, ids, refused) in enumerate(stream):
        if k == crash:
            restored = DedupStore(H, max_ids=2000)
            restored.load(0, index, changelog.get, original.bucket_ms)
            assert restored.key_bytes == original.key_bytes and restored.size() == original.size()
            evicted = original.evicted
        stores = [original] if k < crash else [original, restored]
        answers = []
        for store in stores:
            n_before = len(store.pending)
            store.filter(_events(len(refused), its=its), refused)
            store.undo(len(store.pending) - n_before)
            kept, _, dups, _ = store.filter(_events(len(ids), its=its), ids, list(range(len(ids))))
            answers.append((kept, dups))
            index = _checkpoint(store, changelog if store is original else {})
            assert store.cost() <= store.max_ids or len(store.buckets) == 1
        if k >= crash:
            assert answers[0] == answers[1]
            assert (restored.key_bytes, restored.size(), sorted(restored.buckets), restored.evicted) == \
                (original.key_bytes, original.size(), sorted(original.buckets), original.evicted - evicted)
    assert original.evicted > 0 and original.size()[1] > 0


def test_a_keys_cost_follows_its_indices_not_their_order_and_not_far_past_its_memory() -> None:
    """What a key counts against AGG_DEDUP_MAX_IDS is a function of its indices: the same
    indices in another order, or with repeats, shape its bitmap and set otherwise but cost
    the same (a restored store marks them in record order, without the repeats)."""
    from aggregator.core.keybits import FAR_BYTES, SPARSE_BYTES

    rng = random.Random(3)
    indices = [0, 1, 2, 2500, 4100, 4101, 20_000, 2_800_000] + [rng.randrange(30_000) for _ in range(40)]
    costs = set()
    for _ in range(20):
        rng.shuffle(indices)
        store = DedupStore(H)
        order = indices + rng.sample(indices, 10)  # with repeats
        store.filter(_events(len(order)), [(request_key("k"), i) for i in order])
        entry = store.keys[request_key("k")]
        costs.add(store.key_bytes)
        memory = len(entry[1]) + FAR_BYTES * len(entry[2] or ())
        assert memory <= 2 * (store.key_bytes - KEY_MEMORY)  # it counts about what the indices hold
    assert len(costs) == 1
    dense = DedupStore(H)
    dense.filter(_events(1000), [(request_key("d"), i) for i in range(1000)])
    assert dense.key_bytes == KEY_MEMORY + 125  # a bit an index
    sparse = DedupStore(H)
    sparse.filter(_events(2), [(request_key("s"), 0), (request_key("s"), 2_800_000)])
    assert sparse.key_bytes == KEY_MEMORY + 2 * SPARSE_BYTES  # not the 350 KB a bitmap to 2.8M would take
