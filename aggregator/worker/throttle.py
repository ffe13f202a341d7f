"""Per-region rate limits in the worker: split a batch, spill what is over, drain it
back at each region's rate, and hold consumption while the spill is too big
(docs/contract.md §6).

Owns the token buckets, the backpressure flag and the per-tick tallies of spilled and
rate-limited events.  The accounting itself is ``spill.ledger`` (pure); the files are
``spill.partition``.
"""
from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Sequence
from operator import attrgetter

from aggregator.core.contract import BookEvent, Event
from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.worker.decoder import Record, RecordDecoder
from aggregator.worker.partitions import Partitions, PartitionState

log = logging.getLogger("aggregator.worker")
_offset = attrgetter("offset")
RESUME_BELOW = 0.9  # consumption resumes once the spill is below this share of its limit


class Throttle:
    def __init__(self, limits: RateLimits, spill_max_bytes: int, metrics: Metrics) -> None:
        self.limits = limits
        self.limiting = limits.default_rate > 0 or any(r > 0 for r in limits.per_region.values())
        self.spill_max_bytes = spill_max_bytes
        self.metrics = metrics
        self.hold = False  # spill over AGG_SPILL_MAX_BYTES: stop fetching until it drains
        self.spilled: dict[str, int] = {}
        self.rate_limited: dict[str, int] = {}

    def limit(self, p: PartitionState, events: list[Event], offsets: list[int],
              partitions: Partitions) -> tuple[Sequence[BookEvent], int]:
        """-> (the batch to apply, events of it counted now).  Events over their region's
        rate are written to the spill (fsynced) first and stay in the batch as spilled
        markers: they move stream time, and are counted when drained."""
        split = p.spill.ledger.split(events, offsets, self.limits, time.monotonic())
        if split is None:
            return events, len(events)
        t0 = time.perf_counter()
        n = p.spill.write(split)  # fsynced before the batch counts; a disk error stops the worker
        label = p.book.canonical_region
        for region, lst in split.spills.items():
            r = label(region)
            self.spilled[r] = self.spilled.get(r, 0) + len(lst)
        for region, k in split.limited.items():
            r = label(region)
            self.rate_limited[r] = self.rate_limited.get(r, 0) + k
        self.metrics.batch_spilled(n, time.perf_counter() - t0)
        if self.spill_max_bytes > 0 and not self.hold and partitions.spill_bytes() >= self.spill_max_bytes:
            self.hold = True
            log.warning("spill reached AGG_SPILL_MAX_BYTES (%d bytes): consumption paused until it drains",
                        self.spill_max_bytes)
        return split.events, len(events) - n

    def drain(self, p: PartitionState, now_ms: int) -> None:
        """Count the oldest spilled events of each backlogged region, at its rate."""
        if not p.spill.ledger.total_backlog():
            return
        drained = p.spill.drain(self.limits, time.monotonic())
        if drained:
            p.book.apply(drained, p.book.next_offset, now_ms)
            self.metrics.spill_drained(len(drained))

    def report(self, partitions: Partitions) -> None:
        """Per tick: tallies to metrics, and release the hold once the spill has drained."""
        if self.spilled or self.rate_limited:
            self.metrics.limited(self.spilled, self.rate_limited)
            self.spilled, self.rate_limited = {}, {}
        if self.hold and partitions.spill_bytes() < self.spill_max_bytes * RESUME_BELOW:
            self.hold = False
            log.info("spill below 90%% of AGG_SPILL_MAX_BYTES: consumption resumed")
        self.metrics.backpressure(self.hold)


def rebuild_replay(p: PartitionState, decoder: RecordDecoder, records: Sequence[Record], start: int,
                   now_ms: int, max_ts: int) -> None:
    """Replay of records before the state's offset while spill files are lost:
    re-spill the undrained events of the regions being rebuilt."""
    spill = p.spill
    rebuild = spill.ledger.rebuild
    lows = {r: spill.ledger.regions[r][2] for r in rebuild}
    log.info("partition %d: rebuild replay %d..%d (state at %d, lows %s, left %s)", p.partition,
             records[0].offset, records[-1].offset, start, lows, rebuild)
    replay = records[:bisect_left(records, start, key=_offset)]
    # bad records went to the dead-letter topic the first time: not again
    # events that were too far ahead were late the first time: never re-spilled
    events, offsets, _, _ = decoder.decode(replay, now_ms, p.partition, True, None, max_ts)
    for (region, its, cts), offset in zip(events, offsets, strict=True):
        if region in rebuild and offset >= lows[region]:
            spill.rebuild_add(region, offset, its, cts)
    spill.rebuild_flush(done=records[-1].offset + 1 >= start)


def skip_applied(records: Sequence[Record], start: int) -> Sequence[Record]:
    """The records at or after ``start`` (those before were applied before a crash)."""
    return records[bisect_left(records, start, key=_offset):]
