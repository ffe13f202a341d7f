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
    (NOW - 10_000, 10, 10, False, None),                           # not fetching (backpressure, rebalance)
    (NOW - CAUGHT_UP_IDLE_MS, None, 10, True, NOW - ADVANCE_SLACK_MS),   # end unknown, idle: caught up
    (NOW - CAUGHT_UP_IDLE_MS + 1, None, 10, True, None),           # end unknown, not idle long enough
    (None, None, 0, True, None),                                   # nothing known at all
])
def test_advance_target(last, highwater, next_offset, fetching, expected):
    assert advance_target(NOW, last, highwater, next_offset, fetching) == expected
