"""Owned partitions: state recovered from its stored value, dropped when not assigned,
reported as metrics."""
from __future__ import annotations

import time

import orjson
import pytest

from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.worker.partitions import BookSettings, Partitions
from tests.unit.worker.records import fetched, recovered

BOOKS = BookSettings(window_ms=1000, grace_ms=100, late_after_ms=60_000, idle_ms=60_000, max_regions=10)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_partition_without_stored_state_starts_empty(tmp_path):
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(2)
    assert p.book.next_offset == 0 and p.book.counts == {} and 2 in parts and len(parts) == 1
    assert sample(m, "clickstream_state_recovered_partitions_total") == 0


def test_state_written_by_one_owner_is_recovered_by_the_next(tmp_path):
    first = Partitions(BOOKS, tmp_path / "a", lambda p: None, Metrics())
    p = first.open(1)
    p.book.apply([("eu", 1_000, None), ("eu", 1_500, None), ("us", 3_200, None)], 17, 3_200)
    assert p.book.outbox  # window [1000, 2000) closed at stream time 3200
    assert p.commit_offset() == 17
    value = p.state_value()
    m = Metrics()
    second = Partitions(BOOKS, tmp_path / "b", recovered(1, value), m)
    q = second.open(1)
    assert q.book.next_offset == 17
    assert q.book.outbox == p.book.outbox
    assert q.book.counts == p.book.counts
    assert sample(m, "clickstream_state_recovered_partitions_total") == 1


def test_a_partition_back_on_a_host_does_not_drain_the_spill_it_left_there(tmp_path):
    """The state names the spill directory its backlog is in: A's spill, left when A died
    before its state was written, has the record numbers and first record of the backlog
    B's state holds; back on A it is re-read from the source instead (spill.reconcile)."""
    def spill_on(root, offsets):
        p = Partitions(BOOKS, root, lambda n: None, Metrics()).open(0)
        split = p.spill.ledger.split([("eu", o, None) for o in offsets], offsets, RateLimits(0, {"eu": 1}), now=0.0)
        p.spill.write(split)
        assert [e for e in split.events if e[0] is not None] == [("eu", 10, None)]  # the rest spilled
        p.book.apply(split.events, offsets[-1] + 1, 0)
        return p

    a = spill_on(tmp_path / "a", [10, 11, 13, 14])  # A: records 0-2 are offsets 11, 13, 14
    a.spill.close()
    b = spill_on(tmp_path / "b", [10, 11, 12, 13])  # B: records 0-2 are offsets 11, 12, 13
    value = b.state_value()
    assert orjson.loads(value)["spill_disk"] == b.spill.disk != a.spill.disk
    b.spill.close()
    back = Partitions(BOOKS, tmp_path / "a", recovered(0, value), Metrics()).open(0)
    assert back.spill.ledger.rebuild == {"eu": 3} and back.spill.store.backlog("eu") == 0
    again = Partitions(BOOKS, tmp_path / "b", recovered(0, value), Metrics()).open(0)  # B's own disk
    assert again.spill.ledger.rebuild == {} and again.spill.store.backlog("eu") == 3


def _dedup_state(tmp_path, dedup_ms: int, its: int) -> tuple[bytes, dict, list]:
    """A partition's state with dedup ids of ``dedup_ms``'s buckets, and its dedup records."""
    from aggregator.core.dedupid import event_key

    p = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, dedup_ms=dedup_ms), tmp_path / "a",
                   lambda p: None, Metrics()).open(1)
    ids = [event_key("eu", f"e{i}") for i in range(5)]
    assert len(p.dedup.filter([("eu", its, None)] * 5, ids)[0]) == 5
    records, prepared = p.dedup.take_records(1)
    return p.state_value(prepared), {k: orjson.loads(orjson.dumps(v)) for k, v in records}, ids


def test_dedup_ids_outlive_a_restart_under_another_horizon(tmp_path):
    """The state names its dedup bucket length (core.dedup.DedupStore.load): after
    AGG_DEDUP_SECONDS went from 60 to 600, the ids are still repeats, the horizon intact."""
    now = int(time.time() * 1000)
    value, records, ids = _dedup_state(tmp_path, 60_000, now)
    assert orjson.loads(value)["dedup_bucket_ms"] == 6_000
    m = Metrics()
    parts = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, dedup_ms=600_000), tmp_path / "b",
                       recovered(1, value), m, record=records.get)
    q = parts.open(1)
    assert q.dedup.bucket_ms == 60_000 and now <= q.dedup.newest < now + 6_000
    assert q.dedup.filter([("eu", now, None)] * 5, ids)[0] == []


def test_a_dedup_state_that_cannot_move_to_the_new_horizon_is_refused_loudly(tmp_path, caplog):
    """A horizon of hours raised by 0.1 s: its records could not move without meeting the old
    ones (core.dedup.HorizonClash): refused, said once, the reason kept for /readyz."""
    from aggregator.worker.partitions import SettingChanged

    now = int(time.time() * 1000)
    value, records, _ = _dedup_state(tmp_path, 36_000_000, now)
    parts = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, dedup_ms=36_000_100), tmp_path / "b",
                       recovered(1, value), Metrics(), record=records.get)
    with caplog.at_level("ERROR"), pytest.raises(SettingChanged):
        parts.open(1)
    assert "AGG_DEDUP_SECONDS back to 36000" in parts.refused[1] and 1 not in parts
    assert sum("not counting it" in r.getMessage() for r in caplog.records) == 1


def test_records_a_state_leaves_out_are_deleted_by_whoever_restores_it(tmp_path):
    """Found by a review: the records of expired dedup buckets and closed windows' aggregates
    were deleted only with the owner's next write, so a crash or a revoke in between left
    them in the changelog for good (and in every later owner's table).  The state names
    them now; the owner that restores it deletes them with its next write."""
    from aggregator.core.contract import agg_header_value
    from aggregator.core.dedupid import event_key
    from aggregator.core.sketches import SketchParams

    books = BookSettings(1000, 100, 60_000, 60_000, 10, dedup_ms=60_000, sketches=SketchParams())
    p = Partitions(books, tmp_path / "a", lambda p: None, Metrics()).open(1)
    t = 1_800_000_000_000
    p.dedup.filter([("eu", t, None)], [event_key("eu", "a")])
    p.book.apply([("eu", t, None)], 1, t, [agg_header_value(1, None, None)])
    assert p.book.aggs is not None
    for log in (p.dedup, p.book.aggs):
        log.confirm(log.take_records(1)[1])
    p.dedup.expire(t + 10 * 60_000)  # the id's bucket ends, and the event's window closes
    p.book.apply([("eu", t + 5_000, None)], 2, t + 5_000, [None])
    (_, dedup), (_, aggs) = p.dedup.take_records(1), p.book.aggs.take_records(1)
    assert dedup.gone and aggs.gone
    value = p.state_value(dedup, aggs)
    # the owner stops before its next write: the next one restores the state
    q = Partitions(books, tmp_path / "b", recovered(1, value), Metrics(), record=lambda key: {}).open(1)
    assert q.book.aggs is not None
    assert q.dedup.take_expired() == dedup.gone and q.book.aggs.take_expired() == aggs.gone


def test_open_windows_made_under_other_settings_are_refused_loudly(tmp_path, caplog):
    """Found by a review: AGG_WINDOW_SECONDS or AGG_UNIQUE_USERS_PRECISION changed across a
    restart while windows were open was read silently (windows of two lengths; aggregates
    replayed under other sketch parameters, unique users low).  The state names both now,
    and open windows made under others are refused, as for a changed partition count."""
    from aggregator.core.contract import agg_header_value
    from aggregator.core.sketches import SketchParams
    from aggregator.worker.partitions import SettingChanged

    books = BookSettings(1000, 100, 60_000, 60_000, 10, sketches=SketchParams())
    p = Partitions(books, tmp_path / "a", lambda p: None, Metrics()).open(1)
    p.book.apply([("eu", 1_000, None)], 1, 1_000, [agg_header_value(1, None, None)])
    assert p.book.aggs is not None
    records, prepared = p.book.aggs.take_records(1)
    value = p.state_value(None, prepared)
    stored = {k: orjson.loads(orjson.dumps(v)) for k, v in records}
    changed = {"window": BookSettings(2000, 100, 60_000, 60_000, 10, sketches=SketchParams()),
               "precision": BookSettings(1000, 100, 60_000, 60_000, 10, sketches=SketchParams(hll_p=14))}
    for what, settings in changed.items():
        parts = Partitions(settings, tmp_path / what, recovered(1, value), Metrics(), record=stored.get)
        with caplog.at_level("ERROR"), pytest.raises(SettingChanged):
            parts.open(1)
        assert ("AGG_WINDOW_SECONDS=1" if what == "window" else "AGG_UNIQUE_USERS_PRECISION") in parts.refused[1]
    # the same settings: counted as before
    q = Partitions(books, tmp_path / "same", recovered(1, value), Metrics(), record=stored.get).open(1)
    assert q.book.counts == p.book.counts and q.book.aggs is not None and q.book.aggs.cells
    # once every window is published, a new window length is taken, from its first boundary at
    # or after the old windows' end (p's first open window: 1000; windows of 2000 ms: 2000)
    p.book.counts.clear()
    p.book.advance_to(1_150)
    later = Partitions(changed["window"], tmp_path / "later", recovered(1, p.state_value()), Metrics()).open(1)
    assert p.book.first_open == 1_000 and later.book.first_open == 2_000 and later.book.close_at == 4_100
    # a state written before it named its window length: a first open window off this length's
    # boundaries says it was made under another; refused while it holds open windows
    p.book.apply([("eu", 1_500, None)], 2, 1_500)
    old = orjson.loads(p.state_value())
    del old["window_ms"]
    parts = Partitions(changed["window"], tmp_path / "old", lambda q: (old, None), Metrics())
    with caplog.at_level("ERROR"), pytest.raises(SettingChanged):
        parts.open(1)


def test_keep_only_drops_partitions_assigned_elsewhere(tmp_path):
    parts = Partitions(BOOKS, tmp_path, lambda p: None, Metrics())
    for partition in (0, 1, 2):
        parts.open(partition)
    parts.keep_only({1})
    assert [p.partition for p in parts] == [1]
    parts.forget(1)
    parts.forget(1)  # twice is harmless
    assert len(parts) == 0


def test_report_sets_lag_outbox_and_assignment_gauges(tmp_path):
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    a, b = parts.open(0), parts.open(1)
    a.lag, b.lag = 5, 7
    a.book.apply([("eu", 1_000, None), ("eu", 3_500, None)], 2, 3_500)
    parts.report()
    assert sample(m, "pipeline_stage_in_pending", stage="decode") == 12
    assert sample(m, "pipeline_stage_in_pending", stage="publish") == len(a.book.outbox) > 0
    assert sample(m, "clickstream_assigned_partitions") == 2


def test_a_partition_given_up_drops_its_lag_series(tmp_path):
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    parts.open(0), parts.open(1)
    m.partition_lag(0, 40)
    m.partition_lag(1, 3)
    parts.keep_only({1})  # partition 0 moved to another worker: its lag is the new owner's
    assert sample(m, "clickstream_consumer_lag", partition="0") is None
    assert sample(m, "clickstream_consumer_lag", partition="1") == 3
    parts.forget(1)
    assert sample(m, "clickstream_consumer_lag", partition="1") is None


REGION_GAUGES = ("clickstream_window_events", "clickstream_window_end_timestamp_seconds",
                 "clickstream_window_unique_users", "clickstream_spill_backlog_events", "clickstream_spill_bytes")


def test_a_partition_given_up_drops_the_gauges_of_the_regions_it_was_home_to(tmp_path):
    # found by a review (/tmp/rev11): after a rebalance the old owner kept exporting the
    # last-window and spill gauges of regions whose home moved, and the dashboards'
    # max by (region) showed its stale values beside the new owner's
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    a, b = parts.open(0), parts.open(1)
    split = a.spill.ledger.split([("eu", 1_000 + i, None) for i in range(5)], list(range(5)),
                                 RateLimits(0, {"eu": 2}), now=0.0)
    a.spill.write(split)  # three of eu's events wait in partition 0's spill
    a.book.apply(split.events, 5, 1_004)
    a.book.apply([("__other__", 1_100, None), ("eu", 3_500, None)], 7, 3_500)
    b.book.apply([("us", 1_000, None), ("__other__", 1_100, None), ("us", 3_500, None)], 3, 3_500)
    for p in (a, b):
        m.counted(p.book.take_tally())
        # as published with aggregates on (AGG_AGGREGATES)
        m.published([dict(s, unique_users=1, client_delay_ms={"p50": 1.0, "p90": 2.0, "p99": 3.0})
                     for s in p.book.outbox], time.perf_counter())
    parts.report()
    for region in ("eu", "us", "__other__"):
        assert sample(m, "clickstream_window_events", region=region) is not None
    assert sample(m, "clickstream_spill_backlog_events", region="eu") == 3
    parts.forget(0)
    for name in REGION_GAUGES:
        assert sample(m, name, region="eu") is None, name
    for q in ("0.5", "0.9", "0.99"):
        assert sample(m, "clickstream_window_client_delay_seconds", region="eu", quantile=q) is None
    # counters stay; regions of the partition kept, and __other__ (held by both), keep theirs
    assert sample(m, "clickstream_events_total", region="eu") == 3
    assert sample(m, "clickstream_window_events", region="us") is not None
    assert sample(m, "clickstream_window_events", region="__other__") is not None
    parts.forget(1)
    assert sample(m, "clickstream_window_events", region="__other__") is None


def test_the_source_stamp_is_stored_and_a_recovered_state_must_be_checked_before_commits(tmp_path):
    # core.sourcelog: the broker timestamp of the record at next_offset - 1 travels with the
    # state; a recovered book's offsets are not committed until a batch showed the log is
    # still the one it counted
    first = Partitions(BOOKS, tmp_path / "a", lambda p: None, Metrics())
    p = first.open(0)
    assert p.source_checked and p.commit_ok and p.source_ts is None  # a fresh book: nothing to check
    p.book.apply([("eu", 1_000, None)], 600, 1_000)
    p.source_ts = 1_796_180_561_125
    q = Partitions(BOOKS, tmp_path / "b", recovered(0, p.state_value()), Metrics()).open(0)
    assert q.book.next_offset == 600 and q.source_ts == 1_796_180_561_125
    assert not q.source_checked and not q.commit_ok
    # a state of the earlier format has no stamp
    old = orjson.loads(p.state_value())
    del old["source_ts"]
    r = Partitions(BOOKS, tmp_path / "c", recovered(0, orjson.dumps(old)), Metrics()).open(0)
    assert r.book.next_offset == 600 and r.source_ts is None


def _published_window(tmp_path, clock: list[float]):
    """(metrics on ``clock``, partitions, partition 0) after a window of "eu" was published."""
    m = Metrics(region_idle_seconds=60, clock=lambda: clock[0])
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)
    m.counted(p.book.take_tally())
    m.published(p.book.outbox, time.perf_counter())
    return m, parts, p


def test_the_tick_report_drops_idle_regions_while_nothing_arrives(tmp_path):
    # found by a review (/tmp/rev11): the idle sweep ran only when events were counted
    clock = [1000.0]
    m, parts, p = _published_window(tmp_path, clock)
    assert sample(m, "clickstream_window_end_timestamp_seconds", region="eu") == 2
    clock[0] += 3600
    p.book.advance_to(3_600_000)  # a quiet partition's clock moves on (worker.clock)
    parts.report()
    assert sample(m, "clickstream_window_end_timestamp_seconds", region="eu") is None
    assert sample(m, "clickstream_events_total", region="eu") is None


def test_a_stuck_book_keeps_its_regions_window_end_so_snapshots_stale_can_fire(tmp_path):
    # found by a review (/tmp/rev11): with the sweep running without events, a worker stuck
    # while its regions have traffic (its book's clock not moving, nothing counted) had its
    # window-end gauges dropped after AGG_REGION_IDLE_SECONDS, and ClickstreamSnapshotsStale
    # (newest window end per job) resolved with the worker still stuck
    clock = [1000.0]
    m, parts, p = _published_window(tmp_path, clock)
    clock[0] += 3600  # stuck: the book's stream time stays where it was
    parts.report()
    assert sample(m, "clickstream_window_end_timestamp_seconds", region="eu") == 2
    p.book.advance_to(3_600_000)  # it moves on (windows close, the region is forgotten)
    clock[0] += 60
    parts.report()
    assert sample(m, "clickstream_window_end_timestamp_seconds", region="eu") is None


def test_forwarded_regions_admitted_by_another_workers_cap_keep_their_names():
    """Found by a review (/tmp/rev10/two_other.py): two workers, each with its own region cap
    (2 here).  Worker A names two regions whose home is H (a partition of worker B) and sends
    two more, over its cap, as __other__ to __other__'s home.  H's book held at most 2 regions
    and renamed A's forwarded ones __other__ there: two final __other__ snapshots a window."""
    from aggregator.core.contract import OTHER_REGION
    from aggregator.core.regioncap import RegionCap
    from aggregator.core.repartition import forward_record, home
    from aggregator.worker.decoder import RecordDecoder

    n, now = 4, 10_000_000
    max_ts = now + 5_000
    other_home = home(OTHER_REGION, n)
    h = next(x for x in range(2, n) if x != other_home)  # B's, not __other__'s home
    s = next(x for x in (0, 1) if x != other_home)  # A's
    names = [f"cap-{i}" for i in range(500)]
    at_h = [r for r in names if home(r, n) == h][:4]
    elsewhere = [r for r in names if home(r, n) not in (h, s)][:2]
    books = BookSettings(2000, 1000, 300_000, 3_600_000, max_regions=2, partitions=n)
    dec_a, dec_b = RecordDecoder(n, RegionCap(2, 3_600_000)), RecordDecoder(n, RegionCap(2, 3_600_000))
    fwd: list = []
    dec_a.decode(fetched([(None, orjson.dumps({"region": r, "ingest_ts": 1_000}), []) for r in at_h[:2] + elsewhere]),
                 now, s, False, None, max_ts, fwd)
    assert sorted(f[0] for f in fwd) == sorted([*at_h[:2], OTHER_REGION, OTHER_REGION])
    own = dec_b.decode(fetched([(None, orjson.dumps({"region": r, "ingest_ts": 1_000}), []) for r in at_h[2:]]),
                       now, h, False, None, max_ts, [])
    book_h, book_o = books.new_book(), books.new_book()
    book_h.apply(own.events, 2, now)
    for part, book in ((h, book_h), (other_home, book_o)):
        recs = fetched([forward_record(s, f) for f in fwd if home(f[0], n) == part])
        (events, *_), _ = RecordDecoder(n).decode_forwarded(recs, part, book.forwarded, None, max_ts,
                                                             book.forwarded_epochs)
        book.apply(events, book.next_offset, now)
        book.apply([(at_h[2], 100_000, None)], book.next_offset, now)  # stream time on: window 0 closes
    final = [(s_["region"], s_["count"]) for b in (book_h, book_o) for s_ in b.outbox if s_["window_start"] == 0]
    assert sorted(final) == sorted([(r, 1) for r in at_h] + [(OTHER_REGION, 2)])


def test_a_restarted_worker_keeps_the_names_its_recovered_books_hold():
    """Found by a review (/tmp/rev13/book_bound.py): the region cap is not state, the book's
    regions are; each restart's fresh cap named a further AGG_MAX_REGIONS regions into the
    same book, past the cap (labels, snapshot regions).  The regions of a book taken over
    now take their places in the cap first (RegionCap.hold, as the worker does on open)."""
    from aggregator.core.contract import OTHER_REGION
    from aggregator.core.regioncap import RegionCap
    from aggregator.core.repartition import home

    n, cap_size = 2, 2
    h = 1 - home(OTHER_REGION, n)
    names = [f"r{i}" for i in range(200) if home(f"r{i}", n) == h][:8]
    books = BookSettings(60_000, 5_000, 3_600_000, 600_000, cap_size, partitions=n)
    t, state = 1_700_000_000_000, None
    forwarded = []
    for restart in range(4):
        book = books.new_book()
        cap = RegionCap(cap_size, 600_000)  # a (re)started worker
        if state is not None:
            book.load(state)
            cap.hold(book.last_seen, t)
        batch = []
        for r in names[2 * restart: 2 * restart + 2] + names[:1]:  # new regions, then an old one
            t += 1000
            name = cap.admit(r, t)
            if home(name, n) == h:
                batch.append((name, t, None))
            else:
                forwarded.append(name)  # to its home (the decoder's forward)
        book.apply(batch, book.next_offset + len(batch), t)
        state = book.to_dict()
    assert sorted(book.last_seen) == names[:2]  # the first start's regions: no more names
    assert set(forwarded) == {OTHER_REGION}  # the others counted at __other__'s home
