"""A stop that ends in time (docs/contract.md §3 "Shutdown").

On SIGTERM (or SIGINT) the process stops its parts in order (roles.py): the worker writes
its window state, commits and leaves the consumer group; ingest flushes its producer.  With
the broker away each of those waits for it: aiokafka's consumer keeps retrying the group
coordinator, mode gives the stuck consumer thread 60 s, then logs a traceback and goes on:
a stop of about a minute, past the 30 s Docker and Kubernetes wait before SIGKILL.

``StopBound`` ends it.  Armed by the first stop signal (or any stop of the mode Worker), a
daemon thread waits ``STOP_BOUND_S``; if the process is still there then, it logs one line
and ends at once with status ``EXIT_UNCLEAN_STOP`` (``os._exit``: no more Python code
runs, as under SIGKILL).  A stop that ends in time but did not leave the consumer group
(the broker away: nothing to leave it with) says so in the same one line, with the same
status; a clean stop exits 0 as before.

That is a crash, and it leaves nothing worse than the SIGKILL it comes before: spill
segments are append-only with a checked tail (spill/segment.py), cursors are replaced by
rename, the data-dir lock is a ``flock`` the kernel drops (dirlock.py); the window state
is in the changelog, and whoever owns the partitions next counts from the last checkpoint,
exactly once (tests/integration/test_crash.py, test_stop_outage.py)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("aggregator")

STOP_BOUND_S = 20.0    # from the stop signal to the exit, at most (below the usual 30 s grace)
EXIT_UNCLEAN_STOP = 3  # stopped on request, but not cleanly (docs/contract.md §3)
LAST_WORDS_S = 1.0     # how long the bound waits for its line before it exits anyway


class StopBound:
    """``arm(what)`` starts the clock (once; later calls do nothing): ``what`` names the
    signal.  If the process is still there ``bound_s`` later, the line ``why(...)`` makes
    is logged (unless one was said already: ``said``) and ``exit_fn`` ends the process."""

    def __init__(self, why: Callable[[str], str], bound_s: float = STOP_BOUND_S,
                 exit_fn: Callable[[int], Any] = os._exit) -> None:
        self.why = why
        self.bound_s = bound_s
        self.exit = exit_fn
        self.what = ""
        self.said = False
        self.signalled = False  # armed by a stop signal (not by a crash or an end of its own)
        self.done = False  # the stop has ended: what the process does after it is not bounded
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, what: str) -> None:
        with self._lock:
            if self.thread is not None:
                return
            self.what = what
            self.thread = threading.Thread(target=self._watch, name="stop-bound", daemon=True)
            self.thread.start()

    def disarm(self) -> None:
        with self._lock:
            self.done = True

    def say(self, line: Callable[[], str]) -> None:
        """Log ``line()``, unless a line was said already."""
        with self._lock:
            if self.said:
                return
            self.said = True
        log.error("%s", line())

    def _watch(self) -> None:
        time.sleep(self.bound_s)
        with self._lock:
            if self.done:
                return
        # the line from a thread of its own, given a second: a log handler stuck on a full
        # pipe (the main thread blocked in it, holding its lock) must not keep the exit waiting
        words = threading.Thread(target=self._last_words, name="stop-bound-line", daemon=True)
        words.start()
        words.join(LAST_WORDS_S)
        self.exit(EXIT_UNCLEAN_STOP)

    def _last_words(self) -> None:
        try:
            self.say(lambda: self.why(f"the stop had not ended {self.bound_s:g} s after {self.what}"))
            sys.stderr.flush()
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - the exit comes whatever the line did
            pass


def install(worker: Any, role: str, reachable: Callable[[], bool],
            not_left: Callable[[], str | None] | None = None, bound_s: float = STOP_BOUND_S) -> StopBound:
    """Bound the stop of the mode ``worker`` (``role``'s) and say how it ended.  The bound is
    armed by its first stop signal (``_schedule_shutdown``, SIGTERM and SIGINT alike) or when
    it stops for another reason (``stop_and_shutdown``, after a crash), and disarmed when
    the stop has ended.  When a stop on a signal has ended in time, a worker that did not
    leave its group (``not_left()``: why, "" when it
    left, None when it was no member; ``reachable()``: the broker's state) says so in one
    line and the process exits ``EXIT_UNCLEAN_STOP`` instead of 0."""
    def why(what: str) -> str:
        return unclean_line(role, what if reachable() else f"{what}; the broker is unreachable")

    bound = StopBound(why, bound_s)
    schedule, stop_and_shutdown = worker._schedule_shutdown, worker.stop_and_shutdown

    def on_signal(signum: Any) -> None:
        if bound.thread is None:  # a signal during a crash's stop leaves it the crash's (status 1)
            bound.signalled = True
        bound.arm(getattr(signum, "name", str(signum)))
        schedule(signum)

    def on_stop() -> None:
        bound.arm("the stop began")
        try:
            stop_and_shutdown()  # raises the reason of a crash: the stop is a crash's then
        finally:
            bound.disarm()  # it ended in time: what follows (the embedded broker's stop) is not cut off
        if not_left is None or not bound.signalled:
            return  # ingest: only the bound; a crash, or an end of its own: mode's status stands
        reason = not_left()
        if reason == "" or (reason is None and reachable()):
            return  # it left the group, or was no member (and not for want of a broker)
        bound.say(lambda: unclean_line(role, reason or "the broker is unreachable"))
        raise SystemExit(EXIT_UNCLEAN_STOP)

    worker._schedule_shutdown = on_signal
    worker.stop_and_shutdown = on_stop
    return bound


def unclean_line(role: str, why: str) -> str:
    """The one line of a stop that did not end cleanly, for ``role``."""
    if role == "ingest":
        return (f"stopped without flushing the ingest producer ({why}); exit status {EXIT_UNCLEAN_STOP}: records "
                "of requests not yet answered were not acknowledged, and their clients send them again")
    return (f"stopped without leaving the consumer group cleanly ({why}); exit status {EXIT_UNCLEAN_STOP}: as after "
            "a crash, the group gives this worker's partitions to the others after AGG_SESSION_TIMEOUT, and they "
            "count from the window state in the changelog, exactly once")
