"""The bench's pure parts: the region mix, percentiles, the load generator's bodies (the
smoke run of ``make bench`` itself: tests/integration/test_bench.py).

Moved from tests/test_bench.py."""
from __future__ import annotations

import json

import pytest

from tools.bench import ingest
from tools.bench.common import INGESTED, PROCESSED, REGIONS, percentile, pick_regions, top_share
from tools.bench.loadgen import bodies


def test_region_mix_is_zipf_with_one_region_about_40_percent():
    assert 0.37 < top_share() < 0.43
    regions = pick_regions(20000, seed=3)
    share = regions.count(REGIONS[0]) / len(regions)
    assert 0.37 < share < 0.43
    assert set(regions) == set(REGIONS)
    assert regions == pick_regions(20000, seed=3)  # seeded: the same backlog every run


def test_percentile_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, 50) == 50
    assert percentile(xs, 99) == 99
    assert percentile(xs, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_loadgen_bodies_carry_their_region_counts():
    for body, counts in bodies(10, 3, seed=1):
        lines = body.split(b"\n")
        assert len(lines) == 10 == sum(counts.values())
        seen: dict[str, int] = {}
        for line in lines:
            r = json.loads(line)["region"]
            seen[r] = seen.get(r, 0) + 1
        assert seen == counts


def test_only_a_full_run_writes_the_default_report():
    """docs/benchmarks.md is the last full run: a run that leaves a part out writes no report
    unless --out names one."""
    import argparse

    from tools.bench.__main__ import skipped

    full = argparse.Namespace(skip_worker=False, ingest_duration=10.0, memory_n=3_000_000,
                              aggregates_memory_n=[1_000_000], aggregates=True, dedup=True, one=True,
                              kafka="auto", faust_n=20_000)
    assert skipped(full) == []
    partial = argparse.Namespace(**{**vars(full), "ingest_duration": 0.0, "kafka": "only"})
    assert skipped(partial) == ["--ingest-duration 0", "--kafka only"]


def test_a_worker_that_does_not_catch_up_stops_the_half_rate_phase(monkeypatch):
    """The half-rate phase waits for the worker's backlog; a worker still behind after the
    timeout is an error, not a phase measured over the backlog."""
    applied = {"window": 90.0}

    def fake_metrics(url: str, names: tuple[str, ...] = ()) -> dict:
        if url == "front":
            return {INGESTED: {(("region", "eu"),): 60.0, (("region", "us"),): 40.0}}
        return {PROCESSED: {(("stage", "window"),): applied["window"], (("stage", "decode"),): 500.0}}

    monkeypatch.setattr(ingest, "metrics", fake_metrics)
    with pytest.raises(RuntimeError, match="did not catch up within 0 s: applied 90 of 100"):
        ingest._caught_up("front", "worker", timeout=0.0)
    applied["window"] = 100.0
    ingest._caught_up("front", "worker", timeout=0.0)  # caught up: returns
