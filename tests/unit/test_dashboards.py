"""Static checks of the Grafana dashboard, Prometheus config and alert rules
in dashboards/ (fast, no network).

Every metric they use must be one of the names promised in docs/contract.md §5, and no
query may group or filter by a label that can take unbounded values. Every dashboard
query is scoped by the `job` and `instance` variables; every alert has a `runbook_url`
whose anchor is a section of docs/runbooks.md and is expected to fire in a
`promtool test rules` case. When `promtool` is installed the rule and config files are
also validated, and the rule tests run.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO, require_tool

ROOT = REPO
DASH_DIR = ROOT / "dashboards"
DASHBOARD = DASH_DIR / "grafana" / "clickstream.json"
ALERTS = DASH_DIR / "prometheus" / "alerts.yml"
PROM_CONFIG = DASH_DIR / "prometheus" / "prometheus.yml"
ALERT_TESTS = DASH_DIR / "prometheus" / "alerts_test.yml"
PROV_DASHBOARDS = DASH_DIR / "grafana" / "provisioning" / "dashboards.yml"
PROV_DATASOURCES = DASH_DIR / "grafana" / "provisioning" / "datasources.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

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
    "clickstream_rebalance_seconds": "gauge",
    "clickstream_state_recovered_partitions_total": "counter",
    "clickstream_assigned_partitions": "gauge",
    "clickstream_broker_reachable": "gauge",
    "clickstream_build_info": "gauge",
    "clickstream_window_seconds": "gauge",
    "clickstream_grace_seconds": "gauge",
    "clickstream_http_requests_total": "counter",
    "clickstream_http_request_duration_seconds": "histogram",
    "clickstream_http_connections_refused_total": "counter",
    "clickstream_snapshot_overdue_seconds": "histogram",
    "clickstream_window_unique_users": "gauge",
    "clickstream_window_client_delay_seconds": "summary",
}
# in docs/contract.md §5 and used by alert rules only (fault counters, the published count)
ALERT_METRICS = {
    "clickstream_snapshots_published_total": "counter",
    "clickstream_state_write_failures_total": "counter",
    "clickstream_snapshot_publish_failures_total": "counter",
    "clickstream_spill_disk_errors_total": "counter",
    "clickstream_source_log_resets_total": "counter",
    "clickstream_dedup_evicted_total": "counter",
    "clickstream_worker_clock_ahead_seconds": "gauge",
    "clickstream_worker_clock_behind_seconds": "gauge",
    "clickstream_source_offsets_lost_total": "counter",
    "clickstream_refused_partitions": "gauge",
    "clickstream_forwards_lost_total": "counter",
    "clickstream_worker_fenced_total": "counter",
}
# prometheus_client's process, GC and platform collectors (contract §5 "standard"): the
# dashboard may use them, it need not use them all.
STANDARD_METRICS = {
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "python_gc_objects_collected_total": "counter",
    "python_gc_objects_uncollectable_total": "counter",
    "python_gc_collections_total": "counter",
    "python_info": "gauge",
}
KNOWN_METRICS = {**CONTRACT_METRICS, **EXTRA_METRICS, **ALERT_METRICS, **STANDARD_METRICS}
SERVICE_METRICS = {**CONTRACT_METRICS, **EXTRA_METRICS}
HISTOGRAMS = {n for n, t in KNOWN_METRICS.items() if t == "histogram"}

# Labels the service exports (plus Prometheus' own); all bounded.
ALLOWED_LABELS = {"region", "reason", "stage", "partition", "topic", "kind", "le", "job", "instance", "route", "code",
                  "version", "python", "generation", "quantile"}
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
    "ClickstreamRebalanceStuck",
    "ClickstreamTargetMissing",
    "ClickstreamIngestBudgetBurnFast",
    "ClickstreamIngestBudgetBurnSlow",
    "ClickstreamFreshnessBudgetBurnFast",
    "ClickstreamFreshnessBudgetBurnSlow",
    "ClickstreamStateWritesFailing",
    "ClickstreamSnapshotPublishFailing",
    "ClickstreamSpillDiskErrors",
    "ClickstreamSourceLogReset",
    "ClickstreamDedupEvicting",
    "ClickstreamWorkerClockAhead",
    "ClickstreamWorkerClockBehind",
    "ClickstreamSourceOffsetsLost",
    "ClickstreamPartitionRefused",
    "ClickstreamForwardsLost",
    "ClickstreamWorkerFenced",
}

METRIC_RE = re.compile(r"(?<![\w:])(?:clickstream|pipeline_stage|process|python)_\w+(?![\w:])")
RECORDED_RE = re.compile(r"(?<![\w:])[a-z_]+:[\w:]+")  # level:metric:operations names of recording rules
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR_RE = re.compile(r"\{([^{}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
LABEL_VALUES_RE = re.compile(r"label_values\(\s*(?:[^,()]*(?:\{[^}]*\})?\s*,\s*)?(\w+)\s*\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------
# helpers


def _metric_names(expr: str) -> set[str]:
    names = set()
    for name in METRIC_RE.findall(RECORDED_RE.sub(" ", expr)):
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


def _rule_groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def _alert_rules() -> list[dict]:
    return [r for g in _rule_groups() for r in g["rules"] if "alert" in r]


def _recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in _rule_groups() for r in g["rules"] if "record" in r}


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


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
    for name in ("job", "instance", "region"):
        assert variables[name]["datasource"] == ref


def _variable_query(var: dict) -> str:
    return var["query"]["query"] if isinstance(var["query"], dict) else var["query"]


def test_job_instance_and_region_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "region"]  # each depends on those before it
    expected = {
        "job": "label_values(clickstream_build_info, job)",
        "instance": 'label_values(clickstream_build_info{job=~"$job"}, instance)',
        "region": 'label_values(clickstream_events_total{job=~"$job", instance=~"$instance"}, region)',
    }
    for name, query in expected.items():
        var = variables[name]
        assert var["type"] == "query" and _variable_query(var) == query and var["definition"] == query, name
    assert variables["job"]["multi"] is False and variables["job"]["current"]["value"] == "clickstream"
    for name in ("instance", "region"):
        assert variables[name]["multi"] is True and variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"


SELECTOR_WITH_NAME_RE = re.compile(r"(?<![\w:])((?:clickstream|pipeline_stage|process|python)_\w+|up)\s*(\{[^}]*\})?")


def test_every_query_is_scoped_by_job_and_instance(dashboard):
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            selectors = [m for m in SELECTOR_WITH_NAME_RE.finditer(expr)
                         if m.group(1) != "up" or m.group(2)]  # "up" only as a selector
            assert selectors, (panel["title"], expr)
            for m in selectors:
                sel = m.group(2) or ""
                assert 'job=~"$job"' in sel and 'instance=~"$instance"' in sel, (panel["title"], m.group(0))


def test_overview_row_on_top(dashboard):
    panels = dashboard["panels"]
    assert panels[0]["type"] == "row" and panels[0]["title"] == "Overview" and panels[0]["gridPos"]["y"] == 0
    overview = []
    for p in panels[1:]:
        if p["type"] == "row":
            break
        overview.append(p)
    titles = " | ".join(p["title"] for p in overview)
    for word in ("Events/s", "Late", "Rejected", "lag", "Freshness", "Ingest budget left", "Freshness budget left"):
        assert word in titles, (word, titles)
    exprs = "\n".join(t["expr"] for p in overview for t in p["targets"])
    assert "[30d]" in exprs and "/ 0.001" in exprs and "/ 0.01" in exprs  # the two SLOs' budgets
    assert all(p["gridPos"]["y"] < 5 for p in overview)


def _row_panels(dashboard: dict, title: str) -> list[dict]:
    """The panels under the (expanded) row called ``title``, up to the next row."""
    panels = dashboard["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title)
    out = []
    for p in panels[start + 1:]:
        if p["type"] == "row":
            break
        out.append(p)
    return out


def test_refused_connections_panel_and_ingest_sli(dashboard):
    # connections refused at AGG_HTTP_MAX_CONNECTIONS are answered before any request is
    # read: their own panel in the HTTP row, and failed requests in the ingest SLI panels
    refused = "clickstream_http_connections_refused_total"
    http = {p["title"]: p for p in _row_panels(dashboard, "HTTP, SLIs and build")}
    panel = http["Connections refused at the cap"]
    assert [t["expr"] for t in panel["targets"]] == [
        f'sum by (instance) (rate({refused}{{job=~"$job", instance=~"$instance"}}[$__rate_interval]))']
    assert panel["fieldConfig"]["defaults"]["unit"] == "cps"
    overview = {p["title"]: p for p in _row_panels(dashboard, "Overview")}
    for title, fn, window in (("Ingest budget left (30d)", "increase", "30d"),
                              ("SLIs: ingest errors, late snapshots", "rate", "5m")):
        panel = overview.get(title) or http[title]
        expr = panel["targets"][0]["expr"]
        numerator, _, denominator = expr.partition(" / sum(")
        for part in (numerator, denominator):
            assert f'or {fn}({refused}{{job=~"$job", instance=~"$instance"}}[{window}])' in part, (title, expr)


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
    assert used - set(STANDARD_METRICS) == set(SERVICE_METRICS), set(SERVICE_METRICS) ^ (used - set(STANDARD_METRICS))
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total"} <= used
    joined = "\n".join(dashboard_exprs)
    assert 'up{job=~"$job", instance=~"$instance"}' in joined
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
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{rule['alert']} lacks {key}"
        assert "runbook" not in annotations, f"{rule['alert']}: the runbook is in docs/runbooks.md"


def test_every_alert_has_a_runbook_section(alert_rules):
    anchors = _github_anchors(RUNBOOKS.read_text())
    for rule in alert_rules:
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbooks.md", url
        assert anchor == rule["alert"].lower(), url
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/runbooks.md"
    # and no section for an alert that does not exist any more
    names = {r["alert"].lower() for r in alert_rules}
    sections = {a for a in anchors if a.startswith("clickstream")}
    assert sections == names, sections ^ names


def test_github_anchor_helper():
    assert _github_anchors("# Runbooks\n## ClickstreamWorkerDown\n### A b, c (d)\n") == {
        "runbooks", "clickstreamworkerdown", "a-b-c-d"}


def _alert_tests() -> list[dict]:
    return yaml.safe_load(ALERT_TESTS.read_text())["tests"]


def test_promtool_tests_cover_every_alert(alert_rules):
    """Every alert is expected to fire (non-empty exp_alerts) in some rule test, and to
    stay quiet at some other evaluation (before its condition has held long enough)."""
    fires, quiet = set(), set()
    for case in _alert_tests():
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
            for exp in check.get("exp_alerts") or []:
                url = exp["exp_annotations"]["runbook_url"]
                assert url == f"docs/runbooks.md#{check['alertname'].lower()}"
    names = {r["alert"] for r in alert_rules}
    assert fires == names, names ^ fires
    assert quiet == names, names ^ quiet


def test_slo_alerts_are_multi_window_burn_rates(alert_rules):
    recorded = _recording_rules()
    objectives = {"Ingest": ("job:clickstream_ingest_errors", "0.001"),
                  "Freshness": ("job:clickstream_snapshots_overdue", "0.01")}
    pairs = {"Fast": (("1h", "5m"), "14.4", "critical"), "Slow": (("6h", "30m"), "6", "warning")}
    rules = {r["alert"]: r for r in alert_rules}
    for slo, (prefix, budget) in objectives.items():
        for speed, ((long, short), factor, severity) in pairs.items():
            rule = rules[f"Clickstream{slo}BudgetBurn{speed}"]
            expr = " ".join(rule["expr"].split())
            assert expr == (f"{prefix}:ratio_rate{long} > ({factor} * {budget}) and "
                            f"{prefix}:ratio_rate{short} > ({factor} * {budget})"), expr
            assert rule["labels"]["severity"] == severity
            for window in (long, short):
                assert f"{prefix}:ratio_rate{window}" in recorded
                assert f"[{window}]" in recorded[f"{prefix}:ratio_rate{window}"]
    for name, expr in recorded.items():
        assert name.startswith("job:") and "sum by (job)" in expr, name
    ingest = " ".join(recorded["job:clickstream_ingest_errors:ratio_rate5m"].split())
    assert 'route="/v1/events", code="5xx"' in ingest
    # a connection refused at the cap (answered 503 before any request is read) is one
    # failed ingest request: in the errors and in the total of every window
    for window in ("5m", "30m", "1h", "6h"):
        expr = " ".join(recorded[f"job:clickstream_ingest_errors:ratio_rate{window}"].split())
        refused = f"or rate(clickstream_http_connections_refused_total[{window}])"
        assert expr == (
            f'sum by (job) ( rate(clickstream_http_requests_total{{route="/v1/events", code="5xx"}}[{window}]) '
            f"{refused} ) / "
            f'sum by (job) ( rate(clickstream_http_requests_total{{route="/v1/events"}}[{window}]) {refused} )'), expr
    fresh = " ".join(recorded["job:clickstream_snapshots_overdue:ratio_rate5m"].split())
    assert "clickstream_snapshot_overdue_seconds_bucket{le=" in fresh


def test_alert_expressions(alert_rules):
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules}
    # staleness from the service's own window length and grace, not a hard-coded 60 s window
    threshold = "3 * max by (job) (clickstream_window_seconds) + max by (job) (clickstream_grace_seconds)"
    assert exprs["ClickstreamSnapshotsStale"].startswith(
        "( time() - max by (job) (clickstream_window_end_timestamp_seconds) > on (job) " + threshold + " ) or ( ")
    # after a restart, before the first window closes (no window-end gauge yet): workers with
    # partitions that have published nothing since they started
    assert ("min by (job) (time() - (process_start_time_seconds and on (job, instance) "
            "clickstream_assigned_partitions > 0)) > on (job) " + threshold) in exprs["ClickstreamSnapshotsStale"]
    assert "unless on (job) sum by (job) (clickstream_snapshots_published_total) > 0" in exprs[
        "ClickstreamSnapshotsStale"]
    for alert, counter in (("ClickstreamStateWritesFailing", "clickstream_state_write_failures_total"),
                           ("ClickstreamSnapshotPublishFailing", "clickstream_snapshot_publish_failures_total"),
                           ("ClickstreamSpillDiskErrors", "clickstream_spill_disk_errors_total"),
                           ("ClickstreamDedupEvicting", "clickstream_dedup_evicted_total")):
        assert exprs[alert] == f"sum by (instance) (increase({counter}[5m])) > 0", alert
    assert "increase(clickstream_source_log_resets_total[10m])" in exprs["ClickstreamSourceLogReset"]
    assert "increase(clickstream_source_offsets_lost_total[10m])" in exprs["ClickstreamSourceOffsetsLost"]
    assert exprs["ClickstreamForwardsLost"] == "sum by (instance) (increase(clickstream_forwards_lost_total[10m])) > 0"
    assert exprs["ClickstreamWorkerFenced"] == "sum by (instance) (increase(clickstream_worker_fenced_total[10m])) > 0"
    assert exprs["ClickstreamTargetMissing"] == 'absent(up{job="clickstream"})'
    assert "clickstream_late_events_total" in exprs["ClickstreamLateEventsSpiking"]
    assert "deriv(clickstream_spill_backlog_events[" in exprs["ClickstreamSpillBacklogGrowing"]
    assert "rate(clickstream_rejected_events_total[" in exprs["ClickstreamDeadLetterRate"]
    assert "clickstream_consumer_lag" in exprs["ClickstreamConsumerLagHigh"]
    assert exprs["ClickstreamWorkerDown"] == 'up{job="clickstream"} == 0'
    assert exprs["ClickstreamBrokerUnreachable"] == "min by (instance) (clickstream_broker_reachable) == 0"
    assert exprs["ClickstreamPartitionRefused"] == "max by (instance) (clickstream_refused_partitions) > 0"


def test_alert_rules_use_only_contract_metrics_and_bounded_labels(alert_rules):
    recorded = _recording_rules()
    for rule in [*alert_rules, *({"alert": name, "expr": expr} for name, expr in recorded.items())]:
        expr = rule["expr"]
        unknown = _metric_names(expr) - set(KNOWN_METRICS)
        assert set(RECORDED_RE.findall(expr)) <= set(recorded), rule["alert"]
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
