"""(1) Worker throughput on a backlog, against a bare aiokafka consumer, and (4) its peak RSS.

Every measurement reads the same backlog of ``clicks`` on the same broker:
  * ``bare``   an aiokafka consumer that decodes each value with orjson and counts it per
               region in a dict;
  * ``worker`` ``aggregator run`` started against the backlog;
  * ``plain_faust`` the way a user would write it with Faust (tools/bench/plain_faust.py),
               on the first ``n`` records only, because it is slow.
Rates are from the first record counted to the last, so the consumer-group join (a few
seconds on the embedded broker) is left out of all three alike; the worker's time from
process start is reported too.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from aggregator.core.contract import CLICKS
from tools.bench.common import PROCESSED, BenchService, by_label, cpu_seconds, metrics, proc_status
from tools.harness import REPO, stop_group


@dataclass
class BareResult:
    rate: float
    seconds: float
    counts: dict[str, int]
    cpu_us: float = 0.0       # CPU time of the consumer per event, microseconds


async def bare(bootstrap: str, n: int, timeout: float = 300.0) -> BareResult:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(CLICKS, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=4 << 20)
    await c.start()
    counts: dict[str, int] = {}
    seen = 0
    loads = orjson.loads
    t0 = None
    deadline = time.monotonic() + timeout
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare consumer read {seen} of {n} records in {timeout}s")
            batch = await c.getmany(timeout_ms=1000, max_records=20000)
            if t0 is None and batch:
                t0, cpu0 = time.perf_counter(), time.process_time()
            for recs in batch.values():
                for rec in recs:
                    r = loads(rec.value)["region"]
                    counts[r] = counts.get(r, 0) + 1
                seen += len(recs)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await c.stop()
    return BareResult(n / dt, dt, counts, cpu_us=cpu / n * 1e6)


@dataclass
class WorkerResult:
    rate: float               # events/s, first event counted -> last
    rate_from_start: float    # events/s, process start -> last
    seconds: float
    startup_s: float          # process start -> first event counted
    peak_rss_mb: float        # VmHWM of the worker process
    counts: dict[str, int] = field(default_factory=dict)  # clickstream_events_total per region
    late: float = 0.0
    profile: str = ""
    cpu_us: float = 0.0       # CPU time of the worker process per event (first -> last), microseconds
    dedup_ids: float = 0.0    # clickstream_dedup_ids{kind="event_id"} at the end


FINE_POLL = 0.005  # s: the poll once the end is near (a render of one metric family)


def worker(broker_url: str, n: int, poll: float = 0.1, timeout: float = 600.0,
           profile_dir: str | None = None, env: dict[str, str] | None = None,
           profile_name: str = "worker", marks: Callable[[str, int], None] | None = None) -> WorkerResult:
    """Start ``aggregator run`` on the backlog; done when ``pipeline_stage_processed_total``
    of stage ``window`` (events applied to a window or the late bucket) reaches ``n``.
    With ``profile_dir``: a py-spy profile of the worker there, ``<profile_name>-<n>.txt``.
    ``marks("first" | "last", pid)`` is called when the first and the last event are seen
    counted (tools.bench.threads reads the worker's threads there).

    The last event's time is read within ``FINE_POLL``: once the rate so far says the
    rest will be counted within two polls, the poll shortens to it.  (With ``poll``
    alone the end was read 0-``poll`` late, ``poll`` / 2 on average: 2.5 % of a
    2-second figure 1c run at 0.1 s, always against the worker; the bare consumer
    times itself.)"""
    svc = BenchService(broker_url, env=dict(env or {})).start(wait_ready=None)
    spy = None
    profile = ""
    try:
        # py-spy of the bench extras: beside this interpreter (the Makefile's venv is not on PATH)
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if profile_dir and py_spy:
            profile = os.path.join(profile_dir, f"{profile_name}-{n}.txt")
            spy = subprocess.Popen([py_spy, "record", "--nonblocking", "-r", "200", "-f", "raw",
                                    "-o", profile, "--pid", str(svc.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_first = c_first = None
        t_prev = svc.started_at  # the last poll that saw nothing counted
        wait = poll
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not count {n} events in {timeout}s:\n{svc.tail()}")
            svc.check_alive()
            time.sleep(wait)
            try:
                m = metrics(svc.url, names=(PROCESSED,))
            except OSError:
                continue
            now = time.perf_counter()
            done = by_label(m.get(PROCESSED, {}), "stage").get("window", 0)
            if done == 0:
                t_prev = now
            elif t_first is None:
                t_first, c_first, cpu_first = now, done, cpu_seconds(svc.proc.pid)
                if marks is not None:
                    marks("first", svc.proc.pid)
            elif c_first is not None and t_first is not None and now > t_first and done > c_first:
                left = (n - done) / ((done - c_first) / (now - t_first))
                wait = FINE_POLL if left < 2 * poll else poll
            if done >= n:
                t_last, cpu_last = now, cpu_seconds(svc.proc.pid)
                if marks is not None:
                    marks("last", svc.proc.pid)
                break
        # exact counts: the per-region counter is taken from the books at each state flush
        counts: dict[str, float] = {}
        late = 0.0
        for _ in range(100):
            m = metrics(svc.url)
            counts = by_label(m.get("clickstream_events_total", {}), "region")
            late = sum(m.get("clickstream_late_events_total", {}).values())
            if sum(counts.values()) + late >= n:
                break
            time.sleep(0.1)
        peak = proc_status(svc.proc.pid, "VmHWM")
        dedup_ids = by_label(m.get("clickstream_dedup_ids", {}), "kind").get("event_id", 0.0)
        dt = t_last - t_first
        cpu_us = 0.0
        if c_first < n / 2 and dt > 0:
            rate = (n - c_first) / dt
            cpu_us = (cpu_last - cpu_first) / (n - c_first) * 1e6
        else:  # a backlog counted within a poll or two (tiny N): a lower bound
            dt = t_last - t_prev
            rate = n / dt
        return WorkerResult(rate=rate, rate_from_start=n / (t_last - svc.started_at), seconds=dt,
                            startup_s=t_first - svc.started_at, peak_rss_mb=peak,
                            counts={k: int(v) for k, v in counts.items()}, late=late, profile=profile,
                            cpu_us=cpu_us, dedup_ids=dedup_ids)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        svc.stop()


@dataclass
class FaustResult:
    rate: float
    seconds: float
    n: int


def plain_faust(broker_url: str, n: int, partitions: int, timeout: float = 300.0) -> FaustResult:
    """The plain-Faust reference on the first ``n`` records of the same topic (``partitions``)."""
    data = tempfile.mkdtemp(prefix="bench-faust-")
    out = os.path.join(data, "result.json")
    env = dict(os.environ, BENCH_BROKER=broker_url, BENCH_N=str(n), BENCH_OUT=out, BENCH_DATA=data,
               BENCH_PARTITIONS=str(partitions))
    with open(os.path.join(data, "faust.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tools.bench.plain_faust", "worker", "-l", "warn"],
                                env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(out):
            if proc.poll() is not None:
                raise RuntimeError("plain Faust exited early: "
                                   + open(os.path.join(data, "faust.log"), errors="replace").read()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"plain Faust did not count {n} events in {timeout}s")
            time.sleep(0.1)
        time.sleep(0.05)
        res = orjson.loads(open(out, "rb").read())
        return FaustResult(rate=res["n"] / res["seconds"], seconds=res["seconds"], n=res["n"])
    finally:
        stop_group(proc, 20)
        shutil.rmtree(data, ignore_errors=True)
