"""docker-compose.yml and the Dockerfile, checked with what runs here (no Docker engine):
the compose file against the Compose Specification's JSON schema (vendored by the
check-jsonschema package), every file it mounts exists, its settings are the service's,
the Dockerfile lints clean (dockerfile-utils, from npm; CI installs it), and the image's
entry command runs outside Docker with the environment compose gives it and answers
/healthz, as the image's HEALTHCHECK asks it."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from aggregator.config import Settings
from tests.conftest import REPO, free_port, http, require_tool

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(arg: str) -> list[str]:
    return json.loads(arg) if arg.startswith("[") else ["/bin/sh", "-c", arg]


def test_compose_file_matches_the_compose_specification(compose):
    import jsonschema

    spec = importlib.util.find_spec("check_jsonschema")  # its data only; its CLI is not needed
    root = Path(list(spec.submodule_search_locations)[0])
    schema = json.loads((root / "builtin_schemas" / "vendor" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # the validator does catch a broken file
    broken = {"services": {"a": {"image": "x", "ports": 5, "bogus": 1}}}
    assert len(list(validator.iter_errors(broken))) >= 1


def test_compose_has_the_stack_and_mounts_only_files_that_exist(compose):
    services = compose["services"]
    assert {"kafka", "aggregator", "generator", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:4")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert (REPO / services["aggregator"]["build"] / "Dockerfile").is_file()
    assert services["generator"]["image"] == services["aggregator"]["image"]
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in named, f"{name} uses undeclared volume {src}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    # Grafana gets the project's provisioning at the paths that provisioning names
    gvols = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith(".")}
    dash_prov = yaml.safe_load((REPO / "dashboards/grafana/provisioning/dashboards.yml").read_text())
    path = dash_prov["providers"][0]["options"]["path"]
    assert gvols[f"{path}/clickstream.json"] == "./dashboards/grafana/clickstream.json"
    ds = yaml.safe_load((REPO / "dashboards/grafana/provisioning/datasources.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"   # the compose service name
    assert "9090:9090" in services["prometheus"]["ports"]


def test_compose_prometheus_config_is_the_projects_with_the_compose_target(compose):
    pvols = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]
             if v.startswith(".")}
    assert pvols["/etc/prometheus/alerts.yml"] == "./dashboards/prometheus/alerts.yml"
    mine = yaml.safe_load((REPO / pvols["/etc/prometheus/prometheus.yml"]).read_text())
    base = yaml.safe_load((REPO / "dashboards/prometheus/prometheus.yml").read_text())
    port = compose["services"]["aggregator"]["environment"]["AGG_WEB_PORT"]
    assert mine["scrape_configs"][0]["static_configs"][0]["targets"] == [f"aggregator:{port}"]
    mine["scrape_configs"][0]["static_configs"] = base["scrape_configs"][0]["static_configs"]
    assert mine == base  # nothing else may drift
    promtool = shutil.which("promtool")
    if promtool:
        res = subprocess.run([promtool, "check", "config", "--syntax-only",
                              str(REPO / pvols["/etc/prometheus/prometheus.yml"])],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_compose_settings_are_the_services(compose):
    known = {"AGG_" + f.name.upper() for f in fields(Settings)}
    env = compose["services"]["aggregator"]["environment"]
    assert set(env) <= known, set(env) - known
    assert env["AGG_BROKER"] == "kafka://kafka:9092"
    assert compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert int(env["AGG_PARTITIONS"]) >= 1


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    ins = dockerfile_instructions()
    for word, args in ins:
        if word == "COPY" and "--from=" not in args:
            for src in shlex.split(args)[:-1]:
                assert (REPO / src).exists(), src
    entry = [exec_form(a) for w, a in ins if w == "ENTRYPOINT"][-1]
    cmd = [exec_form(a) for w, a in ins if w == "CMD"][-1]
    assert entry == ["aggregator"] and cmd == ["run"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "aggregator" not in ignored and "pyproject.toml" not in ignored


def test_dockerfile_lints_clean(tmp_path):
    lint = require_tool("dockerfile-utils", "npm install -g dockerfile-utils")
    res = subprocess.run([lint, "lint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nHEALTHCHECK --intervalx=1s CMD true\n")
    res = subprocess.run([lint, "lint", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "intervalx" in res.stdout  # the linter does find errors


@pytest.mark.integration
def test_image_entry_command_with_compose_env_answers_healthz(compose, broker, tmp_path):
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
        # the image's HEALTHCHECK command, pointed at this port, says healthy
        hc = [a for w, a in ins if w == "HEALTHCHECK"][-1]
        hc_cmd = exec_form(hc.split(" CMD ", 1)[1].strip())
        hc_cmd = [c.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for c in hc_cmd]
        if hc_cmd[0] == "python":
            hc_cmd[0] = sys.executable
        assert subprocess.run(hc_cmd, timeout=30).returncode == 0
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
