"""A worker that cannot join its group is restarted by the orchestrator, not left counting
nothing.

A worker joins a group whose other member has stopped answering (SIGSTOP; its session
not timed out, 20 s): the join waits for that member, and the new worker makes no progress.
Past ``AGG_STUCK_REBALANCE_SECONDS`` its ``/healthz`` answers 503 with the reason (what a
liveness check restarts on).  When the member answers again (SIGCONT) the rebalance
completes and ``/healthz`` answers 200 again: a long join that ends is no stall."""
from __future__ import annotations

import os
import signal

import orjson
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA
from tools.harness import http

pytestmark = [
    pytest.mark.integration,
    # what is shown is the worker's own watch over its join; make test shows it on the
    # embedded broker, make test-kafka leaves it out to keep CI's run short
    pytest.mark.skipif(ON_REAL_KAFKA, reason="the worker's own stall watch: make test runs it on the embedded broker"),
]


def healthz(svc) -> tuple[int, dict]:
    try:
        status, _, body = http("GET", svc.url + "/healthz", timeout=5)
    except OSError:  # not listening yet
        return 0, {}
    return status, orjson.loads(body)


@pytest.mark.timeout(150)
def test_a_join_without_progress_fails_healthz_until_it_completes(service_factory):
    silent = service_factory("silent", agg_role="worker", agg_session_timeout="20").start(wait_ready=90)
    os.kill(silent.proc.pid, signal.SIGSTOP)  # alive, in the group, answering nothing
    try:
        joining = service_factory("joining", agg_role="worker", agg_stuck_rebalance_seconds="3").start(wait_ready=None)
        status, body = wait_for(lambda: (s := healthz(joining))[0] == 503 and s, 30,
                                what="/healthz 503 while the join waits for the silent member")
        assert body["status"] == "stuck" and "without progress" in body["reason"], body
        assert "AGG_STUCK_REBALANCE_SECONDS" in body["reason"]
        assert http("GET", joining.url + "/readyz")[0] == 503  # and not ready: it counts nothing
        # the log says it once, with Faust's side of it
        said = [ln for ln in joining.tail(200_000).splitlines() if "/healthz: starting without progress" in ln]
        assert len(said) == 1 and "changelog" in said[0], joining.tail()
    finally:
        os.kill(silent.proc.pid, signal.SIGCONT)
    # the silent member answers again: the group completes the rebalance, both count
    joining.wait_ready(90)
    assert healthz(joining) == (200, {"status": "alive"})
    silent.wait_ready(90)
    assert healthz(silent) == (200, {"status": "alive"})
