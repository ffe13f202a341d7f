"""How fast a spill drains and what a drain holds in memory (docs/contract.md §6): a drain
takes the region's rate over the time since its last drain (ticks are
AGG_STATE_FLUSH_SECONDS apart, up to 60 s, not one burst's second), and while state writes
are not acknowledged it stops once PENDING_MAX drained records wait, keeping only their
positions, not their payloads."""
from __future__ import annotations

from pathlib import Path

from aggregator.core.ratelimit import RateLimits
from aggregator.spill.ledger import SpillLedger
from aggregator.spill.partition import PartitionSpill


def _spill(tmp_path: Path) -> tuple[SpillLedger, PartitionSpill]:
    ledger = SpillLedger()
    return ledger, PartitionSpill(tmp_path / "spill", 0, ledger, fsync=False)


def _tick(spill: PartitionSpill, limits: RateLimits, now: float) -> int:
    """One flush tick's drain, as ``Throttle.drain`` does it: lot after lot -> events."""
    n = len(spill.drain_aggs(limits, now)[0])
    while spill.grants:
        n += len(spill.drain_aggs(limits, now, more=True)[0])
    return n


def _steady(tmp_path: Path, flush_s: float, rate: int, steady: int, seconds: int) -> tuple[int, int, int]:
    """A burst that leaves 5 s of the rate spilled, then ``steady`` events/s in 0.1 s batches,
    a drain every ``flush_s`` -> (backlog at the end, events counted, events in)."""
    ledger, spill = _spill(tmp_path)
    limits = RateLimits(0, f"hot={rate}")
    t = 1000.0
    burst = [("hot", 1, None)] * (6 * rate)
    split = ledger.split(burst, list(range(len(burst))), limits, t)
    assert split is not None
    counted = len(burst) - spill.write(split)
    off = len(burst)
    n = steady // 10
    next_tick = t + flush_s
    for _ in range(seconds * 10):
        t += 0.1
        split = ledger.split([("hot", 1, None)] * n, list(range(off, off + n)), limits, t)
        off += n
        counted += n if split is None else n - spill.write(split)
        if t >= next_tick - 1e-9:
            next_tick += flush_s
            counted += _tick(spill, limits, t)
            spill.acked()
    spill.close()
    return ledger.backlog("hot"), counted, off


def test_a_backlog_drains_at_the_rate_when_ticks_are_seconds_apart(tmp_path):
    # a tick every 2 s, a limit of 1000/s, 800/s steady: the backlog drains at 200/s (5000
    # in 25 s); a drain of one burst a tick drained at 500/s: the backlog grew without end
    backlog, counted, total = _steady(tmp_path, 2.0, 1000, 800, 60)
    assert backlog == 0
    assert counted == total
    # and never more than the rate (plus one burst) over the whole run
    assert counted <= 1000 * 61 + 1000


def test_a_tick_drains_more_than_drain_max_lot_by_lot(tmp_path, monkeypatch):
    monkeypatch.setattr("aggregator.spill.partition.DRAIN_MAX", 100)
    ledger, spill = _spill(tmp_path)
    limits = RateLimits(0, "hot=1000")
    ev = [("hot", 1, None)] * 6000
    split = ledger.split(ev, list(range(6000)), limits, 0.0)
    assert split is not None
    spill.write(split)
    assert ledger.backlog("hot") == 5000
    assert _tick(spill, limits, 1.0) == 1000  # the first drain: one burst
    lots = [len(spill.drain_aggs(limits, 4.0)[0])]  # 3 s later: 3 s of the rate
    while spill.grants:
        lots.append(len(spill.drain_aggs(limits, 4.0, more=True)[0]))
    assert sum(lots) == 3000 and max(lots) == 100  # each lot at most DRAIN_MAX
    spill.acked()
    assert ledger.backlog("hot") == 1000 == spill.store.backlog("hot")
    spill.close()


def test_drains_stop_while_drained_records_wait_for_a_state_write(tmp_path, monkeypatch):
    """State writes failing (or the worker fenced): ``acked`` is not called; the drain stops
    once PENDING_MAX records wait, and the store keeps only where they end, not their payloads."""
    monkeypatch.setattr("aggregator.spill.partition.DRAIN_MAX", 100)
    monkeypatch.setattr("aggregator.spill.partition.PENDING_MAX", 250)
    ledger, spill = _spill(tmp_path)
    n = 2000
    split = ledger.split([("hot", i, None) for i in range(n)], list(range(n)), RateLimits(0, "hot=1"), 0.0)
    assert split is not None
    spill.write(split)
    assert _tick(spill, RateLimits(0, "hot=100"), 1.0) == 100
    unlimited = RateLimits(0, "")
    drained = [_tick(spill, unlimited, 2.0 + i) for i in range(4)]  # no state write acknowledged
    assert drained == [150, 0, 0, 0]
    assert spill.store.taken("hot") == 250 == sum(k for _, k in spill.pending_acks)
    assert len(spill.store._regions["hot"].cache) <= 1  # read ahead by one record, no more
    spill.acked()  # a state write at last
    assert spill.store.taken("hot") == 0 and spill.store.backlog("hot") == n - 1 - 250
    rest = []
    while ledger.backlog("hot"):
        rest += spill.drain(unlimited, 9.0)
        spill.acked()
    assert [its for _, its, _ in rest] == list(range(251, n))  # in order, none twice
    spill.close()
