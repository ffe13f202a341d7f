"""core.dedup: exact, bounded by the horizon, restored from its records, never applied twice."""
from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.core.contract import OTHER_REGION, ingest_header_value, parse_ingest_header
from aggregator.core.dedup import (
    EVENT_ID,
    IDEMPOTENCY_KEY,
    MAX_KEY_INDEX,
    DedupStore,
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
    before = (dict(store.events), {k: (b, bytes(m)) for k, (b, m) in store.keys.items()}, list(store.pending))
    batch = [event_key("eu", "b"), (kh, 1), event_key("eu", "a"), (kh, 9)]
    n_before = len(store.pending)
    kept, _, _, _ = store.filter(_events(4), batch)
    assert len(kept) == 3
    store.undo(len(store.pending) - n_before)
    assert store.events == before[0] and list(store.pending) == before[2]
    assert {k: (b, bytes(m).rstrip(b"\0")) for k, (b, m) in store.keys.items()} == \
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
