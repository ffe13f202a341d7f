"""A spill disk that fills up or fails while the worker runs (issue 15, fault 7;
docs/contract.md §6): on a real full disk (a small tmpfs, mounted here; skipped where
mounting is not permitted) a failed spill write keeps nothing of its batch, the ledger
stays as it was, the batch is held with ``/readyz``'s reason, and once space returns it
is applied and every event is counted exactly once.  A read error (EIO), which no disk
here can produce on demand, is injected by a small subclass."""
from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.spill.ledger import SpillLedger
from aggregator.spill.partition import PartitionSpill, SpillDiskError
from aggregator.spill.store import SpillStore
from aggregator.worker.partitions import BookSettings, Partitions
from aggregator.worker.throttle import HeldBatch, Throttle
from tests.conftest import fill, small_tmpfs

BOOKS = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000, max_regions=10)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that really fills up."""
    with small_tmpfs(tmp_path / "disk") as d:
        yield d


def payloads(n: int, prefix: str = "ev", size: int = 0) -> list[bytes]:
    return [f"{prefix}-{i}-".encode() + b"x" * size for i in range(n)]


def drain_all(store: SpillStore, region: str) -> list[bytes]:
    out: list[bytes] = []
    while b := store.read_batch(region, 100):
        out.extend(b)
        store.ack(region, len(b))
    return out


def test_a_write_on_a_full_disk_keeps_nothing_and_works_once_space_returns(tmpfs):
    store = SpillStore(tmpfs / "spill", max_bytes=0)
    store.append("eu", payloads(5))
    filler = fill(tmpfs)
    seg = os.path.join(store.region_dir("eu"), "000000000001.seg")
    size = os.path.getsize(seg)
    with pytest.raises(OSError) as exc:
        store.append("eu", payloads(200, "big", 100))
    assert exc.value.errno == errno.ENOSPC
    assert store.backlog("eu") == 5 and os.path.getsize(seg) == size  # the partial write is cut off
    with pytest.raises(OSError) as exc:
        store.append("new-region", payloads(200, "big", 100))
    assert exc.value.errno == errno.ENOSPC
    assert store.backlog("new-region") == 0
    filler.unlink()
    store.append("eu", payloads(3, "after"))
    store.append("new-region", payloads(2, "nr"))
    store.close()
    again = SpillStore(tmpfs / "spill", max_bytes=0)  # a restart recovers exactly that
    assert drain_all(again, "eu") == payloads(5) + payloads(3, "after")
    assert drain_all(again, "new-region") == payloads(2, "nr")
    assert again.torn_tails == {} and not any(again.corrupt_records.values())


def test_a_batch_is_all_or_nothing_across_regions(tmpfs):
    ledger = SpillLedger()
    spill = PartitionSpill(tmpfs / "spill", 0, ledger)
    limits = RateLimits(0, "a=1,b=1")
    first = ledger.split([("a", 1, None), ("b", 1, None)] * 3, list(range(6)), limits, time.monotonic())
    assert first is not None
    spill.write(first)  # both regions have a segment with room in its page now
    before = ledger.to_dict()
    filler = fill(tmpfs)
    # region a's small append fits in its page, b's does not: a's must be cut off again
    events = [("a", 2, None)] + [("b", 2, None)] * 400
    split = ledger.split(events, list(range(6, 6 + len(events))), limits, time.monotonic())
    assert split is not None and list(split.spills) == ["a", "b"]
    with pytest.raises(SpillDiskError) as exc:
        spill.write(split)
    assert exc.value.error.errno == errno.ENOSPC and exc.value.region == "b"
    assert ledger.to_dict() == before
    assert spill.store.backlog("a") == ledger.backlog("a") and spill.store.backlog("b") == ledger.backlog("b")
    filler.unlink()
    split = ledger.split(events, list(range(6, 6 + len(events))), limits, time.monotonic())
    assert split is not None
    spill.write(split)
    drained = spill.drain(limits, time.monotonic(), unlimited=True)
    spill.acked()
    regions = [r for r, _, _ in drained]
    assert ledger.total_backlog() == 0 and spill.store.total_backlog() == 0
    # every spilled event came back exactly once
    assert regions.count("a") == ledger.regions["a"][0] and regions.count("b") == ledger.regions["b"][0]


def test_a_held_batch_is_applied_once_space_returns_and_counts_are_exact(tmpfs):
    m = Metrics()
    throttle = Throttle(RateLimits(0, "hot=5"), 0, m)
    parts = Partitions(BOOKS, tmpfs / "spill", lambda p: None, m)
    p = parts.open(0)
    hot = [("hot", 1_000, None)] * 50 + [("cold", 1_000, None)] * 5
    batch, _ = throttle.limit(p, hot, list(range(55)), parts)
    p.book.apply(batch, 55, 2_000)
    filler = fill(tmpfs)
    ledger_before = p.spill.ledger.to_dict()
    events = [("hot", 1_001, None)] * 2000 + [("cold", 1_001, None)] * 7
    held = HeldBatch(events, list(range(55, 55 + len(events))), {}, 55 + len(events))
    assert throttle.limit(p, held.events, held.offsets, parts) is None  # refused: nothing kept
    assert p.spill.ledger.to_dict() == ledger_before and p.book.next_offset == 55
    assert throttle.hold_batch(p, "tp0", held) is True  # the caller pauses the partition
    assert throttle.held_here(p)
    assert throttle.disk_error is not None
    assert throttle.disk_error.startswith("spill disk full: [Errno 28] No space left on device")
    later = HeldBatch([("cold", 1_002, None)], [55 + len(events)], {}, 56 + len(events))
    assert throttle.hold_batch(p, "tp0", later) is False  # queued behind, in order
    throttle.report(parts)
    assert m.registry.get_sample_value("clickstream_backpressure") == 1
    assert m.registry.get_sample_value("clickstream_spill_held_partitions") == 1
    assert m.registry.get_sample_value("clickstream_spill_disk_errors_total", {"op": "write"}) == 1
    assert p.commit_offset() <= 55  # nothing of the held batches is committed

    filler.unlink()
    h = throttle.held[0]
    while h.batches:  # what the worker's tick does
        b = h.batches[0]
        out = throttle.limit(p, b.events, b.offsets, parts)
        assert out is not None
        p.book.apply(out[0], b.end, 2_000)
        h.batches.popleft()
    throttle.release(0)
    assert throttle.disk_error is None and not throttle.held_here(p)
    for _ in range(200):
        if not p.spill.ledger.total_backlog():
            break
        throttle.limits = RateLimits(0, "")
        throttle.drain(p, 2_000)
        p.spill.acked()
    totals = p.book.open_total()
    assert totals == {"hot": 2050, "cold": 13}  # every event exactly once
    assert p.commit_offset() == 56 + len(events)
    throttle.report(parts)
    assert m.registry.get_sample_value("clickstream_backpressure") == 0


def test_a_cursor_a_full_disk_refuses_is_not_fatal_and_drained_segments_still_go(tmpfs, monkeypatch):
    ledger = SpillLedger()
    spill = PartitionSpill(tmpfs / "spill", 0, ledger)
    spill.store.segment_bytes = 4096  # several segments
    limits = RateLimits(0, "eu=1")
    events = [("eu", 1_000 + i, None) for i in range(300)]
    split = ledger.split(events, list(range(300)), limits, time.monotonic())
    assert split is not None
    for region, lst in split.spills.items():  # in small appends, so that segments roll
        for i in range(0, len(lst), 20):
            spill.write(type(split)([], {region: lst[i:i + 20]}, {}))
    spilled = ledger.backlog("eu")
    segs = len(spill.store._regions["eu"].segments)
    assert segs >= 3
    fill(tmpfs)
    monkeypatch.setattr("aggregator.spill.partition.DRAIN_MAX", 10)
    assert len(spill.drain(limits, time.monotonic(), unlimited=True)) == 10
    spill.acked()  # inside the first segment: the cursor cannot be written, not fatal
    assert spill.store.cursor_error is not None and spill.store.cursor_error.errno == errno.ENOSPC
    assert not spill.pending_acks and spill.store.backlog("eu") == spilled - 10
    monkeypatch.setattr("aggregator.spill.partition.DRAIN_MAX", 200)
    assert len(spill.drain(limits, time.monotonic(), unlimited=True)) == 200
    spill.acked()  # past whole segments: they are deleted, the disk gets their space back
    assert len(spill.store._regions["eu"].segments) < segs
    spill.close()
    # a restart with whatever cursor made it to disk: the ledger decides, nothing twice
    ledger2 = SpillLedger()
    ledger2.load(ledger.to_dict())
    again = PartitionSpill(tmpfs / "spill", 0, ledger2)
    assert again.reconcile() == {}
    assert again.store.backlog("eu") == ledger2.backlog("eu") == spilled - 210
    rest = again.drain(limits, time.monotonic(), unlimited=True)
    assert [its for _, its, _ in rest] == sorted(its for _, its, _ in rest)
    assert len(rest) == spilled - 210


class FlakyStore(SpillStore):
    """Reads fail with EIO after ``ok`` records while ``failing``: what a dying disk does."""

    failing = False
    ok = 3

    def _iter_from(self, r, seq, off):  # type: ignore[no-untyped-def]
        for i, item in enumerate(super()._iter_from(r, seq, off)):
            if self.failing and i >= self.ok:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            yield item


def test_a_drain_that_cannot_read_is_retried_and_nothing_is_lost(tmp_path):
    m = Metrics()
    throttle = Throttle(RateLimits(0, "eu=1"), 0, m)
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(0)
    p.spill.store = FlakyStore(tmp_path / "p0", max_bytes=0)
    batch, _ = throttle.limit(p, [("eu", 1_000 + i, None) for i in range(40)], list(range(40)), parts)
    p.book.apply(batch, 40, 2_000)
    backlog = p.spill.ledger.backlog("eu")
    assert backlog > 10
    throttle.limits = RateLimits(0, "")
    FlakyStore.failing = True
    try:
        throttle.drain(p, 2_000)
        assert p.spill.ledger.backlog("eu") == backlog  # nothing moved
        assert throttle.disk_error is None  # set at the tick's report
        throttle.report(parts)
        assert throttle.disk_error is not None and throttle.disk_error.startswith("spill disk failing: [Errno 5]")
        assert m.registry.get_sample_value("clickstream_spill_disk_errors_total", {"op": "read"}) == 1
    finally:
        FlakyStore.failing = False
    while p.spill.ledger.total_backlog():
        throttle.drain(p, 2_000)
        p.spill.acked()
    throttle.report(parts)
    assert throttle.disk_error is None
    assert p.book.open_total() == {"eu": 40}
    assert p.spill.store.backlog("eu") == 0


def test_a_spill_free_partition_opens_on_a_full_disk_and_names_its_directory_once_it_writes(tmpfs):
    """The directory's id (a state names the directory its backlog is in) is made with the
    first record written, so a partition with nothing to spill opens on a full disk as it did
    before the id: its state names no directory ("") until then, which no directory matches."""
    PartitionSpill(tmpfs / "spill", 0, SpillLedger()).close()  # its directories, then the id
    (tmpfs / "spill" / "p0" / "disk-id").unlink()  # as a version before the id left it
    filler = fill(tmpfs)
    ledger = SpillLedger()
    sp = PartitionSpill(tmpfs / "spill", 0, ledger)
    assert sp.disk is None and sp.reconcile() == {}
    split = ledger.split([("eu", 1, None), ("eu", 2, None)], [1, 2], RateLimits(0, {"eu": 1}), now=0.0)
    with pytest.raises(SpillDiskError) as exc:
        sp.write(split)
    assert exc.value.error.errno == errno.ENOSPC and ledger.total_backlog() == 0 and sp.disk is None
    filler.unlink()
    assert sp.write(split) == 1
    assert sp.disk is not None and (tmpfs / "spill" / "p0" / "disk-id").read_text() == sp.disk
    sp.close()


def test_a_spill_that_cannot_open_is_tried_again_ever_less_often():
    throttle = Throttle(RateLimits(0), 0, Metrics())
    e = SpillDiskError("open", 3, "", OSError(errno.ENOSPC, "No space left on device"))
    delays = []
    for _ in range(7):
        throttle.open_failed(3, e)
        assert not throttle.open_due(3)  # not at once: an opening reads the whole stored state
        delays.append(throttle._open_retry[3][1])
    assert delays == [0.5, 1, 2, 4, 8, 10, 10]
    assert throttle.disk_error is not None and "spill open, partition 3" in throttle.disk_error
    assert throttle.open_due(4)  # another partition: no wait
    throttle.opened(3)
    assert throttle.open_due(3) and throttle.disk_error is None and not throttle.unopened
