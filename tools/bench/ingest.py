"""(2) HTTP ingest rate and latency, and (3) snapshot delay, on a fresh broker, with the load
generator (tools/bench/loadgen.py) in a process of its own, against either

  * ``split``: an ingest process (``aggregator run --role ingest``) with a worker process
    (``--role worker``) counting everything it ingests, the deployment for heavy HTTP load;
  * ``one``: ``aggregator run`` (the default role ``all``: ingest and worker in one process,
    one interpreter lock).

One run:
  a. batch 1000, closed loop: the maximum rate and its latency (split: also with the
     worker process stopped, the ingest process's own capacity);
  b. batch 10, closed loop: the same for small requests;
  c. batch 1000, open loop at half of (a)'s rate: latency at a fixed offered rate, while the
     snapshots of the short windows (``window_s``, ``grace_s``) are watched on /metrics and
     on ``click-snapshots``: delay = first seen - window end (- grace);
then every accepted event is checked to be ingested, and counted into a window or the late
bucket, exactly.  ``ingest_run(..., half_rate=R)`` runs phase c alone at R (the bench's
half-rate phase again on a fresh embedded broker: tools/bench/__main__.py).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import orjson

from aggregator.core.contract import SNAPSHOTS
from tools.bench.common import (
    INGESTED,
    PROCESSED,
    WINDOW_END,
    BenchService,
    by_label,
    cpu_seconds,
    metrics,
    proc_status,
)
from tools.harness import REPO


@dataclass
class Phase:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    offered: float
    requests: int
    server_cpu: float   # CPU seconds per wall second (1.0 = one core) of the process serving HTTP
    loadgen_cpu: float  # load generator CPU seconds per wall second
    worker_cpu: float = float("nan")  # the same for the worker process (split only)
    over_100ms: int = 0         # requests slower than 100 ms, as the load generator saw them
    server_over_100ms: int = -1  # ... and as the ingest handler measured itself (-1: not read)
    raw: dict = field(default_factory=dict)


@dataclass
class SnapshotDelays:
    metrics_s: list[float] = field(default_factory=list)  # after grace
    topic_s: list[float] = field(default_factory=list)    # after grace
    poll_s: float = 0.05


@dataclass
class IngestRun:
    phases: dict[str, Phase]
    snapshots: SnapshotDelays
    accepted: int
    counted: int
    late: int
    exact: bool
    detail: str = ""
    dedup_keys: int = 0          # idempotency keys the worker remembers at the end (loadgen sends one a request)
    worker_rss_mb: float = 0.0   # the worker process's peak RSS (with its dedup state)


def loadgen(url: str, batch: int, duration: float, concurrency: int = 8, rate: float = 0.0,
            warmup: float = 1.0, pid: int = 0, name: str = "", worker_pid: int = 0) -> Phase:
    cmd = [sys.executable, "-m", "tools.bench.loadgen", "--url", url, "--batch", str(batch),
           "--duration", str(duration), "--concurrency", str(concurrency), "--warmup", str(warmup)]
    if rate:
        cmd += ["--rate", str(rate)]
    slow0 = _server_slow(url)
    cpu0, wcpu0, t0 = cpu_seconds(pid), cpu_seconds(worker_pid), time.perf_counter()
    out = subprocess.run(cmd, cwd=str(REPO), capture_output=True, timeout=duration + warmup + 120)
    wall = time.perf_counter() - t0
    server_cpu = (cpu_seconds(pid) - cpu0) / wall if pid else float("nan")
    worker_cpu = (cpu_seconds(worker_pid) - wcpu0) / wall if worker_pid else float("nan")
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.decode(errors='replace')[-3000:]}")
    res = orjson.loads(out.stdout.splitlines()[-1])
    bad = {k: v for k, v in res["statuses"].items() if k != "200"}
    if bad:
        raise RuntimeError(f"ingest answered other than 200: {bad}")
    return Phase(name=name, rate=res["rate"], p50_ms=res["p50_ms"], p99_ms=res["p99_ms"], max_ms=res["max_ms"],
                 offered=rate, requests=res["requests"], server_cpu=server_cpu,
                 loadgen_cpu=res["cpu_s"] / res["wall_s"], worker_cpu=worker_cpu, raw=res,
                 over_100ms=res["over_100ms"], server_over_100ms=_server_slow(url) - slow0)


def _server_slow(url: str) -> int:
    """Ingest requests so far whose handler took over 100 ms (``pipeline_stage_duration_seconds``)."""
    try:
        m = metrics(url)
    except OSError:
        return 0
    count = by_label(m.get("pipeline_stage_duration_seconds_count", {}), "stage").get("ingest", 0)
    fast = 0.0
    for labels, v in m.get("pipeline_stage_duration_seconds_bucket", {}).items():
        d = dict(labels)
        if d.get("stage") == "ingest" and d.get("le") == "0.1":
            fast = v
    return int(count - fast)


class SnapshotWatcher:
    """Watches /metrics (``clickstream_window_end_timestamp_seconds`` per region) and the
    ``click-snapshots`` topic from a thread of its own; records when each window's
    snapshot is first seen."""

    def __init__(self, url: str, bootstrap: str, poll: float = 0.05) -> None:
        self.url, self.bootstrap, self.poll = url, bootstrap, poll
        self.seen_metrics: dict[tuple[str, float], float] = {}
        self.seen_topic: dict[tuple[str, int], float] = {}
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def start(self) -> SnapshotWatcher:
        self.thread.start()
        self.ready.wait(30)
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from aiokafka import AIOKafkaConsumer

        c = AIOKafkaConsumer(SNAPSHOTS, bootstrap_servers=self.bootstrap, auto_offset_reset="latest",
                             group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20)
        await c.start()
        await c.seek_to_end()
        self.ready.set()

        async def topic() -> None:
            while not self.stop_flag.is_set():
                batch = await c.getmany(timeout_ms=100)
                now = time.time()
                for recs in batch.values():
                    for rec in recs:
                        s = orjson.loads(rec.value)
                        self.seen_topic.setdefault((s["region"], s["window_end"]), now)

        async def scrape() -> None:
            loop = asyncio.get_running_loop()
            while not self.stop_flag.is_set():
                try:
                    m = await loop.run_in_executor(None, partial(metrics, self.url, names=(WINDOW_END,)))
                except OSError:
                    m = {}
                now = time.time()
                for region, end in by_label(m.get(WINDOW_END, {}), "region").items():
                    self.seen_metrics.setdefault((region, end), now)
                await asyncio.sleep(self.poll)

        try:
            await asyncio.gather(topic(), scrape())
        finally:
            await c.stop()

    def delays(self, t_from: float, t_to: float, grace: float) -> SnapshotDelays:
        """Delays after grace of windows that ended in [t_from, t_to] (epoch seconds)."""
        out = SnapshotDelays(poll_s=self.poll)
        for (_, end), seen in self.seen_metrics.items():
            if t_from <= end <= t_to:
                out.metrics_s.append(seen - end - grace)
        for (_, end_ms), seen in self.seen_topic.items():
            end = end_ms / 1000
            if t_from <= end <= t_to:
                out.topic_s.append(seen - end - grace)
        return out


def ingest_run(broker_url: str, duration: float = 10.0, window_s: float = 2.0, grace_s: float = 1.0,
               small_concurrency: int = 32, big_concurrency: int = 8, split: bool = True,
               small: bool = True, half: bool = True, aggregates: bool = False,
               half_rate: float = 0.0) -> IngestRun:
    """Phases max_1000, max_10 (``small``) and half_1000 (``half``, with the snapshot
    watcher), then the exactness check; ``split``: ingest and worker in two processes, else
    in one; ``aggregates``: AGG_AGGREGATES on in both.  ``half_rate``: only the half-rate
    phase, at this offered rate (half of a maximum measured in another run)."""
    bootstrap = broker_url.split("://", 1)[1]
    env = {"AGG_WINDOW_SECONDS": str(window_s), "AGG_GRACE_SECONDS": str(grace_s),
           "AGG_AGGREGATES": "true" if aggregates else "false"}
    if split:
        worker = BenchService(broker_url, env=dict(env, AGG_ROLE="worker")).start(wait_ready=None)
        front = BenchService(broker_url, env=dict(env, AGG_ROLE="ingest")).start(wait_ready=None)
    else:
        worker = front = BenchService(broker_url, env=env).start(wait_ready=None)
    try:
        worker.wait_ready()
        front.wait_ready()
        pid, wpid = front.proc.pid, (worker.proc.pid if split else 0)
        kind = "split" if split else "one process"
        phases: dict[str, Phase] = {}
        if not half_rate:
            phases["max_1000"] = loadgen(front.url, 1000, duration, big_concurrency, pid=pid, worker_pid=wpid,
                                         name=f"{kind}: batch 1000, max")
        if split and not half_rate:
            # the ingest process's own capacity: the same load with the worker process stopped
            # (SIGSTOP), so that the two cores are the ingest's, the broker's and the load
            # generator's; the worker catches up afterwards and counts it all the same
            os.kill(wpid, signal.SIGSTOP)
            try:
                phases["alone_1000"] = loadgen(front.url, 1000, duration, big_concurrency, pid=pid,
                                               name=f"{kind}: batch 1000, max, worker stopped")
            finally:
                os.kill(wpid, signal.SIGCONT)
        if small and not half_rate:
            phases["max_10"] = loadgen(front.url, 10, duration, small_concurrency, pid=pid, worker_pid=wpid,
                                       name=f"{kind}: batch 10, max")
        snaps = SnapshotDelays()
        if half:
            _caught_up(front.url, worker.url)  # the half-rate phase must not overlap the worker's backlog
            watcher = SnapshotWatcher(worker.url, bootstrap).start()
            t_from = time.time() + 1.0
            phases["half_1000"] = loadgen(front.url, 1000, duration + 5, rate=half_rate or phases["max_1000"].rate / 2,
                                          pid=pid, worker_pid=wpid, name=f"{kind}: batch 1000, half rate")
            t_to = time.time()
            time.sleep(window_s + grace_s + 1.5)  # the last windows of the load close and publish
            watcher.stop()
            snaps = watcher.delays(t_from, t_to, grace_s)
        worker.check_alive()
        front.check_alive()
        accepted = sum(p.raw["accepted"] for p in phases.values())
        expected: dict[str, int] = {}
        for p in phases.values():
            for r, n in p.raw["per_region"].items():
                expected[r] = expected.get(r, 0) + n
        # every accepted event: ingested, and counted into a closed window or the late bucket
        deadline = time.monotonic() + 60
        while True:
            m = metrics(front.url)
            ingested = {k: int(v) for k, v in by_label(m.get("clickstream_events_ingested_total", {}), "region").items()}
            m = metrics(worker.url)
            counted = {k: int(v) for k, v in by_label(m.get("clickstream_events_total", {}), "region").items()}
            late = int(sum(m.get("clickstream_late_events_total", {}).values()))
            closed = {}
            for snap in worker.snapshots():
                closed[snap["region"]] = closed.get(snap["region"], 0) + snap["count"] + snap["late"]
            exact = ingested == expected and closed == expected
            if exact or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        keys = int(by_label(m.get("clickstream_dedup_ids", {}), "kind").get("idempotency_key", 0))
        detail = "" if exact else (f"expected {sum(expected.values())} per loadgen answers, ingested "
                                   f"{sum(ingested.values())}, counted {sum(counted.values())}, late {late}, "
                                   f"in closed windows {sum(closed.values())}")
        return IngestRun(phases=phases, snapshots=snaps, accepted=accepted, counted=sum(counted.values()),
                         late=late, exact=exact, detail=detail, dedup_keys=keys,
                         worker_rss_mb=proc_status(wpid or pid, "VmHWM"))
    finally:
        front.stop()
        if split:
            worker.stop()


def _caught_up(front_url: str, worker_url: str, timeout: float = 60.0) -> None:
    """Wait until the worker has applied every event ingested so far; RuntimeError after
    ``timeout`` (a half-rate phase over the worker's backlog would measure the backlog)."""
    deadline = time.monotonic() + timeout
    while True:
        ingested = sum(metrics(front_url, names=(INGESTED,)).get(INGESTED, {}).values())
        applied = by_label(metrics(worker_url, names=(PROCESSED,)).get(PROCESSED, {}), "stage").get("window", 0)
        if applied >= ingested:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not catch up within {timeout:.0f} s: applied {applied:.0f} "
                               f"of {ingested:.0f} events ingested")
        time.sleep(0.2)
