"""Spill accounting (pure ledger) and one partition's spill over a real disk store.

The property test drives the same calls the worker makes (split -> write ->
apply, drain -> apply -> state write -> ack) through random batches, drains,
crashes at random points and lost spill directories, and checks that every
source event is counted exactly once and each region's events in order."""
from __future__ import annotations

import random
import shutil

import orjson
import pytest

from aggregator.core.ratelimit import RateLimits
from aggregator.spill.ledger import SPILLED, SpillLedger
from aggregator.spill.partition import PartitionSpill


def ev(region: str, its: int) -> tuple:
    return (region, its, None)


def test_no_limit_no_split():
    led = SpillLedger()
    assert led.split([ev("a", 1), ev("b", 2)], [0, 1], RateLimits(0), now=0.0) is None
    assert led.total_backlog() == 0


def test_over_the_rate_spills_the_rest_in_order_and_keeps_spilling_while_backlogged():
    led = SpillLedger()
    limits = RateLimits(0, {"hot": 2})  # burst 2
    events = [ev("hot", 10), ev("cold", 11), ev("hot", 12), ev("hot", 13), ev("hot", 14)]
    split = led.split(events, [100, 101, 102, 103, 104], limits, now=0.0)
    assert split.events == [ev("hot", 10), ev("cold", 11), ev("hot", 12), (SPILLED, 13, None), (SPILLED, 14, None)]
    assert split.spills == {"hot": [[0, 103, 13, None], [1, 104, 14, None]]}
    assert split.limited == {"hot": 2}
    led.commit_split(split)
    assert led.backlog("hot") == 2 and led.low_offset(105) == 103
    # a second later there are tokens again, but the backlog goes first: all spilled
    split = led.split([ev("hot", 20)], [105], limits, now=1.0)
    assert split.events == [(SPILLED, 20, None)] and split.spills == {"hot": [[2, 105, 20, None]]}
    assert split.limited == {}
    led.commit_split(split)
    led.drained("hot", 2, next_low=105)
    assert led.low_offset(106) == 105
    led.drained("hot", 1, next_low=-1)
    assert led.backlog("hot") == 0 and led.low_offset(106) == 106
    # sequence numbers never restart
    split = led.split([ev("hot", 30)] * 5, list(range(200, 205)), limits, now=1.0)
    assert split.spills["hot"][0][0] == 3


def test_state_roundtrip():
    led = SpillLedger()
    led.spilled("eu", [[0, 7, 1, None], [1, 9, 2, None]])
    led2 = SpillLedger()
    led2.load(orjson.loads(orjson.dumps(led.to_dict())))
    assert led2.regions == {"eu": [2, 0, 7]}


def test_reconcile_cases():
    led = SpillLedger()
    led.regions = {"a": [10, 4, 50], "b": [3, 3, -1], "c": [5, 0, 9]}
    # a: disk still holds 2 drained records (crash before the ack) and 1 spilled by an unwritten batch
    assert led.reconcile("a", first_seq=2, on_disk=9) == (2, 6)
    # b: fully drained, disk still has them
    assert led.reconcile("b", first_seq=0, on_disk=3) == (3, 0)
    # c: disk lost some records: rebuild from the source
    assert led.reconcile("c", first_seq=0, on_disk=4) == (0, 0)
    assert led.rebuild == {"c": 5}
    # d: on disk but unknown to the state (its batch was never written): drop
    assert led.reconcile("d", first_seq=0, on_disk=7) == (0, 0)


def test_partition_spill_write_drain_ack_and_recover(tmp_path):
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    events = [ev("hot", i) for i in range(10)]
    split = led.split(events, list(range(10)), limits, now=0.0)
    assert sp.write(split) == 7
    state = orjson.dumps(led.to_dict())
    assert sp.drain(limits, now=0.0) == []          # no tokens left in this second
    got = sp.drain(limits, now=1.0)
    assert got == [ev("hot", 3), ev("hot", 4), ev("hot", 5)]
    assert led.low_offset(10) == 6
    # crash before the ack, state still the one before the drain: the 3 are drained again
    sp.close()
    led_b = SpillLedger()
    led_b.load(orjson.loads(state))
    sp_b = PartitionSpill(tmp_path, 0, led_b, fsync=False)
    assert sp_b.reconcile() == {}
    assert sp_b.drain(limits, now=0.0, unlimited=True) == [ev("hot", i) for i in range(3, 10)]
    # crash after the state write but before the ack: nothing drained twice
    state = orjson.dumps(led_b.to_dict())
    sp_b.close()
    led_c = SpillLedger()
    led_c.load(orjson.loads(state))
    sp_c = PartitionSpill(tmp_path, 0, led_c, fsync=False)
    sp_c.reconcile()
    assert led_c.total_backlog() == 0 and sp_c.store.total_backlog() == 0


# ---------------------------------------------------------------- property test
REGIONS = ("hot", "eu", "us")


class Sim:
    """The worker's spill calls against a source log, with crashes."""

    def __init__(self, root, log_: list[str], limits: RateLimits) -> None:
        self.root, self.log, self.limits = root, log_, limits
        self.durable = {"next": 0, "ledger": {}, "counted": []}
        self.committed = 0
        self.boot()

    def boot(self) -> None:
        d = self.durable
        self.next = d["next"]
        self.counted = list(d["counted"])
        self.ledger = SpillLedger()
        self.ledger.load(orjson.loads(orjson.dumps(d["ledger"])))
        self.spill = PartitionSpill(self.root, 0, self.ledger, fsync=False)
        self.spill.reconcile()
        self.pos = self.committed

    def batch(self, n: int, now: float) -> None:
        recs = list(range(self.pos, min(len(self.log), self.pos + n)))
        if not recs:
            return
        self.pos = recs[-1] + 1
        if recs[0] < self.next and self.ledger.rebuild:
            lows = {r: self.ledger.regions[r][2] for r in self.ledger.rebuild}
            for off in recs:
                r = self.log[off]
                if off < self.next and r in lows and off >= lows[r]:
                    self.spill.rebuild_add(r, off, off, None)
            self.spill.rebuild_flush(done=recs[-1] + 1 >= self.next)
        recs = [o for o in recs if o >= self.next]
        if not recs:
            return
        events = [(self.log[o], o, None) for o in recs]
        split = self.ledger.split(events, recs, self.limits, now)
        if split is not None:
            self.spill.write(split)
            events = split.events
        self.counted += [(r, its) for r, its, _ in events if r is not SPILLED]
        self.next = recs[-1] + 1

    def flush(self, now: float) -> None:
        drained = self.spill.drain(self.limits, now)
        self.counted += [(r, its) for r, its, _ in drained]
        self.durable = {"next": self.next, "ledger": self.ledger.to_dict(), "counted": list(self.counted)}
        self.spill.acked()
        self.committed = self.ledger.low_offset(self.next)

    def crash(self, lose_disk: bool) -> None:
        self.spill.close()
        if lose_disk:
            shutil.rmtree(self.root / "p0", ignore_errors=True)
        self.boot()


def run_sim(root, rnd: random.Random) -> None:
    log_ = [rnd.choice(REGIONS) for _ in range(rnd.randint(1, 120))]
    sim = Sim(root, log_, RateLimits(0, {"hot": 2, "eu": 4}))
    now = 0.0
    for _ in range(rnd.randint(0, 40)):
        now += 0.25
        op, n = rnd.choice(["batch", "batch", "flush", "crash", "lose"]), rnd.randint(1, 15)
        if op == "batch":
            sim.batch(n, now)
        elif op == "flush":
            sim.flush(now)
        else:
            sim.crash(lose_disk=op == "lose")
    for _ in range(len(log_) + 5):  # run to the end: everything gets drained
        now += 1.0
        sim.batch(50, now)
        sim.flush(now)
    sim.spill.close()
    assert sorted(sim.counted) == sorted((r, o) for o, r in enumerate(log_))
    for region in REGIONS:
        order = [its for r, its in sim.counted if r == region]
        assert order == sorted(order), f"{region} counted out of order"


@pytest.mark.parametrize("chunk", range(4))
def test_every_event_counted_once_in_order_through_crashes(tmp_path, chunk):
    """Random schedules (seeded, 4 x 75): batches, drains, crashes, lost spill dirs."""
    for seed in range(chunk * 75, chunk * 75 + 75):
        root = tmp_path / str(seed)
        root.mkdir()
        run_sim(root, random.Random(seed))


def test_spill_missing_from_disk_and_source_is_counted_lost_and_spilling_goes_on(tmp_path):
    limits = RateLimits(0, {"hot": 1})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    sp.write(led.split([ev("hot", i) for i in range(6)], list(range(6)), limits, now=0.0))
    state = orjson.dumps(led.to_dict())
    sp.close()
    shutil.rmtree(tmp_path / "p0")
    led_b = SpillLedger()
    led_b.load(orjson.loads(state))
    sp_b = PartitionSpill(tmp_path, 0, led_b, fsync=False)
    assert sp_b.reconcile() == {"hot": 5}
    sp_b.rebuild_flush(done=True)  # the replay had nothing before the state's offset
    assert sp_b.lost == 5 and led_b.backlog("hot") == 0 and not led_b.rebuild
    split = led_b.split([ev("hot", 9)] * 3, [9, 10, 11], limits, now=5.0)
    sp_b.write(split)
    assert led_b.backlog("hot") == 2
    assert sp_b.drain(limits, now=9.0, unlimited=True) == [ev("hot", 9)] * 2
