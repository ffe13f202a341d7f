"""The generator's ground truth and the audit: pure checks, then end to end against a service."""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import time

import orjson
import pytest

from aggregator.gen.audit import audit, missing_windows
from aggregator.gen.generator import EventSource, generate, rate_summary
from tests.conftest import wait_for

W = 2000


def snap(region: str, ws: int, count: int, client_delay: int = 0, closed_window: int = 0,
         emitted_at: int | None = None) -> dict:
    return {"region": region, "window_start": ws, "window_end": ws + W, "count": count,
            "late": client_delay + closed_window,
            "late_by_reason": {"closed_window": closed_window, "client_delay": client_delay},
            "emitted_at": emitted_at if emitted_at is not None else ws + W + 1000}


TRUTH = {"window_ms": W, "accepted": 0, "rejected": 0,
         "counts": {"eu-west": {"10000": 5, "12000": 3}, "us-east": {"10000": 2}},
         "late": {"eu-west": {"client_delay": 2}}}


def good_snaps() -> list[dict]:
    return [snap("eu-west", 10000, 5), snap("eu-west", 12000, 3, client_delay=2),
            snap("us-east", 10000, 2), snap("us-east", 12000, 0)]


# --- pure: the audit -----------------------------------------------------------------------

def test_exact_snapshots_pass():
    assert audit(TRUTH, good_snaps()) == []
    assert missing_windows(TRUTH, good_snaps()) == set()


def test_wrong_count_is_caught():
    snaps = good_snaps()
    snaps[0]["count"] = 6
    problems = audit(TRUTH, snaps)
    assert len(problems) == 1 and "eu-west window 10000" in problems[0] and "count 6" in problems[0]


def test_missing_window_is_caught():
    snaps = [s for s in good_snaps() if not (s["region"] == "us-east" and s["window_start"] == 10000)]
    problems = audit(TRUTH, snaps)
    assert problems == ["us-east window 10000: missing (expected 2)"]
    assert missing_windows(TRUTH, snaps) == {("us-east", 10000)}


def test_unexpected_nonzero_window_is_caught():
    snaps = good_snaps() + [snap("ap-south", 12000, 1)]
    problems = audit(TRUTH, snaps)
    assert problems == ["ap-south window 12000: unexpected count 1"]


def test_zero_count_extra_windows_pass():
    snaps = good_snaps() + [snap("ap-south", 12000, 0), snap("eu-west", 14000, 0), snap("us-east", 8000, 0)]
    assert audit(TRUTH, snaps) == []


def test_duplicate_with_different_content_is_caught():
    dup = snap("eu-west", 10000, 4)
    problems = audit(TRUTH, good_snaps() + [dup])
    assert any("re-published with different content" in p for p in problems), problems
    # different late numbers, same count, are a different content too
    dup = snap("eu-west", 12000, 3, client_delay=1, closed_window=1)
    problems = audit(TRUTH, good_snaps() + [dup])
    assert any("eu-west window 12000: re-published" in p for p in problems), problems


def test_identical_duplicate_passes_even_with_new_emitted_at():
    snaps = good_snaps()
    assert audit(TRUTH, snaps + copy.deepcopy(snaps)) == []
    again = copy.deepcopy(snaps[1])
    again["emitted_at"] += 5000  # re-published after a crash: same numbers, later time
    assert audit(TRUTH, snaps + [again]) == []


def test_identical_duplicate_does_not_double_late_counts():
    snaps = good_snaps()
    assert audit(TRUTH, snaps + [copy.deepcopy(snaps[1])]) == []


def test_spilled_region_is_checked_by_the_identity():
    # eu-west was rate limited: 2 of window 10000's events were drained after it closed
    moved = [snap("eu-west", 10000, 3), snap("eu-west", 12000, 3, client_delay=2, closed_window=2),
             snap("us-east", 10000, 2)]
    assert audit(TRUTH, moved, {"eu-west"}) == []
    assert len(audit(TRUTH, moved)) == 2  # without the flag: window count and late both wrong
    lost = [snap("eu-west", 10000, 3), snap("eu-west", 12000, 3, client_delay=2, closed_window=1),
            snap("us-east", 10000, 2)]
    assert audit(TRUTH, lost, {"eu-west"}) == ["eu-west: counted + late closed_window = 7 != accepted on time 8"]
    over = [snap("eu-west", 10000, 6), snap("eu-west", 12000, 2, client_delay=2), snap("us-east", 10000, 2)]
    assert "eu-west window 10000: count 6 over expected 5" in audit(TRUTH, over, {"eu-west"})
    # the other regions stay exact per window
    assert audit(TRUTH, moved[:2] + [snap("us-east", 10000, 1)], {"eu-west"}) == [
        "us-east window 10000: count 1 != expected 2"]


def test_wrong_late_counts_are_caught():
    snaps = good_snaps()
    snaps[1] = snap("eu-west", 12000, 3, client_delay=1)
    assert audit(TRUTH, snaps) == ["eu-west late client_delay: 1 != expected 2"]
    # a late reason the truth does not expect
    snaps = good_snaps()
    snaps[3] = snap("us-east", 12000, 0, closed_window=3)
    assert audit(TRUTH, snaps) == ["us-east late closed_window: 3 != expected 0"]
    # late events spread over several windows add up
    snaps = good_snaps()
    snaps[1] = snap("eu-west", 12000, 3, client_delay=1)
    snaps.append(snap("eu-west", 14000, 0, client_delay=1))
    assert audit(TRUTH, snaps) == []


def test_misaligned_window_bounds_are_caught():
    snaps = good_snaps()
    snaps[0]["window_end"] = 11000
    assert any("bounds" in p for p in audit(TRUTH, snaps))


# --- pure: the generator -------------------------------------------------------------------

def regions_of(seed: int, n: int = 500) -> list:
    src = EventSource(seed, 10, skew=1.1, bad_fraction=0.02, delayed_fraction=0.02)
    out = []
    for _ in range(5):
        lines, regs, delayed = src.batch(n // 5, now_ms=1_700_000_000_000)
        out.extend(zip(regs, delayed, [orjson.loads(x).get("user_id") for x in lines]))
    return out


def test_same_seed_same_stream():
    a, b = regions_of(7), regions_of(7)
    assert a == b
    assert regions_of(8) != a
    regs = [r for r, _, _ in a]
    assert None in regs                     # some malformed records
    now = 1_700_000_000_000
    assert any(r and now - ts > 300_000 for r, ts, _ in a)   # some client-delayed records
    assert sum(1 for r, ts, _ in a if r and now - ts > 300_000) < len(a) / 10
    # skewed: the first region is the most popular
    named = [r for r in regs if r]
    assert named.count("eu-west") > named.count("ca-central")


def test_hot_region_burst_and_clock_skew():
    src = EventSource(1, 10, skew=1.1, hot_region="eu-west", burst_multiplier=1000.0, clock_skew_ms=-5000)
    now = 1_700_000_000_000
    _, calm, ts_calm = src.batch(2000, now)
    _, hot, _ = src.batch(2000, now, burst=True)
    assert calm.count("eu-west") < 800            # about a third of the traffic normally
    assert hot.count("eu-west") > 1950            # nearly all of it during a 1000x burst
    assert src.burst_rate_factor > 100            # and the total rate grows with it
    assert all(now - 5000 - 2000 < ts <= now - 5000 for ts in ts_calm)  # skewed producer clock


def test_rate_summary_says_when_target_not_sustained():
    ok = rate_summary(950, 1.0, 1000)
    assert len(ok) == 1 and "achieved 950/s" in ok[0]
    slow = rate_summary(500, 1.0, 1000)
    assert "could not sustain target rate: achieved 500/s of 1000/s" in slow[-1]
    assert len(rate_summary(10, 1.0, 0)) == 1  # 0: as fast as possible, nothing to sustain


# --- end to end ----------------------------------------------------------------------------

def run_audit(truth_path, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aggregator", "audit", "--truth", str(truth_path),
                           "--url", url], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_generator_stream_audits_exactly(service_factory, tmp_path, capsys):
    svc = service_factory("gen").start()
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
    svc = service_factory("kgen").start()
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
