"""Spill accounting (pure ledger) and one partition's spill over a real disk store.

The property test drives the same calls the worker makes (split -> write ->
apply, drain -> apply -> state write -> ack, sweeps of drained regions) through random batches, drains,
crashes at random points, lost spill directories and source logs that start over,
and checks that every source event is counted exactly once and each region's events
in order — except spilled events of a log that started over whose spill directory was
lost too: nothing has them any more, and they are counted as lost."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import orjson
import pytest

from aggregator.core.ratelimit import RateLimits
from aggregator.spill.ledger import SPILLED, SpillLedger
from aggregator.spill.partition import PartitionSpill
from aggregator.spill.segment import encode_record
from aggregator.spill.tidy import forget_idle


def ev(region: str, its: int) -> tuple:
    return (region, its, None)


def _spill_lost(tmp_path: Path, led: SpillLedger, sp: PartitionSpill) -> tuple[SpillLedger, PartitionSpill]:
    """The partition's state written, then its spill directory gone (another host takes it
    over): the ledger recovered from that state and the spill opened again on an empty dir."""
    state = orjson.dumps(led.to_dict())
    sp.close()
    shutil.rmtree(tmp_path / "p0")
    led_b = SpillLedger()
    led_b.load(orjson.loads(state))
    return led_b, PartitionSpill(tmp_path, 0, led_b, fsync=False)


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


def test_a_log_restart_keeps_the_backlog_to_drain_but_not_its_offsets():
    led = SpillLedger()
    limits = RateLimits(0, {"hot": 1})
    led.commit_split(led.split([ev("hot", i) for i in range(3)], [101, 102, 103], limits, now=0.0))
    assert led.backlog("hot") == 2 and led.low_offset(104) == 102
    assert led.log_restarted() == 2  # the new log's offsets start at 0
    assert led.backlog("hot") == 2 and led.low_offset(0) == 0 and led.low_offset(50) == 50
    # the new log's events of the region queue behind the old ones (order) and hold commits back
    split = led.split([ev("hot", 10), ev("hot", 11)], [7, 8], limits, now=9.0)
    assert split.spills == {"hot": [[2, 7, 10, None], [3, 8, 11, None]]}
    led.commit_split(split)
    assert led.low_offset(20) == 7
    stored = orjson.loads(orjson.dumps(led.to_dict()))
    assert stored == {"hot": [4, 0, 7, 2]}  # the fence travels with the state
    led.load(stored)
    led.drained("hot", 1, next_low=103)  # an old one: 103 is of the old log
    assert led.low_offset(20) == 7
    led.drained("hot", 1, next_low=7)  # past the fence: the current log's offsets again
    assert led.low_offset(20) == 7 and led.fences == {} and led.to_dict() == {"hot": [4, 2, 7]}
    led.drained("hot", 1, next_low=8)
    assert led.low_offset(20) == 8
    led.drained("hot", 1, next_low=-1)
    assert led.backlog("hot") == 0 and led.low_offset(20) == 20


def test_reconcile_after_a_log_restart():
    led = SpillLedger()
    # spilled 10, drained 2; seq 2..5 of the old log, 6..9 of the new one (from offset 40)
    led.load({"a": [10, 2, 40, 6], "b": [10, 2, 40, 6], "c": [10, 2, 40, 6], "d": [6, 2, -1, 6]})
    assert led.reconcile("a", first_seq=2, on_disk=8) == (0, 8)  # all on disk
    # b: the old log's records are on disk, the new log's are not: those are re-read
    assert led.reconcile("b", first_seq=2, on_disk=5) == (0, 4) and led.rebuild == {"b": 4}
    # c: the old log's records are not all on disk, and not in the source log: lost, the rest re-read
    assert led.reconcile("c", first_seq=1, on_disk=3) == (3, 0)
    assert led.lost == {"c": 4} and led.rebuild == {"b": 4, "c": 4} and led.regions["c"] == [10, 6, 40]
    assert "c" not in led.fences and led.rebuild_seq("c") == 6
    # d: only old ones, none on disk
    assert led.reconcile("d", first_seq=None, on_disk=0) == (0, 0)
    assert led.lost["d"] == 4 and led.backlog("d") == 0 and "d" not in led.rebuild


def test_partition_spill_across_a_log_restart_and_a_lost_disk(tmp_path):
    limits = RateLimits(0, {"hot": 1})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    sp.write(led.split([ev("hot", i) for i in range(4)], [100, 101, 102, 103], limits, now=0.0))
    assert sp.log_restarted() == 3
    sp.write(led.split([ev("hot", 10), ev("hot", 11)], [0, 1], limits, now=0.0))
    assert led.low_offset(2) == 0
    # drained in order, old ones first; the state written, then the disk is lost
    assert sp.drain(limits, now=0.0, unlimited=True) == [ev("hot", i) for i in (1, 2, 3, 10, 11)]
    sp.acked()
    sp.write(led.split([ev("hot", 12)], [5], limits, now=0.5))
    assert sp.log_restarted() == 1  # a second restart
    sp.write(led.split([ev("hot", 20), ev("hot", 21)], [0, 1], limits, now=0.5))
    led_b, sp_b = _spill_lost(tmp_path, led, sp)
    # the one of the log before is lost; the current log's two are re-read from it
    assert sp_b.reconcile() == {"hot": 2} and sp_b.lost == 1
    for off, its in ((0, 20), (1, 21)):
        sp_b.rebuild_add("hot", off, its, None)
    sp_b.rebuild_flush(done=True)
    assert sp_b.drain(limits, now=9.0, unlimited=True) == [ev("hot", 20), ev("hot", 21)]


def _reopen(path: Path, state: bytes) -> tuple[SpillLedger, PartitionSpill]:
    led = SpillLedger()
    led.load(orjson.loads(state))
    return led, PartitionSpill(path, 0, led, fsync=False)


def test_a_stale_spill_of_a_batch_another_worker_counted_is_not_trusted(tmp_path):
    """Worker A spills offset 51 as record 10 and dies before its state is written; B takes
    the partition, counts 50-52 at once and spills 53 as record 10; back on A's disk, record
    10 is offset 51: the backlog is re-read from the source, not drained from that disk."""
    durable = orjson.dumps({"hot": [10, 10, -1]})
    led_a, sp_a = _reopen(tmp_path / "a", durable)
    sp_a.reconcile()
    sp_a.write(led_a.split([ev("hot", 50), ev("hot", 51)], [50, 51], RateLimits(0, {"hot": 1}), now=0.0))
    sp_a.close()
    led_b, sp_b = _reopen(tmp_path / "b", durable)
    sp_b.reconcile()
    split = led_b.split([ev("hot", i) for i in range(50, 54)], [50, 51, 52, 53], RateLimits(0, {"hot": 3}), now=0.0)
    sp_b.write(split)
    assert [e for e in split.events if e[0] is not None] == [ev("hot", 50), ev("hot", 51), ev("hot", 52)]
    sp_b.close()
    led_a2, sp_a2 = _reopen(tmp_path / "a", orjson.dumps(led_b.to_dict()))
    assert sp_a2.reconcile() == {"hot": 1}
    assert sp_a2.drain(RateLimits(0), now=0.0, unlimited=True) == []
    sp_a2.rebuild_add("hot", 53, 53, None)
    sp_a2.rebuild_flush(done=True)
    assert sp_a2.drain(RateLimits(0), now=0.0, unlimited=True) == [ev("hot", 53)]


def test_a_record_missing_among_the_drained_ones_does_not_shift_the_backlog(tmp_path):
    """Records 0-2 drained (the state says so), not acknowledged on disk, record 1 corrupt
    and quarantined on recovery, and records 7-8 of a batch whose state was never written
    at the tail: counting records would acknowledge record 3 and keep 4-7; the backlog
    (3-6) is re-read from the source instead."""
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    split = led.split([ev("hot", i) for i in range(10)], list(range(10)), limits, now=0.0)
    sp.write(split)
    assert len(sp.drain(limits, now=1.0)) == 3
    state = orjson.dumps(led.to_dict())
    sp.write(led.split([ev("hot", 10), ev("hot", 11)], [10, 11], limits, now=1.0))
    sp.close()
    region_dir = tmp_path / "p0"
    seg = sorted(region_dir.rglob("*.seg"))[0]
    first = len(encode_record(orjson.dumps(split.spills["hot"][0])))
    with open(seg, "r+b") as f:  # a bit flip in record 1
        f.seek(first + 8)
        f.write(b"X")
    led_b, sp_b = _reopen(tmp_path, state)
    assert sp_b.reconcile() == {"hot": 4}
    assert sp_b.store.backlog("hot") == 0
    for off in range(6, 10):
        sp_b.rebuild_add("hot", off, off, None)
    sp_b.rebuild_flush(done=True)
    assert sp_b.drain(limits, now=9.0, unlimited=True) == [ev("hot", i) for i in range(6, 10)]


def _damage(tmp_path: Path, split, index: int) -> None:
    """Flip the last payload byte of the ``index``-th spill record of ``split`` on disk."""
    seg = sorted((tmp_path / "p0").rglob("*.seg"))[0]
    sizes = [len(encode_record(orjson.dumps(r))) for r in split.spills["hot"]]
    with open(seg, "r+b") as f:
        f.seek(sum(sizes[:index + 1]) - 1)
        last = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([last[0] ^ 0xFF]))


def test_a_damaged_record_read_ahead_by_a_rate_limited_drain_keeps_the_low(tmp_path):
    """A drain at the rate takes records 0-2 and reads one more for the next low: record 3
    (offset 6) is the damaged one, so the record it reads is record 4 (offset 7).  The low
    stays 6, and offset 6 is re-read from the source: nothing lost, nothing committed past."""
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    split = led.split([ev("hot", i) for i in range(10)], list(range(10)), limits, now=0.0)
    sp.write(split)  # offsets 3-9 spilled as records 0-6
    _damage(tmp_path, split, 3)
    assert sp.drain(limits, now=1.0) == [ev("hot", i) for i in (3, 4, 5)]
    assert led.low_offset(10) == 6 and sp.rebuild_from == 6 and led.rebuild == {"hot": 4}
    sp.acked()
    for off in range(6, 10):
        sp.rebuild_add("hot", off, off, None)
    sp.rebuild_flush(done=True)
    assert sp.lost == 0 and sp.drain(limits, now=9.0, unlimited=True) == [ev("hot", i) for i in range(6, 10)]


def test_a_damaged_record_of_a_log_that_started_over_is_lost_alone(tmp_path):
    """Records 0-6 are of a log that has started over (below the fence), 7-9 of the new one;
    record 0 is damaged: it alone is lost (nothing has it any more), the rest drain."""
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    split = led.split([ev("hot", i) for i in range(10)], list(range(10)), limits, now=0.0)
    sp.write(split)
    assert sp.log_restarted() == 7 and led.fences == {"hot": 7}
    sp.write(led.split([ev("hot", i) for i in range(10, 13)], [0, 1, 2], limits, now=0.0))
    _damage(tmp_path, split, 0)
    assert sp.drain(limits, now=9.0, unlimited=True) == []
    assert sp.lost == 1 and led.backlog("hot") == 9 and not led.rebuild
    sp.acked()
    assert sp.drain(limits, now=9.0, unlimited=True) == [ev("hot", i) for i in (*range(4, 10), *range(10, 13))]
    assert led.total_backlog() == 0 and sp.lost == 1


def test_a_damaged_record_header_is_cut_off_so_the_re_read_follows_the_good_records(tmp_path):
    """A bit flipped in record 3's length field reads as a torn tail: the file is cut there,
    so the re-read's records (appended before the drained ones are acknowledged) follow the
    good records, not the damaged bytes; and while the partition holds batches for the spill
    disk, the re-read waits."""
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    split = led.split([ev("hot", i) for i in range(10)], list(range(10)), limits, now=0.0)
    sp.write(split)
    seg = sorted((tmp_path / "p0").rglob("*.seg"))[0]
    sizes = [len(encode_record(orjson.dumps(r))) for r in split.spills["hot"]]
    with open(seg, "r+b") as f:
        f.seek(sum(sizes[:3]))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    assert sp.drain_aggs(limits, now=9.0, unlimited=True, reread=False)[0] == [ev("hot", i) for i in (3, 4, 5)]
    assert not led.rebuild and sp.rebuild_from is None  # held batches first
    assert sp.drain(limits, now=9.0, unlimited=True) == []
    assert led.rebuild == {"hot": 4} and sp.rebuild_from == 6
    for off in range(6, 10):
        sp.rebuild_add("hot", off, off, None)
    sp.rebuild_flush(done=True)
    sp.acked()
    assert sp.drain(limits, now=10.0, unlimited=True) == [ev("hot", i) for i in range(6, 10)]
    assert not led.rebuild and led.total_backlog() == 0


def test_a_record_damaged_while_draining_is_re_read_from_the_source(tmp_path):
    """Record 3 (offset 6) is damaged on disk after it was written: the drain takes records
    0-2, then cuts the rest off the disk and asks for the source from offset 6 on."""
    limits = RateLimits(0, {"hot": 3})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    split = led.split([ev("hot", i) for i in range(10)], list(range(10)), limits, now=0.0)
    sp.write(split)  # offsets 3-9 spilled as records 0-6
    seg = sorted((tmp_path / "p0").rglob("*.seg"))[0]
    sizes = [len(encode_record(orjson.dumps(r))) for r in split.spills["hot"]]
    with open(seg, "r+b") as f:  # the last byte of record 3's payload
        f.seek(sum(sizes[:4]) - 1)
        last = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([last[0] ^ 0xFF]))
    assert sp.drain(limits, now=9.0, unlimited=True) == [ev("hot", i) for i in (3, 4, 5)]
    assert sp.rebuild_from == 6 and led.rebuild == {"hot": 4} and led.low_offset(10) == 6
    assert sp.store.backlog("hot") == 3  # the three drained, until the state that counts them is durable
    assert sp.drain(limits, now=10.0, unlimited=True) == []  # nothing more till it is re-read
    sp.acked()
    for off in range(6, 10):  # the worker's replay from offset 6 (rebuild_replay)
        sp.rebuild_add("hot", off, off, None)
    sp.rebuild_flush(done=True)
    assert sp.rebuild_from is None and sp.lost == 0
    assert sp.drain(limits, now=11.0, unlimited=True) == [ev("hot", i) for i in range(6, 10)]
    assert led.total_backlog() == 0


def test_a_log_restart_during_a_rebuild_keeps_what_was_reread_and_loses_the_rest(tmp_path):
    limits = RateLimits(0, {"hot": 1})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    sp.write(led.split([ev("hot", i) for i in range(5)], [10, 11, 12, 13, 14], limits, now=0.0))
    led_b, sp_b = _spill_lost(tmp_path, led, sp)
    assert sp_b.reconcile() == {"hot": 4}
    sp_b.rebuild_add("hot", 11, 1, None)  # the replay of the old log got one of them
    sp_b.rebuild_flush(done=False)
    assert sp_b.log_restarted() == 1  # then the log started over: the other 3 are gone with it
    assert not led_b.rebuild and led_b.low_offset(0) == 0
    # the lost ones keep their place (gaps) so that no sequence number is given twice, and
    # are counted lost as they drain
    assert led_b.regions["hot"][:2] == [4, 0] and sp_b.store.backlog("hot") == 4
    assert sp_b.drain(limits, now=9.0, unlimited=True) == [ev("hot", 1)]
    assert led_b.backlog("hot") == 0 and led_b.fences == {} and sp_b.lost == 3


# ---------------------------------------------------------------- property test
REGIONS = ("hot", "eu", "us")


class Sim:
    """The worker's spill calls against a source log, with crashes.  The log can start over
    (``logs``: the first log, then the one after each restart); the worker finds out on its
    next batch (core.sourcelog, modelled by the log the state counts) and counts the new log
    from 0, as ``WorkerService._check_source``.  An event's ingest time is 1000 * its log
    + its offset."""

    def __init__(self, root, logs: list[list[str]], limits: RateLimits) -> None:
        self.root, self.logs, self.limits = root, logs, limits
        self.gen = 0  # the log the source has now
        self.durable = {"next": 0, "ledger": {}, "counted": [], "gen": 0, "lost": 0}
        self.committed = 0
        self.boot()

    @property
    def log(self) -> list[str]:
        return self.logs[self.gen]

    def boot(self) -> None:
        d = self.durable
        self.next = d["next"]
        self.book_gen = d["gen"]  # the log the state counts
        self.counted = list(d["counted"])
        self.lost = d["lost"]  # events found lost, as of the durable state
        self.ledger = SpillLedger()
        self.ledger.load(orjson.loads(orjson.dumps(d["ledger"])))
        self.spill = PartitionSpill(self.root, 0, self.ledger, fsync=False)
        self.spill.reconcile()
        self.pos = self.committed

    def take_lost(self) -> None:
        self.lost += self.spill.lost
        self.spill.lost = 0

    def batch(self, n: int, now: float) -> None:
        if self.book_gen != self.gen:  # the log started over
            self.next = 0
            self.spill.log_restarted()
            self.book_gen = self.gen
        recs = list(range(self.pos, min(len(self.log), self.pos + n)))
        if not recs:
            return
        base = 1000 * self.gen
        self.pos = recs[-1] + 1
        if recs[0] < self.next and self.ledger.rebuild:
            lows = {r: self.ledger.regions[r][2] for r in self.ledger.rebuild}
            for off in recs:
                r = self.log[off]
                if off < self.next and r in lows and off >= lows[r]:
                    self.spill.rebuild_add(r, off, base + off, None)
            self.spill.rebuild_flush(done=recs[-1] + 1 >= self.next)
        recs = [o for o in recs if o >= self.next]
        if not recs:
            return
        events = [(self.log[o], base + o, None) for o in recs]
        split = self.ledger.split(events, recs, self.limits, now)
        if split is not None:
            self.spill.write(split)
            events = split.events
        self.counted += [(r, its) for r, its, _ in events if r is not SPILLED]
        self.next = recs[-1] + 1

    def flush(self, now: float) -> None:
        drained = self.spill.drain(self.limits, now)
        self.counted += [(r, its) for r, its, _ in drained]
        self.take_lost()
        self.durable = {"next": self.next, "ledger": self.ledger.to_dict(), "counted": list(self.counted),
                        "gen": self.book_gen, "lost": self.lost}
        self.spill.acked()
        if self.book_gen == self.gen:  # a state of a log that is gone commits nothing on the new one
            self.committed = self.ledger.low_offset(self.next)

    def crash(self, lose_disk: bool) -> None:
        self.spill.close()
        if lose_disk:
            shutil.rmtree(self.root / "p0", ignore_errors=True)
        self.boot()

    def restart(self) -> None:
        """The log starts over, once all of it is in durable state (events not yet are lost
        with the log whatever the worker does); the consumer reads the new one from 0."""
        d = self.durable
        if self.gen + 1 < len(self.logs) and self.book_gen == self.gen == d["gen"] and \
                d["next"] == self.next == len(self.log):
            self.gen += 1
            self.committed = self.pos = 0


def run_sim(root, rnd: random.Random, restarts: bool = False) -> None:
    """``restarts``: three logs, short ones, and restarts tried often."""
    n_logs, longest = (3, 30) if restarts else (rnd.choice((1, 1, 2, 3)), 120)
    logs = [[rnd.choice(REGIONS) for _ in range(rnd.randint(1, longest))] for _ in range(n_logs)]
    sim = Sim(root, logs, RateLimits(0, {"hot": 2, "eu": 4}))
    ops = ["batch", "batch", "flush", "crash", "lose", "restart", "sweep"] + ["batch", "flush", "restart", "lose"] * restarts
    now = 0.0
    for _ in range(rnd.randint(0, 40)):
        now += 0.25
        op, n = rnd.choice(ops), rnd.randint(1, 15)
        if op == "batch":
            sim.batch(n, now)
        elif op == "flush":
            sim.flush(now)
        elif op == "restart":
            sim.restart()
        elif op == "sweep":  # regions drained and quiet since the last sweep are forgotten
            forget_idle(sim.spill)
        else:
            sim.crash(lose_disk=op == "lose")
    for _ in range(sum(map(len, logs)) + 5):  # run to the end: everything gets drained
        now += 1.0
        sim.batch(50, now)
        sim.flush(now)
        forget_idle(sim.spill)
        sim.restart()
    sim.spill.close()
    assert sim.gen == len(logs) - 1
    everything = [(r, 1000 * g + o) for g, log_ in enumerate(logs) for o, r in enumerate(log_)]
    assert len(set(sim.counted)) == len(sim.counted), "counted twice"
    missing = set(everything) - set(sim.counted)
    assert not set(sim.counted) - set(everything)
    # only spilled events of a log that started over, whose spill was lost too, are missing: counted as lost
    assert len(missing) == sim.lost and all(its < 1000 * (len(logs) - 1) for _, its in missing)
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


@pytest.mark.parametrize("chunk", range(2))
def test_every_event_counted_once_across_log_restarts(tmp_path, chunk):
    """Random schedules (seeded, 2 x 150) where the source log starts over often: spilled
    events of a log that is gone are drained, never re-read from the new one."""
    for seed in range(chunk * 150, chunk * 150 + 150):
        root = tmp_path / str(seed)
        root.mkdir()
        run_sim(root, random.Random(seed), restarts=True)


def test_spill_missing_from_disk_and_source_is_counted_lost_and_spilling_goes_on(tmp_path):
    limits = RateLimits(0, {"hot": 1})
    led = SpillLedger()
    sp = PartitionSpill(tmp_path, 0, led, fsync=False)
    sp.write(led.split([ev("hot", i) for i in range(6)], list(range(6)), limits, now=0.0))
    led_b, sp_b = _spill_lost(tmp_path, led, sp)
    assert sp_b.reconcile() == {"hot": 5}
    sp_b.rebuild_flush(done=True)  # the replay had nothing before the state's offset
    assert sp_b.lost == 5 and led_b.backlog("hot") == 0 and not led_b.rebuild
    split = led_b.split([ev("hot", 9)] * 3, [9, 10, 11], limits, now=5.0)
    sp_b.write(split)
    assert led_b.backlog("hot") == 2
    assert sp_b.drain(limits, now=9.0, unlimited=True) == [ev("hot", 9)] * 2


def test_a_stale_spill_whose_first_record_agrees_is_not_taken_for_another_disks_backlog(tmp_path):
    """A spills offsets 1105, 1115, 1120 as records 20-22 and dies before its state is
    written; B, from the same state, spills 1105, 1110, 1115 as records 20-22 and writes
    its state.  Back on A's disk the first record agrees (20 at 1105) and there are enough:
    only the directory B's state names tells they are not its backlog.  They are re-read
    from the source, not drained from A's disk (1110 would be lost, 1120 counted twice)."""
    def spill(path: Path, offsets: list[int]) -> tuple[SpillLedger, PartitionSpill]:
        led, sp = _reopen(path, orjson.dumps({"eu": [20, 20, -1]}))
        sp.reconcile()
        split = led.split([ev("eu", o) for o in offsets], offsets, RateLimits(0, {"eu": 1}), now=0.0)
        sp.write(split)
        assert [e for e in split.events if e[0] is not None] == [ev("eu", 1100)]  # the rest spilled
        return led, sp

    _, sp_a = spill(tmp_path / "a", [1100, 1105, 1115, 1120])
    disk_a = sp_a.disk
    sp_a.close()
    led_b, sp_b = spill(tmp_path / "b", [1100, 1105, 1110, 1115])
    state_b, disk_b = orjson.dumps(led_b.to_dict()), sp_b.disk
    sp_b.close()
    assert disk_a != disk_b and len(disk_a) == 16

    _, sp_a2 = _reopen(tmp_path / "a", state_b)
    assert sp_a2.disk == disk_a  # kept across openings
    assert sp_a2.reconcile(disk_b) == {"eu": 3}
    assert sp_a2.drain(RateLimits(0), now=0.0, unlimited=True) == []
    for o in (1105, 1110, 1115):  # the replay of the source from the ledger's low offset
        sp_a2.rebuild_add("eu", o, o, None)
    sp_a2.rebuild_flush(done=True)
    assert sp_a2.drain(RateLimits(0), now=0.0, unlimited=True) == [ev("eu", o) for o in (1105, 1110, 1115)]
    sp_a2.close()

    # B's own disk, named by its own state: drained from there, as before
    _, sp_b2 = _reopen(tmp_path / "b", state_b)
    assert sp_b2.reconcile(disk_b) == {}
    assert sp_b2.drain(RateLimits(0), now=0.0, unlimited=True) == [ev("eu", o) for o in (1105, 1110, 1115)]


def test_a_drained_quiet_region_is_forgotten_and_its_sequence_numbers_are_never_given_again():
    # found by a review (review_spill/region_churn.py): every region that ever spilled kept
    # its ledger entry (in every state written) for ever
    led = SpillLedger()
    led.spilled("a", [[0, 5, 1, None], [1, 6, 1, None]])
    assert led.sweep() == []  # not drained
    led.drained("a", 2, -1)
    assert led.sweep() == []  # drained: quiet if nothing is spilled before the next sweep
    assert led.sweep() == ["a"]
    led.forget("a")
    assert led.regions == {} and led.next_seq == 2
    stored = orjson.loads(orjson.dumps(led.to_dict()))
    assert stored == {"": [2, 2, -1]}  # an earlier version reads it as a region drained long ago
    again = SpillLedger()
    again.load(stored)
    assert again.regions == {} and again.next_seq == 2
    split = again.split([ev("a", 9)] * 3, [7, 8, 9], RateLimits(0, {"a": 1}), now=0.0)
    assert [rec[0] for rec in split.spills["a"]] == [2, 3]  # not 0 and 1 again
    again.commit_split(split)
    assert again.regions == {"a": [4, 2, 8]} and again.backlog("a") == 2
    # records of a forgotten region a crash left on disk are acknowledged, not taken as new ones
    assert again.reconcile("b", first_seq=0, on_disk=2) == (2, 0) and again.rebuild == {}


def test_a_region_that_spills_between_sweeps_or_holds_a_fence_is_not_forgotten():
    led = SpillLedger()
    led.spilled("a", [[0, 5, 1, None]])
    led.drained("a", 1, -1)
    assert led.sweep() == []
    led.spilled("a", [[1, 9, 1, None]])
    led.drained("a", 1, -1)
    assert led.sweep() == []  # spilled since the last sweep
    led.spilled("b", [[0, 5, 1, None]])
    led.log_restarted()
    with pytest.raises(ValueError):
        led.forget("b")
    led.regions["b"][1] = 1  # (drained, the fence left in place)
    assert led.sweep() == ["a"]
    assert "b" in led.regions and led.next_seq == 0
