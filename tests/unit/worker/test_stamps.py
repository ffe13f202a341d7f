"""What the worker reads of aiokafka's group coordinator for the checkpoint's fence
(``stamps.not_member``); the fence against a worker that really stood still (SIGSTOP)
beside another runs in tests/integration/test_worker_stall.py."""
from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import GroupCoordinatorNotAvailableError, NodeNotReadyError

from aggregator.worker.stamps import member_clock, not_left, not_member

SESSION = 6.0


def consumer(generation: int = 3, member_id: str = "m-1", seen: float | None = 100.0) -> SimpleNamespace:
    coordinator = SimpleNamespace(generation=generation, member_id=member_id)
    if seen is not None:
        coordinator.member_seen = seen  # the send time of the last heartbeat or join answered
    return SimpleNamespace(_coordinator=coordinator)


def test_a_member_with_a_heartbeat_answered_within_half_the_session_may_write():
    assert not_member(consumer(), SESSION, 100.0 + SESSION / 2) is None


def test_half_a_session_without_an_answer_holds_the_writes():
    said = not_member(consumer(), SESSION, 100.0 + SESSION / 2 + 0.1)
    assert said is not None and said[0] == logging.WARNING and said[1].startswith("no heartbeat answered for 3.1 s")


def test_a_member_the_coordinator_dropped_holds_its_writes_at_once():
    for c in (consumer(generation=-1, member_id=""), consumer(member_id="")):
        said = not_member(c, SESSION, 100.5)
        assert said is not None and said[0] == logging.ERROR and "dropped" in said[1]


def test_a_consumer_that_never_was_a_member_is_not_held():
    # before its first join (or with no group at all) it has written nothing to hold
    assert not_member(consumer(generation=-1, member_id="", seen=None), SESSION, 1e9) is None
    assert not_member(SimpleNamespace(), SESSION, 1e9) is None


def test_a_worker_leaving_its_group_holds_its_writes_quietly():
    """Found by a review: at a shutdown aiokafka leaves the group (LeaveGroup resets the
    member) before the worker's ticks stop, and a tick between said "dropped" at error level
    and counted a fence on every deploy.  The partitions are another's all the same, so the
    writes are held, said at info level."""
    c = consumer(generation=-1, member_id="")
    loop = asyncio.new_event_loop()
    try:
        c._coordinator._closing = loop.create_future()
        c._coordinator._closing.set_result(None)
        assert not_member(c, SESSION, 100.5) == (logging.INFO, "this worker is leaving its group (shutting down)")
    finally:
        loop.close()


def test_the_member_clock_counts_a_suspended_machine_s_sleep():
    # CLOCK_BOOTTIME where there is one (Linux): a suspend past the session is not "recent"
    assert abs(member_clock() - time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))) < 1.0


# ---------------------------------------------------------------- the consumer's stop
class _Client:
    async def send(self, node_id, request, **kwargs):
        raise NodeNotReadyError(f"node {node_id} is not ready")


def _fetcher(closed: bool) -> SimpleNamespace:
    return SimpleNamespace(_client=_Client(), _retry_backoff=5.0, _closed=closed,
                           _invalidate_preferred_read_replica_for_node=lambda node_id, request: None)


async def _cancelled_in_its_retry_sleep(fetcher: SimpleNamespace) -> object:
    task = asyncio.ensure_future(Fetcher._proc_fetch_request(fetcher, None, 1, SimpleNamespace(topics=[])))
    await asyncio.sleep(0.05)  # the fetch failed (the broker away): aiokafka sleeps its retry backoff
    assert not task.done()
    task.cancel()
    return await task


async def test_a_fetch_cancelled_by_the_fetcher_s_close_returns_as_aiokafka_expects():
    """Found by a review: with the broker gone, Fetcher.close() cancelled a fetch sleeping
    after its failure and awaited it; the CancelledError came out of the consumer's stop and
    killed Faust's consumer thread without a word to mode, which waited 60 s for it."""
    assert await _cancelled_in_its_retry_sleep(_fetcher(closed=True)) is False


async def test_a_fetch_cancelled_otherwise_is_still_cancelled():
    with pytest.raises(asyncio.CancelledError):
        await _cancelled_in_its_retry_sleep(_fetcher(closed=False))


class _Coordinator:
    def __init__(self, generation: int, fail: bool) -> None:
        self.generation, self.member_id, self.group_id = generation, "m-1", "g"
        self._group_instance_id = None
        self.fail, self.sent, self.reset = fail, [], False

    async def _send_req(self, request):
        self.sent.append(request)
        if self.fail:
            raise GroupCoordinatorNotAvailableError()

    def reset_generation(self):
        self.reset = True


async def test_whether_the_consumer_left_its_group_is_kept():
    assert not_left(SimpleNamespace(_coordinator=_Coordinator(3, False))) is None  # not closed yet
    for generation, fail, said in [(3, False, ""), (3, True, "its LeaveGroup request failed: "
                                                               "GroupCoordinatorNotAvailableError"), (-1, False, None)]:
        c = _Coordinator(generation, fail)
        await GroupCoordinator._maybe_leave_group(c)
        assert c.reset and len(c.sent) == (generation > 0)
        assert not_left(SimpleNamespace(_coordinator=c)) == said
