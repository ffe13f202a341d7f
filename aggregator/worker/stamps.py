"""When what the worker's consumer knows was true, stamped where aiokafka learns it (its
fetch and group-coordinator answers, patched here as consumer.py patches its record
classes; both run in the consumer's thread):

* ``end_seen``: a partition's end offset and when the fetch that reported it was sent
  (wall ms): the log held every record appended before then below that end.  A quiet
  partition's stream time follows the wall clock only up to there (worker/clock.py).
* ``not_member``: whether the group may have given this worker's partitions to another,
  from when the last request the coordinator answered as this member's was sent (a
  heartbeat, a SyncGroup; on a clock that counts suspend).  The coordinator drops a member a session timeout
  after the last heartbeat it received, so a member that saw one answered within half the
  session has at least the other half before another worker is given its partitions (and
  more: that worker must still join and recover).  The checkpoint's fence
  (checkpoint.Checkpointer) writes nothing while it says so.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.consumer import fetcher as _fetcher
from aiokafka.consumer import group_coordinator as _group
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import TopicPartition

log = logging.getLogger("aggregator.worker")

_aiokafka_proc_fetch_request = _fetcher.Fetcher._proc_fetch_request


async def _proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> Any:
    """aiokafka's, then each partition the answer gave an end offset is stamped with that end
    and with when the request was sent (``end_seen``, read by :func:`end_seen`): the log held
    every record appended before then below that end.  A quiet partition's stream time may
    follow the wall clock only up to there (worker/clock.py): the time of the answer would not
    do for a process that stood still (SIGSTOP, a paused VM) with an answer of before unread."""
    sent_ms = int(time.time() * 1000)
    try:
        done = await _aiokafka_proc_fetch_request(self, assignment, node_id, request)
    except asyncio.CancelledError:
        if not self._closed:
            raise
        # aiokafka 0.14's Fetcher.close() cancels and awaits each fetch, expecting False back
        # (as aiokafka's own handler for a cancelled send gives); one cancelled in its sleep
        # after a failed fetch (the broker away) raised instead, out of the consumer's stop:
        # Faust's consumer thread died without a word to mode, which waited 60 s for it
        return False
    for topic, partitions in request.topics:
        for partition, *_ in partitions:
            state = assignment.state_value(TopicPartition(topic, partition))
            # aiokafka stamps ``timestamp`` where it takes the end offset from this answer
            if state is not None and state.timestamp is not None and state.timestamp >= sent_ms:
                state.end_seen = (state.highwater, sent_ms)
    return done


_fetcher.Fetcher._proc_fetch_request = _proc_fetch_request


_aiokafka_do_heartbeat = _group.GroupCoordinator._do_heartbeat
_aiokafka_sync_group = _group.CoordinatorGroupRebalance._send_sync_group_request


def member_clock() -> float:
    """Seconds on a clock that counts a suspended machine's sleep too (CLOCK_BOOTTIME where
    there is one): a worker suspended past its session must not find its last heartbeat
    recent."""
    return time.clock_gettime(_CLOCK)


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


async def _do_heartbeat(self: Any) -> Any:
    sent = member_clock()
    ok = await _aiokafka_do_heartbeat(self)
    if ok:  # also "rebalance in progress": the member stays while it rejoins
        self.member_seen = sent
    return ok


async def _send_sync_group_request(self: Any, request: Any) -> Any:
    sent = member_clock()
    assignment = await _aiokafka_sync_group(self, request)
    if assignment is not None:
        coordinator = self._coordinator
        coordinator.member_seen = sent
        # and a heartbeat at once: aiokafka's first comes a heartbeat interval after the join,
        # and a SyncGroup can wait seconds for the group's leader, which would leave the
        # member's last answer older than the fence allows (a false hold at every rebalance)
        task = asyncio.ensure_future(_first_heartbeat(coordinator))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
    return assignment


_pending: set[asyncio.Future[Any]] = set()  # the heartbeats above, referenced until done


async def _first_heartbeat(coordinator: Any) -> None:
    try:
        await coordinator._do_heartbeat()  # errors (a new rebalance, a reset member) handled there
    except Exception as exc:  # noqa: BLE001 - the routine's own heartbeats report what persists
        log.debug("the heartbeat after a join failed: %r", exc)


async def _maybe_leave_group(self: Any) -> None:
    """aiokafka's ``_maybe_leave_group`` (the same one attempt, at close or after
    max.poll.interval idle), with how it went kept on the coordinator for :func:`not_left`:
    aiokafka logged a failure and went on, and a stop that had not left the group said so
    nowhere (with the broker away, in one traceback-free line now: roles.py)."""
    if self.generation > 0 and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except KafkaError as err:
            self.not_left = f"its LeaveGroup request failed: {type(err).__name__}"
        else:
            self.not_left = ""
    else:
        self.not_left = None
    self.reset_generation()


_group.GroupCoordinator._do_heartbeat = _do_heartbeat
_group.CoordinatorGroupRebalance._send_sync_group_request = _send_sync_group_request
_group.GroupCoordinator._maybe_leave_group = _maybe_leave_group


def not_left(consumer: Any) -> str | None:
    """Why the consumer, closed, did not leave its group ("": it left; None: it was no
    member then, or has not closed)."""
    return getattr(getattr(consumer, "_coordinator", None), "not_left", None)


def not_member(consumer: Any, session_s: float, now: float) -> tuple[int, str] | None:
    """Why the group may have given this consumer's partitions to another, with the log
    level to say it at (None: it cannot have, or the consumer never was a member): it is
    leaving its group (a shutdown: info), the coordinator said it no longer knows it
    (error), or no heartbeat was answered for over half the session timeout (warning;
    ``now``: ``member_clock()``)."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    seen = getattr(coordinator, "member_seen", None)
    if seen is None:
        return None
    closing = getattr(coordinator, "_closing", None)
    if closing is not None and closing.done():
        return logging.INFO, "this worker is leaving its group (shutting down)"
    if coordinator.generation < 0 or coordinator.member_id == "":  # reset_generation(): dropped
        return logging.ERROR, "the group dropped this worker (AGG_SESSION_TIMEOUT passed without a heartbeat): it rejoins"
    if now - seen > session_s / 2:
        return logging.WARNING, (f"no heartbeat answered for {now - seen:.1f} s, over half AGG_SESSION_TIMEOUT "
                                 f"({session_s:g} s): the group may have given this worker's partitions to another")
    return None


def end_seen(consumer: Any, tp: Any) -> tuple[int | None, int] | None:
    """``tp``'s end offset as of the last fetch answered for it (None: the broker gave none)
    and when that fetch was sent (wall ms); None: no fetch answered since it was assigned."""
    subscription = consumer._subscription.subscription
    state = None if subscription is None else subscription.assignment.state_value(tp)
    seen = getattr(state, "end_seen", None)
    if seen is None:
        return None
    end, sent_ms = seen
    return (None if end is None or end < 0 else int(end)), sent_ms
