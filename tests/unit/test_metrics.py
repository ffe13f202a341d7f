"""aggregator/metrics.py: the standard collectors, build info, the settings as gauges and the
snapshot-delay buckets placed around the grace (docs/contract.md §5)."""
from __future__ import annotations

import platform
import time
from importlib.metadata import version

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import SWEEP_SECONDS, Metrics, snapshot_delay_buckets, status_class


def snap(region: str, window_end_s: float) -> dict:
    end = int(window_end_s * 1000)
    return {"region": region, "window_start": end - 60_000, "window_end": end, "count": 3, "late": 0,
            "late_by_reason": {"closed_window": 0, "client_delay": 0, "future_ts": 0}, "emitted_at": end}


def buckets(m: Metrics, name: str) -> dict[float, float]:
    """``{le: cumulative count}`` of an unlabelled histogram."""
    out = {}
    for fam in m.registry.collect():
        for s in fam.samples:
            if s.name == name + "_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def quantile(q: float, cumulative: dict[float, float]) -> float:
    """histogram_quantile as Prometheus computes it (linear within the bucket)."""
    les = sorted(cumulative)
    total = cumulative[float("inf")]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = cumulative[le]
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("grace", "window"), [(5.0, 60.0), (0.0, 1.0), (30.0, 300.0), (0.5, 2.0)])
def test_delay_buckets_are_dense_just_above_the_grace(grace, window):
    b = snapshot_delay_buckets(grace, window)
    assert list(b) == sorted(set(b)) and all(x > 0 for x in b)
    for offset in (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30):
        assert round(grace + offset, 3) in b
    assert round(grace + window, 3) in b
    below = [x for x in b if x < grace]
    assert len(below) == (4 if grace else 0)


def test_delay_at_the_default_grace_no_longer_reads_as_7_4_seconds():
    m = Metrics(grace_seconds=5.0, window_seconds=60.0)
    now = time.time()
    # every snapshot published 5.3 s after its window end (grace + a normal close)
    m.published([snap(f"r{i}", now - 5.3) for i in range(100)], time.perf_counter())
    cum = buckets(m, "clickstream_snapshot_delay_seconds")
    assert cum[5.25] == 0 and cum[5.5] == 100
    p99 = quantile(0.99, cum)
    assert 5.25 < p99 <= 5.5, p99  # the old fixed buckets (5, 7.5) gave ~7.47
    # overdue: the same snapshots, measured from window end + grace
    over = buckets(m, "clickstream_snapshot_overdue_seconds")
    assert over[0.25] == 0 and over[0.5] == 100
    assert m.registry.get_sample_value("clickstream_snapshots_published_total") == 100


def test_delay_buckets_follow_the_configured_grace():
    m = Metrics(grace_seconds=30.0, window_seconds=300.0)
    cum = buckets(m, "clickstream_snapshot_delay_seconds")
    assert {30.05, 30.5, 31.0, 35.0, 330.0} <= set(cum)
    m.published([snap("eu", time.time() - 10)], time.perf_counter())  # before the grace ended
    assert buckets(m, "clickstream_snapshot_overdue_seconds")[0.05] == 1  # 0, not negative


def test_settings_exported_as_gauges():
    m = Metrics(grace_seconds=2.5, window_seconds=10.0)
    assert m.registry.get_sample_value("clickstream_window_seconds") == 10.0
    assert m.registry.get_sample_value("clickstream_grace_seconds") == 2.5
    d = Metrics()  # the defaults of the settings
    assert d.registry.get_sample_value("clickstream_window_seconds") == 60.0
    assert d.registry.get_sample_value("clickstream_grace_seconds") == 5.0


def test_build_info_carries_the_package_and_python_versions():
    m = Metrics()
    labels = {"version": version("clickstream-aggregator"), "python": platform.python_version()}
    assert m.registry.get_sample_value("clickstream_build_info", labels) == 1
    infos = [s for fam in m.registry.collect() for s in fam.samples if s.name == "clickstream_build_info"]
    assert len(infos) == 1


def test_process_gc_and_platform_collectors_on_the_registry():
    m = Metrics()
    names = {s.name for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
             for s in fam.samples}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds", "python_gc_collections_total", "python_info"):
        assert name in names, name
    # per registry, not the global one: two processes' worth in one test run do not collide
    assert Metrics().registry is not m.registry


def test_http_series_start_at_zero_and_count_by_status_class():
    m = Metrics()
    m.http_routes(["/v1/events", "/metrics"])
    get = m.registry.get_sample_value
    for code in ("2xx", "4xx", "5xx"):
        assert get("clickstream_http_requests_total", {"route": "/v1/events", "code": code}) == 0
    m.http_request("/v1/events", 200, 0.002)
    m.http_request("/v1/events", 503, 5.0)
    m.http_request("/v1/events", 413, 0.01)
    m.http_request("/v1/events", 200, 0.003)
    assert get("clickstream_http_requests_total", {"route": "/v1/events", "code": "2xx"}) == 2
    assert get("clickstream_http_requests_total", {"route": "/v1/events", "code": "4xx"}) == 1
    assert get("clickstream_http_requests_total", {"route": "/v1/events", "code": "5xx"}) == 1
    assert get("clickstream_http_request_duration_seconds_count", {"route": "/v1/events"}) == 4
    assert get("clickstream_http_request_duration_seconds_bucket", {"route": "/v1/events", "le": "0.005"}) == 2


def test_status_class():
    assert [status_class(s) for s in (101, 200, 204, 304, 400, 499, 500, 503, 599)] == [
        "1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx", "5xx"]


def test_series_of_regions_idle_past_the_horizon_are_dropped():
    # issue 15, fault 11: Kafka-direct producers can name any number of regions over time
    m = Metrics(region_idle_seconds=100)
    m.counted({"eu": 3, "us": 2})
    m.limited({"eu": 1}, {"eu": 1})
    m.spill_backlog("eu", 1, 10)
    m.published([{"region": "eu", "window_start": 0, "window_end": 1000, "count": 3, "late": 1,
                  "late_by_reason": {"closed_window": 1, "client_delay": 0, "future_ts": 0}, "emitted_at": 0}],
                time.perf_counter())
    m.ingest_accepted({"us": 2}, 2, time.perf_counter())
    t0 = time.monotonic()
    m.counted({"us": 1})  # us stays active
    assert m.forget_idle_regions(t0 + 50) == []
    m._region_seen["us"] = t0 + 90
    assert m.forget_idle_regions(t0 + 150) == ["eu"]
    text = generate_latest(m.registry).decode()
    assert 'region="eu"' not in text
    assert 'clickstream_events_total{region="us"} 3.0' in text
    assert 'clickstream_events_ingested_total{region="us"} 2.0' in text
    m.counted({"eu": 1})  # a region that comes back starts again from 0
    assert m.registry.get_sample_value("clickstream_events_total", {"region": "eu"}) == 1


def test_window_aggregates_follow_the_last_snapshot_and_go_with_the_region():
    """clickstream_window_unique_users and clickstream_window_client_delay_seconds (issue 18)."""
    m = Metrics(grace_seconds=5.0, window_seconds=60.0, region_idle_seconds=100.0)
    now = time.time()

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    a = dict(snap("eu", now - 60), unique_users=1234,
             top_urls=[{"url": "/a", "count": 5}], client_delay_ms={"p50": 150.0, "p90": 900.5, "p99": 4100.0})
    m.published([a, snap("us", now - 60)], time.perf_counter())
    assert value("clickstream_window_unique_users", region="eu") == 1234
    assert value("clickstream_window_client_delay_seconds", region="eu", quantile="0.5") == 0.15
    assert value("clickstream_window_client_delay_seconds", region="eu", quantile="0.9") == 0.9005
    assert value("clickstream_window_client_delay_seconds", region="eu", quantile="0.99") == 4.1
    # a snapshot without the fields (aggregates off) changes nothing, and sets nothing
    assert value("clickstream_window_unique_users", region="us") is None
    m.published([snap("eu", now)], time.perf_counter())
    assert value("clickstream_window_unique_users", region="eu") == 1234
    # the next window: new values; no event with a ts: no delay series left behind
    m.published([dict(snap("eu", now), unique_users=7, top_urls=[], client_delay_ms=None)], time.perf_counter())
    assert value("clickstream_window_unique_users", region="eu") == 7
    assert value("clickstream_window_client_delay_seconds", region="eu", quantile="0.5") is None
    # URLs never become label values
    text = generate_latest(m.registry).decode()
    assert "/a" not in text and 'url="' not in text
    # a quantile label is a summary's (promtool refuses it on a gauge): typed so, quantiles only
    assert "# TYPE clickstream_window_client_delay_seconds summary" in text
    assert "clickstream_window_client_delay_seconds_sum" not in text
    # idle regions: both go with the other region series
    m.published([a], time.perf_counter())
    m._region_seen["eu"] = time.monotonic() - 101
    assert "eu" in m.forget_idle_regions()
    assert value("clickstream_window_unique_users", region="eu") is None
    for q in ("0.5", "0.9", "0.99"):
        assert value("clickstream_window_client_delay_seconds", region="eu", quantile=q) is None


def _region_series(m: Metrics, region: str) -> list[str]:
    return [line for line in generate_latest(m.registry).decode().splitlines()
            if f'region="{region}"' in line and not line.startswith("#")]


def test_idle_regions_are_dropped_when_the_whole_service_goes_quiet():
    # found by a review (/tmp/rev11/idle_metrics.py): the sweep ran only when some region
    # had events, so after traffic stopped every region series stayed, the window end froze
    # and ClickstreamSnapshotsStale paged for no fault; the broker probe (every second, every
    # role) runs it now
    clock = [1000.0]
    m = Metrics(grace_seconds=2, window_seconds=10, region_idle_seconds=60, clock=lambda: clock[0])
    m.counted({"c": 5})
    m.published([dict(snap("c", 2000), count=5)], time.perf_counter())
    for k in range(1, 7):  # zero-count snapshots for the idle horizon, then nothing
        clock[0] += 10
        m.published([dict(snap("c", 2000 + 10 * k), count=0)], time.perf_counter())
        m.broker_reachable(True)
    assert _region_series(m, "c")  # not idle yet
    clock[0] += 65
    m.broker_reachable(True)
    assert _region_series(m, "c") == []


def test_a_zero_count_snapshot_does_not_bring_back_a_region_swept_as_idle():
    # found by a review (/tmp/rev11/idle_metrics.py): published() re-created the gauges of a
    # region swept as idle for its last zero-count snapshot, without marking it seen, so no
    # later sweep removed them
    clock = [1000.0]
    m = Metrics(grace_seconds=2, window_seconds=10, region_idle_seconds=60, clock=lambda: clock[0])
    m.counted({"a": 5, "b": 5})
    m.published([snap("a", 1000), snap("b", 1000)], time.perf_counter())
    clock[0] += 61
    m.counted({"b": 5})
    m.sweep(clock[0] + SWEEP_SECONDS)
    assert _region_series(m, "a") == []
    m.published([dict(snap("a", 1060), count=0), snap("b", 1060)], time.perf_counter())
    assert _region_series(m, "a") == []
    assert m.registry.get_sample_value("clickstream_window_end_timestamp_seconds", {"region": "b"}) == 1060
    # a snapshot with events (or late ones) brings it back, to be swept again when idle
    m.published([dict(snap("a", 1070), count=0, late=1)], time.perf_counter())
    assert m.registry.get_sample_value("clickstream_window_end_timestamp_seconds", {"region": "a"}) == 1070
    assert "a" in m.forget_idle_regions(clock[0] + 61)


def test_zero_count_snapshots_of_a_region_its_book_still_holds_set_the_gauges():
    """After a restart the recovered book publishes zero-count snapshots of a quiet region
    before any event of it arrives: they are its window end (what ClickstreamSnapshotsStale
    watches), so they are exported while the book holds the region live."""
    clock = [1000.0]
    m = Metrics(grace_seconds=2, window_seconds=10, region_idle_seconds=60, clock=lambda: clock[0])
    m.sweep(live={"q"})  # the worker's tick: its books hold "q" within their idle horizon
    m.published([dict(snap("q", 2000), count=0)], time.perf_counter())
    assert m.registry.get_sample_value("clickstream_window_end_timestamp_seconds", {"region": "q"}) == 2000
    m.sweep(live=set())  # the book forgot it (idle in its own stream time)
    m.published([dict(snap("r", 2010), count=0)], time.perf_counter())
    assert _region_series(m, "r") == []


def test_gauges_set_for_a_live_region_are_swept_once_its_book_forgets_it():
    """Found by a review (/tmp/rev12/live_leak.py): gauges a zero-count snapshot set because
    the region's book held it (after a restart) were never swept, since the region was never
    marked seen: the frozen window end made ClickstreamSnapshotsStale fire on a quiet service."""
    clock = [1000.0]
    m = Metrics(grace_seconds=2, window_seconds=10, region_idle_seconds=60, clock=lambda: clock[0])
    m.sweep(live={"q"})
    m.published([dict(snap("q", 2000), count=0)], time.perf_counter())
    assert _region_series(m, "q")
    clock[0] += 30
    m.sweep(live=set())  # the book forgot it
    clock[0] += 31 + SWEEP_SECONDS
    m.broker_reachable(True)
    assert _region_series(m, "q") == []
