"""The running service against the embedded broker: exact snapshots and metrics."""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.core.contract import SNAPSHOTS
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration

REGIONS = ["eu-west", "us-east", "ap-south", "sa-east", "af-south"]
W_MS = 2000


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_known_events_give_exact_snapshots_and_metrics(service_factory, broker):
    svc = service_factory().start()
    expected: dict[tuple[str, int], int] = {}
    late_expected: dict[str, int] = {}
    sent = 0
    requests = 0
    # ~4 windows of traffic; region i gets i+1 events per request, so counts differ
    deadline = time.monotonic() + 4 * W_MS / 1000
    while time.monotonic() < deadline:
        events = [{"region": r, "user_id": "u1"} for i, r in enumerate(REGIONS) for _ in range(i + 1)]
        old = int(time.time() * 1000) - 400_000  # older than AGG_LATE_AFTER_SECONDS (300 s)
        events.append({"region": "EU-West", "ts": old})  # upper case is fine; client_delay late
        events.append({"region": "bad region"})           # rejected by index, the rest accepted
        status, _, ans = svc.post(events)
        assert status == 200, ans
        assert ans["accepted"] == len(events) - 1
        assert ans["rejected"] == 1
        assert ans["errors"][0]["index"] == len(events) - 1
        ws = ans["ingest_ts"] - ans["ingest_ts"] % W_MS
        for i, r in enumerate(REGIONS):
            expected[(r, ws)] = expected.get((r, ws), 0) + i + 1
        late_expected["eu-west"] = late_expected.get("eu-west", 0) + 1
        sent += len(events) - 1
        requests += 1
        time.sleep(0.15)
    windows = sorted({ws for _, ws in expected})
    assert len(windows) >= 3

    # every window of every region closes (a quiet partition advances with the wall clock)
    def all_closed():
        snaps = svc.snapshots()
        got = {(s["region"], s["window_start"]) for s in snaps}
        return snaps if all((r, ws) in got for r in REGIONS for ws in windows) else None

    snaps = wait_for(all_closed, 30, what="snapshots of all windows")
    by_key = {}
    for s in snaps:
        assert (s["region"], s["window_start"]) not in by_key, f"published twice: {s}"
        by_key[(s["region"], s["window_start"])] = s
    for r in REGIONS:
        for ws in windows:
            s = by_key[(r, ws)]
            assert s["count"] == expected.get((r, ws), 0), (r, ws, s)
            assert s["window_end"] == ws + W_MS
            assert s["emitted_at"] >= s["window_end"] + 1000  # closes only after grace
    late_total = sum(s["late_by_reason"]["client_delay"] for s in snaps if s["region"] == "eu-west")
    assert sum(s["late"] for s in snaps) == sum(
        s["late_by_reason"]["closed_window"] + s["late_by_reason"]["client_delay"] for s in snaps)
    # late events attach to the window open when processed; the last window may still be open
    assert late_total <= late_expected["eu-west"]

    # the same snapshots are on the click-snapshots topic, each (region, window) once
    import orjson
    topic = [orjson.loads(v) for _, v in read_topic(broker.url.split("://")[1], SNAPSHOTS)]
    topic_keys = [(s["region"], s["window_start"]) for s in topic]
    assert len(topic_keys) == len(set(topic_keys))
    on_topic = dict(zip(topic_keys, topic, strict=False))
    for k, s in by_key.items():  # the topic may already hold later (zero-count) windows too
        assert on_topic[k] == s

    # metrics, parsed with prometheus_client's own parser
    m = metric_samples(svc.metrics_text())
    for i, r in enumerate(REGIONS):
        counted_closed = sum(n for (rr, _), n in expected.items() if rr == r)
        assert m[("clickstream_events_total", (("region", r),))] == counted_closed
        assert m[("clickstream_events_ingested_total", (("region", r),))] == counted_closed + (
            late_expected["eu-west"] if r == "eu-west" else 0)
        # the gauges describe the last closed window (more may have closed since `snaps`)
        end_ms = int(m[("clickstream_window_end_timestamp_seconds", (("region", r),))] * 1000)
        assert end_ms >= windows[-1] + W_MS
        latest = {(s["region"], s["window_end"]): s for s in svc.snapshots()}
        assert m[("clickstream_window_events", (("region", r),))] == latest[(r, end_ms)]["count"]
    assert m[("clickstream_late_events_total", (("reason", "client_delay"), ("region", "eu-west")))] == late_total
    assert m[("clickstream_rejected_events_total", (("reason", "bad_region"),))] == requests
    # every stage reports: nothing left pending in ingest (all acknowledged), work done in each
    ingested = sum(v for (name, _), v in m.items() if name == "clickstream_events_ingested_total")
    assert m[("pipeline_stage_in_pending", (("stage", "ingest"),))] == 0
    assert m[("pipeline_stage_processed_total", (("stage", "ingest"),))] == ingested + requests
    assert m[("pipeline_stage_processed_total", (("stage", "decode"),))] >= ingested
    assert m[("pipeline_stage_processed_total", (("stage", "window"),))] >= sum(expected.values())
    assert m[("pipeline_stage_processed_total", (("stage", "publish"),))] >= len(by_key)
    assert m[("pipeline_stage_in_pending", (("stage", "spill"),))] == 0
