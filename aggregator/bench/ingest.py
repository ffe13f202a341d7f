"""(2) HTTP ingest rate and latency, and (3) snapshot delay, against ``aggregator run``
(ingest and worker in one process) on a fresh broker, with the load generator
(aggregator/bench/loadgen.py) in a second process.

One run:
  a. batch 1000, closed loop: the maximum rate and its latency;
  b. batch 10, closed loop: the same for small requests;
  c. batch 1000, open loop at half of (a)'s rate: latency at a fixed offered rate, while the
     snapshots of the short windows (``window_s``, ``grace_s``) are watched on /metrics and
     on ``click-snapshots``: delay = first seen - window end (- grace);
then every accepted event is checked to be ingested, and counted into a window or the late
bucket, exactly.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import orjson

from aggregator.bench.common import REPO, ServiceProc, by_label, cpu_seconds, metrics, percentile, stop_group
from aggregator.broker import SNAPSHOTS


@dataclass
class Phase:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    offered: float
    requests: int
    server_cpu: float   # service CPU seconds per wall second (1.0 = one core)
    loadgen_cpu: float  # load generator CPU seconds per wall second
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


def loadgen(url: str, batch: int, duration: float, concurrency: int = 8, rate: float = 0.0,
            warmup: float = 1.0, pid: int = 0, name: str = "") -> Phase:
    cmd = [sys.executable, "-m", "aggregator.bench.loadgen", "--url", url, "--batch", str(batch),
           "--duration", str(duration), "--concurrency", str(concurrency), "--warmup", str(warmup)]
    if rate:
        cmd += ["--rate", str(rate)]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    out = subprocess.run(cmd, cwd=str(REPO), capture_output=True, timeout=duration + warmup + 120)
    wall = time.perf_counter() - t0
    server_cpu = (cpu_seconds(pid) - cpu0) / wall if pid else float("nan")
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.decode(errors='replace')[-3000:]}")
    res = orjson.loads(out.stdout.splitlines()[-1])
    bad = {k: v for k, v in res["statuses"].items() if k != "200"}
    if bad:
        raise RuntimeError(f"ingest answered other than 200: {bad}")
    return Phase(name=name, rate=res["rate"], p50_ms=res["p50_ms"], p99_ms=res["p99_ms"], max_ms=res["max_ms"],
                 offered=rate, requests=res["requests"], server_cpu=server_cpu,
                 loadgen_cpu=res["cpu_s"] / res["wall_s"], raw=res)


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

    def start(self) -> "SnapshotWatcher":
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
                    m = await loop.run_in_executor(None, metrics, self.url)
                except OSError:
                    m = {}
                now = time.time()
                for region, end in by_label(m.get("clickstream_window_end_timestamp_seconds", {}), "region").items():
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
               small_concurrency: int = 32, big_concurrency: int = 8) -> IngestRun:
    bootstrap = broker_url.split("://", 1)[1]
    svc = ServiceProc(broker_url, env={"AGG_WINDOW_SECONDS": str(window_s), "AGG_GRACE_SECONDS": str(grace_s)})
    svc.start().wait_ready()
    try:
        pid = svc.proc.pid
        phases: dict[str, Phase] = {}
        phases["max_1000"] = loadgen(svc.url, 1000, duration, big_concurrency, pid=pid, name="batch 1000, max")
        phases["max_10"] = loadgen(svc.url, 10, duration, small_concurrency, pid=pid, name="batch 10, max")
        half = phases["max_1000"].rate / 2
        watcher = SnapshotWatcher(svc.url, bootstrap).start()
        t_from = time.time() + 1.0
        phases["half_1000"] = loadgen(svc.url, 1000, duration + 5, rate=half, pid=pid, name="batch 1000, half rate")
        t_to = time.time()
        time.sleep(window_s + grace_s + 1.5)  # the last windows of the load close and publish
        watcher.stop()
        snaps = watcher.delays(t_from, t_to, grace_s)
        svc.check_alive()
        accepted = sum(p.raw["accepted"] for p in phases.values())
        expected: dict[str, int] = {}
        for p in phases.values():
            for r, n in p.raw["per_region"].items():
                expected[r] = expected.get(r, 0) + n
        # every accepted event: ingested, and counted into a closed window or the late bucket
        deadline = time.monotonic() + 60
        while True:
            m = metrics(svc.url)
            ingested = {k: int(v) for k, v in by_label(m.get("clickstream_events_ingested_total", {}), "region").items()}
            counted = {k: int(v) for k, v in by_label(m.get("clickstream_events_total", {}), "region").items()}
            late = int(sum(m.get("clickstream_late_events_total", {}).values()))
            closed = {}
            for snap in orjson.loads(_get(svc.url + "/v1/snapshots"))["snapshots"]:
                closed[snap["region"]] = closed.get(snap["region"], 0) + snap["count"] + snap["late"]
            exact = ingested == expected and closed == expected
            if exact or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        detail = "" if exact else (f"expected {sum(expected.values())} per loadgen answers, ingested "
                                   f"{sum(ingested.values())}, counted {sum(counted.values())}, late {late}, "
                                   f"in closed windows {sum(closed.values())}")
        return IngestRun(phases=phases, snapshots=snaps, accepted=accepted, counted=sum(counted.values()),
                         late=late, exact=exact, detail=detail)
    finally:
        svc.stop()


def _get(url: str) -> bytes:
    from aggregator.bench.common import http_get
    status, raw = http_get(url, 10)
    if status != 200:
        raise OSError(f"{url} answered {status}")
    return raw


def ingest_alone_run(broker_url: str, duration: float = 10.0, big_concurrency: int = 8) -> dict[str, Phase]:
    """Batch 1000 at its maximum and at half of it against the ingest routes without the
    worker (aggregator/bench/ingest_alone.py); every accepted event must be counted in
    ``clickstream_events_ingested_total``."""
    import signal

    from aggregator.bench.common import free_port, http_get

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.bench.ingest_alone", broker_url, str(port)],
                            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ingest_alone exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                if http_get(url + "/healthz", 1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ingest_alone did not listen in 30 s")
            time.sleep(0.1)
        phases = {"max_1000": loadgen(url, 1000, duration, big_concurrency, pid=proc.pid, name="alone, batch 1000, max")}
        phases["half_1000"] = loadgen(url, 1000, duration, rate=phases["max_1000"].rate / 2, pid=proc.pid,
                                      name="alone, batch 1000, half rate")
        expected: dict[str, int] = {}
        for p in phases.values():
            for r, n in p.raw["per_region"].items():
                expected[r] = expected.get(r, 0) + n
        m = metrics(url)
        ingested = {k: int(v) for k, v in by_label(m.get("clickstream_events_ingested_total", {}), "region").items()}
        if ingested != expected:
            raise RuntimeError(f"ingest alone: ingested {ingested} != accepted {expected}")
        return phases
    finally:
        stop_group(proc, 10)
