"""``make bench``: worker throughput vs a bare consumer, HTTP ingest rate and latency, snapshot
delay and memory (issue 7).  Prints a table and writes docs/benchmarks.md from this run.

    .venv/bin/python -m tools.bench                            # the full run (make bench)
    .venv/bin/python -m tools.bench --n 100000 --runs 1 --memory-n 0 --faust-n 2000 \\
        --ingest-duration 3 --out -                            # a quick look, writes nothing
    .venv/bin/python -m tools.bench --tracing                  # the same with tracing on
                                                               # (writes docs/benchmarks-tracing.md)

Every run starts its own broker (loopback only): the embedded one, and for figures 2 and 3
also Apache Kafka (scripts/kafka.sh) unless --kafka no.  See tools/bench/ for what each
figure means; docs/benchmarks.md says it again next to the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from aggregator.broker import EmbeddedBroker, ensure_topics
from aggregator.config import EMBEDDED_PARTITIONS, KAFKA_PARTITIONS
from tools.bench import changelog, common, ingest, report, throughput
from tools.bench.otlp_sink import OtlpSink
from tools.kafka import ScriptKafka, kafka_usable

BrokerT = TypeVar("BrokerT", EmbeddedBroker, ScriptKafka)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def with_topics(b: BrokerT, partitions: int) -> BrokerT:
    """A started broker with the service's topics (stopped again if they cannot be made)."""
    try:
        asyncio.run(ensure_topics(b.bootstrap, partitions))
    except BaseException:
        b.stop()
        raise
    return b


def fresh_broker(partitions: int) -> tuple[EmbeddedBroker, str]:
    b = with_topics(EmbeddedBroker().start(), partitions)
    return b, b.bootstrap


def stop_broker(b: EmbeddedBroker | ScriptKafka) -> None:
    """Stop a run's broker, saying so if it had exited by itself (a run that then failed
    failed because of it)."""
    code = b.exited()
    if code is not None:
        log(f"the run's broker had exited by itself (status {code}); its log ends: "
            f"{b.stderr_tail(1500).strip() or '(nothing)'}")
    b.stop()


def worker_section(a: argparse.Namespace, event_ids: bool = False, aggregates: bool = False,
                   ingest_format: bool = False, kafka: bool = False) -> tuple[dict, list[tuple[int, float]], bool]:
    """Figure 1, aggregates off (or, with ``event_ids``, 1b: every record has an
    ``event_id``, so the worker keeps dedup state for all of them; with ``aggregates``,
    1c/1d: unique users, top URLs and delay quantiles on, records produced straight to
    Kafka or, ``ingest_format``, as the HTTP ingest writes them; ``ingest_format`` alone,
    1e: those records, aggregates off); each run on a fresh embedded broker, or with
    ``kafka`` a fresh Apache Kafka."""
    runs = []
    exact = True
    for k in range(a.runs):
        b: EmbeddedBroker | ScriptKafka = kafka_broker(a) if kafka else fresh_broker(a.partitions_embedded)[0]
        bootstrap = b.bootstrap
        try:
            t = time.perf_counter()
            truth = asyncio.run(common.produce_backlog(bootstrap, a.n, seed=k + 1, event_ids=event_ids,
                                                       ingest_format=ingest_format))
            log(f"run {k + 1}: produced {a.n:,} events in {time.perf_counter() - t:.1f}s")
            # the machine's speed drifts (a shared host): the baseline is the mean of a bare
            # consumer just before and just after the worker, on the same backlog
            bare1 = asyncio.run(throughput.bare(bootstrap, a.n))
            # one profile per figure, broker and run (1 / 1b / 1c / 1d / 1e: figure-1..., -ids, -aggs, -aggs-ingest, -ingest)
            figure = "figure-1" + ("-ids" if event_ids else "") + ("-aggs" if aggregates else "") + (
                "-ingest" if ingest_format else "") + ("-kafka" if kafka else "")
            w = throughput.worker(b.url, a.n, profile_dir=a.profile_dir,
                                  env={"AGG_AGGREGATES": "true" if aggregates else "false"},
                                  profile_name=f"{figure}-run{k + 1}")
            bare2 = asyncio.run(throughput.bare(bootstrap, a.n))
            bare = throughput.BareResult(rate=(bare1.rate + bare2.rate) / 2, seconds=(bare1.seconds + bare2.seconds) / 2,
                                         counts=bare1.counts if bare1.counts == bare2.counts else {},
                                         cpu_us=(bare1.cpu_us + bare2.cpu_us) / 2)
            run = {"bare": bare.rate, "bare_before": bare1.rate, "bare_after": bare2.rate,
                   "worker": w.rate, "worker_from_start": w.rate_from_start,
                   "startup_s": w.startup_s, "rss": w.peak_rss_mb,
                   "bare_cpu_us": bare.cpu_us, "worker_cpu_us": w.cpu_us, "dedup_ids": w.dedup_ids,
                   "exact": bare.counts == truth and w.counts == truth and w.late == 0}
            exact &= run["exact"]
            if not run["exact"]:
                log(f"run {k + 1}: COUNTS DIFFER: produced {truth}, bare {bare.counts}, worker {w.counts} late {w.late}")
            if a.faust_n and not (event_ids or aggregates or kafka):
                f = throughput.plain_faust(b.url, min(a.faust_n, a.n), a.partitions_embedded)
                run["faust"] = f.rate
            runs.append(run)
            tag = (" (event ids)" if event_ids else "") + (
                " (aggregates on" + (", ingest's records)" if ingest_format else ")") if aggregates
                else " (ingest's records)" if ingest_format else "") + (" (Apache Kafka)" if kafka else "")
            log(f"run {k + 1}{tag}: bare {bare.rate:,.0f}/s (before {bare1.rate:,.0f}, after {bare2.rate:,.0f})  "
                f"worker {w.rate:,.0f}/s ({w.rate / bare.rate:.0%}; "
                f"from start {w.rate_from_start:,.0f}/s)  CPU/event bare {bare.cpu_us:.2f} us worker {w.cpu_us:.2f} us"
                f"  peak RSS {w.peak_rss_mb:.0f} MB"
                + (f"  plain Faust {run['faust']:,.0f}/s" if "faust" in run else "")
                + ("" if run["exact"] else "  COUNTS NOT EXACT"))
        finally:
            stop_broker(b)
    med = common.median
    res = {
        "n": a.n, "runs": runs, "exact": exact,
        "bare_rate": med([r["bare"] for r in runs]), "worker_rate": med([r["worker"] for r in runs]),
        "worker_rate_from_start": med([r["worker_from_start"] for r in runs]),
        "ratio": med([r["worker"] / r["bare"] for r in runs]),
        "ratio_from_start": med([r["worker_from_start"] / r["bare"] for r in runs]),
        "bare_cpu_us": med([r["bare_cpu_us"] for r in runs]),
        "worker_cpu_us": med([r["worker_cpu_us"] for r in runs]),
        "rss": med([r["rss"] for r in runs]), "dedup_ids": med([r["dedup_ids"] for r in runs]),
    }
    if a.faust_n and not (event_ids or aggregates or kafka):
        res.update(faust_n=min(a.faust_n, a.n), faust_rate=med([r["faust"] for r in runs]),
                   faust_ratio=med([r["faust"] / r["bare"] for r in runs]))
    rss = [(a.n, med([r["rss"] for r in runs]))]
    return res, rss, exact


def memory_section(a: argparse.Namespace, rss: list[tuple[int, float]]) -> dict:
    rates, bares, peaks = [], [], []
    for k in range(a.memory_runs):
        b, bootstrap = fresh_broker(a.partitions_embedded)
        try:
            t = time.perf_counter()
            truth = asyncio.run(common.produce_backlog(bootstrap, a.memory_n, seed=100 + k))
            log(f"memory run {k + 1}: produced {a.memory_n:,} events in {time.perf_counter() - t:.1f}s")
            bare = asyncio.run(throughput.bare(bootstrap, a.memory_n))
            w = throughput.worker(b.url, a.memory_n)
            if w.counts != truth or bare.counts != truth:
                raise RuntimeError(f"memory run: counts differ: produced {truth}, worker {w.counts}")
            rates.append(w.rate)
            bares.append(bare.rate)
            peaks.append(w.peak_rss_mb)
            log(f"memory run {k + 1}: N={a.memory_n:,} worker {w.rate:,.0f}/s bare {bare.rate:,.0f}/s "
                f"peak RSS {w.peak_rss_mb:.0f} MB")
        finally:
            stop_broker(b)
    return {"peak_rss": rss + [(a.memory_n, common.median(peaks))], "large_runs": a.memory_runs,
            "large_rate": common.median(rates), "large_bare": common.median(bares)}


def aggregates_memory_section(a: argparse.Namespace, kafka: bool = False) -> dict:
    """Figure 4b: the worker's peak RSS with aggregates on, ``a.aggregates_regions`` regions
    (Zipf-like), over backlogs of each size in ``a.aggregates_memory_n``, records as ingest
    writes them (agg headers); one run each, on a fresh embedded broker or, with ``kafka``,
    a fresh Apache Kafka.  Counts checked exact."""
    out, state = [], []
    regions = common.many_regions(a.aggregates_regions)
    for n in a.aggregates_memory_n:
        b: EmbeddedBroker | ScriptKafka = kafka_broker(a) if kafka else fresh_broker(a.partitions_embedded)[0]
        bootstrap = b.bootstrap
        try:
            t = time.perf_counter()
            truth = asyncio.run(common.produce_backlog(bootstrap, n, seed=200, ingest_format=True, regions=regions))
            log(f"aggregates memory: produced {n:,} events over {a.aggregates_regions} regions in "
                f"{time.perf_counter() - t:.1f}s")
            w = throughput.worker(b.url, n, env={"AGG_AGGREGATES": "true",
                                                 "AGG_MAX_REGIONS": str(max(1000, a.aggregates_regions))})
            produced = {k: v for k, v in truth.items() if v}  # regions drawn at least once
            if w.counts != produced:
                raise RuntimeError("aggregates memory run: counts differ from what was produced")
            # the state the worker wrote per (region, window): its changelog, read back
            cl = changelog.read(bootstrap)
            log(f"aggregates memory{' (Apache Kafka)' if kafka else ''}: N={n:,} worker {w.rate:,.0f}/s "
                f"peak RSS {w.peak_rss_mb:.0f} MB; aggregates' records {cl.written['g']:,} bytes written "
                f"({cl.live['g']:,} live) over {cl.cells:,} (region, window) cells ({cl.live_cells:,} live)")
            out.append((n, w.peak_rss_mb, w.rate))
            state.append({"n": n, **cl.to_json()})
        finally:
            stop_broker(b)
    return {"regions": a.aggregates_regions, "runs": out, "state": state}


def _phase_dict(p: ingest.Phase) -> dict:
    return {"rate": p.rate, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms, "max_ms": p.max_ms, "offered": p.offered,
            "requests": p.requests, "server_cpu": p.server_cpu, "worker_cpu": p.worker_cpu,
            "loadgen_cpu": p.loadgen_cpu, "over_100ms": p.over_100ms, "server_over_100ms": p.server_over_100ms}


def _another_run(a: argparse.Namespace, new_broker: Callable[[], Any], run: dict, prefix: str,
                 **kwargs: Any) -> ingest.IngestRun:
    """One more ingest run on a fresh broker (``kwargs``: its variant), its phases and
    exactness put into ``run`` under ``prefix``."""
    b = new_broker()
    try:
        r = ingest.ingest_run(b.url, duration=a.ingest_duration, window_s=a.window_s, grace_s=a.grace_s,
                              big_concurrency=a.big_concurrency, **kwargs)
    finally:
        stop_broker(b)
    for name, p in r.phases.items():
        run[prefix + name] = _phase_dict(p)
    run[prefix + "exact"] = r.exact
    return r


def ingest_section(a: argparse.Namespace, new_broker: Callable[[], Any] | None = None, one: bool | None = None,
                   label: str = "", fresh_half: bool = False) -> tuple[dict, dict]:
    """Per run: the split deployment (ingest process + worker process: figure 2 and the
    snapshot delay of figure 3), then, unless --no-one, ``aggregator run`` as one process.
    ``new_broker()`` gives a started broker per run (default: a fresh embedded one).
    ``fresh_half``: the half-rate phase once more on a fresh broker and fresh processes (the
    embedded broker's cost grows with the events it holds, and it holds every event of the
    maximum-rate phases before: docs/performance.md)."""
    new_broker = new_broker or (lambda: fresh_broker(a.partitions_embedded)[0])
    one = a.one if one is None else one
    runs = []
    delays: dict[str, list[float]] = {"metrics": [], "topic": [], "one_metrics": [], "one_topic": []}
    exact = True
    poll = 0.05
    for k in range(a.runs):
        b = new_broker()
        try:
            r = ingest.ingest_run(b.url, duration=a.ingest_duration, window_s=a.window_s, grace_s=a.grace_s,
                                  small_concurrency=a.small_concurrency, big_concurrency=a.big_concurrency)
            cl = changelog.read(b.bootstrap)  # the dedup records the worker wrote for those keys
        finally:
            stop_broker(b)
        run = {name: _phase_dict(p) for name, p in r.phases.items()}
        run["exact"] = r.exact
        run["dedup_keys"], run["worker_rss"] = r.dedup_keys, r.worker_rss_mb  # the loadgen keys every request
        run["dedup_changelog"] = cl.live["d"]  # bytes; nothing expires within the run (AGG_DEDUP_SECONDS)
        exact &= r.exact
        delays["metrics"] += r.snapshots.metrics_s
        delays["topic"] += r.snapshots.topic_s
        poll = r.snapshots.poll_s
        # this run's own snapshot delay p99 (figure 3 pools every run's snapshots)
        run["snapshot_p99_s"] = {where: common.percentile(d, 99) if d else float("nan")
                                 for where, d in (("metrics", r.snapshots.metrics_s), ("topic", r.snapshots.topic_s))}
        p1, p2, p3 = r.phases["max_1000"], r.phases["max_10"], r.phases["half_1000"]
        pa = r.phases.get("alone_1000")
        log(f"ingest run {k + 1}{label}, split: batch 1000 {p1.rate:,.0f}/s (p50 {p1.p50_ms:.0f} ms, p99 {p1.p99_ms:.0f} ms, "
            f"CPU ingest {p1.server_cpu:.2f} worker {p1.worker_cpu:.2f} loadgen {p1.loadgen_cpu:.2f}); "
            + (f"worker stopped {pa.rate:,.0f}/s (p99 {pa.p99_ms:.0f} ms, CPU ingest {pa.server_cpu:.2f}); " if pa else "")
            + f"batch 10 {p2.rate:,.0f}/s (p99 {p2.p99_ms:.0f} ms); half rate {p3.offered:,.0f}/s: "
            f"p50 {p3.p50_ms:.1f} ms p99 {p3.p99_ms:.1f} ms max {p3.max_ms:.0f} ms (over 100 ms: "
            f"{p3.over_100ms} as sent, {p3.server_over_100ms} in the ingest handler); snapshots seen "
            f"{len(r.snapshots.metrics_s)}/{len(r.snapshots.topic_s)}, delay p99 "
            f"{run['snapshot_p99_s']['metrics']:.2f}/{run['snapshot_p99_s']['topic']:.2f} s; dedup: "
            f"{r.dedup_keys:,} keys, {cl.live['d']:,} bytes of records"
            + ("" if r.exact else f"; COUNTS NOT EXACT: {r.detail}"))
        if fresh_half:
            h = _another_run(a, new_broker, run, "fresh_", half_rate=p1.rate / 2)
            exact &= h.exact
            ph = h.phases["half_1000"]
            log(f"ingest run {k + 1}{label}, half rate on a fresh broker: {ph.offered:,.0f}/s: p50 {ph.p50_ms:.1f} ms "
                f"p99 {ph.p99_ms:.1f} ms max {ph.max_ms:.0f} ms (CPU ingest {ph.server_cpu:.2f} worker "
                f"{ph.worker_cpu:.2f})" + ("" if h.exact else f"; COUNTS NOT EXACT: {h.detail}"))
        if a.aggregates:  # the same, AGG_AGGREGATES on: ingest hashes the user and the URL of each event
            g = _another_run(a, new_broker, run, "agg_", small=False, half=False, aggregates=True)
            exact &= g.exact
            g1, ga = g.phases["max_1000"], g.phases["alone_1000"]
            log(f"ingest run {k + 1}{label}, aggregates on: batch 1000 {g1.rate:,.0f}/s (p99 {g1.p99_ms:.0f} ms, "
                f"CPU ingest {g1.server_cpu:.2f}); worker stopped {ga.rate:,.0f}/s (CPU ingest {ga.server_cpu:.2f})"
                + ("" if g.exact else f"; COUNTS NOT EXACT: {g.detail}"))
        if one:
            o = _another_run(a, new_broker, run, "one_", split=False, small=False)
            exact &= o.exact
            delays["one_metrics"] += o.snapshots.metrics_s
            delays["one_topic"] += o.snapshots.topic_s
            q1, q3 = o.phases["max_1000"], o.phases["half_1000"]
            log(f"ingest run {k + 1}, one process: batch 1000 {q1.rate:,.0f}/s (p99 {q1.p99_ms:.0f} ms, "
                f"CPU {q1.server_cpu:.2f}); half rate {q3.offered:,.0f}/s: p50 {q3.p50_ms:.1f} ms "
                f"p99 {q3.p99_ms:.1f} ms" + ("" if o.exact else f"; COUNTS NOT EXACT: {o.detail}"))
        runs.append(run)
    med = common.median

    def m(phase: str, key: str) -> float:
        return med([run[phase][key] for run in runs])

    res = {"runs": runs, "exact": exact,
           "max_1000_rate": m("max_1000", "rate"), "max_1000_p50": m("max_1000", "p50_ms"),
           "max_1000_p99": m("max_1000", "p99_ms"),
           **({"alone_rate": m("alone_1000", "rate"), "alone_p99": m("alone_1000", "p99_ms"),
               "alone_cpu": m("alone_1000", "server_cpu")} if all("alone_1000" in run for run in runs) else {}),
           "max_10_rate": m("max_10", "rate"), "max_10_p50": m("max_10", "p50_ms"), "max_10_p99": m("max_10", "p99_ms"),
           "half_offered": m("half_1000", "offered"), "half_rate": m("half_1000", "rate"),
           "half_p50": m("half_1000", "p50_ms"), "half_p99": m("half_1000", "p99_ms"),
           "dedup_keys": med([run["dedup_keys"] for run in runs]), "worker_rss": med([run["worker_rss"] for run in runs]),
           "dedup_changelog": med([run["dedup_changelog"] for run in runs]),
           "dedup_changelog_per_key": med([run["dedup_changelog"] / max(1, run["dedup_keys"]) for run in runs])}
    if all("fresh_half_1000" in run for run in runs):
        res.update(fresh_half_offered=m("fresh_half_1000", "offered"), fresh_half_rate=m("fresh_half_1000", "rate"),
                   fresh_half_p50=m("fresh_half_1000", "p50_ms"), fresh_half_p99=m("fresh_half_1000", "p99_ms"))
    if all("agg_max_1000" in run for run in runs):
        res.update(agg_max_rate=m("agg_max_1000", "rate"), agg_max_p99=m("agg_max_1000", "p99_ms"),
                   agg_alone_rate=m("agg_alone_1000", "rate"))
    if one:
        res.update(one_max_rate=m("one_max_1000", "rate"), one_max_p99=m("one_max_1000", "p99_ms"),
                   one_half_offered=m("one_half_1000", "offered"), one_half_p50=m("one_half_1000", "p50_ms"),
                   one_half_p99=m("one_half_1000", "p99_ms"), one_cpu=m("one_max_1000", "server_cpu"))
    pct = common.percentile
    snaps = {"poll_s": poll}
    for key, d in delays.items():
        if d:
            snaps.update({f"{key}_n": len(d), f"{key}_p50": pct(d, 50), f"{key}_p99": pct(d, 99)})
    return res, snaps


def kafka_broker(a: argparse.Namespace) -> ScriptKafka:
    """A fresh Apache Kafka (scripts/kafka.sh) with the service's topics."""
    return with_topics(ScriptKafka(base_dir=a.kafka_dir or None).start(), a.partitions_kafka)


def _nan_back(x: Any) -> Any:
    """orjson writes NaN as null: the raw results read back get their NaN again."""
    if x is None:
        return float("nan")
    if isinstance(x, dict):
        return {k: _nan_back(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_back(v) for v in x]
    return x


def render(source: str, out: str) -> int:
    """--render: the report of an earlier run, from the raw results it carries."""
    with open(source) as f:
        text = f.read()
    try:
        raw = text.split("## Raw results", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    except IndexError:
        print(f"error: {source} has no raw results block (## Raw results, then ```json)", file=sys.stderr)
        return 2
    results = _nan_back(orjson.loads(raw))
    results["json"] = raw
    md = report.markdown(results)
    if out == "-":
        print(md)
    else:
        with open(out, "w") as f:
            f.write(md)
        log(f"wrote {out} from the results in {source}")
    return 0


def measure(a: argparse.Namespace, results: dict) -> bool:
    """Every figure asked for, into ``results``; -> whether every count was exact."""
    ok = True
    why = "not asked (--kafka no)" if a.kafka == "no" else kafka_usable()
    if why and a.kafka in ("yes", "only"):
        log(f"error: --kafka {a.kafka}, but Apache Kafka cannot run here: {why}")
        ok = False
    if not a.skip_worker and a.n and a.kafka != "only":
        results["worker"], rss, exact = worker_section(a)
        ok &= exact
        if a.dedup:
            results["worker_dedup"], _, exact = worker_section(a, event_ids=True)
            ok &= exact
        if a.aggregates:
            results["worker_aggs"], _, exact = worker_section(a, aggregates=True)
            ok &= exact
            results["worker_aggs_ingest"], _, exact = worker_section(a, aggregates=True, ingest_format=True)
            ok &= exact
            results["worker_ingest"], _, exact = worker_section(a, ingest_format=True)  # 1e: beside 1d
            ok &= exact
        if a.aggregates and a.aggregates_memory_n:
            results["aggregates_memory"] = aggregates_memory_section(a)
        if a.memory_n:
            results["memory"] = memory_section(a, rss)
        else:
            results["memory"] = {"peak_rss": rss, "large_runs": 0, "large_rate": float("nan"),
                                 "large_bare": float("nan")}
    if not a.skip_worker and a.n and not why:
        # figures 1, 1b, 1c, 1d, 1e and 4b again on Apache Kafka (the aggregates' goal is on both brokers)
        try:
            results["worker_kafka"], _, exact = worker_section(a, kafka=True)
            ok &= exact
            if a.dedup:
                results["worker_dedup_kafka"], _, exact = worker_section(a, event_ids=True, kafka=True)
                ok &= exact
            if a.aggregates:
                results["worker_aggs_kafka"], _, exact = worker_section(a, aggregates=True, kafka=True)
                ok &= exact
                results["worker_aggs_ingest_kafka"], _, exact = worker_section(
                    a, aggregates=True, ingest_format=True, kafka=True)
                ok &= exact
                results["worker_ingest_kafka"], _, exact = worker_section(a, ingest_format=True, kafka=True)
                ok &= exact
                if a.aggregates_memory_n:  # figure 4b on Kafka too: its fetch buffers are its own
                    results["aggregates_memory_kafka"] = aggregates_memory_section(a, kafka=True)
        except Exception as exc:  # noqa: BLE001 - the embedded figures are still reported
            log(f"the worker runs on Apache Kafka failed: {exc!r}"[:1500])
            results["notes"].append(f"Figures 1, 1b, 1c, 1d, 1e and 4b were not measured on Apache Kafka: {exc!r}"[:600] + ".")
            ok = False
    if a.ingest_duration > 0:
        if a.kafka != "only":
            results["ingest"], results["snapshots"] = ingest_section(a, fresh_half=True)
            ok &= results["ingest"]["exact"]
        if not why:
            try:
                results["ingest_kafka"], results["snapshots_kafka"] = ingest_section(
                    a, lambda: kafka_broker(a), one=False, label=" (Apache Kafka)")
                results["ingest_kafka"]["kafka_dir"] = a.kafka_dir or tempfile.gettempdir()
                ok &= results["ingest_kafka"]["exact"]
            except Exception as exc:  # noqa: BLE001 - the embedded figures are still reported
                why = f"the Kafka runs failed: {exc!r}"[:1500]
                log(why)
                ok = False
        if why:
            log(f"ingest on Apache Kafka skipped: {why}")
            results["notes"].append(f"Figures 2 and 3 were not measured on Apache Kafka: {why}.")
    return ok


def skipped(a: argparse.Namespace) -> list[str]:
    """The options of ``a`` that leave out a part of the full run."""
    flags = [(a.skip_worker, "--skip-worker"), (not a.ingest_duration, "--ingest-duration 0"),
             (not a.memory_n, "--memory-n 0"), (not a.aggregates_memory_n, "--aggregates-memory-n"),
             (not a.aggregates, "--no-aggregates"), (not a.dedup, "--no-dedup"), (not a.one, "--no-one"),
             (a.kafka in ("no", "only"), f"--kafka {a.kafka}"), (not a.faust_n, "--faust-n 0")]
    return [name for on, name in flags if on]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="backlog for worker throughput")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (medians)")
    ap.add_argument("--faust-n", type=int, default=20_000, help="events for the plain-Faust reference (0: skip)")
    ap.add_argument("--memory-n", type=int, default=3_000_000, help="larger backlog for peak RSS (0: skip)")
    ap.add_argument("--aggregates-memory-n", type=int, nargs="*", default=[1_000_000, 3_000_000],
                    help="backlogs for figure 4b: peak RSS with aggregates on and many regions (none: skip)")
    ap.add_argument("--aggregates-regions", type=int, default=1000, help="regions of figure 4b")
    ap.add_argument("--memory-runs", type=int, default=1)
    ap.add_argument("--no-aggregates", dest="aggregates", action="store_false",
                    help="skip figures 1c and 1d (the worker with unique users, top URLs and delay quantiles on)")
    ap.add_argument("--no-dedup", dest="dedup", action="store_false",
                    help="skip figure 1b (the backlog again with an event_id on every record: dedup state on)")
    ap.add_argument("--partitions", type=int, default=None,
                    help="partitions of the topics (default: the service's, 1 on the embedded broker, 4 on Kafka)")
    ap.add_argument("--ingest-duration", type=float, default=10.0, help="seconds per ingest phase (0: skip ingest)")
    ap.add_argument("--window-s", type=float, default=2.0, help="window length during the ingest runs")
    ap.add_argument("--grace-s", type=float, default=1.0, help="grace during the ingest runs")
    ap.add_argument("--big-concurrency", type=int, default=8, help="connections at batch 1000")
    ap.add_argument("--small-concurrency", type=int, default=32, help="connections at batch 10")
    ap.add_argument("--no-one", dest="one", action="store_false",
                    help="skip the one-process (role all) ingest runs")
    ap.add_argument("--kafka", choices=("auto", "yes", "no", "only"), default="auto",
                    help="also measure ingest and snapshot delay (figures 2 and 3, split runs) on Apache Kafka "
                         "started by scripts/kafka.sh: auto = when it can be assembled here; only = not on "
                         "the embedded broker")
    ap.add_argument("--kafka-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "",
                    help="where Kafka's log goes (default tmpfs: the VM's shared disk stalls writes)")
    ap.add_argument("--skip-worker", action="store_true")
    ap.add_argument("--profile-dir", default=None, help="record py-spy profiles of the worker here")
    ap.add_argument("--tracing", action="store_true",
                    help="run the service processes with OpenTelemetry tracing on (docs/tracing.md): every "
                         "ingest request and worker batch sampled, spans sent over OTLP/HTTP to a receiver in "
                         "this process that drops them; the report goes to docs/benchmarks-tracing.md")
    ap.add_argument("--out", default=None,
                    help="markdown report ('-': none; default docs/benchmarks.md, with --tracing "
                         "docs/benchmarks-tracing.md)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--render", default=None, metavar="MARKDOWN",
                    help="measure nothing: write --out again from the raw results of an earlier report "
                         "(its JSON block), e.g. after the report's wording changed")
    a = ap.parse_args(argv)
    # the topics' partitions per broker: as asked, else the service's default there
    a.partitions_embedded = a.partitions or EMBEDDED_PARTITIONS
    a.partitions_kafka = a.partitions or KAFKA_PARTITIONS
    left_out = skipped(a)
    if a.out is None and not a.render and left_out:
        # docs/benchmarks.md is the last full run: a partial one would replace it with part of a table
        log(f"a partial run ({' '.join(left_out)}): no report written (--out FILE writes one)")
        a.out = "-"
    if a.out is None:
        a.out = os.path.join(common.REPO, "docs", "benchmarks-tracing.md" if a.tracing else "benchmarks.md")
    if a.render:
        return render(a.render, a.out)
    if a.profile_dir:
        os.makedirs(a.profile_dir, exist_ok=True)
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

    t0 = time.perf_counter()
    results: dict = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m tools.bench", *(argv if argv is not None else sys.argv[1:])]).strip(),
        "machine": common.machine(),
        "config": {"partitions": {"embedded": a.partitions_embedded, "kafka": a.partitions_kafka},
                   "zipf_s": common.ZIPF_S, "top_share": common.top_share(),
                   "window_s": a.window_s, "grace_s": a.grace_s, "ingest_duration": a.ingest_duration,
                   "big_concurrency": a.big_concurrency, "small_concurrency": a.small_concurrency},
        "notes": [],
    }
    log(f"machine: {results['machine']['cpu']}, {results['machine']['nproc']} cores, load {results['machine']['loadavg']}")
    sink = None
    if a.tracing:
        sink = OtlpSink().start()
        os.environ.update(sink.env())  # inherited by every service process started below
        results["config"]["tracing"] = True
        log(f"tracing on: the services send their spans to {sink.endpoint} (dropped there)")
    ok = True
    try:
        ok = measure(a, results)
    finally:
        if sink is not None:
            sink.stop()
            for key in sink.env():
                os.environ.pop(key, None)
    if sink is not None:
        st = results["tracing"] = sink.stats()
        log(f"tracing: received {st['spans']:,} spans ({st['links']:,} links) in {st['requests']:,} OTLP requests, "
            f"{st['bytes'] / 1e6:,.1f} MB")
        results["notes"].append(
            "Tracing on (`--tracing`): every `POST /v1/events` and every worker batch traced "
            "(OTEL_TRACES_SAMPLER=always_on), spans exported over OTLP/HTTP to a receiver in the bench process "
            f"that drops them: {st['spans']:,} spans with {st['links']:,} links received. Compare with "
            "docs/benchmarks.md (tracing off) for the cost.")
        if st["spans"] == 0:
            log("error: --tracing, but no span arrived")
            ok = False
    results["elapsed_s"] = time.perf_counter() - t0
    results["json"] = orjson.dumps({k: v for k, v in results.items() if k != "json"},
                                   option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    print()
    print(report.table(results))
    print(f"\n({results['elapsed_s'] / 60:.1f} min)")
    if a.json:
        with open(a.json, "w") as f:
            f.write(results["json"] + "\n")
    if a.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(report.markdown(results))
        log(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
