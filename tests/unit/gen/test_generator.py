"""The generator: a seeded, skewed stream with bad, delayed and burst records.

Moved from tests/test_gen_audit.py."""
from __future__ import annotations

import orjson

from aggregator.gen.generator import EventSource, rate_summary


def regions_of(seed: int, n: int = 500) -> list:
    src = EventSource(seed, 10, skew=1.1, bad_fraction=0.02, delayed_fraction=0.02)
    out = []
    for _ in range(5):
        lines, regs, delayed = src.batch(n // 5, now_ms=1_700_000_000_000)
        out.extend(zip(regs, delayed, [orjson.loads(x).get("user_id") for x in lines], strict=False))
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
