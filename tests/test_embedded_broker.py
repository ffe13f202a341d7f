"""The embedded broker process: its stderr is kept (not a pipe nobody reads, which would
block it once full) and a broker that died by itself is reported."""
from __future__ import annotations

import os
import signal

import pytest

from aggregator.broker import EmbeddedBroker
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_embedded_broker_reports_its_own_death():
    b = EmbeddedBroker().start()
    try:
        assert b.exited() is None
        assert b.stderr is not None and b.stderr.fileno() >= 0
        assert isinstance(b.stderr_tail(), str)
        os.kill(b.proc.pid, signal.SIGKILL)
        wait_for(lambda: b.exited() is not None, 10, what="the broker to die")
        assert b.exited() == -signal.SIGKILL
    finally:
        b.stop()
    assert b.proc is None and b.stderr is None and b.exited() is None
