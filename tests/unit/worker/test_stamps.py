"""What the worker reads of aiokafka's group coordinator for the checkpoint's fence
(``stamps.not_member``); the fence against a worker that really stood still (SIGSTOP)
beside another runs in tests/integration/test_worker_stall.py."""
from __future__ import annotations

from types import SimpleNamespace

from aggregator.worker.stamps import not_member

SESSION = 6.0


def consumer(generation: int = 3, member_id: str = "m-1", seen: float | None = 100.0) -> SimpleNamespace:
    coordinator = SimpleNamespace(generation=generation, member_id=member_id)
    if seen is not None:
        coordinator.member_seen = seen  # the send time of the last heartbeat or join answered
    return SimpleNamespace(_coordinator=coordinator)


def test_a_member_with_a_heartbeat_answered_within_half_the_session_may_write():
    assert not_member(consumer(), SESSION, 100.0 + SESSION / 2) is None


def test_half_a_session_without_an_answer_holds_the_writes():
    why = not_member(consumer(), SESSION, 100.0 + SESSION / 2 + 0.1)
    assert why is not None and why.startswith("no heartbeat answered for 3.1 s")


def test_a_member_the_coordinator_dropped_holds_its_writes_at_once():
    for c in (consumer(generation=-1, member_id=""), consumer(member_id="")):
        why = not_member(c, SESSION, 100.5)
        assert why is not None and "dropped" in why


def test_a_consumer_that_never_was_a_member_is_not_held():
    # before its first join (or with no group at all) it has written nothing to hold
    assert not_member(consumer(generation=-1, member_id="", seen=None), SESSION, 1e9) is None
    assert not_member(SimpleNamespace(), SESSION, 1e9) is None
