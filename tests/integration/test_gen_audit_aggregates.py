"""Unique users, top URLs and client-delay quantiles end to end (issue 18): a seeded
generator stream over several windows and regions of very different sizes, through a
service with aggregates on (the default), audited against the generator's exact truth
over HTTP ingest and over Kafka-direct records; a tampered truth fails the audit."""
from __future__ import annotations

import asyncio
import copy
import json
import time

import pytest

from aggregator.gen.audit import EXACT_USERS, missing_windows, unambiguous_top
from aggregator.gen.generator import generate
from tests.conftest import wait_for
from tests.integration.test_gen_audit import run_audit
from tests.unit.gen.test_audit import W


def settle(svc, t: dict, gen_done: float) -> None:
    windows = {int(w) for per in t["counts"].values() for w in per}
    wait_for(lambda: not missing_windows(t, svc.snapshots()), 30, what="snapshots of every truth window")
    wait_for(lambda: any(s["window_start"] >= max(windows) + W for s in svc.snapshots()), 15,
             what="the window after the last one with traffic to close")
    time.sleep(max(0.0, gen_done + 4.0 - time.monotonic()))


@pytest.mark.integration
@pytest.mark.parametrize("path", ["http", "kafka"])
def test_aggregates_audit_against_exact_truth(service_factory, broker, tmp_path, path):
    svc = service_factory(f"agg-{path}", AGG_AGGREGATES="true").start()
    rate, seconds = 700.0, 7.0
    truth = asyncio.run(generate(
        svc.url if path == "http" else "", rate, int(rate * seconds), regions=6, seed=11, batch=50, window_ms=W,
        skew=1.3, delayed_fraction=0.01, progress=False, clock_skew_ms=-3000,
        kafka=broker.url if path == "kafka" else "", aggregates=True))
    gen_done = time.monotonic()
    t = truth.to_json()
    cells = [c for per in t["aggregates"].values() for c in per.values()]
    users = [c["unique_users"] for c in cells]
    # regions of very different sizes: cells on both sides of the exact threshold
    assert min(users) <= EXACT_USERS < max(users), sorted(users)
    assert any(len(unambiguous_top(c)) == 3 for c in cells)
    assert len({int(w) for per in t["counts"].values() for w in per}) >= 3
    truth_path = tmp_path / "truth.json"
    truth_path.write_text(json.dumps(t))
    settle(svc, t, gen_done)

    snaps = [s for s in svc.snapshots() if s["count"]]
    assert snaps and all("unique_users" in s and "top_urls" in s and "client_delay_ms" in s for s in snaps), \
        "the snapshots carry no aggregates: is the worker side of issue 18 in?"
    res = run_audit(truth_path, svc.url)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + svc.tail()
    assert "match the ground truth exactly" in res.stdout
    assert f"aggregates of {len(cells)} cells checked" in res.stdout, res.stdout[-1000:]

    # tampered truths: each aggregate rule can fail
    big_region, big_ws = max(((r, ws) for r, per in t["aggregates"].items() for ws in per),
                             key=lambda k: t["aggregates"][k[0]][k[1]]["unique_users"])
    for field in ("unique_users", "top", "delay"):
        bad = copy.deepcopy(t)
        c = bad["aggregates"][big_region][big_ws]
        if field == "unique_users":
            c["unique_users"] = round(c["unique_users"] * 1.1)
        elif field == "top":
            c["top_urls"][0][1] = round(c["top_urls"][0][1] * 1.2) + 1
        else:
            c["client_delay_ms"]["p99"] = round(c["client_delay_ms"]["p99"] * 1.05) + 1
        bad_path = tmp_path / f"tampered-{field}.json"
        bad_path.write_text(json.dumps(bad))
        res = run_audit(bad_path, svc.url)
        assert res.returncode == 1, (field, res.stdout[-2000:])
        assert f"{big_region} window {big_ws}:" in res.stderr, res.stderr
