"""When a partition's stream time may follow the wall clock (docs/contract.md §1).  Pure.

A quiet, caught-up partition's stream time follows the wall clock minus a slack
(records still in flight), so its windows close about grace + slack + one tick after
their end instead of waiting for its next record.  A partition that receives records
keeps pure stream time; nothing advances while the consumer is not fetching
(backpressure, rebalance): the end offset it knows is stale then.
"""
from __future__ import annotations

ADVANCE_SLACK_MS = 300  # wall clock minus this: records produced just before may still be in flight
ADVANCE_IDLE_MS = 300  # no record for this long: the partition is quiet
CAUGHT_UP_IDLE_MS = 1000  # end offset unknown: no record for this long counts as caught up


def advance_target(now_ms: int, last_record_ms: int | None, highwater: int | None, next_offset: int,
                   fetching: bool) -> int | None:
    """The stream time to advance the partition to, or None to leave it.

    ``last_record_ms``: wall time of its last fetched batch (None: none since assignment);
    ``highwater``: its end offset as of the last fetch (None: not known yet);
    ``next_offset``: the first offset its state has not applied."""
    if not fetching:
        return None
    quiet = last_record_ms is None or now_ms - last_record_ms >= ADVANCE_IDLE_MS
    if not quiet:
        return None
    if highwater is not None:
        caught_up = highwater <= next_offset
    else:
        caught_up = last_record_ms is not None and now_ms - last_record_ms >= CAUGHT_UP_IDLE_MS
    return now_ms - ADVANCE_SLACK_MS if caught_up else None
