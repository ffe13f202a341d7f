"""The generator's ground truth and the audit end to end against a service (the pure checks:
tests/unit/gen/).

Moved from tests/test_gen_audit.py."""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import time

import pytest

from aggregator.gen.audit import missing_windows
from aggregator.gen.generator import generate
from tests.conftest import wait_for
from tests.unit.gen.test_audit import W


def run_audit(truth_path, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aggregator", "audit", "--truth", str(truth_path),
                           "--url", url], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_generator_stream_audits_exactly(service_factory, tmp_path, capsys):
    svc = service_factory("gen", AGG_AGGREGATES="true").start()
    rate, seconds = 500.0, 7.0
    truth = asyncio.run(generate(
        svc.url, rate, int(rate * seconds), regions=10, seed=3, batch=25, window_ms=W, skew=1.1,
        bad_fraction=0.02, delayed_fraction=0.02, concurrency=4, progress_interval=2.0,
        hot_region="hot-zone", burst_multiplier=10.0, burst_start=2.0, burst_duration=2.0,
        clock_skew_ms=-20_000))
    gen_done = time.monotonic()
    err = capsys.readouterr().err
    assert "gen: sent" in err and "gen: achieved" in err, err
    t = truth.to_json()
    assert t["accepted"] + t["rejected"] == t["sent"] == int(rate * seconds)
    assert t["rejected"] > 0
    assert sum(n for per in t["late"].values() for n in per.values()) > 0
    assert len(t["counts"]) == 11  # 10 regions + the hot one
    hot = sum(t["counts"]["hot-zone"].values())
    assert hot > 0.05 * t["accepted"]  # over twice its calm share (~2.4 %): the burst happened
    windows = {int(w) for per in t["counts"].values() for w in per}
    assert len(windows) >= 3
    truth_path = tmp_path / "truth.json"
    truth_path.write_text(json.dumps(t))

    # every window of the truth published; then quiet so the window holding the last late
    # events (attached to the window open when processed) has closed too
    wait_for(lambda: not missing_windows(t, svc.snapshots()), 30, what="snapshots of every truth window")
    after = max(windows) + W
    wait_for(lambda: any(s["window_start"] >= after for s in svc.snapshots()), 15,
             what="the window after the last one with traffic to close")
    time.sleep(max(0.0, gen_done + 4.0 - time.monotonic()))

    res = run_audit(truth_path, svc.url)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + svc.tail()
    assert "match the ground truth exactly" in res.stdout
    assert "mismatch" not in res.stdout

    # tampered truth: one count +1 -> the audit fails and names it
    bad = copy.deepcopy(t)
    region = max(bad["counts"], key=lambda r: sum(bad["counts"][r].values()))
    ws = sorted(bad["counts"][region])[0]
    bad["counts"][region][ws] += 1
    bad_path = tmp_path / "tampered.json"
    bad_path.write_text(json.dumps(bad))
    res = run_audit(bad_path, svc.url)
    assert res.returncode != 0
    assert "AUDIT FAILED: 1 mismatches" in res.stderr, res.stderr
    assert f"{region} window {ws}: count" in res.stderr

    # a second run of the same seed against the same service, within its dedup horizon: new
    # events (not the first run's ids and keys again), audited exactly beside the first run's
    # snapshots (which are not this run's double counts)
    second = asyncio.run(generate(svc.url, rate, int(rate * 3), regions=10, seed=3, batch=25, window_ms=W,
                                  bad_fraction=0.02, progress=False)).to_json()
    gen_done = time.monotonic()
    windows = {int(w) for per in second["counts"].values() for w in per}
    wait_for(lambda: any(s["window_start"] >= max(windows) + W for s in svc.snapshots()), 30,
             what="the window after the second run's last one to close")
    time.sleep(max(0.0, gen_done + 4.0 - time.monotonic()))
    second_path = tmp_path / "second.json"
    second_path.write_text(json.dumps(second))
    res = run_audit(second_path, svc.url)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "match the ground truth exactly" in res.stdout

    # the CLI: a target rate HTTP cannot reach is reported plainly, and the truth is written
    cli_truth = tmp_path / "cli.json"
    res = subprocess.run([sys.executable, "-m", "aggregator", "gen", "--url", svc.url, "--rate", "1000000",
                          "--count", "300", "--regions", "3", "--seed", "5", "--window-seconds", "2",
                          "--truth", str(cli_truth)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "could not sustain target rate: achieved" in res.stderr and "of 1000000/s" in res.stderr
    written = json.loads(cli_truth.read_text())
    assert written["sent"] == written["accepted"] == 300


@pytest.mark.integration
def test_kafka_generator_stream_audits_exactly(service_factory, broker, tmp_path):
    svc = service_factory("kgen", AGG_AGGREGATES="true").start()
    rate, seconds = 500.0, 4.0
    truth = asyncio.run(generate(
        "", rate, int(rate * seconds), regions=10, seed=4, batch=25, window_ms=W, skew=1.1,
        bad_fraction=0.02, delayed_fraction=0.02, progress=False, kafka=broker.url))
    gen_done = time.monotonic()
    t = truth.to_json()
    assert t["accepted"] + t["rejected"] == t["sent"] == int(rate * seconds) and t["rejected"] > 0
    windows = {int(w) for per in t["counts"].values() for w in per}
    truth_path = tmp_path / "truth.json"
    truth_path.write_text(json.dumps(t))
    wait_for(lambda: not missing_windows(t, svc.snapshots()), 30, what="snapshots of every truth window")
    wait_for(lambda: any(s["window_start"] >= max(windows) + W for s in svc.snapshots()), 15,
             what="the window after the last one with traffic to close")
    time.sleep(max(0.0, gen_done + 4.0 - time.monotonic()))
    res = run_audit(truth_path, svc.url)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + svc.tail()
