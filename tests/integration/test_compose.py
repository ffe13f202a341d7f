"""The image's entry command, run outside Docker with the environment compose gives it,
answers /healthz as the image's HEALTHCHECK asks it (the static checks of docker-compose.yml
and the Dockerfile: tests/unit/test_compose.py).

Moved from tests/test_compose.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, http
from tests.integration.conftest import BROKER_INDEPENDENT
from tests.unit.test_compose import compose, dockerfile_instructions, exec_form  # noqa: F401 - compose: a fixture

pytestmark = [BROKER_INDEPENDENT]


@pytest.mark.integration
def test_image_entry_command_with_compose_env_answers_healthz(compose, broker, tmp_path):  # noqa: F811
    """ENTRYPOINT + CMD of the Dockerfile, with the Dockerfile's ENV overridden by the compose
    environment, run here: the broker address, data dir and port are the only changes
    (this machine's broker, a temporary dir, a free loopback port)."""
    ins = dockerfile_instructions()
    env = dict(os.environ)
    for word, args in ins:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    env.update({k: str(v) for k, v in compose["services"]["aggregator"]["environment"].items()})
    assert env["AGG_BROKER"] == "kafka://kafka:9092" and env["AGG_DATA_DIR"] == "/data"
    port = free_port()
    env.update({"AGG_BROKER": broker.url, "AGG_DATA_DIR": str(tmp_path / "data"),
                "AGG_WEB_HOST": "127.0.0.1", "AGG_WEB_PORT": str(port), "AGG_SESSION_TIMEOUT": "6"})
    entry = [exec_form(a) for w, a in ins if w == "ENTRYPOINT"][-1]
    cmd = compose["services"]["aggregator"].get("command") or [exec_form(a) for w, a in ins if w == "CMD"][-1]
    exe = Path(sys.executable).parent / entry[0]            # the console script pip installs
    assert exe.is_file(), exe
    log = open(tmp_path / "svc.log", "wb")
    proc = subprocess.Popen([str(exe), *entry[1:], *cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        healthy = ready = False
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, (tmp_path / "svc.log").read_text()[-3000:]
            try:
                healthy = healthy or http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200
                ready = http("GET", f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200
            except OSError:
                pass
            time.sleep(0.3)
        assert healthy and ready, (tmp_path / "svc.log").read_text()[-3000:]
        # the image's HEALTHCHECK command, with the service's environment (it reads the port
        # from AGG_WEB_PORT), says healthy
        hc = [a for w, a in ins if w == "HEALTHCHECK"][-1]
        hc_cmd = exec_form(hc.split(" CMD ", 1)[1].strip())
        if hc_cmd[0] == "python":
            hc_cmd[0] = sys.executable
        assert subprocess.run(hc_cmd, env=env, timeout=30).returncode == 0
        status, _, body = http("POST", f"http://127.0.0.1:{port}/v1/events",
                               json.dumps([{"region": "compose"}]).encode(),
                               {"Content-Type": "application/json"})
        assert status == 200 and json.loads(body)["accepted"] == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
