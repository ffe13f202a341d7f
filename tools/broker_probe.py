"""The broker alone under a steady load: what it costs as it fills up.

    .venv/bin/python -m tools.broker_probe                    # embedded broker, 60k ev/s, 90 s
    .venv/bin/python -m tools.broker_probe --no-consume       # produce only
    .venv/bin/python -m tools.broker_probe --per-batch 200    # the same records in 5x the batches
    .venv/bin/python -m tools.broker_probe --bootstrap 127.0.0.1:19092 --pid PID   # any broker

Produces records like the ingest does (--per-batch records a request, default 1000, over 4
partitions: one record batch each; acks=all, open loop at --rate) and, unless --no-consume,
reads them back with one consumer that keeps up.  Every 5 s it prints the records held, the
broker process's CPU (cores) and RSS over that interval, and the produce acknowledgement
p50/p99/max.  No service involved: this is the broker's cost.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from aggregator.broker import EmbeddedBroker, ensure_topics
from aggregator.core.contract import CLICKS
from tools.bench.common import cpu_seconds, percentile, proc_status

PER_BATCH = 1000
PARTITIONS = 4


async def probe(bootstrap: str, pid: int, rate: float, duration: float, consume: bool,
                per_batch: int = PER_BATCH) -> None:
    await ensure_topics(bootstrap, PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20,
                                enable_idempotence=False)
    await producer.start()
    value = orjson.dumps({"region": "r00", "user_id": "u123456", "url": "/p/12345", "ts": 1700000000000})
    consumed = [0]

    async def consumer() -> None:
        c = AIOKafkaConsumer(CLICKS, bootstrap_servers=bootstrap, group_id="broker-probe",
                             auto_offset_reset="earliest")
        await c.start()
        try:
            while True:
                for recs in (await c.getmany(timeout_ms=200)).values():
                    consumed[0] += len(recs)
        finally:
            await c.stop()

    async def one(sched: float) -> None:
        futs = []
        for part in range(PARTITIONS):
            b = producer.create_batch()
            for _ in range(per_part):
                b.append(timestamp=None, key=b"r00", value=value, headers=[])
            b.close()
            futs.append(await producer.send_batch(b, CLICKS, partition=part))
        await asyncio.gather(*futs)
        state["lats"].append(time.monotonic() - sched)  # the interval's list when it is acknowledged

    ctask = asyncio.create_task(consumer()) if consume else None
    per_part = max(1, per_batch // PARTITIONS)  # records a partition's batch; a request sends one each
    interval, t0, i, sent = per_part * PARTITIONS / rate, time.monotonic(), 0, 0
    state: dict[str, list[float]] = {"lats": []}
    tasks: set = set()
    mark, cpu0 = t0, cpu_seconds(pid) if pid else 0.0
    print("  s  records held  consumed  broker CPU (cores)  broker RSS MB  ack p50 / p99 / max ms", flush=True)
    while time.monotonic() - t0 < duration:
        sched = t0 + i * interval
        now = time.monotonic()
        if sched > now:
            await asyncio.sleep(sched - now)
        t = asyncio.create_task(one(sched))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
        sent += per_part * PARTITIONS
        if time.monotonic() - mark >= 5:
            now, cpu = time.monotonic(), cpu_seconds(pid) if pid else 0.0
            ms = [x * 1000 for x in state["lats"]] or [float("nan")]
            cores = f"{(cpu - cpu0) / (now - mark):.2f}" if pid else "-"
            rss = f"{proc_status(pid, 'VmRSS'):.0f}" if pid else "-"
            print(f"{now - t0:4.0f}  {sent:12,}  {consumed[0]:8,}  {cores:>18}  {rss:>13}  "
                  f"{percentile(ms, 50):.1f} / {percentile(ms, 99):.1f} / {max(ms):.1f}", flush=True)
            mark, cpu0, state["lats"] = now, cpu, []
    await asyncio.gather(*tasks)
    if ctask:
        ctask.cancel()
        await asyncio.gather(ctask, return_exceptions=True)
    await producer.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.broker_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=60000, help="records per second produced")
    ap.add_argument("--duration", type=float, default=90)
    ap.add_argument("--no-consume", dest="consume", action="store_false")
    ap.add_argument("--per-batch", type=int, default=PER_BATCH,
                    help="records a produce request (one record batch a partition)")
    ap.add_argument("--bootstrap", default=None, help="a running broker (default: start the embedded one)")
    ap.add_argument("--pid", type=int, default=0, help="that broker's process id, for its CPU and RSS")
    a = ap.parse_args()
    broker = None
    if a.bootstrap is None:
        broker = EmbeddedBroker().start()
        a.bootstrap, a.pid = broker.bootstrap, broker.proc.pid
    try:
        asyncio.run(probe(a.bootstrap, a.pid, a.rate, a.duration, a.consume, a.per_batch))
    finally:
        if broker:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
