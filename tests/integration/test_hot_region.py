"""docs/contract.md §6 end to end: one region at 1000x the others, over its rate limit.

Records go straight to ``clicks`` with their ``ingest_ts`` (as the HTTP
ingest writes them), so the truth of every (region, window) is exact.  The
hot region's excess is spilled to disk and drained at its rate: drained
events keep their ingest time, so those whose window closed meanwhile land
in the late bucket (``closed_window``).  Hence the checks: the other regions
exact per window and on time, the hot region exact by the §1 identity
(counted + late == accepted), every snapshot published once (a re-publication
only with identical content), and memory within budget.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import re
import struct
import threading
import time
from pathlib import Path

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, SNAPSHOTS
from aggregator.gen.audit import audit
from aggregator.spill.segment import scan_bytes
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

W_MS, GRACE_MS = 2000, 1000
COLD = ["eu-west", "us-east", "ap-south", "sa-east", "af-south"]
HOT = "hot"
COLD_RATE = 4           # events/s per cold region
RSS_BUDGET_MB = 300


class Truth:
    def __init__(self) -> None:
        self.windows: dict[tuple[str, int], int] = {}
        self.total: dict[str, int] = {}

    def add(self, region: str, its: int) -> None:
        key = (region, its - its % W_MS)
        self.windows[key] = self.windows.get(key, 0) + 1
        self.total[region] = self.total.get(region, 0) + 1


async def produce(bootstrap: str, seconds: float, hot_seconds: float, truth: Truth, seed: int = 1) -> None:
    """Cold regions at COLD_RATE/s each for ``seconds``; the hot one at 1000x that for ``hot_seconds``."""
    from aiokafka import AIOKafkaProducer

    rng = random.Random(seed)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20)
    await p.start()
    tick = 0.1
    try:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            now = int(time.time() * 1000)
            batch = [r for r in COLD for _ in range(int(COLD_RATE * tick + rng.random()))]
            if elapsed < hot_seconds:
                batch += [HOT] * int(COLD_RATE * 1000 * tick)
            futs = []
            for r in batch:
                ev = {"region": r, "ingest_ts": now, "user_id": "u%d" % rng.randrange(1000)}
                truth.add(r, now)
                futs.append(await p.send(CLICKS, orjson.dumps(ev), key=r.encode()))
            await asyncio.gather(*futs)
            await asyncio.sleep(max(0.0, start + (int(elapsed / tick) + 1) * tick - time.monotonic()))
    finally:
        await p.stop()


async def read_snapshots(bootstrap: str, idle: float = 2.0) -> list[tuple[dict, int]]:
    """Every snapshot on click-snapshots with the time it was produced (ms)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(SNAPSHOTS, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         group_id=None, enable_auto_commit=False)
    await c.start()
    out = []
    try:
        while batch := await c.getmany(timeout_ms=int(idle * 1000)):
            for recs in batch.values():
                out.extend((orjson.loads(r.value), r.timestamp) for r in recs)
    finally:
        await c.stop()
    return out


def metric(text: str, name: str, region: str | None = None, label: str = "region") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if region is None or f'{label}="{region}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def peaks(svc, **series: tuple[str, str | None]):
    """Poll /metrics in the background; yields the peak of each ``name=(metric, region)``."""
    seen = dict.fromkeys(series, 0.0)
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                text = svc.metrics_text()
                for k, (name, region) in series.items():
                    seen[k] = max(seen[k], metric(text, name, region))
            except Exception:  # noqa: BLE001 - the worker may be restarting
                pass
            time.sleep(0.2)

    w = threading.Thread(target=watch)
    w.start()
    try:
        yield seen
    finally:
        stop.set()
        w.join()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def check_exact(truth: Truth, snaps: list[tuple[dict, int]]) -> dict[tuple[str, int], dict]:
    """The audit: published once (or re-published identically), the cold regions exact per
    window, the hot region exact by the identity counted + late == accepted."""
    t = {"window_ms": W_MS, "counts": {}, "late": {}}
    for (region, ws), n in truth.windows.items():
        t["counts"].setdefault(region, {})[str(ws)] = n
    problems = audit(t, [s for s, _ in snaps], {HOT})
    assert problems == [], problems[:20]
    published = {(s["region"], s["window_start"]): s for s, _ in snaps}
    assert sum(s["late_by_reason"]["client_delay"] for s in published.values()) == 0
    return published


def settle(svc, truth: Truth, bootstrap: str, timeout: float = 90.0) -> list[tuple[dict, int]]:
    """Wait until the spill is drained and click-snapshots holds every truth window and every
    hot event (counted or late).  The topic, not the process's memory: workers get killed here."""
    state = {"snaps": [], "why": ""}

    def done():
        if metric(svc.metrics_text(), "clickstream_spill_backlog_events") > 0:
            state["why"] = "spill backlog not drained"
            return False
        snaps = state["snaps"] = asyncio.run(read_snapshots(bootstrap, idle=1.0))
        latest = {(s["region"], s["window_start"]): s for s, _ in snaps}
        missing = set(truth.windows) - set(latest)
        hot = sum(s["count"] + s["late"] for (r, _), s in latest.items() if r == HOT)
        state["why"] = f"missing windows {sorted(missing)[:6]}, hot {hot} of {truth.total[HOT]}"
        return not missing and hot >= truth.total[HOT]

    try:
        wait_for(done, timeout, interval=0.5, what="spill drained and every window published")
    except AssertionError:
        raise AssertionError(f"not settled after {timeout}s: {state['why']}\n{svc.tail()}") from None
    return state["snaps"]


def test_hot_region_is_spilled_and_drained_and_others_stay_on_time(broker, service_factory):
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("hot", AGG_RATE_LIMITS=f"{HOT}=1000").start()
    truth = Truth()
    with peaks(svc, backlog=("clickstream_spill_backlog_events", HOT)) as peak:
        asyncio.run(produce(bootstrap, seconds=12.0, hot_seconds=6.0, truth=truth))
    assert truth.total[HOT] >= 1000 * truth.total[COLD[0]] * 0.4  # 1000x while it bursts
    snaps = settle(svc, truth, bootstrap)
    published = check_exact(truth, snaps)

    text = svc.metrics_text()
    spilled = metric(text, "clickstream_spilled_events_total", HOT)
    assert spilled >= truth.total[HOT] - 1000 * 8, spilled  # at most ~rate x (burst + 1 s) went straight in
    assert metric(text, "clickstream_rate_limited_events_total", HOT) > 0
    assert peak["backlog"] > 1000, peak
    assert metric(text, "clickstream_spill_backlog_events", HOT) == 0
    assert metric(text, "clickstream_spill_bytes", HOT) == 0
    assert metric(text, "pipeline_stage_processed_total", "spill", label="stage") >= 2 * spilled
    for r in COLD:
        assert metric(text, "clickstream_spilled_events_total", r) == 0

    # the other regions were published within grace + 1 s of their window end, burst or not
    delays = sorted((produced_at - s["window_end"], s["emitted_at"] - s["window_end"], s["region"], s["window_start"])
                    for s, produced_at in snaps
                    if s["region"] != HOT and (s["region"], s["window_start"]) in truth.windows)
    assert delays and delays[-1][0] <= GRACE_MS + 1000, f"published later than grace + 1 s: {delays[-8:]}"
    assert len(published) >= len(truth.windows)
    assert peak_rss_mb(svc.proc.pid) < RSS_BUDGET_MB


def test_sigkill_while_spilling_and_while_draining_and_a_corrupt_spill_record(broker, service_factory):
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("hotkill", AGG_RATE_LIMITS=f"{HOT}=800").start()
    truth = Truth()
    kills: list[float] = []

    def killer():
        # 1: while the hot region bursts and spills
        wait_for(lambda: metric(svc.metrics_text(), "clickstream_spill_backlog_events", HOT) > 500, 30,
                 what="the hot region to spill")
        kills.append(metric(svc.metrics_text(), "clickstream_spill_backlog_events", HOT))
        svc.kill()
        svc.start()
        # 2: after the burst, while the backlog drains
        time.sleep(5.0)
        wait_for(lambda: metric(svc.metrics_text(), "clickstream_spill_backlog_events", HOT) > 500, 30,
                 what="a backlog to drain")
        kills.append(metric(svc.metrics_text(), "clickstream_spill_backlog_events", HOT))
        svc.kill()
        # damage one spilled record: found by its CRC on restart.  The newest record, because
        # it is surely not drained yet (a segment already drained is deleted unread)
        segs = sorted((svc.data_dir / "spill").glob("p*/regions/r-hot/*.seg"))
        assert segs, "no spill segment on disk"
        data = bytearray(segs[-1].read_bytes())
        entries = scan_bytes(bytes(data)).entries
        assert entries, "no complete spill record in the newest segment"
        data[entries[-1].end - 1] ^= 0xFF  # last payload byte: length intact, CRC wrong
        segs[-1].write_bytes(bytes(data))
        # and a torn last record: a header promising more bytes than the file has
        with open(segs[-1], "ab") as f:
            f.write(struct.pack(">II", 1000, 0) + b'{"torn')
        svc.start()

    t = threading.Thread(target=killer)
    t.start()
    asyncio.run(produce(bootstrap, seconds=10.0, hot_seconds=4.0, truth=truth, seed=2))
    t.join()
    assert len(kills) == 2, kills
    snaps = settle(svc, truth, bootstrap)
    check_exact(truth, snaps)
    text = svc.metrics_text()
    assert metric(text, "clickstream_spill_faults_total", "corrupt", label="kind") >= 1
    assert metric(text, "clickstream_spill_faults_total", "torn", label="kind") >= 1
    log = svc.tail(200_000)
    assert re.search(r"corrupt records quarantined on recovery", log), log[-3000:]
    assert "re-reading them from the source log" in log


def test_a_spill_record_damaged_while_the_worker_drains_is_re_read_from_kafka(broker, service_factory):
    """No restart: a spilled record is damaged on disk while the backlog drains.  The drain
    finds it by its CRC, and the rest of the region's backlog is re-read from ``clicks``:
    every count exact, none lost, none twice."""
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("hotrot", AGG_RATE_LIMITS=f"{HOT}=500").start()
    truth = Truth()
    asyncio.run(produce(bootstrap, seconds=6.0, hot_seconds=3.0, truth=truth, seed=3))
    assert metric(svc.metrics_text(), "clickstream_spill_backlog_events", HOT) > 1000
    # a record near the newest is surely not drained (nor read ahead) yet: flip its last
    # payload byte; the intact records after it are cut off the disk and re-read too
    segs = sorted((svc.data_dir / "spill").glob("p*/regions/r-hot/*.seg"))
    assert segs, "no spill segment on disk"
    entries = scan_bytes(segs[-1].read_bytes()).entries
    assert len(entries) > 20, "too few spill records in the newest segment"
    with open(segs[-1], "r+b") as f:
        f.seek(entries[-10].end - 1)
        byte = f.read(1)[0]
        f.seek(entries[-10].end - 1)
        f.write(bytes([byte ^ 0xFF]))
    snaps = settle(svc, truth, bootstrap)
    check_exact(truth, snaps)
    log = svc.tail(200_000)
    assert "corrupt record (CRC mismatch)" in log and "while draining" in log, log[-3000:]
    assert "damaged or missing on disk; re-reading them from the source log" in log, log[-3000:]
    text = svc.metrics_text()
    assert metric(text, "clickstream_spill_faults_total", "lost", label="kind") == 0
    assert metric(text, "clickstream_spill_faults_total", "corrupt", label="kind") >= 1
    assert metric(text, "clickstream_spill_backlog_events", HOT) == 0


def test_disk_budget_slows_consumption_and_drops_nothing(broker, service_factory):
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("budget", AGG_RATE_LIMITS=f"{HOT}=1500", AGG_SPILL_MAX_BYTES="65536").start()
    truth = Truth()
    with peaks(svc, backpressure=("clickstream_backpressure", None), bytes=("clickstream_spill_bytes", None),
               lag=("clickstream_consumer_lag", None)) as seen:
        asyncio.run(produce(bootstrap, seconds=8.0, hot_seconds=3.0, truth=truth, seed=3))
        snaps = settle(svc, truth, bootstrap)
    check_exact(truth, snaps)
    assert seen["backpressure"] == 1, seen
    assert seen["lag"] > 0, seen
    # one fetched batch may land after the budget is reached, never much more
    assert seen["bytes"] < 65536 + 2_000_000, seen
    assert "consumption paused until it drains" in svc.tail(200_000)
    assert "consumption resumed" in svc.tail(200_000)
    assert metric(svc.metrics_text(), "clickstream_backpressure") == 0
