"""Figure 1c's worker, thread by thread: where its CPU time goes (docs/performance.md).

    .venv/bin/python -m tools.bench.threads --broker kafka --rounds 3
    .venv/bin/python -m tools.bench.threads --broker embedded --partitions 1 --env AGG_AGGREGATES=false
    .venv/bin/python -m tools.bench.threads --perf /tmp/w.data   # perf record -g of the worker too

Each round starts a fresh broker (loopback only), produces figure 1c's backlog (records
straight to Kafka, ``user_id``, ``url`` and ``ts`` on every event), runs the bare consumer,
the worker of this checkout (aggregates on) and the bare consumer again, and prints the
worker's rate over the mean of the two bare runs, with each thread's CPU time (user +
system, and system alone) and minor page faults per event, read from ``/proc/PID/task``
between the first and the last counted event, and the worker's RSS then.  To compare two
builds, run it from two worktrees in turn (the machine's noise is as large as most gains).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
from typing import Any

from tools.bench import common, throughput
from tools.bench.__main__ import fresh_broker, kafka_broker, stop_broker
from tools.bench.common import proc_status

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, tuple[int, int, int]]:
    """Each thread's (CPU ticks, system ticks, minor faults) so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12]), int(fields[12]), int(fields[7]))
    return out


def run_worker(url: str, n: int, env: dict[str, str], perf: str | None) -> dict[str, Any]:
    """tools.bench.throughput's worker run, with its threads read at the first and the last
    event counted (and perf recording in between)."""
    seen: dict[str, tuple[int, dict, float]] = {}
    recorder: list[subprocess.Popen] = []

    def marks(which: str, pid: int) -> None:
        seen[which] = (pid, threads(pid), proc_status(pid, "VmRSS"))
        if which == "first" and perf:
            recorder.append(subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", perf],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        elif which == "last" and recorder:
            recorder[0].send_signal(signal.SIGINT)
            recorder[0].wait(timeout=60)

    w = throughput.worker(url, n, poll=0.05, env=env, marks=marks)
    events = w.rate * w.seconds
    (pid, first, rss0), (_, last, rss1) = seen["first"], seen["last"]
    per = {}
    for tid, (cpu, sys_, faults) in last.items():
        cpu0, sys0, faults0 = first.get(tid, (0, 0, 0))
        if cpu > cpu0:
            per["main" if tid == pid else f"thread {tid}"] = (
                round((cpu - cpu0) * TICK_US / events, 2), round((sys_ - sys0) * TICK_US / events, 2), faults - faults0)
    return {"rate": w.rate, "threads": per, "rss": (round(rss0), round(rss1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", choices=("kafka", "embedded"), default="kafka")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for the worker process")
    p.add_argument("--perf", help="perf record -g the worker between the first and the last counted event, to this file")
    a = p.parse_args()
    env = {"AGG_AGGREGATES": "true", **dict(e.split("=", 1) for e in a.env)}
    for r in range(a.rounds):
        if a.broker == "kafka":
            b: Any = kafka_broker(argparse.Namespace(kafka_dir=None, partitions_kafka=a.partitions))
            boot = b.bootstrap
        else:
            b, boot = fresh_broker(a.partitions)
        try:
            asyncio.run(common.produce_backlog(boot, a.n, seed=a.seed))
            b1 = asyncio.run(throughput.bare(boot, a.n))
            w = run_worker(b.url, a.n, env, a.perf)
            b2 = asyncio.run(throughput.bare(boot, a.n))
        finally:
            stop_broker(b)
        bare = (b1.rate + b2.rate) / 2
        split = ", ".join(f"{k} {cpu} µs ({sys_} system, {faults} faults)" for k, (cpu, sys_, faults) in w["threads"].items())
        print(f"round {r + 1}: ratio {w['rate'] / bare:.0%}, worker {w['rate']:,.0f} ev/s, bare {bare:,.0f} ev/s "
              f"({(b1.cpu_us + b2.cpu_us) / 2:.2f} µs an event); per event: {split}; RSS {w['rss'][0]} -> {w['rss'][1]} MB",
              flush=True)


if __name__ == "__main__":
    main()
