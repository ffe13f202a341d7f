"""HTTP load generator for ``POST /v1/events`` (NDJSON), run as its own process so that its
CPU is not the service's:

    python -m tools.bench.loadgen --url http://127.0.0.1:8080 --batch 1000 --concurrency 8 --duration 10
    python -m tools.bench.loadgen --url ... --batch 1000 --rate 50000 --duration 15   # fixed offered rate

Closed loop (no ``--rate``): ``--concurrency`` clients each send the next request as soon as
the last is answered (the maximum rate).  Open loop (``--rate`` events/s): requests are
started on a fixed schedule whatever the answers do, and latency is measured from the
scheduled start, so a stalled server shows up in the latency instead of slowing the load.
Prints one JSON object: rate, latency percentiles (ms), answers, and accepted events per
region (for exact counts).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import uuid

import aiohttp
import orjson

from tools.bench.common import percentile, pick_regions


def bodies(batch: int, k: int, seed: int) -> list[tuple[bytes, dict[str, int]]]:
    """``k`` distinct NDJSON bodies of ``batch`` events, each with its count per region."""
    out = []
    now = int(time.time() * 1000)
    regions = pick_regions(batch * k, seed)
    for j in range(k):
        counts: dict[str, int] = {}
        lines = []
        for i in range(batch):
            r = regions[j * batch + i]
            counts[r] = counts.get(r, 0) + 1
            n = j * batch + i
            lines.append(orjson.dumps({"region": r, "user_id": f"u{n % 5000}", "url": f"/p/{n % 1000}", "ts": now}))
        out.append((b"\n".join(lines), counts))
    return out


async def run(url: str, batch: int, concurrency: int, duration: float, rate: float, warmup: float,
              seed: int, max_outstanding: int) -> dict:
    work = bodies(batch, 32, seed)
    run_id = uuid.uuid4().hex[:12]  # keys never repeat across runs and phases (a repeat would be deduped)
    headers = {"Content-Type": "application/x-ndjson"}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    per_region: dict[str, int] = {}
    acc = {"accepted": 0, "rejected": 0, "requests": 0, "events": 0, "skipped": 0}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    measured = {"accepted": 0, "first": None, "last": None}

    async def post(session: aiohttp.ClientSession, i: int, scheduled: float) -> None:
        body, counts = work[i % len(work)]
        try:  # every request with a key of its own, as a client that retries would send (dedup on)
            async with session.post(url + "/v1/events", data=body,
                                    headers={**headers, "Idempotency-Key": f"lg-{run_id}-{i}"}) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            return
        done = time.perf_counter()
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        acc["requests"] += 1
        acc["events"] += batch
        if status != 200:
            return
        ans = orjson.loads(raw)
        acc["accepted"] += ans["accepted"]
        acc["rejected"] += ans["rejected"]
        if ans["rejected"] == 0:
            for r, n in counts.items():
                per_region[r] = per_region.get(r, 0) + n
        if scheduled >= t_measure:
            latencies.append(done - scheduled)
            measured["accepted"] += ans["accepted"]
            measured["first"] = measured["first"] or scheduled
            measured["last"] = done

    conn = aiohttp.TCPConnector(limit=0 if rate else concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
        if rate <= 0:
            counter = iter(range(1 << 62))

            async def client() -> None:
                while True:
                    t = time.perf_counter()
                    if t >= t_end:
                        return
                    await post(session, next(counter), t)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            interval = batch / rate
            tasks: set[asyncio.Task] = set()
            i = 0
            while True:
                scheduled = t_start + i * interval
                if scheduled >= t_end:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= max_outstanding:
                    acc["skipped"] += 1  # the server is that far behind: counted, not sent
                else:
                    t = asyncio.create_task(post(session, i, scheduled))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)
    span = (measured["last"] - measured["first"]) if measured["first"] and measured["last"] else 0.0
    ms = [x * 1000 for x in latencies]
    cpu = os.times()
    return {
        "batch": batch, "concurrency": concurrency, "offered_rate": rate, "duration": duration,
        "rate": measured["accepted"] / span if span > 0 else 0.0,
        "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else float("nan"),
        "over_100ms": sum(1 for x in ms if x > 100),
        "measured_requests": len(ms), "statuses": statuses, "per_region": per_region,
        "cpu_s": cpu.user + cpu.system, "wall_s": time.perf_counter() - t_start, **acc,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (after --warmup)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=0.0, help="offered events/s (open loop); 0: closed loop")
    ap.add_argument("--max-outstanding", type=int, default=512)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    # a bounded run: the load generator's own collector pauses must not count as the service's latency
    gc.collect()
    gc.freeze()
    gc.disable()
    res = asyncio.run(run(a.url, a.batch, a.concurrency, a.duration, a.rate, a.warmup, a.seed, a.max_outstanding))
    sys.stdout.write(orjson.dumps(res).decode() + "\n")


if __name__ == "__main__":
    main()
