"""The embedded broker process: its stderr goes to a regular file (not a pipe nobody reads,
which would block it once full) whose end is reported when it fails, and a broker that died
by itself is reported."""
from __future__ import annotations

import os
import signal
import stat

import pytest

from aggregator.broker import BrokerError, EmbeddedBroker
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_embedded_broker_reports_its_own_death():
    b = EmbeddedBroker().start()
    try:
        assert b.exited() is None
        assert stat.S_ISREG(os.fstat(b.stderr.fileno()).st_mode)  # a file: never blocks the broker
        os.kill(b.proc.pid, signal.SIGKILL)
        wait_for(lambda: b.exited() is not None, 10, what="the broker to die")
        assert b.exited() == -signal.SIGKILL
    finally:
        b.stop()
    assert b.proc is None and b.stderr is None


def test_a_broker_that_fails_to_start_says_why(monkeypatch):
    # Tansu reads its storage engine from the environment; one it does not know makes it exit
    monkeypatch.setenv("STORAGE_ENGINE", "bogus://nothing")
    b = EmbeddedBroker()
    with pytest.raises(BrokerError) as err:
        b.start()
    assert "exited with 1" in str(err.value)
    assert "UnsupportedStorageUrl" in str(err.value)  # its stderr, read back from the file
    assert b.proc is None and b.stderr is None  # nothing left open
