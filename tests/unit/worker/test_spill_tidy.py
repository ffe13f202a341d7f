"""The spill of owned partitions in the tick report: regions drained and quiet are forgotten,
and the spill gauges sum the regions one label stands for (docs/contract.md §6)."""
from __future__ import annotations

import os

import orjson

from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.worker.partitions import BookSettings, Partitions

BOOKS = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000, max_regions=10)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_spill_gauges_sum_every_region_a_label_stands_for(tmp_path):
    # found by a review (review_spill/other_gauge.py): the gauges were set once per region
    # under its label, so the regions shown as __other__ overwrote each other's backlog
    m = Metrics()
    parts = Partitions(BookSettings(60_000, 1000, 600_000, 3_600_000, max_regions=2), tmp_path, lambda n: None, m)
    p = parts.open(0)
    p.book.last_seen.update({"a": 1, "b": 1})  # the book's cap is full: other regions are __other__
    for region, n in (("__other__", 5), ("c", 3), ("d", 0)):
        offsets = list(range(n + 1))
        split = p.spill.ledger.split([(region, 1_000, None)] * (n + 1), offsets, RateLimits(0, {region: 1}), 0.0)
        if split is not None:
            p.spill.write(split)
    parts.report()
    assert sample(m, "clickstream_spill_backlog_events", region="__other__") == 8
    assert sample(m, "clickstream_spill_bytes", region="__other__") == p.spill.total_bytes() > 0
    assert sample(m, "pipeline_stage_in_pending", stage="spill") == 8


def test_regions_drained_and_quiet_are_forgotten_at_the_sweeps_of_the_tick_report(tmp_path):
    # found by a review (review_spill/region_churn.py): 200 region names over a worker's life
    # kept 200 ledger entries (in every state written), 200 directories, and spill gauges
    # re-created at every tick after the idle sweep had dropped them
    from aggregator.spill.tidy import SWEEP_S
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda n: None, m)
    p = parts.open(0)
    regions = [f"r{k}" for k in range(20)]
    for k, region in enumerate(regions):
        offsets = list(range(10 * k, 10 * k + 10))
        p.spill.write(p.spill.ledger.split([(region, 1_000, None)] * 10, offsets, RateLimits(0, {region: 1}), 0.0))
    p.spill.drain(RateLimits(0), 0.0, unlimited=True)
    p.spill.acked()
    for _ in range(2):  # drained at one sweep, still quiet at the next
        parts.swept -= SWEEP_S
        parts.report()
    assert p.spill.ledger.regions == {} and p.spill.store.regions() == []
    assert orjson.loads(p.state_value())["spill"] == {"": [9, 9, -1]}
    assert os.listdir(tmp_path / "p0" / "regions") == []
    m.regions_gone(regions)  # the idle sweep of the metrics
    parts.report()
    assert all(sample(m, "clickstream_spill_backlog_events", region=r) is None for r in regions)
