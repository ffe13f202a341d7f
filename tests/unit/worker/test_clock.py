"""When a quiet, caught-up partition's stream time follows the wall clock."""
from __future__ import annotations

import pytest

from aggregator.core.windows import WindowBook
from aggregator.worker.clock import (
    ADVANCE_IDLE_MS,
    ADVANCE_SLACK_MS,
    CAUGHT_UP_IDLE_MS,
    SKEW_SPAN_MS,
    ClockSkew,
    advance_target,
)

NOW = 1_000_000


@pytest.mark.parametrize(("last", "highwater", "seen", "read_to", "fetching", "expected"), [
    (None, 10, NOW - 50, 10, True, NOW - 50 - ADVANCE_SLACK_MS),    # assigned, nothing new, caught up
    (NOW - ADVANCE_IDLE_MS, 10, NOW, 10, True, NOW - ADVANCE_SLACK_MS),  # quiet long enough
    (NOW - ADVANCE_IDLE_MS + 1, 10, NOW, 10, True, None),           # a record just arrived: stream time rules
    (NOW - 10_000, 11, NOW, 10, True, None),                        # lag: the backlog decides, not the clock
    (NOW - 10_000, 3, NOW, 10, True, None),                         # the log ends below the state: started over
    (NOW - 10_000, 10, NOW, 10, False, None),                       # not fetching (backpressure, rebalance)
    # the last answered fetch was sent before the worker stood still for 9 s: caught up as of then only
    (NOW - 10_000, 10, NOW - 9_000, 10, True, NOW - 9_000 - ADVANCE_SLACK_MS),
    (NOW - 10_000, 10, NOW + 5, 10, True, NOW - ADVANCE_SLACK_MS),  # a clock stepped back: never past now
    (NOW - CAUGHT_UP_IDLE_MS, None, None, 10, True, NOW - ADVANCE_SLACK_MS),   # end unknown, idle: caught up
    (NOW - CAUGHT_UP_IDLE_MS, None, NOW - 9_000, 10, True, NOW - 9_000 - ADVANCE_SLACK_MS),  # ... as of the fetch
    (NOW - CAUGHT_UP_IDLE_MS + 1, None, NOW, 10, True, None),       # end unknown, not idle long enough
    (None, None, None, 0, True, None),                              # nothing known at all
])
def test_advance_target(last, highwater, seen, read_to, fetching, expected):
    assert advance_target(NOW, last, highwater, seen, read_to, fetching) == expected


def test_a_rebalance_that_lasts_is_timed_and_warned_of_every_period():
    from aggregator.worker.clock import RebalanceWatch

    w = RebalanceWatch(30.0)
    assert w.observe(False, 100.0) == (0.0, False)
    seen = [w.observe(True, t) for t in (200.0, 210.0, 229.5, 230.0, 259.5, 260.0)]
    assert seen == [(0.0, False), (10.0, False), (29.5, False), (30.0, True), (59.5, False), (60.0, True)]
    assert w.observe(False, 261.0) == (0.0, False) and w.since is None
    assert w.observe(True, 300.0) == (0.0, False)  # a new rebalance starts its own clock
    assert w.observe(True, 329.0) == (29.0, False) and w.lasted(330.0) == 30.0


def test_a_rebalance_is_stalled_only_after_stall_s_without_progress():
    from aggregator.worker.clock import RebalanceWatch

    w = RebalanceWatch(30.0, stall_s=600.0)
    assert w.stalled(0.0) is None  # no rebalance
    w.observe(True, 0.0, (5, 1000))
    w.observe(True, 500.0, (5, 400))  # changelog records recovered: progress
    assert w.stalled(1099.0) is None and w.stalled(1100.0) == 600.0
    w.observe(True, 1100.0, (6, 400))  # a new generation: progress too
    assert w.stalled(1699.0) is None
    w.observe(True, 1650.0, (6, 400))  # the same marker: no progress
    assert w.stalled(1700.0) == 600.0
    w.observe(False, 1701.0, (6, 400))  # it ended: no stall
    assert w.stalled(5000.0) is None
    w.observe(True, 5000.0, (6, 400))  # a new rebalance counts from its own start
    assert w.stalled(5599.0) is None and w.stalled(5600.0) == 600.0
    never = RebalanceWatch(30.0)  # stall_s 0: never stalled
    never.observe(True, 0.0)
    assert never.stalled(10**9) is None


def test_a_stall_is_reported_once_a_rebalance():
    from aggregator.worker.clock import RebalanceWatch

    w = RebalanceWatch(30.0, stall_s=10.0)
    w.track(True, 0.0, (1, 5))
    assert w.first_stall_report() and not w.first_stall_report()
    w.track(True, 5.0, (1, 5))  # the same rebalance: already told
    assert not w.first_stall_report()
    w.track(False, 6.0)
    w.track(True, 7.0, (2, 5))  # a new one is told again
    assert w.first_stall_report()


HOUR = 3_600_000
REAL = 1_700_000_000_000 // SKEW_SPAN_MS * SKEW_SPAN_MS  # the start of a span


def test_a_clock_ahead_is_taken_once_two_spans_saw_it_and_dropped_at_the_first_fresh_record():
    skew = ClockSkew(5_000)
    skew.observe(REAL + HOUR + 10, REAL)  # newest record stamped an hour before this clock
    assert skew.ahead_ms == 0  # one span: maybe a replay of old records
    skew.observe(REAL + HOUR + 20_000, REAL + 19_995)
    assert skew.ahead_ms == 0
    skew.observe(REAL + HOUR + SKEW_SPAN_MS + 5, REAL + SKEW_SPAN_MS)  # the next span: still an hour
    assert skew.ahead_ms == HOUR + 5  # the least lag of both spans
    skew.observe(REAL + HOUR + 3 * SKEW_SPAN_MS, REAL + 3 * SKEW_SPAN_MS + 100)  # a batch a minute: still seen
    assert skew.ahead_ms == HOUR - 100
    skew.observe(REAL + 6 * SKEW_SPAN_MS, REAL + 6 * SKEW_SPAN_MS - 40)  # the clock set right: a fresh record
    assert skew.ahead_ms == 0


def test_a_lead_is_seen_at_a_batch_a_minute_and_kept_while_nothing_is_read():
    skew = ClockSkew(5_000)
    for minute in range(3):  # spans 0, 2, 4: never two in a row
        t = REAL + minute * 60_000
        skew.observe(t + HOUR, t)
    assert skew.ahead_ms == HOUR
    assert skew.spans and max(skew.spans) - min(skew.spans) < 4  # the last four spans only
    # nothing read for an hour: the lead stays (dropping it would close quiet windows early)
    assert skew.ahead_ms == HOUR


def test_old_records_once_then_fresh_ones_are_not_a_clock_ahead():
    skew = ClockSkew(5_000)
    skew.observe(REAL, REAL - HOUR)  # a replay's old records
    skew.observe(REAL + SKEW_SPAN_MS + 3, REAL + SKEW_SPAN_MS)  # then fresh ones
    assert skew.ahead_ms == 0
    skew.observe(REAL + 2 * SKEW_SPAN_MS, REAL + 2 * SKEW_SPAN_MS - 4_000)  # latency within the tolerance
    assert skew.ahead_ms == 0


def test_windows_of_a_quiet_partition_follow_the_records_time_when_the_clock_is_ahead():
    """What the worker's tick does with the lead (``advance_to(target - ahead_ms)``): a
    clock an hour ahead closes no window early, and correctly stamped events after it are
    counted in their windows, not late."""
    skew = ClockSkew(5_000)
    skew.observe(REAL + HOUR, REAL - 2)
    skew.observe(REAL + HOUR + SKEW_SPAN_MS, REAL + SKEW_SPAN_MS - 2)
    book = WindowBook(60_000, 5_000, 300_000, HOUR)
    book.apply([("eu", REAL + SKEW_SPAN_MS, None)], 1, REAL + SKEW_SPAN_MS)
    now = REAL + HOUR + SKEW_SPAN_MS + 1_000  # this worker's clock
    target = advance_target(now, now - 1_000, 1, now - 100, 1, True)
    assert target is not None
    book.advance_to(target - skew.ahead_ms)
    assert book.outbox == []  # without the lead: sixty windows closed early
    book.apply([("eu", REAL + SKEW_SPAN_MS + 1_000 * i, None) for i in range(1, 11)], 11, now)
    assert sum(sum(c.values()) for c in book.counts.values()) == 11 and not book.late


def test_the_worker_watches_its_clock_on_live_batches_only(caplog):
    """Only a batch that reaches its partition's end after one that did too: a worker that
    starts reads the tails of its partitions, written maybe an hour ago, as first batches."""
    from types import SimpleNamespace

    from aggregator.worker.service import WorkerService
    from aggregator.worker.throttle import HeldBatch

    w = SimpleNamespace(kafka=SimpleNamespace(read_to=lambda partition, n: n,
                                              highwater=lambda partition: 100), clock_skew=ClockSkew(5_000),
                        max_ahead_ms=5_000)
    parts = [SimpleNamespace(partition=n, clock_live=False) for n in range(3)]

    def batch(end: int, its: int) -> HeldBatch:
        return HeldBatch([("eu", its, None)], [], {}, end, end_ts=its - 5)

    now = REAL + HOUR
    # the old tails of two partitions, in two spans: first batches, not live
    WorkerService._watch_clock(w, parts[0], batch(100, REAL), now)  # type: ignore[arg-type]
    WorkerService._watch_clock(w, parts[1], batch(100, REAL), now + SKEW_SPAN_MS)  # type: ignore[arg-type]
    assert w.clock_skew.ahead_ms == 0 and not w.clock_skew.spans
    # a partition behind its end: not live either
    WorkerService._watch_clock(w, parts[2], batch(50, REAL), now)  # type: ignore[arg-type]
    WorkerService._watch_clock(w, parts[2], batch(60, REAL), now + SKEW_SPAN_MS)  # type: ignore[arg-type]
    assert not w.clock_skew.spans
    # fresh records an hour behind this clock on a live partition, in two spans: ahead
    WorkerService._watch_clock(w, parts[0], batch(100, REAL + 2 * SKEW_SPAN_MS),  # type: ignore[arg-type]
                               now + 2 * SKEW_SPAN_MS)
    WorkerService._watch_clock(w, parts[0], batch(100, REAL + 3 * SKEW_SPAN_MS),  # type: ignore[arg-type]
                               now + 3 * SKEW_SPAN_MS)
    assert w.clock_skew.ahead_ms == HOUR
    assert [r for r in caplog.records if "clock is 3600.0 s ahead" in r.getMessage()]
