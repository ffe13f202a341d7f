"""The state of the partitions of ``clicks`` this worker owns.

One ``PartitionState`` per owned partition: its window book, its spill (ledger over
segment files), its lag and when it last saw a record.  ``Partitions`` creates one
from the stored state when a batch of a newly assigned partition arrives (or when
the partition is assigned and quiet), and forgets it on revoke.  No Faust here: the
stored state comes through a callable.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.dedup import DEFAULT_MAX_IDS, DedupStore, HorizonClash
from aggregator.core.recordlog import LeftRecords, Prepared, RecordLog
from aggregator.core.repartition import home
from aggregator.core.sketches import SketchParams
from aggregator.core.sourcelog import CHECK_TRIES, Restart
from aggregator.core.windows import STATE_FORMAT, WindowBook
from aggregator.metrics import Metrics
from aggregator.spill.ledger import SpillLedger
from aggregator.spill.partition import PartitionSpill, SpillDiskError
from aggregator.spill.tidy import SWEEP_S, LeftSpills, forget_idle

log = logging.getLogger("aggregator.worker")

# partition -> (its state, the changelog slot it was read from) or None (core.statechunks)
StoredState = Callable[[int], "tuple[dict[str, Any], int | None] | None"]
# key of a changelog record of the state (a dedup record, core.dedup) -> its JSON value or None
StoredRecord = Callable[[str], Any]
# the region label ``clickstream_spill_bytes`` gives the spills of partitions not owned here (never a region)
LEFT_LABEL = "(left behind)"


class Refused(RuntimeError):
    """A stored state this worker does not count from; said once, and kept in
    ``Partitions.refused`` (the reason /readyz gives) while the partition is assigned."""


class StateFormatUnknown(Refused):
    """A stored state in a format this version does not read (a later version's, after a
    rollback): read as this one's, its fields could be misread; refused instead."""


class PartitionCountChanged(Refused):
    """A stored state holds open windows (or spilled events of a region whose home moved)
    counted under another partition count of ``clicks``: the homes of regions moved, so
    continuing would give some (region, window) two final snapshots."""


class SettingChanged(Refused):
    """A stored state a setting changed since would have misread: open windows of another
    ``AGG_WINDOW_SECONDS``, open windows' aggregates made with other sketch parameters
    (``AGG_UNIQUE_USERS_PRECISION``), dedup ids that cannot move to the buckets of a changed
    ``AGG_DEDUP_SECONDS`` (core.dedup.HorizonClash)."""


class BookSettings:
    """What a window book is made of (from the service's settings); ``partitions``: the
    partition count of ``clicks`` (the homes of regions, core.repartition)."""

    __slots__ = ("window_ms", "grace_ms", "late_after_ms", "idle_ms", "max_regions", "partitions", "dedup_ms",
                 "dedup_max_ids", "sketches", "top_urls")

    def __init__(self, window_ms: int, grace_ms: int, late_after_ms: int, idle_ms: int, max_regions: int,
                 partitions: int = 1, dedup_ms: int = 0, dedup_max_ids: int = DEFAULT_MAX_IDS,
                 sketches: SketchParams | None = None, top_urls: int = 10) -> None:
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.late_after_ms = late_after_ms
        self.idle_ms = idle_ms
        self.max_regions = max_regions
        self.partitions = partitions
        self.dedup_ms = dedup_ms  # the dedup horizon (core.dedup; 0: none)
        self.dedup_max_ids = dedup_max_ids
        self.sketches = sketches  # the aggregates' parameters (core.sketches); None: aggregates off
        self.top_urls = top_urls

    def new_book(self) -> WindowBook:
        """A book holds the regions whose home its partition is, named by the caps of the
        workers that read them (each admits up to ``max_regions``; the worker's decoder,
        core.regioncap): its own bound is that over every partition's worker, so it never
        names a region otherwise (at a home that is not ``__other__``'s, a second final
        ``__other__`` snapshot of the window)."""
        aggs = None if self.sketches is None else WindowAggregates(self.sketches, self.top_urls)
        return WindowBook(self.window_ms, self.grace_ms, self.late_after_ms, self.idle_ms,
                          self.max_regions * max(1, self.partitions), aggs)


# the key tag of the aggregates' records: WindowAggregates.TAG, which the compiled class keeps
# per instance (read on the class it is a descriptor); tests/unit/worker/test_checkpoint.py
# deletes records WindowAggregates wrote under it
AGGS_TAG = "g"


class PartitionState:
    __slots__ = ("partition", "book", "spill", "dedup", "lag", "last_record_ms", "state_slot", "maybe_slots",
                 "extra_slots", "clock_live", "source_ts",
                 "source_checked", "commit_ok", "clicks_ms", "verify_at", "verify_ms", "verify_tries",
                 "restart_pending", "known_next", "aggs_left")

    def __init__(self, partition: int, book: WindowBook, spill: PartitionSpill,
                 dedup: DedupStore | None = None) -> None:
        self.partition = partition
        self.book = book
        self.spill = spill
        self.dedup = dedup if dedup is not None else DedupStore(0)  # the ids seen within the horizon
        self.lag = 0
        self.last_record_ms: int | None = None  # wall time of the last fetched batch
        self.state_slot: int | None = None  # the changelog slot of its last confirmed state (core.statechunks)
        # slots whose header was sent but not acknowledged since: the broker may have stored
        # it all the same (a timeout), so one of them may be what the changelog names now
        self.maybe_slots: set[int] = set()
        self.extra_slots: dict[int, int] = {}  # slots above 1 written since it was opened -> their chunks
        self.clock_live = False  # its last batch reached its end (worker.clock.ClockSkew)
        # the source log (core.sourcelog): the broker timestamp of the record at book.next_offset - 1;
        # whether a batch has shown that the log is still the one the book counted (a fresh
        # book has nothing to check); and whether its states' offsets may be committed: not
        # before that, nor for a state taken before the log was found to have started over
        self.source_ts: int | None = None
        self.source_checked = book.next_offset == 0
        self.commit_ok = self.source_checked
        # a batch continuing the state after a pause waits for the log to be re-read from
        # next_offset - 1 (core.sourcelog.needs_check): wall time of its last batch of clicks
        # (not of clicks-repartition), the offset asked for, when and how many times in a row,
        # and the restart a re-read found (another record there: the log is then read again
        # from its start)
        self.clicks_ms: int | None = None
        self.verify_at: int | None = None
        self.verify_ms = 0
        self.verify_tries = 0
        self.restart_pending: Restart | None = None
        self.known_next: int | None = None  # where the log read from its start goes on (None: not begun)
        self.aggs_left: LeftRecords | None = None  # a restored state's aggregates records, AGG_AGGREGATES off

    def aggs_log(self) -> RecordLog | None:
        """The records log of the aggregates: the book's, or what a restored state left of them."""
        return self.book.aggs if self.book.aggs is not None else self.aggs_left

    def state_value(self, dedup: Prepared | None = None, aggs: Prepared | None = None) -> bytes:
        """The state's value (written as chunks): the book with the spill ledger and the
        indexes of the dedup and aggregates records (written beside the chunks)."""
        state = self.book.to_dict()
        state["spill"] = self.spill.ledger.to_dict()
        state["spill_disk"] = self.spill.disk or ""  # the spill directory its backlog is in (spill.reconcile)
        if dedup is not None and (dedup.index or dedup.gone):
            state["dedup"] = dedup.to_json()
            state["dedup_bucket_ms"] = self.dedup.bucket_ms  # AGG_DEDUP_SECONDS may change (core.dedup.load)
            state["dedup_gone"] = dedup.gone_json()
        if aggs is not None and (aggs.index or aggs.gone):
            state["aggs"] = aggs.to_json()
            state["aggs_gone"] = aggs.gone_json()
        state["source_ts"] = self.source_ts
        state["window_ms"] = self.book.window_ms  # the settings its open windows were made with
        if self.book.aggs is not None:
            state["aggs_params"] = self.book.aggs.params.key()
        return orjson.dumps(state)

    def reread(self, now_ms: int, at: int | None = None) -> int:
        """Ask for the partition to be read again from ``at``, by default the record before
        the book's next offset: a check that its log is still the one counted (core.sourcelog)."""
        self.verify_at = self.book.next_offset - 1 if at is None else at
        self.verify_ms = now_ms
        return self.verify_at

    def reread_batch(self, now_ms: int, at: int | None = None) -> int | None:
        """The same for a batch that continues the book's offset (or, ``at`` 0, one that comes
        before the log that started over was read from its start); None: such a batch came
        back ``CHECK_TRIES`` times in a row without a re-read that holds the record before and
        the next one (that record deleted by retention, or the end of a log segment, where a
        fetch stops), and the batch is taken as it is."""
        want = self.book.next_offset - 1 if at is None else at
        self.verify_tries = self.verify_tries + 1 if self.verify_at == want else 1
        if self.verify_tries <= CHECK_TRIES:
            return self.reread(now_ms, want)
        log.warning("partition %d of clicks: offset %d cannot be read again together with offset %d (deleted "
                    "by retention, or a log segment ends there); going on from what the log gives",
                    self.partition, want, want + 1)
        self.verify_at, self.verify_tries = None, 0
        return None

    def regions(self) -> set[str]:
        """The region labels its book and spill hold (each region has one home partition)."""
        book = self.book
        held = set(book.last_seen).union(*book.counts.values(), *book.late.values())
        return held | {book.canonical_region(r) for r in self.spill.backlog_by_region()}

    def commit_offset(self) -> int:
        """The source offset up to which every record is counted or durably spilled."""
        return self.spill.ledger.low_offset(self.book.next_offset)


class Partitions:
    def __init__(self, books: BookSettings, spill_root: Path, stored: StoredState, metrics: Metrics,
                 record: StoredRecord | None = None) -> None:
        self.books = books
        self.spill_root = spill_root
        self.stored = stored
        self.record: StoredRecord = record or (lambda key: None)
        self.metrics = metrics
        self.owned: dict[int, PartitionState] = {}
        self.refused: dict[int, str] = {}  # partition -> why its stored state is not counted (Refused)
        # the spills partitions left on disk here (revoked, or by an earlier run), counted in
        # spill_bytes() while not owned, deleted once an assignment since gives them elsewhere (spill.tidy)
        self.left = LeftSpills(spill_root)
        self.swept = time.monotonic()  # the last sweep of drained regions (spill.tidy.forget_idle)

    def __iter__(self) -> Iterator[PartitionState]:
        return iter(list(self.owned.values()))

    def __len__(self) -> int:
        return len(self.owned)

    def __contains__(self, partition: int) -> bool:
        return partition in self.owned

    def get(self, partition: int) -> PartitionState | None:
        return self.owned.get(partition)

    def open(self, partition: int) -> PartitionState:
        """The partition's state, recovered from its stored value (if any) and its spill
        reconciled with the ledger.  Raises ``PartitionCountChanged`` when the stored book
        holds open windows (or spilled events of a region whose home moved) counted with
        another partition count (docs/contract.md §1), and
        ``StateFormatUnknown`` for a state in a format this version does not read;
        ``SpillDiskError`` when the spill disk refuses to open or reconcile its spill (nothing
        is kept: opened again later, from the stored state)."""
        book = self.books.new_book()
        ledger = SpillLedger()
        dedup = DedupStore(self.books.dedup_ms, self.books.dedup_max_ids)
        stored = self.stored(partition)
        slot = None
        left = None
        if stored is not None:
            state, slot = stored
            v = state.get("v", STATE_FORMAT)
            if type(v) is not int or not 1 <= v <= STATE_FORMAT:
                raise self._refuse(partition, StateFormatUnknown(
                    f"partition {partition}: its window state is in format {v!r}, and this version of the "
                    f"service reads format {STATE_FORMAT} at most (written by a later version?): run that "
                    "version or a later one; this one would misread it"))
            book.load(state)
            self._check_settings(partition, state, book)
            ledger.load(state.get("spill"))
            try:
                dedup.load(partition, state.get("dedup"), self.record, state.get("dedup_bucket_ms"),
                           int(time.time() * 1000), state.get("dedup_gone"))
            except HorizonClash as exc:
                raise self._refuse(partition, SettingChanged(f"partition {partition}: {exc}")) from None
            if book.aggs is not None:
                book.aggs.load(partition, state.get("aggs"), self.record, set(book.counts))
                book.aggs.restore_gone(state.get("aggs_gone"))
            elif state.get("aggs") or state.get("aggs_gone"):  # AGG_AGGREGATES turned off: their records go
                left = LeftRecords(AGGS_TAG, state.get("aggs"), state.get("aggs_gone"))
        n = self.books.partitions
        if book.partitions and book.partitions != n:
            self._take_count(partition, book, ledger, n)
        book.partitions = n  # stored with the next state written
        try:
            spill = PartitionSpill(self.spill_root, partition, ledger)
            # a crash at any step of it is recovered the same way: so is a failure
            spill.reconcile(None if stored is None else stored[0].get("spill_disk"))
        except OSError as e:  # the spill disk refused: the partition waits, opened again every tick
            raise SpillDiskError("open", partition, "", e) from None
        if stored is not None:
            self.metrics.state_recovered()
            log.info("partition %d: recovered window state at offset %d (%d open windows, %d unpublished "
                     "snapshots, %d spilled events to drain, %d + %d dedup ids)", partition, book.next_offset,
                     len(book.counts), len(book.outbox), ledger.total_backlog(), *dedup.size())
        self.metrics.spill_fault("corrupt", sum(spill.store.corrupt_records.values()))
        self.metrics.spill_fault("torn", sum(spill.store.torn_tails.values()))
        p = self.owned[partition] = PartitionState(partition, book, spill, dedup)
        p.state_slot = slot
        p.aggs_left = left
        if stored is not None:
            ts = stored[0].get("source_ts")
            p.source_ts = ts if isinstance(ts, int) else None
        return p

    def _take_count(self, partition: int, book: WindowBook, ledger: SpillLedger, n: int) -> None:
        """The stored book was counted when clicks had ``book.partitions`` partitions, and it has
        ``n`` now: homes of regions moved.  ``PartitionCountChanged`` while it holds open windows, or
        spilled events of a region whose home moved (drained here, they would be counted here);
        else it is taken over without the regions whose home moved: their new home reports them,
        kept here they would get zero-count final snapshots of their own for up to
        AGG_REGION_IDLE_SECONDS beside the new home's."""
        spilled = {r for r in ledger.backlogged() if home(r, n) != partition}
        spilled.update(r for r, k in ledger.rebuild.items() if k and home(r, n) != partition)
        if book.holds_open_data() or spilled:
            raise self._refuse(partition, PartitionCountChanged(
                f"partition {partition}: its window state has open windows{' or spilled events' if spilled else ''} "
                f"counted when clicks had {book.partitions} partitions, now it has {n}: regions' home partitions "
                "moved, and continuing would publish two final snapshots for some (region, window); go back to "
                f"{book.partitions} partitions until every window is published and the spill is drained"))
        moved = [r for r in {*book.last_seen, *book.first_seen} if home(r, n) != partition]
        for region in moved:
            book.last_seen.pop(region, None)
            book.first_seen.pop(region, None)
        if moved:
            log.info("partition %d: clicks has %d partitions, it had %d: %d regions whose home moved are left to "
                     "their new home", partition, n, book.partitions, len(moved))

    def _check_settings(self, partition: int, state: dict[str, Any], book: WindowBook) -> None:
        """SettingChanged when the stored state (loaded into ``book``, before its dedup ids and
        aggregates) has open windows made under another window length or aggregates made
        under other sketch parameters (a state of an earlier version names neither: read as
        before)."""
        was = state.get("window_ms", book.window_ms)
        # (a first open window that ``load`` moved to a boundary of this length: made under another)
        if (was != book.window_ms or book.first_open != int(state["first_open"])) and book.holds_open_data():
            raise self._refuse(partition, SettingChanged(
                f"partition {partition}: its window state has open windows of {was} ms and AGG_WINDOW_SECONDS "
                f"makes them {book.window_ms} ms: windows of two lengths would meet; go back to "
                f"AGG_WINDOW_SECONDS={was / 1000:g} until every window is published"))
        params = state.get("aggs_params")
        if book.aggs is not None and state.get("aggs") and params is not None and params != book.aggs.params.key():
            raise self._refuse(partition, SettingChanged(
                f"partition {partition}: the aggregates of its open windows were made with sketch parameters "
                f"{params} and these settings give {book.aggs.params.key()} (AGG_UNIQUE_USERS_PRECISION: the first): "
                "rebuilt under these they would come out wrong; go back until every window is published"))

    def _refuse(self, partition: int, exc: Refused) -> Refused:
        """``exc``, said once (error level) and kept as the partition's reason."""
        if self.refused.get(partition) != str(exc):
            log.error("%s; not counting it", exc)
        self.refused[partition] = str(exc)
        return exc

    def refusal(self) -> str | None:
        """Why a stored state of an assigned partition is not counted here (/readyz), if any."""
        return next(iter(self.refused.values()), None)

    def forget(self, partition: int) -> None:
        p = self.owned.pop(partition, None)
        if p is not None:
            # its regions' last-window and spill gauges are the new owner's to say (not
            # __other__ while another book here holds it too); its lag the same
            gone = p.regions().difference(*(q.regions() for q in self.owned.values()))
            p.spill.close()  # stays on disk (counted) until it is assigned elsewhere: keep_only
            self.left.left(partition)
            self.metrics.partition_gone(partition)
            self.metrics.regions_gone(gone)

    def keep_only(self, assigned: set[int]) -> None:
        """A batch fetched before a rebalance can arrive after the revoke: the state it
        re-created belongs to a partition another worker owns now.  Never write its state
        or publish from it (a stale changelog record would be recovered by a later owner).
        The spills left here that an assignment received since gives elsewhere go (spill.tidy)."""
        self.left.delete({*assigned, *self.owned})  # (theirs go at the next tick if still elsewhere)
        for partition in [p for p in self.owned if p not in assigned]:
            log.warning("partition %d is not assigned here (any more): dropping its window book", partition)
            self.forget(partition)
        self.refused = {p: why for p, why in self.refused.items() if p in assigned}  # its new owner says it

    def left_bytes(self) -> int:
        """Bytes of the spills of partitions not owned here that are still on disk."""
        return self.left.total(self.owned)

    def spill_bytes(self) -> int:
        """The spill on disk that counts against AGG_SPILL_MAX_BYTES: owned partitions' and left ones'."""
        return sum(p.spill.total_bytes() for p in self.owned.values()) + self.left_bytes()

    def report(self) -> None:
        """Per-tick gauges: spill backlog by region, lost spill records, outbox, lag; every
        ``SWEEP_S`` the regions drained and quiet are forgotten (spill.tidy.forget_idle)."""
        m = self.metrics
        total_backlog = 0
        if time.monotonic() - self.swept >= SWEEP_S:
            self.swept = time.monotonic()
            for p in self.owned.values():
                forget_idle(p.spill)
        by_label: dict[str, list[int]] = {}  # several regions can have one label (__other__)
        for p in self.owned.values():
            label = p.book.canonical_region
            for region, (backlog, nbytes) in p.spill.backlog_by_region().items():
                sums = by_label.setdefault(label(region), [0, 0])
                sums[0] += backlog
                sums[1] += nbytes
                total_backlog += backlog
        for name, (backlog, nbytes) in by_label.items():
            m.spill_backlog(name, backlog, nbytes)
        m.spill_left(LEFT_LABEL, self.left_bytes())
        for p in self.owned.values():
            if p.spill.lost > 0:
                m.spill_fault("lost", p.spill.lost)
            if p.spill.excess > 0:
                m.spill_fault("excess", p.spill.excess)
            if p.spill.damaged > 0:
                m.spill_fault("corrupt", p.spill.damaged)
            p.spill.lost = p.spill.excess = p.spill.damaged = 0
        m.pending("spill", total_backlog)
        m.pending("publish", sum(len(p.book.outbox) for p in self.owned.values()))
        m.pending("decode", sum(p.lag for p in self.owned.values()))
        m.assigned(len(self.owned), len(self.refused))
        for p in self.owned.values():
            if p.dedup.evicted:
                log.warning("partition %d: %d dedup event ids and request keys forgotten before AGG_DEDUP_SECONDS "
                            "passed (more than AGG_DEDUP_MAX_IDS=%d ids' worth): a repeat of them would be counted "
                            "again", p.partition,
                            p.dedup.evicted, p.dedup.max_ids)
                m.dedup_evicted(p.dedup.evicted)
                p.dedup.evicted = 0
            aggs = p.book.aggs
            if aggs is not None and aggs.malformed:
                log.warning("partition %d: %d events with a clickstream-agg header that is not what ingest "
                            "writes: counted, delays kept, but not in unique users or top URLs", p.partition,
                            aggs.malformed)
                aggs.malformed = 0
        sizes = [p.dedup.size() for p in self.owned.values()]
        m.dedup_size(sum(e for e, _ in sizes), sum(k for _, k in sizes))
        # idle regions' series go while nothing arrives too, but not while a book's stream time is
        # within its idle horizon of the region's last event (a stuck worker's frozen window end is
        # what ClickstreamSnapshotsStale sees)
        m.sweep(live={r for p in self.owned.values() for r, seen in p.book.last_seen.items()
                      if seen >= p.book.stream_time - p.book.idle_ms})
