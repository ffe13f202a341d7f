"""Rate limits in the worker: events over a region's rate go to the spill on disk (a
real one, in tmp_path) and come back, in order, when drained; a spill over its
limit holds consumption until it has drained."""
from __future__ import annotations

import time

from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.worker.decoder import RecordDecoder
from aggregator.worker.partitions import BookSettings, Partitions
from aggregator.worker.throttle import Throttle, rebuild_replay, skip_applied
from tests.unit.worker.records import fetched, recovered

BOOKS = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000, max_regions=10)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_no_limit_configured_means_no_limiting():
    assert not Throttle(RateLimits(0, ""), 1 << 20, Metrics()).limiting
    assert Throttle(RateLimits(0, "eu=5"), 1 << 20, Metrics()).limiting


def test_over_the_rate_is_spilled_then_drained_and_counted_once(tmp_path):
    m = Metrics()
    throttle = Throttle(RateLimits(0, "eu=5"), 1 << 30, m)
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(0)
    events = [("eu", 1_000 + i, None) for i in range(20)] + [("us", 1_000, None)]
    batch, counted_now = throttle.limit(p, events, list(range(21)), parts)
    assert len(batch) == 21  # spilled events stay as markers: they move stream time
    assert counted_now == 21 - p.spill.ledger.total_backlog()
    assert 0 < counted_now < 21
    p.book.apply(batch, 21, 2_000)
    assert p.book.open_total()["us"] == 1
    assert p.commit_offset() < 21  # never past the oldest event still in the spill
    throttle.report(parts)
    spilled = value(m, "clickstream_spilled_events_total", region="eu")
    assert spilled == p.spill.ledger.total_backlog()
    assert value(m, "clickstream_rate_limited_events_total", region="eu") >= spilled
    for _ in range(100):  # the bucket refills in real time: drain until the backlog is gone
        if not p.spill.ledger.total_backlog():
            break
        throttle.drain(p, 2_000)
        p.spill.acked()
        time.sleep(0.05)
    assert p.spill.ledger.total_backlog() == 0
    assert p.book.open_total()["eu"] == 20  # every event once
    assert p.commit_offset() == 21


def test_a_spill_over_its_limit_holds_consumption_until_it_drains(tmp_path):
    m = Metrics()
    throttle = Throttle(RateLimits(0, "eu=1"), 1, m)  # one byte: any spill is too big
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(0)
    batch, _ = throttle.limit(p, [("eu", 1_000 + i, None) for i in range(10)], list(range(10)), parts)
    assert throttle.hold
    throttle.report(parts)
    assert value(m, "clickstream_backpressure") == 1
    throttle.drain(p, 2_000)
    p.spill.acked()
    while p.spill.ledger.total_backlog():
        throttle.limits = RateLimits(0, "")  # lifted: drain the rest at once
        throttle.drain(p, 2_000)
        p.spill.acked()
    throttle.report(parts)
    assert not throttle.hold and value(m, "clickstream_backpressure") == 0


def test_failing_checkpoint_writes_hold_consumption_until_acknowledged(tmp_path):
    """While the broker refuses the checkpoint's writes (state, forwards, snapshots) the
    worker fetches nothing (else the forward queue and the outbox grow with every fetch)
    and says so in ``clickstream_backpressure``."""
    from types import SimpleNamespace

    from aggregator.worker.checkpoint import Checkpointer
    from aggregator.worker.service import WorkerService

    m = Metrics()
    throttle = Throttle(RateLimits(0, ""), 1 << 30, m)
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    checkpointer = Checkpointer(lambda: None, lambda p, r: None, lambda p, o: None, m, [])  # type: ignore[arg-type,return-value]
    checkpointer.failing = "window state writes failing: x"
    w = SimpleNamespace(throttle=throttle, checkpointer=checkpointer, app=SimpleNamespace(rebalancing=False))
    assert WorkerService._holding(w)  # type: ignore[arg-type]
    throttle.report(parts, writes_failing=True)
    assert value(m, "clickstream_backpressure") == 1
    w.app.rebalancing = True  # a rebalance's recovery reads on (changelog)
    assert not WorkerService._holding(w)  # type: ignore[arg-type]
    w.app.rebalancing, w.checkpointer.failing = False, None
    assert not WorkerService._holding(w)  # type: ignore[arg-type]
    w.checkpointer.fenced = "the group dropped this worker"  # its writes held (Checkpointer._fenced): so is fetching
    assert WorkerService._holding(w)  # type: ignore[arg-type]
    w.checkpointer.fenced = None
    throttle.report(parts)
    assert value(m, "clickstream_backpressure") == 0


def test_skip_applied_keeps_records_from_the_state_offset_on():
    recs = fetched([(b"eu", b"{}", [])] * 5, base=10)
    assert [r.offset for r in skip_applied(recs, 12)] == [12, 13, 14]
    assert skip_applied(recs, 20) == []


def test_rebuild_replay_re_spills_the_lost_backlog(tmp_path):
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path / "a", lambda p: None, m)
    p = parts.open(0)
    throttle = Throttle(RateLimits(0, "eu=2"), 1 << 30, m)
    specs = [(b"eu", b'{"region": "eu", "ingest_ts": %d}' % (1_000 + i), []) for i in range(8)]
    recs = fetched(specs, base=100)
    events, offsets, *_ = RecordDecoder().decode(recs, 0, 0, True, None, 10**15)
    batch, _ = throttle.limit(p, events, offsets, parts)
    p.book.apply(batch, 108, 2_000)
    backlog = p.spill.ledger.total_backlog()
    assert backlog > 0
    # the spill files are lost (another host took the partition over): a new owner
    # recovers the state, finds no files, and rebuilds the backlog from the source
    other = Partitions(BOOKS, tmp_path / "b", recovered(0, p.state_value()), m)
    q = other.open(0)
    assert q.spill.ledger.rebuild
    rebuild_replay(q, RecordDecoder(), recs, q.book.next_offset, 3_000, 10**15)
    assert not q.spill.ledger.rebuild
    assert q.spill.ledger.total_backlog() == backlog


def test_a_rebuild_under_way_does_not_keep_the_spill_hold_on(tmp_path):
    """A partition re-spilling a lost backlog from the source log cannot drain it until the
    re-read ends, which needs fetches: its bytes neither set the AGG_SPILL_MAX_BYTES hold nor
    keep one another partition's spill set (before: the whole worker stalled for good)."""
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    a, b = parts.open(0), parts.open(1)
    n = 6000  # partition 0 took over 6000 spilled 'hot' events whose files are elsewhere
    a.spill.ledger.regions["hot"] = [n, 0, 0]
    a.spill.ledger.rebuild["hot"] = n
    a.book.next_offset = 10_000
    for i in range(5000):  # the replay so far re-spilled 5000 of them
        a.spill.rebuild_add("hot", i, 1_700_000_000_000, None)
    a.spill.rebuild_flush(done=False)
    rebuilt = a.spill.total_bytes()
    limit = rebuilt // 8  # the rebuilt bytes alone are far over it
    throttle = Throttle(RateLimits(0, "b=1"), limit, m)
    batch, _ = throttle.limit(b, [("b", 1_000, None)] * 2000, list(range(2000)), parts)
    assert b.spill.total_bytes() >= limit and throttle.hold  # partition 1's spill crosses the bound
    throttle.limits = RateLimits(0, "")  # partition 1's spill drains
    for p in (a, b):
        throttle.drain(p, 2_000)
        p.spill.acked()
    throttle.report(parts)
    assert b.spill.ledger.total_backlog() == 0 and a.spill.ledger.rebuild == {"hot": 1000}
    assert not throttle.hold  # fetching resumes: the rebuild can end
    assert value(m, "clickstream_backpressure") == 0


def _other_spill_then_rebuild(tmp_path, first_cap, fresh_cap, spill_all=False):
    """``eu`` events over the rate spilled under what ``first_cap`` named them; the spill is
    lost and a new owner re-reads them with a worker cap like ``fresh_cap``."""
    m = Metrics()
    books = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000,
                         max_regions=1)
    parts = Partitions(books, tmp_path / "a", lambda p: None, m)
    p = parts.open(0)
    throttle = Throttle(RateLimits(2, None), 1 << 30, m)  # AGG_RATE_LIMIT=2
    if spill_all:  # none counted: the window book does not know the region
        throttle.limits.take("eu", 2, time.monotonic())
    recs = fetched([(b"eu", b'{"region": "eu", "ingest_ts": %d}' % (1_000 + i), []) for i in range(8)], base=100)
    events, offsets, *_ = RecordDecoder(1, first_cap).decode(recs, 0, 0, True, None, 10**15)
    batch, _ = throttle.limit(p, events, offsets, parts)
    p.book.apply(batch, 108, 2_000)
    spilled = dict(p.spill.ledger.regions)
    other = Partitions(books, tmp_path / "b", recovered(0, p.state_value()), m)
    q = other.open(0)
    fresh_cap.hold(q.book.last_seen, 3_000)
    before = dict(fresh_cap.seen)
    rebuild_replay(q, RecordDecoder(1, fresh_cap), recs, q.book.next_offset, 3_000, 10**15)
    assert fresh_cap.seen == before  # the replay takes no place in the live cap
    return spilled, q


def test_a_rebuild_finds_events_spilled_as_other_though_the_cap_names_them_now(tmp_path):
    from aggregator.core.contract import OTHER_REGION
    from aggregator.core.regioncap import RegionCap
    full = RegionCap(1, 3_600_000)
    full.admit("us", 0)  # the cap is full: "eu" is __other__
    spilled, q = _other_spill_then_rebuild(tmp_path, full, RegionCap(1, 3_600_000))
    assert set(spilled) == {OTHER_REGION}
    assert q.spill.lost == 0 and not q.spill.ledger.rebuild
    assert q.spill.ledger.backlog(OTHER_REGION) == q.spill.store.backlog(OTHER_REGION) == 6
    assert [e[0] for e in q.spill.drain(RateLimits(0), 0.0, unlimited=True)] == [OTHER_REGION] * 6


def test_a_rebuild_finds_events_spilled_by_name_though_the_cap_is_full_now(tmp_path):
    from aggregator.core.regioncap import RegionCap
    full = RegionCap(1, 3_600_000)
    full.admit("us", 0)  # after the restart the cap is full: the live cap would say __other__
    spilled, q = _other_spill_then_rebuild(tmp_path, RegionCap(1, 3_600_000), full, spill_all=True)
    assert set(spilled) == {"eu"}
    assert q.spill.lost == 0 and not q.spill.ledger.rebuild
    assert q.spill.ledger.backlog("eu") == q.spill.store.backlog("eu") == 8


def _first_pass_then_rebuild(tmp_path, ids: list[str]) -> tuple[object, object, Metrics]:
    """``eu`` events with ``ids`` at offsets 100..., one token (the first is counted, the
    rest spilled), dedup on as the worker applies it; then the spill is lost and a new owner
    rebuilds it from the records."""
    books = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000,
                         max_regions=10, dedup_ms=600_000)
    m = Metrics()
    parts = Partitions(books, tmp_path / "a", lambda p: None, m)
    p = parts.open(0)
    throttle = Throttle(RateLimits(0, "eu=1"), 1 << 30, m)
    specs = [(b"eu", b'{"region": "eu", "ingest_ts": %d, "event_id": "%s"}' % (1_000 + i, e.encode()), [])
             for i, e in enumerate(ids)]
    recs = fetched(specs, base=100)
    events, offsets, _, _, dids, _ = RecordDecoder().decode(recs, 0, 0, True, None, 10**15)
    kept, kept_offsets, _, _ = p.dedup.filter(events, dids, offsets)
    batch, _ = throttle.limit(p, kept, kept_offsets or [], parts)
    p.book.apply(batch, 100 + len(ids), 2_000)
    other = Partitions(books, tmp_path / "b", recovered(0, p.state_value()), m)
    q = other.open(0)
    rebuild_replay(q, RecordDecoder(), recs, q.book.next_offset, 3_000, 10**15)
    return p, q, m


def test_a_rebuild_leaves_out_repeats_the_first_pass_dropped(tmp_path):
    p, q, m = _first_pass_then_rebuild(tmp_path, ["a", "b", "b", "c", "c"])
    assert p.spill.ledger.total_backlog() == 2  # b and c; their repeats were dropped
    assert not q.spill.ledger.rebuild
    drained = q.spill.drain(RateLimits(0), 0.0, unlimited=True)
    assert [its for _, its, _ in drained] == [1_001, 1_003]  # b, c: each once, the first sighting
    assert q.spill.excess == 0 and q.spill.lost == 0


def test_a_rebuild_that_reads_more_than_was_spilled_keeps_the_count_and_says_so(tmp_path):
    # offset 103 repeats "a", counted before the rebuilt range: the rebuild cannot tell
    p, q, m = _first_pass_then_rebuild(tmp_path, ["a", "b", "c", "a"])
    assert p.spill.ledger.total_backlog() == 2
    drained = q.spill.drain(RateLimits(0), 0.0, unlimited=True)
    assert len(drained) == 2 and q.spill.excess == 1 and q.spill.lost == 0
    parts = Partitions(BOOKS, tmp_path / "c", lambda n: None, m)
    parts.owned[0] = q
    parts.report()  # the fault goes to the metric, once
    parts.report()
    assert value(m, "clickstream_spill_faults_total", kind="excess") == 1
    assert value(m, "clickstream_spill_faults_total", kind="lost") == 0


def _aggregated_spill(tmp_path, lose_the_disk: bool) -> dict:
    """Four ``eu`` events of four users and URLs, produced straight to Kafka, one token: three
    spilled, then drained (after the spill is rebuilt from the records, ``lose_the_disk``);
    -> the window's snapshot."""
    from aggregator.core.sketches import SketchParams

    books = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000,
                         max_regions=10, sketches=SketchParams())
    m = Metrics()
    parts = Partitions(books, tmp_path / "a", lambda p: None, m)
    p = parts.open(0)
    throttle = Throttle(RateLimits(0, "eu=1"), 1 << 30, m)
    t0 = 1_700_000_040_000
    specs = [(b"eu", b'{"region": "eu", "ingest_ts": %d, "ts": %d, "user_id": "u%d", "url": "https://x.io/p%d"}'
              % (t0 + i, t0 + i - 50 * (i + 1), i, i), []) for i in range(4)]
    recs = fetched(specs, base=100)
    decoder = RecordDecoder(aggregates=True)
    events, offsets, _, _, _, aggs = decoder.decode(recs, t0, 0, True, None, 10**15)
    batch, counted = throttle.limit(p, events, offsets, parts, aggs)
    assert counted == 1
    p.book.apply(batch, 104, t0, aggs)
    if lose_the_disk:
        other = Partitions(books, tmp_path / "b", recovered(0, p.state_value()), m)
        p = other.open(0)
        rebuild_replay(p, RecordDecoder(aggregates=True), recs, p.book.next_offset, t0, 10**15)
    p.spill.acked()
    throttle.limits = RateLimits(0, "")
    throttle.drain(p, t0)
    assert p.spill.ledger.total_backlog() == 0
    p.book.advance_to(t0 + 60_000 + 2_000)
    (snap,) = [s for s in p.book.outbox if s["region"] == "eu"]
    return snap


def test_spilled_events_add_their_aggregates_when_drained(tmp_path):
    snap = _aggregated_spill(tmp_path / "a", False)
    assert snap["count"] == 4 and snap["unique_users"] == 4
    assert sorted(u["url"] for u in snap["top_urls"]) == [f"https://x.io/p{i}" for i in range(4)]
    assert snap["client_delay_ms"]["p99"] >= 140  # of the delays 50..200 ms, not of the first (50) alone
    # rebuilt from the records: the three spilled events bring theirs again.  (This harness
    # recovers the state's chunks, not its aggregates records, so the counted event's user
    # and URL are not in the new owner's cell; the worker reads those from the changelog.)
    snap = _aggregated_spill(tmp_path / "b", True)
    assert snap["count"] == 4 and snap["unique_users"] == 3
    assert sorted(u["url"] for u in snap["top_urls"]) == [f"https://x.io/p{i}" for i in range(1, 4)]


def test_a_drain_of_gaps_alone_marks_the_state_to_be_written(tmp_path):
    """Spilled events of a log that started over before they could be re-read are gaps: a
    drain of nothing but gaps counts no event, yet moves the ledger (and counts them lost):
    the state must be written, or a crash would count them lost again."""
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path / "a", lambda p: None, m)
    p = parts.open(0)
    throttle = Throttle(RateLimits(0, "eu=1"), 1 << 30, m)
    events = [("eu", 1_000 + i, None) for i in range(5)]
    batch, _ = throttle.limit(p, events, list(range(10, 15)), parts)
    p.book.apply(batch, 15, 2_000)
    q = Partitions(BOOKS, tmp_path / "b", recovered(0, p.state_value()), m).open(0)  # the spill is lost
    assert q.spill.ledger.rebuild == {"eu": 4}
    assert q.spill.log_restarted() == 0  # the log starts over before any was re-read: 4 gaps, no event
    q.book.dirty = False
    throttle.limits = RateLimits(0, "")
    throttle.drain(q, 3_000)
    assert q.spill.ledger.total_backlog() == 0 and q.spill.lost == 4
    assert q.book.dirty


def test_a_spill_disk_that_refuses_does_not_keep_quiet_partitions_from_being_opened():
    """/readyz says the disk refuses; the tick still opens assigned partitions with nothing
    new to read (their open windows must close and publish): only a failing checkpoint, a
    rebalance or a recovery stops that (WorkerService._sync_assignment)."""
    from types import SimpleNamespace

    from aggregator.spill.partition import SpillDiskError
    from aggregator.worker.service import WorkerService

    throttle = Throttle(RateLimits(0, ""), 1 << 30, Metrics())
    throttle.open_failed(2, SpillDiskError("open", 2, "", OSError(28, "No space left on device")))
    w = SimpleNamespace(started=True, kafka=SimpleNamespace(recovered=lambda: True, refused=lambda: None),
                        app=SimpleNamespace(rebalancing=False),
                        checkpointer=SimpleNamespace(failing=None), throttle=throttle,
                        partitions=SimpleNamespace(refusal=lambda: None))
    assert WorkerService.not_ready(w).startswith("spill disk full: ")  # type: ignore[arg-type]
    assert WorkerService.not_ready(w, refusals=False) is None  # type: ignore[arg-type]
    w.checkpointer.failing = "window state writes failing: x"
    assert WorkerService.not_ready(w, refusals=False) == "window state writes failing: x"  # type: ignore[arg-type]
