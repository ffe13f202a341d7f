"""docker-compose.yml and the Dockerfile, checked with what runs here (no Docker engine):
the compose file against the Compose Specification's JSON schema (vendored by the
check-jsonschema package), every file it mounts exists, its settings are the service's,
and the Dockerfile lints clean (dockerfile-utils, from npm; CI installs it).  The image's
entry command, run with a broker: tests/integration/test_compose.py."""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from aggregator.config import Settings
from tests.conftest import REPO, require_tool

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
