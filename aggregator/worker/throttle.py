"""Per-region rate limits in the worker: split a batch, spill what is over, drain it
back at each region's rate, and hold consumption while the spill is too big
(docs/contract.md §6).

A spill disk that refuses a write (full, failing, read-only) holds the batch that needed
it: nothing of it is applied (the spill write is rolled back, the book's next offset
stays), the worker stops fetching that partition (and what is forwarded to it through
``clicks-repartition``) and offers the held batches again at every tick, in order, until
the disk takes them.  Other partitions go on.  While any
batch is held or a drain cannot read, ``disk_error`` says why (``/readyz``).

Owns the token buckets, the backpressure flag and the per-tick tallies of spilled and
rate-limited events.  The accounting itself is ``spill.ledger`` (pure); the files are
``spill.partition``.
"""
from __future__ import annotations

import errno
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from operator import attrgetter

from aggregator.core.contract import OTHER_REGION, Agg, BookEvent, Event
from aggregator.core.dedupid import DedupId
from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.spill.partition import SpillDiskError
from aggregator.worker.decoder import Record, RecordDecoder
from aggregator.worker.partitions import Partitions, PartitionState

log = logging.getLogger("aggregator.worker")
_offset = attrgetter("offset")
OPEN_RETRY_S, OPEN_RETRY_MAX_S = 0.5, 10.0  # a spill the disk would not let open: first retry, longest delay
RESUME_BELOW = 0.9  # consumption resumes once the spill is below this share of its limit
BUCKET_SWEEP_SECONDS = 60.0  # how often token buckets that have refilled are dropped


def disk_reason(e: SpillDiskError) -> str:
    """``/readyz``'s reason for a spill disk error."""
    no = e.error.errno
    kind = "full" if no in (errno.ENOSPC, errno.EDQUOT) else "read-only" if no == errno.EROFS else "failing"
    return f"spill disk {kind}: {e}"


def held_bytes(partitions: Partitions) -> int:
    """The spill's bytes the AGG_SPILL_MAX_BYTES hold is decided on: those of the owned
    partitions, and the spill revoked partitions left on this disk (docs/contract.md §6: it
    counts until it is deleted, at the first tick after an assignment gives the partition
    elsewhere); not those of regions re-read from the source log (re-spilled bytes cannot
    drain until that ends, and it needs fetches: counted, they would keep a hold set by
    another partition's spill on forever)."""
    return sum(p.spill.held_bytes() for p in partitions) + partitions.left_bytes()


class HeldBatch:
    """A decoded batch not applied because the spill disk refused its write."""

    __slots__ = ("events", "offsets", "future", "end", "ids", "aggs", "end_ts")

    def __init__(self, events: list[Event], offsets: list[int], future: dict[str, int], end: int,
                 ids: list[DedupId | None] | None = None, aggs: list[Agg | None] | None = None,
                 end_ts: int | None = None) -> None:
        self.events = events
        self.offsets = offsets
        self.future = future  # its future_ts events by region
        self.end = end  # the book's next offset once it is applied
        self.ids = ids  # the events' dedup ids (core.dedup), None: none has one
        self.aggs = aggs  # what each event adds to aggregates (core.aggstate), None: aggregates off
        self.end_ts = end_ts  # the broker timestamp of its record at end - 1 (core.sourcelog)


class Held:
    """One partition's held batches, in source order, and what its fetching is paused by."""

    __slots__ = ("p", "keys", "batches")

    def __init__(self, p: PartitionState, keys: object) -> None:
        self.p = p
        self.keys = keys  # the consumer's handles on the partition (its TPs of clicks and clicks-repartition)
        self.batches: deque[HeldBatch] = deque()


class Throttle:
    def __init__(self, limits: RateLimits, spill_max_bytes: int, metrics: Metrics) -> None:
        self.limits = limits
        self._next_bucket_sweep = time.monotonic() + BUCKET_SWEEP_SECONDS
        self.limiting = limits.default_rate > 0 or any(r > 0 for r in limits.per_region.values())
        self.spill_max_bytes = spill_max_bytes
        self.metrics = metrics
        self.hold = False  # spill over AGG_SPILL_MAX_BYTES: stop fetching until it drains
        self.spilled: dict[str, int] = {}
        self.rate_limited: dict[str, int] = {}
        self.held: dict[int, Held] = {}  # partition -> batches waiting for the spill disk
        self.disk_error: str | None = None  # why the spill disk holds batches or drains
        self._write_error: SpillDiskError | None = None
        self._read_errors: dict[int, SpillDiskError] = {}
        self.unopened: dict[int, SpillDiskError] = {}  # partition -> why its spill could not be opened
        self._open_retry: dict[int, tuple[float, float]] = {}  # partition -> (next try, monotonic; delay)

    def limit(self, p: PartitionState, events: list[Event], offsets: list[int],
              partitions: Partitions, aggs: Sequence[Agg | None] | None = None,
              ) -> tuple[Sequence[BookEvent], int] | None:
        """-> (the batch to apply, events of it counted now).  Events over their region's
        rate are written to the spill (fsynced) first and stay in the batch as spilled
        markers: they move stream time, and are counted when drained.  None: the spill
        disk refused the write, nothing of the batch was kept: hold it (:meth:`hold_batch`)."""
        split = p.spill.ledger.split(events, offsets, self.limits, time.monotonic(), aggs)
        if split is None:
            return events, len(events)
        t0 = time.perf_counter()
        try:
            n = p.spill.write(split)  # fsynced before the batch counts
        except SpillDiskError as e:
            self._write_error = e
            self.metrics.spill_disk_error(e.op)
            return None
        label = p.book.canonical_region
        for region, lst in split.spills.items():
            r = label(region)
            self.spilled[r] = self.spilled.get(r, 0) + len(lst)
        for region, k in split.limited.items():
            r = label(region)
            self.rate_limited[r] = self.rate_limited.get(r, 0) + k
        self.metrics.batch_spilled(n, time.perf_counter() - t0)
        if self.spill_max_bytes > 0 and not self.hold and held_bytes(partitions) >= self.spill_max_bytes:
            self.hold = True
            log.warning("spill reached AGG_SPILL_MAX_BYTES (%d bytes): consumption paused until it drains",
                        self.spill_max_bytes)
        return split.events, len(events) - n

    # ------------------------------------------------------ a refusing disk
    def held_here(self, p: PartitionState) -> bool:
        """Batches of this partition wait for the spill disk: later ones must wait behind."""
        h = self.held.get(p.partition)
        return h is not None and h.p is p

    def hold_batch(self, p: PartitionState, keys: object, batch: HeldBatch) -> bool:
        """Keep ``batch`` for later; True when the partition was not held yet (pause ``keys``)."""
        h = self.held.get(p.partition)
        new = h is None or h.p is not p
        if new:
            h = self.held[p.partition] = Held(p, keys)
        assert h is not None
        h.batches.append(batch)
        if new:
            self._update_disk_error()
        return new

    def open_failed(self, partition: int, e: SpillDiskError) -> None:
        """The spill disk refused to open the partition's spill: it waits, not fetched, and is
        tried again after a delay that doubles up to OPEN_RETRY_MAX_S (an opening reads the
        whole stored state, its dedup ids and aggregates: ~0.3 s for a million ids)."""
        if partition not in self.unopened:
            self.metrics.spill_disk_error(e.op)
        self.unopened[partition] = e
        delay = min(OPEN_RETRY_MAX_S, 2 * self._open_retry.get(partition, (0.0, OPEN_RETRY_S / 2))[1])
        self._open_retry[partition] = (time.monotonic() + delay, delay)
        self._update_disk_error()

    def open_due(self, partition: int) -> bool:
        """Whether a partition whose spill could not be opened is to be tried again now."""
        return partition not in self.unopened or time.monotonic() >= self._open_retry[partition][0]

    def opened(self, partition: int) -> None:
        """The partition's spill is open (or the partition is no longer assigned)."""
        self._open_retry.pop(partition, None)
        if self.unopened.pop(partition, None) is not None:
            self._update_disk_error()

    def release(self, partition: int) -> Held | None:
        """The partition's held batches are all applied (or it is gone): stop holding it."""
        h = self.held.pop(partition, None)
        self._update_disk_error()
        return h

    def _update_disk_error(self) -> None:
        """``disk_error`` from the held partitions and this tick's drains; one log line
        when the disk starts refusing, one when it works again."""
        e = self._write_error if self.held else None
        if e is None and self.unopened:
            e = next(iter(self.unopened.values()))
        if e is None and self._read_errors:
            e = next(iter(self._read_errors.values()))
        if e is None:
            if self.disk_error is not None:
                log.warning("spill disk works again: held batches applied, fetching resumed, drains go on")
            self.disk_error = None
            self._write_error = None
            return
        reason = disk_reason(e)
        if self.disk_error is None:
            log.error("%s; partitions %s wait (not fetched, nothing of them lost) and are retried every tick; "
                      "partitions that do not need the disk go on", reason, sorted({*self.held, *self.unopened}))
        self.disk_error = reason

    def drain(self, p: PartitionState, now_ms: int) -> None:
        """Count the oldest spilled events of each backlogged region, at its rate since its
        last drain: DRAIN_MAX of each at a time, each lot applied before the next is read."""
        spill = p.spill
        backlog = spill.ledger.total_backlog()
        if not backlog:
            self._read_errors.pop(p.partition, None)
            return
        # a re-read of missing records waits for batches held here (their seek back would skip them)
        reread, now, more = not self.held_here(p), time.monotonic(), False
        while True:
            drained, aggs = spill.drain_aggs(self.limits, now, reread=reread, more=more)
            if drained:
                if aggs is None and p.book.aggs is not None:  # their client delays, at least
                    aggs = [None] * len(drained)
                p.book.apply(drained, p.book.next_offset, now_ms, aggs)
                self.metrics.spill_drained(len(drained))
            if not spill.grants:
                break
            more = True
        if spill.ledger.total_backlog() != backlog:
            p.book.dirty = True  # the ledger moved (gaps of a lost log drain without events): write it
        if spill.read_error is not None:  # that region is read again next time
            self._read_errors[p.partition] = spill.read_error
            self.metrics.spill_disk_error("read")
        else:
            self._read_errors.pop(p.partition, None)

    def report(self, partitions: Partitions, writes_failing: bool = False) -> None:
        """Per tick: tallies to metrics, and release the hold once the spill has drained
        (``writes_failing``: the worker does not fetch either, until a checkpoint's writes
        are acknowledged)."""
        if self.spilled or self.rate_limited:
            self.metrics.limited(self.spilled, self.rate_limited)
            self.spilled, self.rate_limited = {}, {}
        if self.hold and held_bytes(partitions) < self.spill_max_bytes * RESUME_BELOW:
            self.hold = False
            log.info("spill below 90%% of AGG_SPILL_MAX_BYTES: consumption resumed")
        for partition in [n for n, h in self.held.items() if partitions.get(n) is not h.p]:
            del self.held[partition]  # revoked: the next owner reads it again from the committed offset
        for partition in [n for n in self._read_errors if partitions.get(n) is None]:
            del self._read_errors[partition]
        self._update_disk_error()
        now = time.monotonic()
        if now >= self._next_bucket_sweep:  # buckets stay those of regions being limited
            self._next_bucket_sweep = now + BUCKET_SWEEP_SECONDS
            self.limits.forget_full(now)
        self.metrics.backpressure(self.hold or bool(self.held) or writes_failing)
        self.metrics.spill_held(len(self.held))


REBUILD_IDS_PRUNE = 100_000  # dedup ids a rebuild holds before it forgets those a horizon old


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
    # the region cap is not asked (it may name a region now that was __other__ then, or the
    # reverse, and the replay must not take places in it): the names are matched below
    cap, decoder.cap = decoder.cap, None
    try:
        events, offsets, _, _, ids, aggs = decoder.decode(replay, now_ms, p.partition, True, None, max_ts)
    finally:
        decoder.cap = cap
    spilled_as: dict[str, str] = {}  # a replayed event's region -> the one it was spilled under
    # a repeat of an event re-spilled here was dropped the first time (core.dedup): not again
    seen = spill.rebuild_ids if ids is not None and p.dedup.horizon_ms else None
    horizon = p.dedup.horizon_ms
    for n, ((name, its, cts), offset) in enumerate(zip(events, offsets, strict=True)):
        region = spilled_as.get(name)
        if region is None:
            region = spilled_as[name] = _spilled_label(name, rebuild, p.book.last_seen)
        if region in rebuild and offset >= lows[region]:
            if seen is not None and (did := ids[n]) is not None:  # type: ignore[index]
                first = seen.get(did)
                if first is not None and its - first < horizon:
                    continue
                seen[did] = its
            spill.rebuild_add(region, offset, its, cts, None if aggs is None else aggs[n])
    if seen is not None and len(seen) > REBUILD_IDS_PRUNE:  # bounded: ids a horizon old no longer match
        newest = max(seen.values())
        kept = {did: its for did, its in seen.items() if newest - its < horizon}
        if len(kept) > p.dedup.max_ids:  # as the dedup store, at most max_ids: the newest
            kept = dict(sorted(kept.items(), key=lambda kv: kv[1])[-p.dedup.max_ids:])
        spill.rebuild_ids = kept
    spill.rebuild_flush(done=records[-1].offset + 1 >= start)


def _spilled_label(name: str, rebuild: dict[str, int], named: dict[str, int]) -> str:
    """The region a replayed event of ``name`` was spilled under: its own name when that is
    being rebuilt, else ``__other__`` (the cap was full then) unless the window book counted
    it by name (then it was not spilled as __other__).  Without the label of each spilled
    event this is a guess for a region the cap named at some times and not at others, and
    for a named region's events a producer wrote here while their home is elsewhere (they
    were forwarded, not spilled): a rebuild that re-reads more events than a region spilled
    leaves the last out, loudly (docs/contract.md §6)."""
    if name in rebuild or OTHER_REGION not in rebuild or name in named:
        return name
    return OTHER_REGION


def skip_applied(records: Sequence[Record], start: int) -> Sequence[Record]:
    """The records at or after ``start`` (those before were applied before a crash)."""
    return records[bisect_left(records, start, key=_offset):]
