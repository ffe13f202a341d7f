"""The worker-wide region cap (issue 15, fault 11)."""
from __future__ import annotations

from aggregator.core.contract import OTHER_REGION
from aggregator.core.regioncap import RegionCap


def test_at_most_max_regions_are_named_whatever_partition_they_come_from():
    cap = RegionCap(5, idle_ms=60_000)
    # eleven regions, as from four partitions of one worker (the cap was per partition)
    named = {cap.admit(f"r{i}", 1_000 + i) for i in range(11)}
    assert named == {"r0", "r1", "r2", "r3", "r4", OTHER_REGION}
    assert cap.admit("r2", 2_000) == "r2"  # a named region stays named


def test_an_idle_region_gives_its_place_up():
    cap = RegionCap(2, idle_ms=10_000)
    assert cap.admit("a", 0) == "a" and cap.admit("b", 0) == "b"
    assert cap.admit("c", 5_000) == OTHER_REGION  # full, nobody idle yet
    cap.touch(["b"], 8_000)
    assert cap.admit("c", 12_000) == "c"  # a idle since 0: its place goes to c
    assert set(cap.seen) == {"b", "c"}
    assert cap.admit("a", 12_001) == OTHER_REGION


def test_a_full_cap_looks_for_idle_regions_at_most_once_a_second():
    cap = RegionCap(1, idle_ms=100)
    cap.admit("a", 0)
    assert cap.admit("b", 50) == OTHER_REGION   # swept at 50: a not idle yet
    assert cap.admit("b", 500) == OTHER_REGION  # a is idle now, but the next sweep is at 1050
    assert cap.admit("b", 1_050) == "b"


def test_events_already_counted_as_other_take_no_place():
    """Records ingest keyed ``__other__`` (its own cap) may come first: they are counted as
    ``__other__`` and leave the places to named regions."""
    cap = RegionCap(1, idle_ms=60_000)
    assert cap.admit(OTHER_REGION, 0) == OTHER_REGION
    assert cap.admit("a", 1) == "a" and cap.admit("b", 2) == OTHER_REGION
    assert set(cap.seen) == {"a"}
