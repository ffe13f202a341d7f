"""Prometheus metrics of CONTRACT §5, in one registry per process.

Hot paths count into local dicts and call ``add_counts`` once per batch;
no metric call happens per event."""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

STAGES = ("ingest", "decode", "window", "spill", "publish")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ingested = Counter("clickstream_events_ingested", "Events accepted over HTTP (broker acknowledged)", ["region"], registry=r)
        self.counted = Counter("clickstream_events", "Events counted into a window", ["region"], registry=r)
        self.window_events = Gauge("clickstream_window_events", "Count of the last closed window", ["region"], registry=r)
        self.window_end = Gauge("clickstream_window_end_timestamp_seconds", "End of the last closed window (epoch seconds)", ["region"], registry=r)
        self.late = Counter("clickstream_late_events", "Events put in the late bucket", ["region", "reason"], registry=r)
        self.rate_limited = Counter("clickstream_rate_limited_events", "Events over their region's rate limit", ["region"], registry=r)
        self.spilled = Counter("clickstream_spilled_events", "Events written to the spill", ["region"], registry=r)
        self.spill_backlog = Gauge("clickstream_spill_backlog_events", "Events in the spill not yet drained", ["region"], registry=r)
        self.spill_bytes = Gauge("clickstream_spill_bytes", "Bytes of spill on disk", ["region"], registry=r)
        self.rejected = Counter("clickstream_rejected_events", "Records rejected (HTTP or Kafka), by reason", ["reason"], registry=r)
        self.snapshot_delay = Histogram("clickstream_snapshot_delay_seconds", "Window end to snapshot publication",
                                        buckets=(0.1, 0.25, 0.5, 1, 2, 5, 7.5, 10, 15, 30, 60, 120, 300), registry=r)
        self.stage_pending = Gauge("pipeline_stage_in_pending", "Items waiting to be processed by a stage", ["stage"], registry=r)
        self.stage_processed = Counter("pipeline_stage_processed", "Items processed by a stage", ["stage"], registry=r)
        self.stage_errors = Counter("pipeline_stage_errors", "Items a stage failed on", ["stage"], registry=r)
        self.stage_duration = Histogram("pipeline_stage_duration_seconds", "Time a stage spends on one batch", ["stage"],
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.consumer_lag = Gauge("clickstream_consumer_lag", "Records behind the partition end", ["partition"], registry=r)
        self.backpressure = Gauge("clickstream_backpressure", "1 while consumption is paused because the spill reached AGG_SPILL_MAX_BYTES", registry=r)
        self.spill_faults = Counter("clickstream_spill_faults", "Spill records found damaged on recovery (quarantined, re-read from Kafka), or lost (not in Kafka any more), by kind", ["kind"], registry=r)
        for kind in ("corrupt", "torn", "lost"):
            self.spill_faults.labels(kind)
        self.rebalances = Counter("clickstream_rebalances", "Consumer-group rebalances this worker took part in", registry=r)
        self.recovered = Counter("clickstream_state_recovered_partitions", "Partitions whose window state was recovered from the changelog", registry=r)
        self.assigned = Gauge("clickstream_assigned_partitions", "Partitions of clicks this worker counts", registry=r)
        self.snapshots_published = Counter("clickstream_snapshots_published", "Final snapshots published", registry=r)
        for stage in STAGES:
            self.stage_pending.labels(stage)
            self.stage_processed.labels(stage)
            self.stage_errors.labels(stage)

    @staticmethod
    def add_counts(counter: Counter, counts: Mapping[str, float] | Mapping[tuple[str, ...], float]) -> None:
        """Add a local ``{label: n}`` (or ``{(l1, l2): n}``) tally to a counter."""
        for key, n in counts.items():
            if n:
                if isinstance(key, tuple):
                    counter.labels(*key).inc(n)
                else:
                    counter.labels(key).inc(n)
