"""Regions drained and quiet leave the ledger and the disk (spill.tidy, docs/contract.md §6)."""
from __future__ import annotations

import os

import orjson

from aggregator.core.ratelimit import RateLimits
from aggregator.spill.ledger import SpillLedger
from aggregator.spill.partition import PartitionSpill
from aggregator.spill.tidy import forget_idle

LIMITS = RateLimits(0, {"eu": 1, "us": 1})


def spill_some(led: SpillLedger, sp: PartitionSpill, first: int) -> None:
    events = [("eu", first + i, None) for i in range(5)] + [("us", first + i, None) for i in range(5)]
    sp.write(led.split(events, list(range(first, first + 10)), LIMITS, now=float(first)))


def test_regions_drained_and_quiet_leave_the_ledger_and_their_directories(tmp_path):
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    spill_some(led, sp, 0)
    assert led.regions == {"eu": [4, 0, 1], "us": [4, 0, 6]}
    assert len(sp.drain(LIMITS, now=0.0, unlimited=True)) == 8
    assert forget_idle(sp) == []  # drained: quiet if nothing comes before the next sweep
    assert forget_idle(sp) == []  # but their acknowledgements wait for the state
    sp.acked()
    assert sorted(forget_idle(sp)) == ["eu", "us"]
    assert led.to_dict() == {"": [4, 4, -1]}
    assert os.listdir(tmp_path / "p0" / "regions") == [] and os.listdir(tmp_path / "p0" / "gone") == []
    assert sp.backlog_by_region() == {}
    # a region back: new sequence numbers, a new directory; the state after it reopens as it was
    spill_some(led, sp, 100)
    assert led.regions == {"eu": [8, 4, 101], "us": [8, 4, 106]}
    state = orjson.dumps(led.to_dict())
    sp.close()
    led_b = SpillLedger()
    led_b.load(orjson.loads(state))
    sp_b = PartitionSpill(tmp_path, 0, led_b, fsync=False)
    assert sp_b.reconcile() == {}
    assert sp_b.drain(LIMITS, now=0.0, unlimited=True) == (
        [("eu", 100 + i, None) for i in range(1, 5)] + [("us", 100 + i, None) for i in range(1, 5)])


def test_a_directory_the_ledger_does_not_know_is_deleted_and_a_crash_mid_delete_is_finished_at_start(tmp_path):
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    spill_some(led, sp, 0)
    sp.close()
    led_b = SpillLedger()  # a state from before the batch: its spill is dropped at reconcile
    sp_b = PartitionSpill(tmp_path, 0, led_b, fsync=False)
    sp_b.reconcile()
    assert sorted(sp_b.store.regions()) == ["eu", "us"]
    assert forget_idle(sp_b) == [] and sp_b.store.regions() == []
    assert os.listdir(tmp_path / "p0" / "regions") == []
    (tmp_path / "p0" / "gone" / "r-eu.00").mkdir()  # what a crash left of a deletion
    PartitionSpill(tmp_path, 0, SpillLedger(), fsync=False)
    assert not (tmp_path / "p0" / "gone").exists()
