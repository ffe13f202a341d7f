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


def test_a_killed_service_leaves_no_orphan_broker_and_says_it_keeps_nothing(tmp_path):
    """``aggregator run`` without AGG_BROKER, SIGKILLed alone (its broker runs in a session of
    its own, so no group kill reaches it): the broker dies with it and frees the port."""
    import socket
    import subprocess
    import sys
    import time

    import orjson

    from tests.conftest import REPO
    from tools.harness import free_port, http

    broker_port, web_port = free_port(), free_port()
    env = dict(os.environ, AGG_BROKER_PORT=str(broker_port), AGG_WEB_PORT=str(web_port),
               AGG_DATA_DIR=str(tmp_path), AGG_SESSION_TIMEOUT="6")
    env.pop("AGG_BROKER", None)
    with open(tmp_path / "service.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "aggregator", "run"], env=env, cwd=str(REPO),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready():
            try:
                status, _, body = http("GET", f"http://127.0.0.1:{web_port}/readyz", timeout=1)
            except OSError:
                return None
            return orjson.loads(body) if status == 200 else None

        body = wait_for(ready, 60, what="the service to be ready")
        assert "in memory" in body["broker"] and "restart starts from nothing" in body["broker"]
        assert "restart starts from nothing" in (tmp_path / "service.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()

        def port_free():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", broker_port)) != 0

        wait_for(port_free, 10, what="the orphaned broker to go")
        print(f"broker gone {time.monotonic() - t0:.2f}s after its service")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(("env", "expected"), [({}, 1), ({"AGG_PARTITIONS": "3"}, 3)])
def test_aggregator_broker_creates_the_topics_with_the_embedded_partition_count(env, expected):
    """``aggregator broker`` creates the service's topics before it says where it listens, with
    one partition of ``clicks`` unless AGG_PARTITIONS says otherwise: processes started against
    it (AGG_BROKER) find them and use them as they are."""
    import asyncio
    import subprocess
    import sys
    import time

    from aggregator.broker import partition_counts
    from tests.conftest import REPO
    from tools.harness import free_port

    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    full.update(env, AGG_BROKER_PORT=str(port), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "aggregator", "broker"], env=full, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        said = f"embedded broker on kafka://127.0.0.1:{port}"
        lines = []
        while not (lines and lines[-1].startswith(said)):  # said once the topics are there
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        counts = asyncio.run(partition_counts(f"127.0.0.1:{port}", ["clicks", "clicks-repartition"]))
        assert counts == {"clicks": expected, "clicks-repartition": expected}, counts
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
