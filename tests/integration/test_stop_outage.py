"""A worker whose broker is gone (found by a review, with ``aggregator broker`` and a
worker of its own, the broker then SIGKILLed): aiokafka logged ~100 ERROR lines a second,
and after SIGTERM the worker took ~60 s to exit, past the 30 s grace of Docker and
Kubernetes, with ``Error while stopping child ... TimeoutError`` tracebacks.

Now its log over the outage is a few lines, repeats collapsed with how many were left out
(aggregator/logcollapse.py), and SIGTERM ends it within ``STOP_BOUND_S`` with one line that
says it did not leave the consumer group cleanly, and status ``EXIT_UNCLEAN_STOP``
(aggregator/stopbound.py); its data directory is free for the next process at once."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from aggregator.broker import EmbeddedBroker
from aggregator.dirlock import DirLock
from aggregator.stopbound import EXIT_UNCLEAN_STOP, STOP_BOUND_S
from tests.integration.conftest import BROKER_INDEPENDENT, Service

pytestmark = [pytest.mark.integration, pytest.mark.slow, BROKER_INDEPENDENT]

WATCH_S = 12.0  # past one collapsing interval (10 s): each repeated line's count is said once
UNCLEAN = "stopped without leaving the consumer group cleanly"


def log_lines(svc: Service, start: int) -> list[str]:
    assert svc.log_path is not None
    return svc.log_path.read_bytes()[start:].decode(errors="replace").splitlines()


def test_a_worker_without_its_broker_logs_little_and_stops_in_time(tmp_path):
    broker = EmbeddedBroker().start()  # its own, to kill: the split layout of `aggregator broker`
    svc = Service(broker.url, tmp_path / "worker", AGG_ROLE="worker")
    try:
        svc.start(wait_ready=90)
        assert svc.log_path is not None
        mark = svc.log_path.stat().st_size
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        time.sleep(WATCH_S)

        lines = log_lines(svc, mark)
        print(f"{len(lines)} log lines in {WATCH_S:g} s without the broker:", *lines, sep="\n  ")
        entries = [json.loads(line) for line in lines]  # every line one JSON object: no tracebacks
        assert len(entries) <= 25, len(entries)  # was ~1,200 (about 100 a second)
        assert any(e["logger"] == "aggregator.broker" and e["msg"].startswith("broker unreachable")
                   for e in entries)
        collapsed = [e for e in entries if e.get("suppressed")]
        assert collapsed and all("not shown]" in e["msg"] for e in collapsed)
        assert sum(e["suppressed"] for e in collapsed) > 100

        mark = svc.log_path.stat().st_size
        assert svc.proc is not None
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        try:
            rc = svc.proc.wait(STOP_BOUND_S + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_S + 5:g} s after SIGTERM:\n{svc.tail()}")
        took = time.monotonic() - t0
        lines = log_lines(svc, mark)
        print(f"exit status {rc} {took:.1f} s after SIGTERM:", *lines, sep="\n  ")
        assert took <= STOP_BOUND_S + 1.5, took
        assert rc == EXIT_UNCLEAN_STOP
        assert not any("Traceback" in line or "Error while stopping" in line for line in lines)
        said = [line for line in lines if UNCLEAN in line]
        assert len(said) == 1 and json.loads(said[0])["level"] == "error"
        # the data directory is free at once (the lock is a flock the kernel drops)
        DirLock(svc.data_dir).acquire().release()
    finally:
        svc.kill()
        broker.stop()
