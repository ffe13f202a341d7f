"""The table ``make bench`` prints and ``docs/benchmarks.md``, both from one results dict."""
from __future__ import annotations

import math
from typing import Any

from aggregator.core.sketches.cell import max_serialised_bytes

# a request key's dedup memory per partition, measured in process for 1,000-event bodies
# (docs/contract.md §3, "Bounded"): the bench's bodies
KEY_BYTES = (410, 480)
CELL_MAX_BYTES = max_serialised_bytes()  # a cell's state whole, at the default parameters
# the "how measured" of a row that results written before it do not have (--render of an older run)
PREDATES = " (The run reported here predates this row.)"

# result keys of figures 2 and 3 per broker kind, and how the report names the broker
INGEST_BROKERS = (("ingest", "snapshots", "embedded broker"), ("ingest_kafka", "snapshots_kafka", "Apache Kafka"))


def _num(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit == "ev/s":
        return f"{x:,.0f} ev/s"
    if unit == "ms":
        return f"{x:,.1f} ms"
    if unit == "s":
        return f"{x:.3f} s"
    if unit == "MB":
        return f"{x:,.0f} MB"
    if unit == "B":  # bytes, in the unit that reads best
        return f"{x / 1e6:,.1f} MB" if x >= 1e6 else f"{x:,.0f} B"
    return f"{x:,.2f}"


def _ingest_rows(i: dict[str, Any], s: dict[str, Any] | None, on: str) -> list[tuple[str, str, str, str, str]]:
    """Figures 2 and 3 measured on one kind of broker (``on``)."""
    out: list[tuple[str, str, str, str, str]] = []
    out.append((f"2. HTTP ingest process (worker in another), NDJSON batch 1000, max, {on}", _num(i["max_1000_rate"], "ev/s"),
                "goal >= 100,000 ev/s",
                f"{i['max_1000_rate'] / 100000:.0%}", "PASS" if i["max_1000_rate"] >= 100000 else "FAIL"))
    out.append(("   latency at that rate p50 / p99", f"{_num(i['max_1000_p50'], 'ms')} / {_num(i['max_1000_p99'], 'ms')}",
                "", "", "info"))
    if "dedup_keys" in i:  # issue 16: the dedup state at the bench rate (the load generator keys every request)
        out.append(("   idempotency keys the worker remembers at the end / its peak RSS",
                    f"{i['dedup_keys']:,.0f} / {_num(i['worker_rss'], 'MB')}", "every request keyed", "", "info"))
    if "dedup_changelog" in i:  # their records on the changelog; their memory from the contract's measure
        keys = i["dedup_keys"]
        out.append(("   ... their dedup records on the changelog (live) / per key and partition",
                    f"{_num(i['dedup_changelog'], 'B')} / {_num(i['dedup_changelog_per_key'], 'B')}",
                    f"in memory at most ~{keys * KEY_BYTES[0] / 1e6:,.0f}-{keys * KEY_BYTES[1] / 1e6:,.0f} MB at "
                    f"{KEY_BYTES[0]}-{KEY_BYTES[1]} B a key (contract §3)", "", "info"))
    if "alone_rate" in i:
        out.append(("   the same, worker process stopped (the ingest process's own capacity)",
                    _num(i["alone_rate"], "ev/s"), f"p99 {_num(i['alone_p99'], 'ms')}; #16 goal >= 200,000 ev/s",
                    f"{i['alone_rate'] / 200000:.0%}", "PASS" if i["alone_rate"] >= 200000 else "FAIL"))
    if "agg_max_rate" in i:  # issue 18: ingest with the aggregates' per-event work, beside the figure above
        out.append(("   the same with AGG_AGGREGATES on (user and URL hashed by ingest)", _num(i["agg_max_rate"], "ev/s"),
                    f"aggregates off: {_num(i['max_1000_rate'], 'ev/s')}; p99 {_num(i['agg_max_p99'], 'ms')}",
                    f"{i['agg_max_rate'] / i['max_1000_rate']:.0%}" if i["max_1000_rate"] else "-", "info"))
        if "alone_rate" in i:
            out.append(("   ... and with the worker process stopped", _num(i["agg_alone_rate"], "ev/s"),
                        f"aggregates off: {_num(i['alone_rate'], 'ev/s')}",
                        f"{i['agg_alone_rate'] / i['alone_rate']:.0%}" if i["alone_rate"] else "-", "info"))
    out.append(("   batch 10, max", _num(i["max_10_rate"], "ev/s"), f"batch 1000: {_num(i['max_1000_rate'], 'ev/s')}",
                f"{i['max_10_rate'] / i['max_1000_rate']:.0%}" if i["max_1000_rate"] else "-", "info"))
    out.append(("   batch 10 latency p50 / p99", f"{_num(i['max_10_p50'], 'ms')} / {_num(i['max_10_p99'], 'ms')}",
                "", "", "info"))
    # the goal's row: on a fresh broker where the run measured it so (the embedded broker), else
    # after the maximum-rate phases on the same broker
    h = "fresh_half" if "fresh_half_p99" in i else "half"
    where = ", on a fresh broker," if h == "fresh_half" else ""
    out.append((f"   batch 1000 at half the max ({_num(i[h + '_offered'], 'ev/s')} offered){where} p50",
                _num(i[h + "_p50"], "ms"), "", "", "info"))
    out.append(("   ... p99", _num(i[h + "_p99"], "ms"), "goal < 50 ms", f"{i[h + '_p99'] / 50:.0%}",
                "PASS" if i[h + "_p99"] < 50 else "FAIL"))
    out.append(("   ... achieved", _num(i[h + "_rate"], "ev/s"), f"offered {_num(i[h + '_offered'], 'ev/s')}",
                f"{i[h + '_rate'] / i[h + '_offered']:.0%}" if i[h + "_offered"] else "-", "info"))
    if h == "fresh_half":
        out.append(("   the same after the maximum-rate phases, on their broker, p50 / p99",
                    f"{_num(i['half_p50'], 'ms')} / {_num(i['half_p99'], 'ms')}",
                    "it holds their events (docs/performance.md)", "", "info"))
    if "one_max_rate" in i:
        out.append(("   one process (ingest + worker, role all), batch 1000, max", _num(i["one_max_rate"], "ev/s"),
                    "goal >= 100,000 ev/s", f"{i['one_max_rate'] / 100000:.0%}", "info"))
        out.append((f"   one process at half its max ({_num(i['one_half_offered'], 'ev/s')}) p50 / p99",
                    f"{_num(i['one_half_p50'], 'ms')} / {_num(i['one_half_p99'], 'ms')}", "goal p99 < 50 ms",
                    f"{i['one_half_p99'] / 50:.0%}", "info"))
    out.append(("   counts exact (ingested, and in closed windows)", "yes" if i["exact"] else "NO",
                "= accepted per region", "", "PASS" if i["exact"] else "FAIL"))
    if s:
        for where in ("metrics", "topic", "one_metrics", "one_topic"):
            if f"{where}_n" not in s:
                continue
            label = "/metrics" if where.endswith("metrics") else "click-snapshots"
            one = where.startswith("one_")
            head = "   one process: snapshot delay" if one else f"3. snapshot delay, {on},"
            out.append((f"{head} after grace, {label}, p50", _num(s[f"{where}_p50"], "s"), "", "", "info"))
            out.append((f"   ... p99 ({s[f'{where}_n']} snapshots)", _num(s[f"{where}_p99"], "s"), "goal < 1 s",
                        f"{s[f'{where}_p99']:.0%}",
                        "info" if one else ("PASS" if s[f"{where}_p99"] < 1 else "FAIL")))
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, value, baseline or goal, ratio, verdict) for every figure present."""
    out: list[tuple[str, str, str, str, str]] = []
    w = r.get("worker")
    if w:
        n = f"{w['n']:,}"
        out.append((f"1. worker throughput, aggregates off (beside 1c), N={n}", _num(w["worker_rate"], "ev/s"),
                    f"bare consumer {_num(w['bare_rate'], 'ev/s')}; goal >= 90%",
                    f"{w['ratio']:.0%}", "PASS" if w["ratio"] >= 0.9 else "FAIL"))
        out.append(("   worker incl. start-up and group join", _num(w["worker_rate_from_start"], "ev/s"),
                    f"bare consumer {_num(w['bare_rate'], 'ev/s')}", f"{w['ratio_from_start']:.0%}", "info"))
        if w.get("faust_rate"):
            out.append((f"   plain Faust agent + tumbling table, N={w['faust_n']:,}", _num(w["faust_rate"], "ev/s"),
                        f"bare consumer {_num(w['bare_rate'], 'ev/s')}", f"{w['faust_ratio']:.1%}", "reference"))
        out.append(("   counts exact (bare and worker, every run)", "yes" if w["exact"] else "NO", "per region = produced", "",
                    "PASS" if w["exact"] else "FAIL"))
    wk = r.get("worker_kafka")
    if wk:
        out.append((f"1. worker throughput, Apache Kafka, N={wk['n']:,}", _num(wk["worker_rate"], "ev/s"),
                    f"bare consumer {_num(wk['bare_rate'], 'ev/s')}; goal >= 90%",
                    f"{wk['ratio']:.0%}", "PASS" if wk["ratio"] >= 0.9 else "FAIL"))
        out.append(("   counts exact (bare and worker, every run)", "yes" if wk["exact"] else "NO",
                    "per region = produced", "", "PASS" if wk["exact"] else "FAIL"))
    for key, label in (("worker_aggs", "1c. worker, aggregates on (unique users, top URLs, delays), records straight "
                                         "to Kafka"),
                       ("worker_aggs_ingest", "1d. worker, aggregates on, records as the HTTP ingest writes them"),
                       ("worker_aggs_kafka", "1c. worker, aggregates on, records straight to Kafka, Apache Kafka"),
                       ("worker_aggs_ingest_kafka", "1d. worker, aggregates on, ingest's records, Apache Kafka")):
        g = r.get(key)
        if g:
            out.append((f"{label}, N={g['n']:,}", _num(g["worker_rate"], "ev/s"),
                        f"bare consumer {_num(g['bare_rate'], 'ev/s')}; goal >= 100%", f"{g['ratio']:.0%}",
                        "PASS" if g["ratio"] >= 1.0 else "FAIL"))
            out.append(("   peak RSS / counts exact", f"{_num(g['rss'], 'MB')} / {'yes' if g['exact'] else 'NO'}",
                        "per region = produced", "", "PASS" if g["exact"] else "FAIL"))
    for key, label in (("worker_ingest", "1e. worker, aggregates off, ingest's records (beside 1d)"),
                       ("worker_ingest_kafka", "1e. worker, aggregates off, ingest's records, Apache Kafka")):
        g = r.get(key)
        if g:
            out.append((f"{label}, N={g['n']:,}", _num(g["worker_rate"], "ev/s"),
                        f"bare consumer {_num(g['bare_rate'], 'ev/s')}", f"{g['ratio']:.0%}",
                        "info" if g["exact"] else "FAIL"))
    for key, base, on in (("worker_dedup", w, ""), ("worker_dedup_kafka", wk, ", Apache Kafka")):
        d = r.get(key)
        if d:
            out.append((f"1b. worker, an event_id on every record (dedup state on){on}, N={d['n']:,}",
                        _num(d["worker_rate"], "ev/s"), f"bare consumer {_num(d['bare_rate'], 'ev/s')}",
                        f"{d['ratio']:.0%}", "info"))
            out.append(("   event ids remembered / worker peak RSS", f"{d['dedup_ids']:,.0f} / {_num(d['rss'], 'MB')}",
                        f"without ids: {_num(base['rss'], 'MB') if base and 'rss' in base else '-'}", "", "info"))
            out.append(("   counts exact", "yes" if d["exact"] else "NO", "per region = produced", "",
                        "PASS" if d["exact"] else "FAIL"))
    for key, skey, on in INGEST_BROKERS:
        if r.get(key):
            out += _ingest_rows(r[key], r.get(skey), on)
    m = r.get("memory")
    if m:
        for n, mb in m["peak_rss"]:
            out.append((f"4. worker peak RSS, N={n:,}", _num(mb, "MB"), "goal < 300 MB", f"{mb / 300:.0%}",
                        "PASS" if mb < 300 else "FAIL"))
        if len(m["peak_rss"]) >= 2:
            (n1, a), (n2, b) = m["peak_rss"][0], m["peak_rss"][-1]
            out.append((f"   growth N={n1:,} -> {n2:,}", f"{b - a:+,.0f} MB", "must not grow with N", f"{b / a:.2f}x",
                        "PASS" if b < a * 1.2 else "FAIL"))
    for key, on in (("aggregates_memory", ""), ("aggregates_memory_kafka", ", Apache Kafka")):
        g = r.get(key)
        if g:
            state = {st["n"]: st for st in g.get("state", ())}  # not in results before 2026-12-06
            for n, mb, rate in g["runs"]:
                out.append((f"4b. worker peak RSS, aggregates on, {g['regions']:,} regions{on}, N={n:,}",
                            _num(mb, "MB"), f"goal < 300 MB ({rate:,.0f} ev/s)", f"{mb / 300:.0%}",
                            "PASS" if mb < 300 else "FAIL"))
                if n in state:
                    out.append(_state_row(state[n]))
    return out


def _state_row(st: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """Figure 4b's aggregates' records per (region, window) cell (tools/bench/changelog.py)."""
    cells, live_cells = st["cells"] or math.nan, st["live_cells"] or math.nan
    return ("   aggregates' state written per (region, window)", _num(st["written"]["g"] / cells, "B"),
            f"{st['cells']:,} cells; live at the end {_num(st['live']['g'] / live_cells, 'B')} a cell "
            f"(+ {_num(st['live']['state'] / live_cells, 'B')} of the partitions' state records); "
            f"a cell whole <= {CELL_MAX_BYTES:,} B", "", "info")


def table(r: dict[str, Any]) -> str:
    rs = [("figure", "value (median)", "baseline / goal", "ratio", "")] + rows(r)
    widths = [max(len(x[k]) for x in rs) for k in range(5)]
    lines = []
    for j, row in enumerate(rs):
        lines.append("  ".join(c.ljust(widths[k]) for k, c in enumerate(row)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def _split_runs_table(runs: list[dict[str, Any]]) -> list[str]:
    md = ["| run | b1000 max ev/s | p50 ms | p99 ms | b10 max ev/s | p50 ms | p99 ms | half offered ev/s | p50 ms | "
          "p99 ms | max ms | over 100 ms: sent / in handler | CPU (cores) at b1000 max: ingest / worker / loadgen | "
          "snapshot delay p99 s: /metrics / topic |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, run in enumerate(runs, 1):
        a, b, c = run["max_1000"], run["max_10"], run["half_1000"]
        md.append(f"| {k} | {a['rate']:,.0f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {b['rate']:,.0f} | "
                  f"{b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {c['offered']:,.0f} | {c['p50_ms']:.1f} | "
                  f"{c['p99_ms']:.1f} | {c.get('max_ms', float('nan')):.0f} | {c.get('over_100ms', -1)} / "
                  f"{c.get('server_over_100ms', -1)} | {a['server_cpu']:.2f} / {a.get('worker_cpu', float('nan')):.2f} / "
                  f"{a['loadgen_cpu']:.2f} | {_run_snapshot_p99(run)} |")
    return md + [""]


def _run_snapshot_p99(run: dict[str, Any]) -> str:
    p = run.get("snapshot_p99_s")  # not in results written before 2026-12-03
    return "-" if p is None else f"{p['metrics']:.2f} / {p['topic']:.2f}"


def markdown(r: dict[str, Any]) -> str:
    mach = r["machine"]
    cfg = r["config"]
    md = [
        "# Benchmarks, tracing on" if cfg.get("tracing") else "# Benchmarks",
        "",
        *(["Every ingest request and worker batch traced (`--tracing`, docs/tracing.md); the same figures "
           "with tracing off are docs/benchmarks.md.", ""] if cfg.get("tracing") else []),
        "Written by `make bench` (`python -m tools.bench`) from its own output; do not edit by hand.",
        f"Run started {r['started']} and took {r['elapsed_s'] / 60:.1f} min. "
        f"Command: `{r['command']}`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {mach['cpu']} |",
        f"| nproc | {mach['nproc']} |",
        f"| memory | {mach['memory']} |",
        f"| OS | {mach['os']} |",
        f"| Python | {mach['python']} |",
        f"| compiled hot path (mypyc, tools/native.py) | {mach.get('compiled', '-')} |",
        f"| git | {mach['commit']} |",
        f"| packages | {mach['packages']} |",
        f"| load average at start | {mach['loadavg']} |",
        "",
        "A shared two-core machine: other test suites may run at the same time, so absolute numbers",
        "move from run to run; each figure is the median of the runs below, and every ratio is to a",
        "baseline measured in the same run on the same broker (the embedded Tansu broker, in memory,",
        "on loopback, sharing the two cores with the service and the load generator)."
        + (f" Figures {_on_kafka(r)} are measured on Apache Kafka too, in rows that say so (a fresh "
           "single-node Kafka per run, its log on tmpfs)." if r.get("worker_kafka") else "")
        + (" Figures 2 and 3 are measured on Apache Kafka too, in rows that say so." if r.get("ingest_kafka") else ""),
        "",
        "## Results",
        "",
        "| figure | value (median) | baseline / goal | ratio | |",
        "|---|---|---|---|---|",
    ]
    for f, v, b, ratio, verdict in rows(r):
        md.append(f"| {f.strip()} | {v} | {b} | {ratio} | {verdict} |")
    md += ["", "## How each figure is measured", ""]
    w = r.get("worker")
    if w:
        md += [
            f"**1. Worker throughput.** {w['n']:,} compact JSON click events "
            f"(`{{\"region\",\"user_id\",\"url\",\"ts\",\"ingest_ts\"}}`: 5,000 users, 1,000 pages with a query "
            f"string, a client `ts` 0-2 s before `ingest_ts`; 16 regions, Zipf s={cfg['zipf_s']}, the first region "
            f"{cfg['top_share']:.0%} of the events) are produced to `clicks` ({_partitions(cfg['partitions'])}, "
            "key = region) before anything reads them. Then, on that backlog: the **bare consumer** "
            "(aiokafka `getmany`, `orjson.loads` of each value, a count per region in a dict), "
            "**the worker** (`aggregator run`, default settings but `AGG_AGGREGATES=false`: counts only) started "
            "against it, and the bare consumer "
            "again; the baseline is the mean of the two bare runs around the worker, because the shared "
            "machine's speed drifts from minute to minute. CPU per event (user + system time of the "
            "consumer's process over the measured interval) is shown beside the rates. Rates run from the first "
            "event counted to the last one applied to a window or the late bucket "
            "(`pipeline_stage_processed_total{stage=\"window\"}`, polled every 100 ms), so the consumer-group "
            "join is left out of both alike; the worker's rate from process start is shown too. "
            "Counts are checked exact per region against what was produced "
            "(`clickstream_events_total`, and the bare consumer's dict).",
            "",
            "**1b-1e** are the same measurement on other backlogs or settings, each against its own bare "
            "consumer: **1b** every record with a distinct `event_id` (the worker keeps dedup state for all); "
            "**1c** the worker with `AGG_AGGREGATES=true` (unique users, top URLs, delay quantiles: the "
            "default) on the same records as figure 1, produced straight to Kafka (the worker parses each "
            "value once); **1d** the same with the records as the HTTP ingest writes them (the "
            "`clickstream-ingest` and `clickstream-agg` headers: the worker reads no value); **1e** those "
            "records with the aggregates off, beside 1d, as figure 1 is beside 1c (the same backlog, seed "
            "for seed: records produced straight to Kafka, the aggregates off). Issue 18's goal is 1c and 1d "
            "at 100 % or more.",
            "",
            f"The **plain-Faust** reference (`tools/bench/plain_faust.py`: an agent over `clicks`, "
            f"`orjson.loads`, a tumbling 60 s windowed table `table[region] += 1` per event) reads only the first "
            f"{w.get('faust_n', 0):,} events of the same topic in the same run, because it manages only about a "
            "thousand events a second; its rate is first event to last.",
            "",
            "| run | bare ev/s (before / after) | worker ev/s | worker/bare | CPU us/event bare / worker "
            "| worker from start ev/s | start-up s | plain Faust ev/s | worker peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, run in enumerate(w["runs"], 1):
            md.append(f"| {k} | {run['bare']:,.0f} ({run.get('bare_before', float('nan')):,.0f} / "
                      f"{run.get('bare_after', float('nan')):,.0f}) | {run['worker']:,.0f} | {run['worker'] / run['bare']:.0%} | "
                      f"{run.get('bare_cpu_us', float('nan')):.2f} / {run.get('worker_cpu_us', float('nan')):.2f} | "
                      f"{run['worker_from_start']:,.0f} | {run['startup_s']:.1f} | "
                      f"{(format(run['faust'], ',.0f') if 'faust' in run else '-')} | {run['rss']:.0f} |")
        md.append("")
    i, k = r.get("ingest"), r.get("ingest_kafka")
    if i or k:
        md += [
            f"**2. HTTP ingest.** An ingest process (`aggregator run --role ingest`, `AGG_AGGREGATES=false` "
            "but where said) and a worker process "
            f"(`--role worker`, counting everything ingested while it is measured) on the same machine, "
            f"with {cfg['window_s']:g} s windows and "
            f"{cfg['grace_s']:g} s grace, on a fresh broker per run. The load generator "
            "(`tools/bench/loadgen.py`) is a second process sending pre-built NDJSON bodies "
            "(`{\"region\",\"user_id\",\"url\",\"ts\"}`, same region mix) over keep-alive connections. "
            f"Maximum rate: closed loop, {cfg['big_concurrency']} connections at batch 1000 and "
            f"{cfg['small_concurrency']} at batch 10, {cfg['ingest_duration']:g} s after 1 s warm-up. "
            "Half rate: open loop at half of the same run's batch-1000 maximum, requests started on a fixed "
            "schedule and latency measured from the scheduled start (no coordinated omission). "
            "\"Worker process stopped\": the batch-1000 maximum again with the worker process "
            "SIGSTOPped, so that the ingest process has the cores the worker would take (the broker and "
            "the load generator still share them); the worker then catches up and counts those events too. "
            "\"With AGG_AGGREGATES on\": the two batch-1000 maxima again on a fresh broker, both processes "
            "with the aggregates on, so ingest hashes each event's user and URL and adds the "
            "`clickstream-agg` header (issue 18's ingest figure, beside the one without). "
            "Every request must answer 200; afterwards the events accepted per region must equal "
            "`clickstream_events_ingested_total` and the counts in the closed windows' snapshots. "
            "The dedup state (issue 16): the load generator sends an `Idempotency-Key` with every body, "
            "and none is forgotten within the run (`AGG_DEDUP_SECONDS`, 600 s); at the end of the split "
            "run (after all its phases: batch 1000 at the maximum, with the worker stopped, batch 10, "
            "half rate) the worker's "
            "`clickstream_dedup_ids{kind=\"idempotency_key\"}` (a key counts once per "
            "partition its body reached) and its peak RSS are read, and after it stops the window-state "
            "changelog is read back: the bytes of the dedup records (`<partition>/d/...`) it holds at "
            "the end (the last value of each key). Their memory is not measured apart from the "
            "worker's RSS (a run without keys beside it would cost another split run each time); the "
            "row gives an upper estimate from the keys and the contract's in-process measure of a key "
            "of a 1,000-event body, 410-480 B (most keys of the run are of batch-10 bodies, ~355-360 B "
            "each: the memory is up to a quarter below the estimate)."
            + ("" if any("dedup_changelog" in x for x in (i, k) if x) else PREDATES),
            "",
        ]
    if i:
        md += ["On the embedded broker:", ""] + _split_runs_table(i["runs"])
        if all("fresh_half_1000" in run for run in i["runs"]):
            md += [
                "**Half rate on a fresh embedded broker.** Each run then measures the half-rate phase once "
                "more, at the same offered rate, on a fresh embedded broker with fresh ingest and worker "
                "processes (and the snapshot watcher), and checks its counts the same way. Issue 16's "
                "50 ms goal is read here on the embedded broker: the embedded broker keeps every event in "
                "memory and its cost of serving fetches grows with the events it holds (docs/performance.md: "
                "about 0.45 of a core in the half-rate phase after the maximum-rate phases, which leave it "
                "several million events), so the phase in the table above also measures what the phases "
                "before it left behind. Apache Kafka's cost does not grow so; its half-rate row is the one "
                "in its table.",
                "",
                "| run | offered ev/s | p50 ms | p99 ms | max ms | CPU (cores): ingest / worker / loadgen |",
                "|---|---|---|---|---|---|",
            ]
            for j, run in enumerate(i["runs"], 1):
                c = run["fresh_half_1000"]
                md.append(f"| {j} | {c['offered']:,.0f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['max_ms']:.0f} | "
                          f"{c['server_cpu']:.2f} / {c['worker_cpu']:.2f} / {c['loadgen_cpu']:.2f} |")
            md.append("")
        if "one_max_rate" in i:
            md += [
                "**One process.** `aggregator run` with the default role `all` serves ingest and runs the worker "
                "in one process: one event loop and one interpreter lock, so at batch 1000 it ingests *and* "
                "consumes every event. Each run measures it too, on a fresh broker: the batch-1000 maximum and "
                "the half-rate latency, with the same exactness check.",
                "",
                "| run | b1000 max ev/s | p99 ms | half offered ev/s | p50 ms | p99 ms | CPU (cores) at max |",
                "|---|---|---|---|---|---|---|",
            ]
            for j, run in enumerate(i["runs"], 1):
                a, c = run["one_max_1000"], run["one_half_1000"]
                md.append(f"| {j} | {a['rate']:,.0f} | {a['p99_ms']:.1f} | {c['offered']:,.0f} | {c['p50_ms']:.1f} | "
                          f"{c['p99_ms']:.1f} | {a['server_cpu']:.2f} |")
            md.append("")
    if k:
        md += [
            "**Figures 2 and 3 on Apache Kafka.** The same split runs (ingest process, worker process, load "
            "generator, snapshot watcher) against a fresh single-node Apache Kafka per run (KRaft, "
            "`scripts/kafka.sh`, 512 MiB heap, one replica), its log in "
            f"`{k.get('kafka_dir', '?')}`: the production broker, sharing the same two cores. Its log goes to "
            "tmpfs by default because on this VM's shared disk Kafka's request log showed appends "
            "(`localTime`) of up to 77 ms and the ingest saw produce round trips of 100-300 ms then, which "
            "every request queued behind them waits out (docs/performance.md, \"What was found about each broker\").",
            "",
        ] + _split_runs_table(k["runs"])
    s = r.get("snapshots") or r.get("snapshots_kafka")
    if s:
        md += [
            "**3. Snapshot delay.** During the half-rate phase (of the split runs; of the one-process "
            "runs for the rows marked so), a watcher in the benchmark process polls "
            f"`/metrics` every {s['poll_s'] * 1000:.0f} ms (`clickstream_window_end_timestamp_seconds` per region) "
            "and reads `click-snapshots` with a consumer; delay = when a (region, window) snapshot is first seen "
            f"minus window end minus grace ({cfg['grace_s']:g} s), for the windows that ended while the load ran, "
            "all runs pooled (each split run's own p99 is in its table's last column). The /metrics figure "
            "includes up to one polling interval.",
            "",
        ]
    m = r.get("memory")
    if m:
        md += [
            "**4. Memory.** Peak RSS (`VmHWM` of `/proc/PID/status`) of the worker process of (1), read when it "
            f"has counted the whole backlog: at N={m['peak_rss'][0][0]:,} the median of the runs of (1), at the "
            f"larger N {m['large_runs']} run(s) on a backlog produced the same way "
            f"(worker rate there {m['large_rate']:,.0f} ev/s, bare {m['large_bare']:,.0f} ev/s).",
            "",
        ]
    g = r.get("aggregates_memory") or r.get("aggregates_memory_kafka")
    if g:
        md += [
            f"**4b. Memory with aggregates.** Peak RSS of the worker with `AGG_AGGREGATES=true` over a backlog "
            f"of {g['regions']:,} regions (Zipf-like, exponent 0.8), records as the HTTP ingest writes them "
            "(every event with a user, a URL and a client `ts`), one run per size, on the embedded broker "
            f"({_partitions(cfg['partitions'])}) and on Apache Kafka; counts checked exact. "
            "The state bytes per (region, window): once the worker has stopped, its window-state changelog "
            "is read back and the values of the aggregates' records (`<partition>/g/<bucket>/<seq>`: each "
            "cell's logged input since the checkpoint before, and a window's cells whole once that input "
            "outgrew them, docs/analytics.md) are summed, as written over the run, divided by the "
            "(region, window) cells those records name; \"live at the end\" counts only the last value "
            "of each key not deleted since, over the cells it names: what a worker recovering the "
            "partition reads. The backlog spans a few seconds of ingest time, so its events fall in one "
            "or two windows; a window that closes during the run has its "
            "records deleted (its cells become snapshots in the partition's state), so it counts in the "
            "written figure only. Beside it: the live state records of the partitions (the counts, the "
            "indexes naming the records above, the outbox) over the same cells, and the bound of a "
            "cell's own JSON, whole (`max_serialised_bytes()`)." + ("" if "state" in g else PREDATES),
            "",
        ]
    if r.get("notes"):
        md += ["## Notes", ""] + [f"- {x}" for x in r["notes"]] + [""]
    md += ["## Raw results", "", "```json", r["json"], "```", ""]
    return "\n".join(md)


def _on_kafka(r: dict[str, Any]) -> str:
    """The worker figures a run measured on Apache Kafka too."""
    figs = [f for key, f in (("worker_kafka", "1"), ("worker_dedup_kafka", "1b"), ("worker_aggs_kafka", "1c"),
                             ("worker_aggs_ingest_kafka", "1d"), ("worker_ingest_kafka", "1e"),
                             ("aggregates_memory_kafka", "4b")) if r.get(key)]
    return ", ".join(figs[:-1]) + " and " + figs[-1] if len(figs) > 1 else figs[0]


def _partitions(p: Any) -> str:
    """The topics' partitions of a run's config (one count in results before the brokers differed)."""
    if isinstance(p, dict):
        return f"{p['embedded']} partition{'s' * (p['embedded'] != 1)} on the embedded broker, {p['kafka']} on Kafka"
    return f"{p} partitions"
