"""The Prometheus metrics of docs/contract.md §5, in one registry per process.

Callers say what happened (``ingest_accepted``, ``batch_decoded``, ``published`` …),
never which counter to bump: the metric names, label sets and the way tallies become
samples live here only.  Hot paths count into local dicts and report once per batch
or tick; no method here is called per event.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from aggregator.core.contract import LATE_REASONS, Snapshot
from aggregator.core.dedupid import SOURCES as DEDUP_SOURCES
from aggregator.metricdefs import (
    DELAY_QUANTILES,
    HTTP_BUCKETS,
    OVERDUE_BUCKETS,
    STAGE_BUCKETS,
    STATUS_CLASSES,
    SWEEP_SECONDS,
    package_version,
    snapshot_delay_buckets,
    status_class,
)
from aggregator.quantile_gauge import QuantileGauge

disable_created_metrics()

STAGES = ("ingest", "decode", "window", "spill", "publish")
SPILL_FAULTS = ("corrupt", "torn", "lost", "excess")


def _add_counts(counter: Counter, counts: Mapping[str, int] | Mapping[tuple[str, ...], int]) -> None:
    """Add a local ``{label: n}`` (or ``{(l1, l2): n}``) tally to a counter."""
    for key, n in counts.items():
        if n:
            counter.labels(*key).inc(n) if isinstance(key, tuple) else counter.labels(key).inc(n)


def _drop(metric: Counter | Gauge | QuantileGauge, *labels: str) -> None:
    with suppress(KeyError):  # a series never set: nothing to remove
        metric.remove(*labels)


class Metrics:
    """The metrics of one process; ``grace_seconds`` and ``window_seconds`` are the
    settings' (``AGG_GRACE_SECONDS``, ``AGG_WINDOW_SECONDS``): they place the snapshot-delay
    buckets and are exported as gauges, so alert rules derive their thresholds from them."""

    def __init__(self, grace_seconds: float = 5.0, window_seconds: float = 60.0, region_idle_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # collectors without describe() (process, GC, platform) also answer ``/metrics?name[]=``
        r = self.registry = CollectorRegistry(support_collectors_without_names=True)
        self.grace_seconds, self._clock = grace_seconds, clock  # clock: monotonic seconds (the idle sweep's)
        # region labels of regions without events for region_idle_seconds are dropped
        # (issue 15, fault 11): Kafka-direct producers can name any number of regions over time
        self.region_idle_seconds = region_idle_seconds
        self._region_seen: dict[str, float] = {}  # region label -> monotonic time of its last event
        self._live: set[str] = set()  # regions the worker's window books still report: never idle
        self._next_sweep = clock() + SWEEP_SECONDS
        ProcessCollector(registry=r), GCCollector(registry=r), PlatformCollector(registry=r)
        Gauge("clickstream_build_info", "1, labelled with the package and Python versions of this process",
              ["version", "python"], registry=r).labels(package_version(), platform.python_version()).set(1)
        Gauge("clickstream_window_seconds", "Tumbling window length (AGG_WINDOW_SECONDS)", registry=r).set(window_seconds)
        Gauge("clickstream_grace_seconds", "Grace after a window end before it closes (AGG_GRACE_SECONDS)",
              registry=r).set(grace_seconds)
        self._http_requests = Counter("clickstream_http_requests", "HTTP requests answered, by route template and "
                                      "status class", ["route", "code"], registry=r)
        self._http_duration = Histogram("clickstream_http_request_duration_seconds",
                                        "Time from a request's arrival to its answer, by route template", ["route"],
                                        buckets=HTTP_BUCKETS, registry=r)
        self._http_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._http_refused = Counter("clickstream_http_connections_refused", "HTTP connections refused over "
                                     "AGG_HTTP_MAX_CONNECTIONS (answered 503, closed unread)", registry=r)
        self._ingested = Counter("clickstream_events_ingested", "Events accepted over HTTP (broker acknowledged)",
                                 ["region"], registry=r)
        self._counted = Counter("clickstream_events", "Events counted into a window", ["region"], registry=r)
        self._window_events = Gauge("clickstream_window_events", "Count of the last closed window", ["region"], registry=r)
        self._window_end = Gauge("clickstream_window_end_timestamp_seconds",
                                 "End of the last closed window (epoch seconds)", ["region"], registry=r)
        # with aggregates on (AGG_AGGREGATES): from the snapshot of the last closed window;
        # URLs are never label values (the top pages are in /v1/snapshots)
        self._window_users = Gauge("clickstream_window_unique_users",
                                   "Distinct user_ids of the last closed window (exact up to 256, then a "
                                   "HyperLogLog estimate, within 5 % at the default precision)", ["region"], registry=r)
        self._window_delay = QuantileGauge("clickstream_window_client_delay_seconds",
                                           "Client delay (ingest time - client ts) of the last closed window's "
                                           "events, at quantile 0.5, 0.9, 0.99 (within 1 %)", ["region", "quantile"], r)
        self._late = Counter("clickstream_late_events", "Events put in the late bucket", ["region", "reason"], registry=r)
        self._rate_limited = Counter("clickstream_rate_limited_events", "Events over their region's rate limit",
                                     ["region"], registry=r)
        self._spilled = Counter("clickstream_spilled_events", "Events written to the spill", ["region"], registry=r)
        self._spill_backlog = Gauge("clickstream_spill_backlog_events", "Events in the spill not yet drained",
                                    ["region"], registry=r)
        self._spill_bytes = Gauge("clickstream_spill_bytes", "Bytes of spill on disk", ["region"], registry=r)
        self._rejected = Counter("clickstream_rejected_events", "Records rejected (HTTP or Kafka), by reason",
                                 ["reason"], registry=r)
        self._snapshot_delay = Histogram("clickstream_snapshot_delay_seconds", "Window end to snapshot publication",
                                         buckets=snapshot_delay_buckets(grace_seconds, window_seconds), registry=r)
        self._state_write_failures = Counter("clickstream_state_write_failures",
                                             "Window-state writes to the changelog the broker did not acknowledge "
                                             "(per partition and attempt; retried)", registry=r)
        self._snapshot_publish_failures = Counter("clickstream_snapshot_publish_failures",
                                                  "Snapshot publications to click-snapshots the broker did not "
                                                  "acknowledge (per partition and attempt; retried)", registry=r)
        self._source_log_resets = Counter("clickstream_source_log_resets",
                                          "Times a partition of clicks was found to have started over (topic "
                                          "recreated, broker back empty); its new log is counted from its start",
                                          ["partition"], registry=r)
        self._offsets_lost = Counter("clickstream_source_offsets_lost", "Offsets of clicks or clicks-repartition "
                                     "a partition's state had not applied that the log no longer holds (deleted by "
                                     "retention, or skipped by an offset reset): their events are lost",
                                     ["topic"], registry=r)
        self._snapshot_overdue = Histogram("clickstream_snapshot_overdue_seconds",
                                           "Window end + grace (when it may close) to snapshot publication, 0 if "
                                           "earlier", buckets=OVERDUE_BUCKETS, registry=r)
        self._stage_pending = Gauge("pipeline_stage_in_pending", "Items waiting for a stage", ["stage"], registry=r)
        self._stage_processed = Counter("pipeline_stage_processed", "Items processed by a stage", ["stage"], registry=r)
        self._stage_errors = Counter("pipeline_stage_errors", "Items a stage failed on", ["stage"], registry=r)
        self._stage_duration = Histogram("pipeline_stage_duration_seconds", "Time a stage spends on one batch",
                                         ["stage"], registry=r, buckets=STAGE_BUCKETS)
        self._consumer_lag = Gauge("clickstream_consumer_lag", "Records behind the partition end", ["partition"], registry=r)
        self._clock_ahead = Gauge("clickstream_worker_clock_ahead_seconds", "How far this worker's clock runs "
                                  "ahead of the records it reads (0: within AGG_MAX_AHEAD_SECONDS)", registry=r)
        self._clock_behind = Gauge("clickstream_worker_clock_behind_seconds", "How far this worker's clock runs "
                                   "behind the records' stamps, over AGG_MAX_AHEAD_SECONDS (0: not so): every "
                                   "event is set aside as future_ts meanwhile", registry=r)
        self._backpressure = Gauge("clickstream_backpressure", "1 while consumption is paused because the spill reached "
                                   "AGG_SPILL_MAX_BYTES or partitions wait for a spill disk that refuses writes", registry=r)
        self._spill_disk_errors = Counter("clickstream_spill_disk_errors",
                                          "Spill disk operations that failed (full, I/O error, read-only), by op: "
                                          "write (a batch held and retried), rollback, read (a drain retried), open (retried)",
                                          ["op"], registry=r)
        self._spill_held = Gauge("clickstream_spill_held_partitions",
                                 "Partitions not fetched because a batch of theirs waits for the spill disk", registry=r)
        self._spill_faults = Counter("clickstream_spill_faults",
                                     "Spill records found damaged on recovery or while draining (quarantined, re-read), "
                                     "lost (not in Kafka any more), or re-read beyond what was spilled by a rebuild (excess), "
                                     "by kind", ["kind"], registry=r)
        self._rebalancing = Gauge("clickstream_rebalance_seconds", "How long the current consumer-group rebalance "
                                  "(with its changelog recovery) has lasted on this worker; 0 when none", registry=r)
        self._rebalances = Counter("clickstream_rebalances", "Consumer-group rebalances this worker took part in", registry=r)
        self._recovered = Counter("clickstream_state_recovered_partitions",
                                  "Partitions whose window state was recovered from the changelog", registry=r)
        self._assigned = Gauge("clickstream_assigned_partitions", "Partitions of clicks this worker counts", registry=r)
        self._idempotent = Gauge("clickstream_ingest_idempotent_producer", "1 while ingest produces with Kafka's "
                                 "idempotent producer, 0 without (the broker refused it, or the embedded one)", registry=r)
        self._refused = Gauge("clickstream_refused_partitions", "Partitions of clicks assigned here whose stored "
                              "window state is refused (not fetched; /readyz says why)", registry=r)
        self._broker_reachable = Gauge("clickstream_broker_reachable", "1 while a bootstrap address of the broker "
                                       "accepts connections (probed every second)", registry=r)
        self._snapshots_published = Counter("clickstream_snapshots_published", "Final snapshots published", registry=r)
        self._duplicates = Counter("clickstream_duplicate_events",
                                   "Events dropped as repeats within AGG_DEDUP_SECONDS, by the id that made them "
                                   "one (idempotency_key or event_id)", ["region", "source"], registry=r)
        self._dedup_ids = Gauge("clickstream_dedup_ids", "Ids the worker remembers for dedup (event ids, and "
                                "idempotency keys)", ["kind"], registry=r)
        self._dedup_evicted = Counter("clickstream_dedup_evicted", "Dedup event ids and request keys forgotten "
                                      "before AGG_DEDUP_SECONDS passed: over AGG_DEDUP_MAX_IDS ids' worth", registry=r)
        self._forwards_lost = Counter("clickstream_forwards_lost", "Forwarded events the broker did not acknowledge "
                                      "while a later forward to their home was: lost unless it stored them", registry=r)
        self._repartitioned = Counter("clickstream_repartitioned_events", "Events of clicks forwarded to their "
                                      "region's home partition (clicks-repartition)", registry=r)
        self._fenced = Counter("clickstream_worker_fenced", "Times this worker held its writes because its group may "
                               "have dropped it (no heartbeat answered for half AGG_SESSION_TIMEOUT)", registry=r)
        for kind in SPILL_FAULTS:
            self._spill_faults.labels(kind)
        for op in ("write", "rollback", "read", "open"):  # exported at 0 from the start
            self._spill_disk_errors.labels(op)
        for stage in STAGES:
            self._stage_pending.labels(stage)
            self._stage_processed.labels(stage)
            self._stage_errors.labels(stage)
        # labelled children looked up once, not per request or batch
        self._ingest_processed = self._stage_processed.labels("ingest")
        self._ingest_duration = self._stage_duration.labels("ingest")
        self._ingest_pending = self._stage_pending.labels("ingest")
        self._ingest_errors = self._stage_errors.labels("ingest")
        self._ingested_by_region: dict[str, Counter] = {}

    # ---------------------------------------------------------------- HTTP
    def http_routes(self, routes: Iterable[str]) -> None:
        """The route templates served: their series start at 0 for every status class, so a
        ratio of 5xx to all requests is 0 (not absent) while nothing failed."""
        for route in routes:
            for code in STATUS_CLASSES:
                self._http_child(route, code)

    def http_request(self, route: str, status: int, seconds: float | None) -> None:
        """``route``: a route template, never a raw path; ``seconds`` None: not timed (refused by the parser)."""
        count, duration = self._http_child(route, status_class(status))
        count.inc()
        if seconds is not None:
            duration.observe(seconds)

    def http_connections_refused(self, n: int = 1) -> None:  # over the connection cap (web.server)
        self._http_refused.inc(n)

    def _http_child(self, route: str, code: str) -> tuple[Counter, Histogram]:
        key = (route, code)
        child = self._http_children.get(key)
        if child is None:  # bounded: the app's route templates (+ "unmatched") x five classes
            child = self._http_children[key] = (self._http_requests.labels(route, code), self._http_duration.labels(route))
        return child

    # ---------------------------------------------------------------- regions
    def _seen(self, regions: Iterable[str]) -> None:
        """Regions with events now (called per batch or tick, with its tally's keys)."""
        now = self._clock()
        for region in regions:
            self._region_seen[region] = now
        self.sweep(now)

    def sweep(self, now: float | None = None, live: Iterable[str] | None = None) -> None:
        """The idle sweep, at most every SWEEP_SECONDS, also without events (broker probe; worker tick: ``live``)."""
        self._live = self._live if live is None else set(live)
        now = self._clock() if now is None else now
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            self.forget_idle_regions(now)

    def forget_idle_regions(self, now: float | None = None) -> list[str]:
        """Drop the series of regions without events for ``region_idle_seconds`` (-> them); a
        counter that comes back starts at 0 (rate() and increase() take it as a reset)."""
        horizon = (self._clock() if now is None else now) - self.region_idle_seconds
        idle = [r for r, t in self._region_seen.items() if t < horizon and r not in self._live]
        for region in idle:
            del self._region_seen[region]
            self._ingested_by_region.pop(region, None)
            for metric in (self._ingested, self._counted, self._rate_limited, self._spilled):
                _drop(metric, region)
            for reason in LATE_REASONS:
                _drop(self._late, region, reason)
            for source in DEDUP_SOURCES:
                _drop(self._duplicates, region, source)
        self.regions_gone(idle)
        return idle

    def regions_gone(self, regions: Iterable[str]) -> None:
        """Drop the last-window and spill gauges of ``regions`` (idle, or their home partition
        moved to another worker: the new owner says them); counters stay."""
        for region in regions:
            for metric in (self._window_events, self._window_end, self._window_users, self._spill_backlog, self._spill_bytes):
                _drop(metric, region)
            for q in DELAY_QUANTILES.values():
                _drop(self._window_delay, region, q)

    # ---------------------------------------------------------------- ingest
    def ingest_waiting(self, n: int) -> None:  # ``n`` records handed to the broker (negative: answered)
        self._ingest_pending.inc(n)

    def ingest_accepted(self, per_region: Mapping[str, int], items: int, started: float) -> None:
        """A request was answered 200: ``per_region`` acknowledged by the broker, ``items``
        records in the body; ``started`` is its ``time.perf_counter()`` at arrival."""
        children = self._ingested_by_region
        self._seen(per_region)
        for region, n in per_region.items():
            child = children.get(region)
            if child is None:  # bounded: ingest caps regions at AGG_MAX_REGIONS + __other__
                child = children[region] = self._ingested.labels(region)
            child.inc(n)
        self._ingest_processed.inc(items)
        self._ingest_duration.observe(time.perf_counter() - started)

    def ingest_failed(self, n: int = 1) -> None:  # a body not parsed (1), or n records the broker did not take
        self._ingest_errors.inc(n)

    def rejected(self, reasons: Mapping[str, int]) -> None:  # records refused (HTTP or Kafka), by reason
        _add_counts(self._rejected, reasons)

    # ---------------------------------------------------------------- worker
    def batch_decoded(self, records: int, rejected: Mapping[str, int], seconds: float) -> None:
        if rejected:
            _add_counts(self._rejected, rejected)
            self._stage_errors.labels("decode").inc(sum(rejected.values()))
        self._stage_processed.labels("decode").inc(records)
        self._stage_duration.labels("decode").observe(seconds)

    def batch_windowed(self, events: int, seconds: float) -> None:
        self._stage_processed.labels("window").inc(events)
        self._stage_duration.labels("window").observe(seconds)

    def batch_spilled(self, events: int, seconds: float) -> None:
        self._stage_processed.labels("spill").inc(events)
        self._stage_duration.labels("spill").observe(seconds)

    def state_write_failed(self, partitions: int) -> None:  # window states the broker did not acknowledge
        self._state_write_failures.inc(partitions)

    def snapshot_publish_failed(self, partitions: int) -> None:  # snapshots of partitions not acknowledged
        self._snapshot_publish_failures.inc(partitions)

    def source_log_reset(self, partition: int) -> None:  # started over under the worker (core.sourcelog)
        self._source_log_resets.labels(str(partition)).inc()

    def source_offsets_lost(self, topic: str, n: int) -> None:  # skipped from a partition's state (retention, reset)
        self._offsets_lost.labels(topic).inc(n)

    def spill_drained(self, events: int) -> None:
        self._stage_processed.labels("spill").inc(events)

    def counted(self, per_region: Mapping[str, int]) -> None:  # events counted into windows since the last report
        self._seen(per_region)
        _add_counts(self._counted, per_region)

    def duplicates(self, dups: Mapping[tuple[str, str], int]) -> None:  # events dropped as repeats, by (region, source)
        self._seen(region for region, _ in dups)
        for (region, source), n in dups.items():
            self._duplicates.labels(region, source).inc(n)

    def dedup_evicted(self, n: int) -> None:
        self._dedup_evicted.inc(n)

    def dedup_size(self, event_ids: int, keys: int) -> None:
        self._dedup_ids.labels("event_id").set(event_ids)
        self._dedup_ids.labels("idempotency_key").set(keys)

    def limited(self, spilled: Mapping[str, int], rate_limited: Mapping[str, int]) -> None:  # spilled, over-rate events
        self._seen(spilled)
        self._seen(rate_limited)
        _add_counts(self._spilled, spilled)
        _add_counts(self._rate_limited, rate_limited)

    def spill_backlog(self, region: str, events: int, nbytes: int) -> None:
        if events:
            self._seen((region,))
        self._spill_backlog.labels(region).set(events)
        self._spill_bytes.labels(region).set(nbytes)

    def spill_left(self, label: str, nbytes: int) -> None:
        """Bytes of the spill partitions not owned here left on disk, under ``label``: no
        events of it drain here, so it has no backlog series; 0 drops the series."""
        if nbytes:
            self._spill_bytes.labels(label).set(nbytes)
        else:
            _drop(self._spill_bytes, label)

    def spill_fault(self, kind: str, n: int) -> None:  # spill records found corrupt or torn on recovery, or lost
        if n:
            self._spill_faults.labels(kind).inc(n)

    def pending(self, stage: str, n: int) -> None:  # items waiting in stage (decode: lag; spill: backlog; publish: outbox)
        self._stage_pending.labels(stage).set(n)

    def partition_lag(self, partition: int, lag: int) -> None:
        self._consumer_lag.labels(str(partition)).set(lag)

    def partition_gone(self, partition: int) -> None:  # moved: its lag is its new owner's to say
        _drop(self._consumer_lag, str(partition))

    def clock_ahead(self, ms: int, behind_ms: int) -> None:
        self._clock_ahead.set(ms / 1000)
        self._clock_behind.set(behind_ms / 1000)

    def backpressure(self, on: bool) -> None:
        self._backpressure.set(1 if on else 0)

    def spill_disk_error(self, op: str) -> None:
        self._spill_disk_errors.labels(op).inc()

    def spill_held(self, partitions: int) -> None:
        self._spill_held.set(partitions)

    def ingest_idempotent(self, on: bool) -> None:
        self._idempotent.set(1 if on else 0)

    def assigned(self, n: int, refused: int = 0) -> None:
        self._assigned.set(n)
        self._refused.set(refused)

    def broker_reachable(self, up: bool) -> None:  # every second, in every role
        self._broker_reachable.set(1 if up else 0)
        self.sweep()

    def repartitioned(self, events: int) -> None:  # events of a batch forwarded to their region's home partition
        self._repartitioned.inc(events)

    def forwards_lost(self, events: int) -> None:  # overtaken by a later forward to their home (checkpoint)
        self._forwards_lost.inc(events)

    def fenced(self) -> None:  # the checkpoint holds its writes: the group may have dropped this worker
        self._fenced.inc()

    def rebalanced(self) -> None:
        self._rebalances.inc()

    def rebalancing_for(self, seconds: float) -> None:
        self._rebalancing.set(seconds)

    def state_recovered(self) -> None:
        self._recovered.inc()

    def _set_delays(self, region: str, delays: Mapping[str, float] | None) -> None:
        """The last closed window's client-delay quantiles (ms in the snapshot); None (no
        event of the window carried a ts): the region's series go, so no stale value stays."""
        for key, q in DELAY_QUANTILES.items():
            v = None if delays is None else delays.get(key)
            if v is None:
                _drop(self._window_delay, region, q)
            else:
                self._window_delay.labels(region, q).set(v / 1000)

    def published(self, snaps: Iterable[Snapshot], started: float) -> None:
        """Final snapshots are out (``started``: ``time.perf_counter()`` before publishing)."""
        now = time.time()
        grace = self.grace_seconds
        n = 0
        for snap in snaps:
            n += 1
            r = snap["region"]
            if snap["count"] or snap["late"]:
                self._seen((r,))
            if r in self._live:  # its book holds it: swept an idle period after the book forgets it
                self._region_seen.setdefault(r, self._clock())
            if r in self._region_seen:  # not a zero-count one of a region swept as idle
                self._window_events.labels(r).set(snap["count"])
                self._window_end.labels(r).set(snap["window_end"] / 1000)
                if "unique_users" in snap:
                    self._window_users.labels(r).set(snap["unique_users"])
                if "client_delay_ms" in snap:
                    self._set_delays(r, snap["client_delay_ms"])
            for reason, k in snap["late_by_reason"].items():
                if k:
                    self._late.labels(r, reason).inc(k)
            delay = max(0.0, now - snap["window_end"] / 1000)
            self._snapshot_delay.observe(delay)
            self._snapshot_overdue.observe(max(0.0, delay - grace))
        self._snapshots_published.inc(n)
        self._stage_processed.labels("publish").inc(n)
        self._stage_duration.labels("publish").observe(time.perf_counter() - started)
