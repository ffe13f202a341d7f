"""When a quiet, caught-up partition's stream time follows the wall clock."""
from __future__ import annotations

import pytest

from aggregator.worker.clock import ADVANCE_IDLE_MS, ADVANCE_SLACK_MS, CAUGHT_UP_IDLE_MS, advance_target

NOW = 1_000_000


@pytest.mark.parametrize(("last", "highwater", "next_offset", "fetching", "expected"), [
    (None, 10, 10, True, NOW - ADVANCE_SLACK_MS),                 # assigned, nothing new, caught up
    (NOW - ADVANCE_IDLE_MS, 10, 10, True, NOW - ADVANCE_SLACK_MS),  # quiet long enough
    (NOW - ADVANCE_IDLE_MS + 1, 10, 10, True, None),               # a record just arrived: stream time rules
    (NOW - 10_000, 11, 10, True, None),                            # lag: the backlog decides, not the clock
    (NOW - 10_000, 3, 10, True, None),                             # the log ends below the state: started over
    (NOW - 10_000, 10, 10, False, None),                           # not fetching (backpressure, rebalance)
    (NOW - CAUGHT_UP_IDLE_MS, None, 10, True, NOW - ADVANCE_SLACK_MS),   # end unknown, idle: caught up
    (NOW - CAUGHT_UP_IDLE_MS + 1, None, 10, True, None),           # end unknown, not idle long enough
    (None, None, 0, True, None),                                   # nothing known at all
])
def test_advance_target(last, highwater, next_offset, fetching, expected):
    assert advance_target(NOW, last, highwater, next_offset, fetching) == expected


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
