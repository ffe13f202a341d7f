"""The plain-Faust reference: what a user would write with Faust for per-region tumbling
counts: an agent over ``clicks`` and a tumbling windowed table updated once per event.

    BENCH_BROKER=kafka://127.0.0.1:9092 BENCH_N=20000 BENCH_OUT=/tmp/r.json BENCH_DATA=/tmp/d \\
        BENCH_PARTITIONS=4 python -m tools.bench.plain_faust worker -l warn

``clicks`` is already keyed by region, so no ``group_by`` (which would add a repartition
topic and be slower still).  When the agent has counted ``BENCH_N`` events it writes
``{"n", "seconds"}`` (first event to last) to ``BENCH_OUT``; the benchmark then stops it.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from typing import Any

import faust
import orjson

N = int(os.environ.get("BENCH_N", "20000"))
OUT = os.environ.get("BENCH_OUT", "plain-faust.json")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "4"))  # of clicks: a table has as many as its source

app = faust.App(
    f"bench-plain-faust-{uuid.uuid4().hex[:8]}",
    broker=os.environ.get("BENCH_BROKER", "kafka://127.0.0.1:9092"),
    datadir=os.path.join(os.environ.get("BENCH_DATA", "."), "faust"),
    web_enabled=False,
    topic_replication_factor=1,
    topic_partitions=PARTITIONS,
    broker_session_timeout=6,
    broker_heartbeat_interval=1.5,
    consumer_auto_offset_reset="earliest",
)
clicks = app.topic("clicks", key_type=bytes, value_type=bytes, value_serializer="raw",
                   key_serializer="raw", internal=False)
counts = app.Table("bench-region-counts", default=int, partitions=PARTITIONS).tumbling(
    timedelta(seconds=60), expires=timedelta(hours=1))

state = {"seen": 0, "t0": 0.0}


@app.agent(clicks)
async def count(stream: Any) -> None:
    async for value in stream:
        event = orjson.loads(value)
        counts[event["region"]] += 1
        state["seen"] += 1
        if state["seen"] == 1:
            state["t0"] = time.perf_counter()
        if state["seen"] == N:
            tmp = OUT + ".tmp"
            with open(tmp, "wb") as f:
                f.write(orjson.dumps({"n": N, "seconds": time.perf_counter() - state["t0"]}))
            os.replace(tmp, OUT)


if __name__ == "__main__":
    app.main()
