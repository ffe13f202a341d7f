"""The running service against a real Prometheus (Debian's ``prometheus`` package).

1. ``promtool check metrics`` accepts the service's /metrics exposition.
2. A real Prometheus on loopback, configured from dashboards/prometheus/
   (target and intervals rewritten, alerts.yml loaded), scrapes the service
   while a small stream runs; then every panel target of the Grafana dashboard
   is evaluated through /api/v1/query (``$job`` = clickstream, ``$instance`` = all) and the alert and
   recording rules are checked through /api/v1/rules; the SLO recording rules
   must have produced values.

One region runs over a low rate limit, so the spill and rate-limit panels
have data too: every panel must return data. Skipped only if the prometheus
binary is absent (and never under CI, which installs it).
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import free_port
from tests.conftest import REPO, require_tool, wait_for
from tests.integration.conftest import BROKER_INDEPENDENT

pytestmark = [BROKER_INDEPENDENT, pytest.mark.integration, pytest.mark.prometheus]

ROOT = REPO
DASHBOARD = ROOT / "dashboards" / "grafana" / "clickstream.json"
PROM_DIR = ROOT / "dashboards" / "prometheus"

REGIONS = ["eu-west", "us-east", "ap-south", "sa-east", "af-south"]
W_MS = 2000
STREAM_SECONDS = 12.0
# every rule of alerts.yml must load with health ok (the unit tests pin the list of names)
RULES = [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
EXPECTED_RULES = len(RULES)
RECORDED = [r["record"] for r in RULES if "record" in r]

# Grafana variables -> values for a direct PromQL query (the dashboard's "All" is ".*").
SUBSTITUTIONS = [
    (re.compile(r"\$\{job(?::[a-z]+)?\}|\[\[job\]\]|\$job\b"), "clickstream"),
    (re.compile(r"\$\{instance(?::[a-z]+)?\}|\[\[instance\]\]|\$instance\b"), ".*"),
    (re.compile(r"\$\{region(?::[a-z]+)?\}|\[\[region\]\]|\$region\b"), ".*"),
    (re.compile(r"\$\{__rate_interval\}|\$__rate_interval\b"), "1m"),
    (re.compile(r"\$\{__interval\}|\$__interval\b"), "15s"),
    (re.compile(r"\$\{__range\}|\$__range\b"), "5m"),
    (re.compile(r"\$\{datasource\}|\$datasource\b"), ""),
]
METRIC_RE = re.compile(r"(?<![\w:])(?:clickstream|pipeline_stage|process|python)_\w+")
PROMETHEUS_OWN = {"up"}  # synthesized by Prometheus per target, always has samples


def _prometheus_binary() -> str:
    return require_tool("prometheus", "Debian: apt-get install prometheus")


def _promtool() -> str:
    _prometheus_binary()  # the only skip: no prometheus package at all
    path = shutil.which("promtool")
    assert path is not None, "prometheus is installed but promtool is not on PATH"
    return path


def _get_json(url: str, timeout: float = 5.0) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # Prometheus answers errors as JSON too (400/422)
        return json.loads(exc.read() or b"{}")


def _sample_names(metrics_text: str) -> set[str]:
    """Names of the samples present in an exposition (e.g. ``x_total``, ``h_bucket``)."""
    return {s.name for fam in text_string_to_metric_families(metrics_text) for s in fam.samples}


def _panel_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target of the dashboard, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []) or []:
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []) or [])

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def _substitute(expr: str) -> str:
    for pattern, value in SUBSTITUTIONS:
        expr = pattern.sub(value, expr)
    assert "$" not in expr and "[[" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def _stream_batch() -> list[dict]:
    """One request's worth: a few events over 5 regions, one client-delayed, one invalid."""
    now = int(time.time() * 1000)
    events = [{"region": r, "user_id": f"u{i}", "url": f"/p/{i}", "ts": now - 100 * (i + 1)}
              for i, r in enumerate(REGIONS) for _ in range(i % 2 + 1)]
    events.append({"region": "eu-west", "ts": int(time.time() * 1000) - 400_000})  # client_delay late
    events.append({"region": "bad region"})  # rejected (bad_region)
    return events


def _post_ok(svc, events) -> None:
    status, _, ans = svc.post(events)
    assert status == 200, ans
    assert ans["accepted"] == len(events) - 1 and ans["rejected"] == 1, ans


def _windows_closed(svc, n: int):
    """Truthy once at least ``n`` distinct windows have published snapshots."""
    def pred():
        return len({s["window_start"] for s in svc.snapshots()}) >= n
    return pred


# --------------------------------------------------------------------------
# 1. promtool check metrics


@pytest.mark.timeout(35)
def test_promtool_check_metrics_accepts_the_exposition(service_factory):
    promtool = _promtool()
    svc = service_factory("promtool").start(wait_ready=20)
    # every labelled family gets samples: counted, late (client_delay), rejected, closed windows
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        _post_ok(svc, _stream_batch())
        time.sleep(0.1)
    wait_for(_windows_closed(svc, 1), 15, what="a closed window")

    text = svc.metrics_text()
    names = _sample_names(text)
    for name in ("clickstream_events_total", "clickstream_window_events",
                 "clickstream_late_events_total", "clickstream_rejected_events_total",
                 "clickstream_snapshot_delay_seconds_bucket"):
        assert name in names, f"{name} has no sample in /metrics"

    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=15)
    assert res.returncode == 0, f"promtool check metrics failed:\n{res.stdout}{res.stderr}"
    # promtool prints lint problems on stdout/stderr even when they are only warnings
    assert not (res.stdout.strip() or res.stderr.strip()), f"promtool lint output:\n{res.stdout}{res.stderr}"


# --------------------------------------------------------------------------
# 2. a real Prometheus scraping the service; dashboard queries and alert rules


def _write_config(dest: Path, svc_port: int) -> Path:
    text = (PROM_DIR / "prometheus.yml").read_text()
    rewrites = [
        (r"(scrape_interval:\s*)\S+", r"\g<1>1s"),
        (r"(scrape_timeout:\s*)\S+", r"\g<1>1s"),  # must not exceed scrape_interval
        (r"(evaluation_interval:\s*)\S+", r"\g<1>1s"),  # rules evaluated (health ok) quickly
        (r"127\.0\.0\.1:8080", f"127.0.0.1:{svc_port}"),
    ]
    for pattern, repl in rewrites:
        text, n = re.subn(pattern, repl, text)
        assert n >= 1, f"prometheus.yml has no {pattern!r} to rewrite"
    assert re.search(r"rule_files:\s*\n\s*-\s*alerts\.yml", text), "rule_files must load alerts.yml"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROM_DIR / "alerts.yml", dest / "alerts.yml")
    cfg = dest / "prometheus.yml"
    cfg.write_text(text)
    return cfg


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL Prometheus if the pytest process dies without tearing down."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Prometheus:
    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False
        wait_for(ready, timeout, interval=0.2, what="prometheus /-/ready")

    def query(self, expr: str) -> dict:
        return _get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path):
    binary = _prometheus_binary()
    started: list[Prometheus] = []

    def make(svc_port: int) -> Prometheus:
        workdir = tmp_path / "prometheus"
        cfg = _write_config(workdir, svc_port)
        promtool = shutil.which("promtool")
        if promtool:
            res = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True,
                                 text=True, timeout=15)
            assert res.returncode == 0, f"rewritten config rejected:\n{res.stdout}{res.stderr}"
        p = Prometheus(binary, cfg, workdir)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.mark.timeout(60)
def test_dashboard_queries_and_alert_rules_on_a_real_prometheus(service_factory, prometheus_factory):
    # REGIONS[1] sends 2 events per 100 ms: over 5/s it is rate limited and spilled
    # aggregates on: the dashboard has panels of unique users and client delays
    svc = service_factory("prom", AGG_RATE_LIMITS=f"{REGIONS[1]}=5", AGG_AGGREGATES="true").start(wait_ready=20)
    prom = prometheus_factory(svc.port)
    prom.wait_ready(15)

    def target_up():
        r = prom.query('up{job="clickstream"}')
        return r.get("status") == "success" and any(s["value"][1] == "1" for s in r["data"]["result"])
    wait_for(target_up, 10, what="prometheus scraping the service (up == 1)")

    # the stream: a few events per 100 ms over 5 regions, a client-delayed one, an invalid one
    deadline = time.monotonic() + STREAM_SECONDS
    while time.monotonic() < deadline:
        _post_ok(svc, _stream_batch())
        time.sleep(0.1)
    wait_for(_windows_closed(svc, 4), 10, what="several closed windows")
    time.sleep(2.5)  # at least two more scrapes (1 s) after the last closed window

    names = _sample_names(svc.metrics_text()) | PROMETHEUS_OWN
    targets = _panel_targets()
    assert targets, "the dashboard has no panel targets"

    query_deadline = time.monotonic() + 10  # shared budget for results still being scraped
    failures: list[str] = []
    for title, raw in targets:
        expr = _substitute(raw)
        used = set(METRIC_RE.findall(expr)) | ({"up"} if re.search(r"\bup\s*\{", expr) else set())
        assert used, f"{title}: no known metric in {expr!r}"
        missing = sorted(used - names)

        def answer():
            r = prom.query(expr)  # noqa: B023 - called within this iteration
            if r.get("status") != "success":
                return r  # an error does not go away by waiting
            return r if (r["data"]["result"] or missing) else None  # noqa: B023 - as above
        try:
            r = wait_for(answer, max(0.0, query_deadline - time.monotonic()), interval=0.5,
                         what=f"data for {expr!r}")
        except AssertionError:
            r = prom.query(expr)
        if r.get("status") != "success":
            failures.append(f"{title}: {expr!r} -> {r.get('errorType')}: {r.get('error')}")
            continue
        if r["data"]["result"]:
            continue
        if missing:
            failures.append(f"{title}: {expr!r}: no samples in /metrics for {', '.join(missing)}")
        else:
            failures.append(f"{title}: {expr!r} returned no data although /metrics has samples of "
                            f"{', '.join(sorted(used))}")
    assert not failures, "dashboard queries failed:\n" + "\n".join(failures) + f"\n{prom.tail()}"

    # alert rules: all loaded from the copied alerts.yml and evaluated without errors
    def rules_ok():
        r = _get_json(prom.url + "/api/v1/rules")
        if r.get("status") != "success":
            return None
        rules = [rule for g in r["data"]["groups"] for rule in g["rules"]]
        if len(rules) == EXPECTED_RULES and all(rule.get("health") == "ok" for rule in rules):
            return rules
        return None
    try:
        rules = wait_for(rules_ok, 10, interval=0.5, what=f"{EXPECTED_RULES} rules with health ok")
    except AssertionError:
        r = _get_json(prom.url + "/api/v1/rules")
        got = [(rule.get("name"), rule.get("health"), rule.get("lastError"))
               for g in r.get("data", {}).get("groups", []) for rule in g["rules"]]
        raise AssertionError(f"expected {EXPECTED_RULES} rules with health ok, got {got}") from None
    assert sorted(rule["name"] for rule in rules if rule["type"] == "recording") == sorted(RECORDED)
    assert len({rule["name"] for rule in rules}) == EXPECTED_RULES

    # the SLO ratios are computed from the live service: the ingest ratio over POSTs
    # that all succeeded is 0, and snapshots were published (a ratio, not absent)
    def recorded(name):
        def value():
            r = prom.query(name)
            res = r.get("data", {}).get("result", []) if r.get("status") == "success" else []
            return res[0]["value"][1] if res else None
        return value
    for name in ("job:clickstream_ingest_errors:ratio_rate5m", "job:clickstream_snapshots_overdue:ratio_rate5m"):
        got = wait_for(recorded(name), 10, interval=0.5, what=f"a value of {name}")
        assert 0.0 <= float(got) <= 1.0, (name, got)
    assert float(recorded("job:clickstream_ingest_errors:ratio_rate5m")()) == 0.0
