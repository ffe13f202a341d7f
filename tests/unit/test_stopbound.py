"""A stop that ends in time (aggregator/stopbound.py): with the broker gone a worker's stop
took about a minute, past the 30 s grace of Docker and Kubernetes, and ended in tracebacks;
now it ends within STOP_BOUND_S, and one that did not leave the group says so in one line
and exits EXIT_UNCLEAN_STOP."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from aggregator import stopbound
from aggregator.stopbound import EXIT_UNCLEAN_STOP, STOP_BOUND_S, StopBound
from tests.conftest import REPO

UNCLEAN = "stopped without leaving the consumer group cleanly"


def test_the_bound_is_below_the_usual_grace_and_the_status_is_distinct():
    assert STOP_BOUND_S <= 20 < 30
    assert EXIT_UNCLEAN_STOP not in (0, 1, 2, 130)


def test_a_stop_past_the_bound_says_one_line_and_exits(caplog):
    exits: list[int] = []
    b = StopBound(lambda what: f"line: {what}", bound_s=0.2, exit_fn=exits.append)
    with caplog.at_level(logging.ERROR, "aggregator"):
        b.arm("SIGTERM")
        b.arm("SIGINT")  # once: the first signal's clock
        assert b.thread is not None
        b.thread.join(5)
    assert exits == [EXIT_UNCLEAN_STOP]
    assert [r.getMessage() for r in caplog.records] == ["line: the stop had not ended 0.2 s after SIGTERM"]


def test_a_line_said_already_is_not_said_again(caplog):
    exits: list[int] = []
    b = StopBound(lambda what: "from the bound", bound_s=0.1, exit_fn=exits.append)
    with caplog.at_level(logging.ERROR, "aggregator"):
        b.say(lambda: "from the stop")
        b.arm("SIGTERM")
        b.thread.join(5)
    assert exits == [EXIT_UNCLEAN_STOP]
    assert [r.getMessage() for r in caplog.records] == ["from the stop"]


class FakeWorker:
    def __init__(self) -> None:
        self.signals: list[object] = []
        self.stopped = 0

    def _schedule_shutdown(self, signum: object) -> None:
        self.signals.append(signum)

    def stop_and_shutdown(self) -> None:
        self.stopped += 1


@pytest.mark.parametrize(("not_left", "reachable", "unclean"), [
    ("", False, None),                     # left the group (the broker went after)
    (None, True, None),                    # no member, the broker there: nothing to leave
    ("its LeaveGroup request failed: GroupCoordinatorNotAvailableError", True,
     "its LeaveGroup request failed: GroupCoordinatorNotAvailableError"),
    (None, False, "the broker is unreachable"),
])
def test_after_the_stop_a_worker_that_did_not_leave_says_so(caplog, not_left, reachable, unclean):
    w = FakeWorker()
    stopbound.install(w, "worker", lambda: reachable, lambda: not_left, bound_s=60)
    w._schedule_shutdown(signal.SIGTERM)
    assert w.signals == [signal.SIGTERM]
    with caplog.at_level(logging.ERROR, "aggregator"):
        if unclean is None:
            w.stop_and_shutdown()
        else:
            with pytest.raises(SystemExit) as exc:
                w.stop_and_shutdown()
            assert exc.value.code == EXIT_UNCLEAN_STOP
    assert w.stopped == 1
    lines = [r.getMessage() for r in caplog.records]
    if unclean is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"{UNCLEAN} ({unclean}); exit status 3")


def test_ingest_has_only_the_bound():
    w = FakeWorker()
    stopbound.install(w, "ingest", lambda: False, None, bound_s=60)
    w.stop_and_shutdown()  # no group to leave: status 0
    assert w.stopped == 1


def run_child(code: str) -> tuple[subprocess.CompletedProcess, float]:
    """``code`` (dedented) run by a child Python from the repository: its outcome and seconds."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), capture_output=True, text=True,
                       timeout=30)
    return p, time.monotonic() - t0


def test_a_hung_stop_ends_the_real_process_within_the_bound():
    """os._exit from the bound's thread, while the main thread is stuck in the stop."""
    code = textwrap.dedent("""
        import signal, time
        from aggregator import logs, stopbound
        logs.setup_logging("INFO")
        class Hung:
            def _schedule_shutdown(self, signum): pass
            def stop_and_shutdown(self):
                time.sleep(60)
        w = Hung()
        stopbound.install(w, "worker", lambda: False, lambda: None, bound_s=1.0)
        w._schedule_shutdown(signal.SIGTERM)
        w.stop_and_shutdown()
    """)
    p, took = run_child(code)
    assert p.returncode == EXIT_UNCLEAN_STOP, p.stderr
    assert took < 10, took
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert UNCLEAN in lines[0] and "the stop had not ended 1 s after SIGTERM; the broker is unreachable" in lines[0]
    assert "Traceback" not in p.stderr


def test_a_stop_that_has_ended_is_not_cut_off():
    """What follows a clean stop (the embedded broker's stop, a tracer's flush) is not the
    stop: once it has ended the bound does nothing (it killed pytest's own workers 60 s on)."""
    exits: list[int] = []
    b = StopBound(lambda what: "late", bound_s=0.2, exit_fn=exits.append)
    b.arm("SIGTERM")
    b.disarm()
    b.thread.join(5)
    assert exits == [] and not b.said
    w = FakeWorker()
    bound = stopbound.install(w, "worker", lambda: True, lambda: "", bound_s=60)
    w._schedule_shutdown(signal.SIGTERM)
    w.stop_and_shutdown()
    assert bound.done and bound.thread is not None and bound.thread.is_alive()  # asleep, disarmed


def test_a_crash_keeps_its_own_status_with_the_broker_away(caplog):
    """No stop signal: the worker ended by itself (a crash, whose status mode gives); the
    broker being away does not make it a stop on request that did not end cleanly."""
    w = FakeWorker()
    stopbound.install(w, "worker", lambda: False, lambda: None, bound_s=60)
    with caplog.at_level(logging.ERROR, "aggregator"):
        w.stop_and_shutdown()  # no SystemExit(3)
    assert w.stopped == 1 and caplog.records == []


def test_a_log_handler_stuck_on_a_full_pipe_does_not_hold_the_exit():
    """The main thread blocked in a handler (holding its lock): the bound's line cannot be
    written, and the process still ends at the bound (plus the line's second)."""
    code = textwrap.dedent("""
        import logging, signal, threading
        from aggregator import stopbound
        class Stuck(logging.Handler):
            def emit(self, record):
                threading.Event().wait()  # a pipe nobody reads
        logging.getLogger().addHandler(Stuck())
        class W:
            def _schedule_shutdown(self, signum): pass
            def stop_and_shutdown(self):
                logging.getLogger("aiokafka").error("the broker is gone")
        w = W()
        stopbound.install(w, "worker", lambda: False, lambda: None, bound_s=1.0)
        w._schedule_shutdown(signal.SIGTERM)
        w.stop_and_shutdown()
    """)
    p, took = run_child(code)
    assert p.returncode == EXIT_UNCLEAN_STOP, p.stderr
    assert took < 10


def test_a_signal_during_a_crashs_stop_leaves_it_the_crashs(caplog):
    """A pod deleted while a crashed worker is stopping: SIGTERM arrives mid-stop; the stop
    is still the crash's (status 1 from mode), not a stop on request gone unclean (3)."""
    w = FakeWorker()
    inner = w.stop_and_shutdown

    def stop_with_a_signal_midway() -> None:
        w._schedule_shutdown(signal.SIGTERM)  # the wrapped one: installed below
        inner()

    w.stop_and_shutdown = stop_with_a_signal_midway
    bound = stopbound.install(w, "worker", lambda: False, lambda: None, bound_s=60)
    with caplog.at_level(logging.ERROR, "aggregator"):
        w.stop_and_shutdown()  # no SystemExit(3)
    assert w.stopped == 1 and caplog.records == [] and not bound.signalled
