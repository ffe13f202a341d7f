"""Worker throughput vs a bare aiokafka consumer, same backlog, same run.

    .venv/bin/python scripts/bench_worker.py --n 300000 --runs 3

Produces N compact click events (16 regions, Zipf skew, one region ~40 %)
to ``clicks`` on a fresh embedded broker, then measures:
  * bare: an aiokafka consumer that decodes each value with orjson and
    counts it per region in a dict (the ceiling for a Python consumer);
  * worker: ``aggregator run`` started against the backlog, timed from the
    first counted event to the last (group join excluded), read off /metrics.
Prints medians.  A first step towards ``make bench`` (issue 7).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import orjson
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aggregator.broker import CLICKS, EmbeddedBroker, ensure_topics, free_port  # noqa: E402

REGIONS = [f"r{i:02d}" for i in range(16)]


async def produce(bootstrap: str, n: int, partitions: int) -> None:
    from aiokafka import AIOKafkaProducer
    rng = random.Random(1)
    weights = [0.4] + [0.6 / 15] * 15
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=1 << 20)
    await p.start()
    now = int(time.time() * 1000)
    regions = rng.choices(REGIONS, weights, k=n)
    by_part: dict[int, list] = {}
    parts = {r: (await p.partitions_for(CLICKS)) for r in REGIONS[:1]}
    del parts
    from aiokafka.partitioner import DefaultPartitioner
    part_of = {r: DefaultPartitioner()(r.encode(), list(range(partitions)), list(range(partitions)))
               for r in REGIONS}
    for i, r in enumerate(regions):
        by_part.setdefault(part_of[r], []).append(
            (r.encode(), orjson.dumps({"region": r, "user_id": f"u{i % 5000}", "ingest_ts": now + i // 1000})))
    for part, recs in by_part.items():
        batch = p.create_batch()
        for k, v in recs:
            if batch.append(key=k, value=v, timestamp=None) is None:
                batch.close()
                await (await p.send_batch(batch, CLICKS, partition=part))
                batch = p.create_batch()
                batch.append(key=k, value=v, timestamp=None)
        batch.close()
        await (await p.send_batch(batch, CLICKS, partition=part))
    await p.stop()


async def bare(bootstrap: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(CLICKS, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         group_id=None, max_partition_fetch_bytes=4 << 20)
    await c.start()
    counts: dict[str, int] = {}
    seen = 0
    loads = orjson.loads
    t0 = None
    while seen < n:
        batch = await c.getmany(timeout_ms=1000, max_records=20000)
        if t0 is None and batch:
            t0 = time.perf_counter()
        for recs in batch.values():
            for rec in recs:
                r = loads(rec.value)["region"]
                counts[r] = counts.get(r, 0) + 1
            seen += len(recs)
    dt = time.perf_counter() - t0
    await c.stop()
    return n / dt


def worker(broker_url: str, n: int, partitions: int) -> tuple[float, float]:
    port = free_port()
    env = dict(os.environ, AGG_BROKER=broker_url, AGG_WEB_PORT=str(port), AGG_PARTITIONS=str(partitions),
               AGG_DATA_DIR=tempfile.mkdtemp(), AGG_LOG_LEVEL="WARNING", AGG_STATE_FLUSH_SECONDS="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "aggregator", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_first = None
    peak_rss = 0.0
    try:
        while True:
            time.sleep(0.05)
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS"):
                            peak_rss = max(peak_rss, int(line.split()[1]) / 1024)
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            total = 0
            for fam in text_string_to_metric_families(text):
                if fam.name in ("clickstream_events",):
                    total += sum(s.value for s in fam.samples if s.name.endswith("_total"))
            if total > 0 and t_first is None:
                t_first = time.perf_counter()
            if total >= n:
                return n / (time.perf_counter() - t_first), peak_rss
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    a = ap.parse_args()
    bares, workers, rss = [], [], []
    for run in range(a.runs):
        b = EmbeddedBroker().start()
        try:
            bootstrap = b.url.split("://")[1]
            asyncio.run(ensure_topics(bootstrap, a.partitions))
            asyncio.run(produce(bootstrap, a.n, a.partitions))
            bares.append(asyncio.run(bare(bootstrap, a.n)))
            w, r = worker(b.url, a.n, a.partitions)
            workers.append(w)
            rss.append(r)
            print(f"run {run + 1}: bare {bares[-1]:,.0f}/s  worker {w:,.0f}/s  peak RSS {r:.0f} MB", flush=True)
        finally:
            b.stop()
    mb, mw = statistics.median(bares), statistics.median(workers)
    print(f"\nN={a.n:,} partitions={a.partitions} runs={a.runs} (medians)")
    print(f"  bare aiokafka+orjson consumer : {mb:,.0f} events/s")
    print(f"  aggregator worker             : {mw:,.0f} events/s  ({mw / mb:.0%} of bare)")
    print(f"  worker peak RSS               : {statistics.median(rss):.0f} MB")


if __name__ == "__main__":
    main()
