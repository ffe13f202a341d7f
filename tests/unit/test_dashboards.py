"""Static checks of the Grafana dashboard, Prometheus config and alert rules
in dashboards/ (fast, no network).

Every metric they use must be one of the names promised in docs/contract.md §5 (plus
`clickstream_consumer_lag`), and no query may group or filter by a label that
can take unbounded values. When `promtool` is installed the rule and config
files are also validated by it.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import REPO, require_tool

ROOT = REPO
DASH_DIR = ROOT / "dashboards"
DASHBOARD = DASH_DIR / "grafana" / "clickstream.json"
ALERTS = DASH_DIR / "prometheus" / "alerts.yml"
PROM_CONFIG = DASH_DIR / "prometheus" / "prometheus.yml"
ALERT_TESTS = DASH_DIR / "prometheus" / "alerts_test.yml"
PROV_DASHBOARDS = DASH_DIR / "grafana" / "provisioning" / "dashboards.yml"
PROV_DATASOURCES = DASH_DIR / "grafana" / "provisioning" / "datasources.yml"

# docs/contract.md §5, name -> type.
CONTRACT_METRICS = {
    "clickstream_events_ingested_total": "counter",
    "clickstream_events_total": "counter",
    "clickstream_window_events": "gauge",
    "clickstream_window_end_timestamp_seconds": "gauge",
    "clickstream_late_events_total": "counter",
    "clickstream_rate_limited_events_total": "counter",
    "clickstream_spilled_events_total": "counter",
    "clickstream_spill_backlog_events": "gauge",
    "clickstream_spill_bytes": "gauge",
    "clickstream_rejected_events_total": "counter",
    "clickstream_snapshot_delay_seconds": "histogram",
    "pipeline_stage_in_pending": "gauge",
    "pipeline_stage_processed_total": "counter",
    "pipeline_stage_errors_total": "counter",
    "pipeline_stage_duration_seconds": "histogram",
}
EXTRA_METRICS = {
    "clickstream_consumer_lag": "gauge",
    "clickstream_backpressure": "gauge",
    "clickstream_spill_faults_total": "counter",
    "clickstream_rebalances_total": "counter",
    "clickstream_state_recovered_partitions_total": "counter",
    "clickstream_assigned_partitions": "gauge",
    "clickstream_broker_reachable": "gauge",
}
KNOWN_METRICS = {**CONTRACT_METRICS, **EXTRA_METRICS}
HISTOGRAMS = {n for n, t in KNOWN_METRICS.items() if t == "histogram"}

# Labels the service exports (plus Prometheus' own); all bounded.
ALLOWED_LABELS = {"region", "reason", "stage", "partition", "topic", "kind", "le", "job", "instance"}
UNBOUNDED_LABELS = {"user_id", "url", "event_id", "ts", "ingest_ts", "timestamp", "session_id", "ip"}

EXPECTED_ALERTS = {
    "ClickstreamSnapshotsStale",
    "ClickstreamLateEventsSpiking",
    "ClickstreamSpillBacklogGrowing",
    "ClickstreamDeadLetterRate",
    "ClickstreamConsumerLagHigh",
    "ClickstreamWorkerDown",
    "ClickstreamSpillBackpressure",
    "ClickstreamBrokerUnreachable",
}

METRIC_RE = re.compile(r"\b(?:clickstream|pipeline_stage)_\w+")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR_RE = re.compile(r"\{([^{}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
LABEL_VALUES_RE = re.compile(r"label_values\(\s*(?:[^,()]*(?:\{[^}]*\})?\s*,\s*)?(\w+)\s*\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------
# helpers


def _metric_names(expr: str) -> set[str]:
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def _labels_used(expr: str) -> set[str]:
    """Label names an expression groups by, matches on or filters by."""
    labels: set[str] = set()
    for group in GROUPING_RE.findall(expr):
        labels.update(x.strip() for x in group.split(",") if x.strip())
    # Grafana legend templates ({{region}}) are not selectors.
    for selector in SELECTOR_RE.findall(expr.replace("{{", "").replace("}}", "")):
        labels.update(MATCHER_RE.findall(selector))
    labels.update(LABEL_VALUES_RE.findall(expr))
    return labels


def _parse_block(lines: list[str], start: int, indent: int) -> tuple[dict, int]:
    """Parse a block mapping of the simple YAML subset used in alerts.yml
    (plain, quoted and block scalars, nested mappings; no lists inside) at
    `indent` columns, starting at lines[start]. PyYAML is not a dependency of
    the project, so this deliberately small reader is used instead; promtool
    (when installed) checks the file with a real parser."""
    result: dict = {}
    i = start
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        cur = len(raw) - len(raw.lstrip(" "))
        if cur < indent or stripped.startswith("- "):
            break
        assert cur == indent, f"unexpected indentation at line {i + 1}: {raw!r}"
        key, sep, value = stripped.partition(":")
        assert sep, f"not a mapping entry at line {i + 1}: {raw!r}"
        value = value.strip()
        i += 1
        if value in ("|", "|-", ">", ">-"):
            body = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip(" ")) > indent
            ):
                body.append(lines[i].rstrip())
                i += 1
            while body and not body[-1]:
                body.pop()
            cut = min((len(b) - len(b.lstrip(" ")) for b in body if b), default=0)
            body = [b[cut:] for b in body]
            joiner = "\n" if value.startswith("|") else " "
            result[key] = joiner.join(body)
        elif value == "":
            result[key], i = _parse_block(lines, i, indent + 2)
        else:
            if value[:1] in "'\"" and value[-1:] == value[:1]:
                value = value[1:-1]
            result[key] = value
    return result, i


def _alert_rules() -> list[dict]:
    lines = ALERTS.read_text().splitlines()
    rules = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)- alert:\s*(\S+)\s*$", line)
        if m:
            indent = len(m.group(1)) + 2
            body, _ = _parse_block(lines, i + 1, indent)
            rules.append({"alert": m.group(2), **body})
    return rules


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def dashboard_exprs(dashboard) -> list[str]:
    exprs = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            exprs.append(target.get("expr", ""))
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if var.get("type") == "query":
            exprs.append(query or "")
    return exprs


@pytest.fixture(scope="module")
def alert_rules() -> list[dict]:
    return _alert_rules()


# --------------------------------------------------------------------------
# dashboard


def test_dashboard_loads(dashboard):
    assert dashboard["title"]
    assert dashboard["uid"] == "clickstream"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None  # importable into any Grafana


def test_datasource_is_a_prometheus_template_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref, panel["title"]
    assert variables["region"]["datasource"] == ref


def test_region_variable(dashboard):
    region = {v["name"]: v for v in dashboard["templating"]["list"]}["region"]
    assert region["type"] == "query"
    query = region["query"]["query"] if isinstance(region["query"], dict) else region["query"]
    assert query == "label_values(clickstream_events_total, region)"
    assert region["definition"] == query
    assert region["multi"] is True and region["includeAll"] is True


def test_every_panel_has_targets_with_expr(dashboard):
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"empty expr in panel {panel['title']!r}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"no unit on {panel['title']!r}"


def test_panel_ids_unique_and_layout_does_not_overlap(dashboard):
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_covers_every_metric(dashboard_exprs):
    used = set().union(*(_metric_names(e) for e in dashboard_exprs))
    assert used == set(KNOWN_METRICS), set(KNOWN_METRICS) ^ used
    joined = "\n".join(dashboard_exprs)
    assert 'up{job="clickstream"}' in joined
    assert "rate(clickstream_events_total" in joined and "[1m]" in joined
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(clickstream_snapshot_delay_seconds_bucket" in joined


def test_dashboard_uses_only_contract_metrics(dashboard_exprs):
    for expr in dashboard_exprs:
        unknown = _metric_names(expr) - set(KNOWN_METRICS)
        assert not unknown, f"{expr!r} uses {unknown}, not in docs/contract.md §5"


def test_dashboard_uses_no_unbounded_labels(dashboard, dashboard_exprs):
    for expr in dashboard_exprs:
        labels = _labels_used(expr)
        assert labels <= ALLOWED_LABELS, f"{expr!r} uses labels {labels - ALLOWED_LABELS}"
        assert not re.search(r"\b(" + "|".join(UNBOUNDED_LABELS) + r")\b", expr), expr
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= ALLOWED_LABELS, panel["title"]


def test_label_extraction_catches_unbounded_labels():
    # Guard the guard: the helpers must see labels in every place they can hide.
    assert _labels_used('sum by (user_id) (rate(x{url=~"a"}[1m]))') == {"user_id", "url"}
    assert _labels_used("a > on (event_id) group_left (ts) b") == {"event_id", "ts"}
    assert _labels_used("label_values(clickstream_events_total, user_id)") == {"user_id"}
    assert _metric_names("rate(pipeline_stage_duration_seconds_bucket[1m])") == {
        "pipeline_stage_duration_seconds"
    }
    assert _metric_names("clickstream_events_count") == {"clickstream_events_count"}


# --------------------------------------------------------------------------
# alert rules and Prometheus config


def test_alert_rules_present_with_annotations(alert_rules):
    names = [r["alert"] for r in alert_rules]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS
    for rule in alert_rules:
        assert rule.get("expr", "").strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']} lacks {key}"


def test_alert_expressions(alert_rules):
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules}
    assert exprs["ClickstreamSnapshotsStale"].startswith(
        "time() - max(clickstream_window_end_timestamp_seconds) > 3 * 60"
    )
    assert "clickstream_late_events_total" in exprs["ClickstreamLateEventsSpiking"]
    assert "deriv(clickstream_spill_backlog_events[" in exprs["ClickstreamSpillBacklogGrowing"]
    assert "rate(clickstream_rejected_events_total[" in exprs["ClickstreamDeadLetterRate"]
    assert "clickstream_consumer_lag" in exprs["ClickstreamConsumerLagHigh"]
    assert exprs["ClickstreamWorkerDown"] == 'up{job="clickstream"} == 0'
    assert exprs["ClickstreamBrokerUnreachable"] == "min by (instance) (clickstream_broker_reachable) == 0"


def test_alert_rules_use_only_contract_metrics_and_bounded_labels(alert_rules):
    for rule in alert_rules:
        expr = rule["expr"]
        unknown = _metric_names(expr) - set(KNOWN_METRICS)
        assert not unknown, f"{rule['alert']} uses {unknown}, not in docs/contract.md §5"
        labels = _labels_used(expr)
        assert labels <= ALLOWED_LABELS, f"{rule['alert']} uses labels {labels - ALLOWED_LABELS}"
        templated = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule)))
        assert templated <= ALLOWED_LABELS, rule["alert"]


def test_prometheus_config():
    text = PROM_CONFIG.read_text()
    assert re.search(r"^rule_files:\s*\n\s+- alerts\.yml\s*$", text, re.M)
    assert (PROM_CONFIG.parent / "alerts.yml").is_file()
    job = text[text.index("- job_name: clickstream") :]
    assert re.search(r"^\s+scrape_interval: 5s\s*$", job, re.M)
    assert re.search(r"^\s+- 127\.0\.0\.1:8080\s*$", job, re.M)


def test_grafana_provisioning():
    ds = PROV_DATASOURCES.read_text()
    assert "type: prometheus" in ds and "url: http://prometheus:9090" in ds
    dash = PROV_DASHBOARDS.read_text()
    assert "apiVersion: 1" in dash and "type: file" in dash and "path:" in dash


def test_promtool_validates_rules_and_config():
    promtool = require_tool("promtool", "Debian/Ubuntu: apt-get install prometheus")
    commands = [
        [promtool, "check", "rules", str(ALERTS)],
        [promtool, "check", "config", str(PROM_CONFIG)],
    ]
    if ALERT_TESTS.exists():
        commands.append([promtool, "test", "rules", ALERT_TESTS.name])
    for cmd in commands:
        proc = subprocess.run(
            cmd, cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
