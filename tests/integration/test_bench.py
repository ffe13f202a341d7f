"""Smoke test of ``make bench`` (``python -m tools.bench``, tools/bench/): a tiny run of every
measurement must finish and count exactly.  No timing is asserted: rates and latencies on a
shared machine are for docs/benchmarks.md, not for a test."""
from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest

from tests.conftest import REPO
from tests.integration.conftest import ON_REAL_KAFKA
from tools.bench.report import markdown, table

ROOT = REPO


@pytest.mark.integration
@pytest.mark.skipif(ON_REAL_KAFKA, reason="starts embedded brokers of its own whatever the suite's broker: "
                    "make test runs it; under make test-kafka it would only repeat that")
def test_bench_runs_and_counts_exactly(tmp_path):
    out, raw = tmp_path / "benchmarks.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--n", "3000", "--runs", "1", "--faust-n", "300",
         "--memory-n", "6000", "--aggregates-memory-n", "4000", "--aggregates-regions", "300",
         "--ingest-duration", "1.5", "--kafka", "no", "--out", str(out), "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(raw.read_text())
    w = res["worker"]
    assert w["n"] == 3000 and w["exact"] is True and w["runs"][0]["exact"] is True
    # figure 1b (dedup state: every event id remembered), 1c and 1d (aggregates on)
    assert res["worker_dedup"]["exact"] is True and res["worker_dedup"]["dedup_ids"] == 3000
    assert res["worker_aggs"]["exact"] is True and res["worker_aggs_ingest"]["exact"] is True
    assert res["worker_ingest"]["exact"] is True  # 1e: ingest's records, aggregates off
    assert w["bare_rate"] > 0 and w["worker_rate"] > 0 and w["faust_rate"] > 0
    assert [n for n, _ in res["memory"]["peak_rss"]] == [3000, 6000]
    assert all(mb > 0 for _, mb in res["memory"]["peak_rss"])
    # figure 4b: aggregates on over many regions, counts exact (else the run raises)
    assert res["aggregates_memory"]["regions"] == 300 and [n for n, _, _ in res["aggregates_memory"]["runs"]] == [4000]
    # ... and the state it wrote per (region, window): its changelog read back (issue 18)
    st = res["aggregates_memory"]["state"][0]
    assert st["n"] == 4000 and st["written"]["g"] >= st["live"]["g"] > 0 and st["cells"] >= st["live_cells"] > 100
    i = res["ingest"]
    assert i["exact"] is True and i["runs"][0]["one_exact"] is True
    assert i["dedup_keys"] > 0 and i["worker_rss"] > 0  # the dedup state at the bench rate
    assert i["runs"][0]["dedup_changelog"] > 0 and i["dedup_changelog_per_key"] > 0  # ... and its records
    run = i["runs"][0]
    phases = ("max_1000", "alone_1000", "max_10", "half_1000", "one_max_1000", "one_half_1000",
              "agg_max_1000", "agg_alone_1000",  # agg_: AGG_AGGREGATES on in both processes
              "fresh_half_1000")  # the half-rate phase again on a fresh embedded broker (issue 16's row)
    assert set(run) >= set(phases) and run["agg_exact"] is True and run["fresh_exact"] is True
    # offered half of the same run's maximum, as the phase on the broker of the maxima
    assert run["fresh_half_1000"]["offered"] == pytest.approx(run["max_1000"]["rate"] / 2, rel=0.01)
    assert "fresh_half_p99" in i
    assert all(run[p]["requests"] > 0 for p in phases)
    assert res["snapshots"]["metrics_n"] > 0 and res["snapshots"]["topic_n"] > 0
    assert run["snapshot_p99_s"]["metrics"] >= 0 and run["snapshot_p99_s"]["topic"] >= 0  # this run's own (not NaN)
    # the report is made from the results: every section and the machine are there
    md = out.read_text()
    for needle in ("## Machine", "nproc", "Python", "worker throughput", "HTTP ingest", "snapshot delay",
                   "peak RSS", "1b. worker", "1c. worker", "1d. worker", "4b. worker", "worker process stopped",
                   "the same with AGG_AGGREGATES on", "on a fresh broker", "Half rate on a fresh embedded broker",
                   "aggregates' state written per (region, window)", "dedup records on the changelog",
                   res["machine"]["cpu"]):
        assert needle in md, needle
    assert "worker throughput" in proc.stdout  # the printed table
    # the markdown is made from exactly these results (its raw block is the JSON written)
    assert markdown({**res, "json": raw.read_text().rstrip("\n")}) == md
    assert table(res).count("\n") >= 10
    assert "ingest_kafka" not in res and "Apache Kafka: not asked" in md
    # --render writes the same report again from the raw results it carries
    again = tmp_path / "again.md"
    subprocess.run([sys.executable, "-m", "tools.bench", "--render", str(out), "--out", str(again)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    assert again.read_text() == md
    # ... also when a figure is NaN (orjson writes null; e.g. --memory-n 0 leaves rates NaN)
    res["memory"]["large_rate"] = float("nan")
    res["ingest"]["half_p99"] = res["ingest"]["fresh_half_p99"] = float("nan")
    raw_nan = orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
    with_nan = tmp_path / "nan.md"
    with_nan.write_text(markdown({**res, "json": raw_nan}))
    subprocess.run([sys.executable, "-m", "tools.bench", "--render", str(with_nan), "--out", str(again)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    assert again.read_text() == with_nan.read_text() and "nan%" in again.read_text()


@pytest.mark.integration
@pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs real Kafka (AGG_TEST_BROKER=kafka, make test-kafka)")
def test_bench_ingest_on_apache_kafka_counts_exactly(tmp_path):
    """Figures 1, 1c, 1d, 2 and 3 on a fresh Apache Kafka of the bench's own per run
    (scripts/kafka.sh); only under make test-kafka, where the jars are assembled."""
    out, raw = tmp_path / "benchmarks.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--n", "3000", "--faust-n", "0", "--memory-n", "0", "--runs", "1",
         "--aggregates-memory-n", "4000", "--aggregates-regions", "300",
         "--ingest-duration", "1.5", "--kafka", "only", "--kafka-dir", str(tmp_path), "--out", str(out),
         "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(raw.read_text())
    assert "ingest" not in res and "worker" not in res  # --kafka only: no embedded-broker runs
    # figures 1, 1b, 1c, 1d and 1e on Apache Kafka: counts exact
    for key in ("worker_kafka", "worker_dedup_kafka", "worker_aggs_kafka", "worker_aggs_ingest_kafka",
                "worker_ingest_kafka"):
        assert res[key]["n"] == 3000 and res[key]["exact"] is True, key
    # figure 4b on Apache Kafka (counts exact, else the run raises)
    assert [n for n, _, _ in res["aggregates_memory_kafka"]["runs"]] == [4000]
    st = res["aggregates_memory_kafka"]["state"][0]  # its changelog read back: 4 partitions there
    assert st["written"]["g"] >= st["live"]["g"] > 0 and st["cells"] >= st["live_cells"] > 100
    i = res["ingest_kafka"]
    assert i["exact"] is True and i["runs"][0]["exact"] is True and i["runs"][0]["dedup_changelog"] > 0
    assert all(i["runs"][0][p]["requests"] > 0 for p in ("max_1000", "max_10", "half_1000"))
    assert res["snapshots_kafka"]["metrics_n"] > 0 and res["snapshots_kafka"]["topic_n"] > 0
    assert res["ingest_kafka"]["kafka_dir"] == str(tmp_path)
    assert not list(tmp_path.glob("bench-kafka-*")), "the bench's Kafka data folder was left behind"
    md = out.read_text()
    assert "max, Apache Kafka" in md and "max, embedded broker" not in md
    assert "1. worker throughput, Apache Kafka" in md and "1d. worker, aggregates on, ingest's records, Apache Kafka" in md
    assert "**Figures 2 and 3 on Apache Kafka.**" in md and "**2. HTTP ingest.**" in md
    assert "**3. Snapshot delay.**" in md and "On the embedded broker" not in md
