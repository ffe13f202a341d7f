"""One partition's spill: the ledger (pure accounting) over a SpillStore (disk).

No Faust here; the worker calls these from its batch handler and flush tick:

* ``write(split)``       before the batch is applied: spill records are fsynced first
* ``drain(limits, now)`` at each tick: oldest records of each backlogged region, at its rate
* ``acked()``            after the window state holding the drain is durable
* ``reconcile(disk)``    when the partition is (re)assigned: disk vs ledger (``disk``: the
                         id of the spill directory the state's backlog was written on)

Spill record payload: ``[seq, source_offset, ingest_ts, client_ts_or_null]`` (orjson; with
the aggregates on a fifth field, the event's agg header as Latin-1 text, ``ledger.spill_agg``),
in the region's directory under ``<spill dir>/p<partition>/``; a *gap*
``[seq, -1, null, null]`` holds the place of an event lost (``log_restarted``).

A full or failing disk (any ``OSError``) never leaves a batch half-spilled: ``write``
cuts off what it appended for the batch's other regions and raises
:class:`SpillDiskError` with the ledger unchanged, so the caller can hold the batch and
offer it again later.  A drain that cannot read a region skips it (``read_error``) and
takes it again at the next tick; an acknowledgement that cannot read stays pending.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import orjson

from aggregator.core.contract import Agg, Event
from aggregator.core.ratelimit import RateLimits
from aggregator.spill.layout import disk_id
from aggregator.spill.ledger import SpillLedger, SpillRecord, Split, spill_agg
from aggregator.spill.store import SpillStore

log = logging.getLogger("aggregator.spill")

DRAIN_MAX = 50_000  # records per region per drain call (bounds memory of one drain; a tick calls it again)
# records per region per second since its last drain, at most, unless its rate is higher (and a
# second's at least): bounds the time a tick spends draining a region with no rate (a limit lifted)
DRAIN_PER_S = 50_000
# drained records of a region waiting for a state write (``acked``) beyond which it drains no
# more until they are acknowledged (state writes failing, or the worker fenced)
PENDING_MAX = DRAIN_MAX


class SpillDiskError(Exception):
    """The spill disk refused a write or a read (``error``: the ``OSError``).  For a
    write, nothing of the batch was kept: the ledger and the disk are as before it."""

    def __init__(self, op: str, partition: int, region: str, error: OSError) -> None:
        super().__init__(f"{error} (spill {op}, partition {partition}" + (f", region {region!r})" if region else ")"))
        self.op = op
        self.partition = partition
        self.region = region
        self.error = error


class PartitionSpill:
    def __init__(self, root: str | os.PathLike[str], partition: int, ledger: SpillLedger,
                 fsync: bool = True) -> None:
        self.partition = partition
        self.ledger = ledger
        self.store = SpillStore(os.path.join(os.fspath(root), f"p{partition}"), max_bytes=0, fsync=fsync)
        self.disk: str | None = None  # what the window state names this directory by
        try:
            self._ensure_disk()
        except OSError:  # a full disk: made with the first record written (a state names "" till then)
            pass
        self.pending_acks: list[tuple[str, int]] = []
        self.rebuilding: dict[str, list[SpillRecord]] = {}
        self.lost = 0  # spilled events neither on disk nor in the source log any more
        self.excess = 0  # events a rebuild re-read beyond what was spilled (``rebuild_flush``), not re-spilled
        self.rebuild_ids: dict[Any, int] = {}  # dedup id -> ingest time, of the events a rebuild re-spilled
        # the source offset to fetch again from: records found missing while draining (``_reread``)
        self.rebuild_from: int | None = None
        self.rebuild_tries = 0
        self.damaged = 0  # spill records found missing while draining (a fault: reported, then zeroed)
        # region -> records at the end of its spill that belong to no committed batch
        # (a failed write's rollback that itself failed): cut off before the next write
        self.uncommitted: dict[str, int] = {}
        self.read_error: SpillDiskError | None = None  # the last drain could not read a region
        self.grants: dict[str, int] = {}  # region -> records this tick's drain may still take

    def _ensure_disk(self) -> None:
        """The directory's id (``layout.disk_id``), made before the first record is written."""
        if self.disk is None:
            self.disk = disk_id(self.store.root, self.store.fsync)

    # ------------------------------------------------------------ recovery
    def reconcile(self, written_on: str | None = None) -> dict[str, int]:
        """Make the disk agree with the ledger; returns regions to rebuild -> events.
        ``written_on``: the id of the spill directory the ledger's state was written with
        (None: not known, a state of an earlier version; "": none, no record of its backlog
        was written where it was taken).  Another directory's id (or ""): that
        state's backlog is on another host's disk, and what this one holds is a spill
        left here before (the partition comes back to a host): none of it is trusted."""
        store, ledger = self.store, self.ledger
        if written_on is not None and written_on != self.disk and ledger.total_backlog():
            log.warning("spill p%d: the window state's spill backlog was written in another spill directory "
                        "(%s, this one is %s): this one's records are not taken for it", self.partition,
                        written_on, self.disk)
        for region in sorted(set(ledger.regions) | set(store.regions())):
            if written_on is not None and written_on != self.disk:
                if store.backlog(region):
                    store.truncate_after(region, 0)
                ledger.reconcile(region, None, 0)  # the backlog (if any) is re-read from the source
                continue
            on_disk = store.backlog(region)
            first = store.read_batch(region, 1)
            first_seq = orjson.loads(first[0])[0] if first else None
            ack, keep = ledger.reconcile(region, first_seq, on_disk)
            if ack:
                store.ack(region, ack)
            if store.backlog(region) > keep:
                store.truncate_after(region, keep)
            if keep and not self._kept_is_backlog(region):
                # not this backlog's records (a record of them went missing, or they are a stale
                # spill of a batch another worker has counted since): none of them is trusted
                store.truncate_after(region, 0)
                ledger.rebuild.pop(region, None)
                ledger.reconcile(region, None, 0)
        for region, n in ledger.lost.items():
            log.error("spill p%d: region %r: %d spilled events read from a source log that has started over "
                      "since are not on this disk, and cannot be re-read from the new log: they are lost",
                      self.partition, region, n)
            self.lost += n
        ledger.lost = {}
        if store.corrupt_records and any(store.corrupt_records.values()):
            log.error("spill p%d: corrupt records quarantined on recovery: %s; their regions are "
                      "rebuilt from the source log", self.partition, store.corrupt_records)
        for region, n in ledger.rebuild.items():
            log.warning("spill p%d: region %r: %d spilled events are not on this disk; re-reading "
                        "them from the source log", self.partition, region, n)
        return dict(ledger.rebuild)

    def _kept_is_backlog(self, region: str) -> bool:
        """Whether the first record kept on disk is the first of the region's backlog: the
        sequence number after the drained ones, at the ledger's low offset.  Reconciling
        counts records; this checks what they are."""
        e = self.ledger.regions[region]
        first = self.store.read_batch(region, 1)
        if not first:
            return False
        seq, offset = orjson.loads(first[0])[:2]
        # below a fence the records are of a log that has started over since: their offsets
        # are not the current log's (``low`` is), and only their sequence numbers tell
        if seq == e[1] and (offset == e[2] or e[2] < 0 or region in self.ledger.fences):
            return True
        log.error("spill p%d: region %r: the spill on disk starts at record %d (offset %d), the "
                  "backlog at record %d (offset %d): not this backlog's records; re-reading them "
                  "from the source log", self.partition, region, seq, offset, e[1], e[2])
        return False

    def rebuild_add(self, region: str, offset: int, its: int, cts: int | None, agg: Agg | None = None) -> None:
        lst = self.rebuilding.get(region)
        if lst is None:
            lst = self.rebuilding[region] = []
        lst.append([0, offset, its, cts] if agg is None else [0, offset, its, cts, spill_agg(agg)])

    def rebuild_flush(self, done: bool) -> None:
        """Write what a replayed batch re-spilled; ``done``: the replay reached the state's offset."""
        ledger = self.ledger
        for region, lst in self.rebuilding.items():
            want = max(0, ledger.rebuild.get(region, 0))
            if len(lst) > want:
                # more than were spilled: events the first pass did not spill (too far ahead
                # then, a repeat of an event before the rebuilt range, or a named region's
                # forwarded to its home, re-read as __other__: worker.throttle); which ones is not
                # known, so the count is kept and the last ones are left out, loudly
                log.error("spill p%d: region %r: the rebuild from the source log re-read %d events more "
                          "than were spilled (too far ahead, repeats, or forwarded, the first time): the "
                          "last ones were left out, so the count is right but some events may sit in a "
                          "neighbouring window and in its aggregates", self.partition, region,
                          len(lst) - want)
                self.excess += len(lst) - want
                del lst[want:]
                if not lst:
                    continue
            seq = ledger.rebuild_seq(region)
            for rec in lst:
                rec[0] = seq
                seq += 1
            self._ensure_disk()
            self.store.append(region, [orjson.dumps(r) for r in lst])
            ledger.rebuilt(region, lst)
        self.rebuilding = {}
        if done:
            self.rebuild_ids = {}
            self.rebuild_from, self.rebuild_tries = None, 0
            for region, left in ledger.rebuild.items():
                if left:
                    # the source no longer has them (retention, or the offset was committed
                    # past them by an older version): count them as lost, loudly, and go on
                    log.error("spill p%d: region %r: rebuild from the source log is %d events short; "
                              "they are lost", self.partition, region, left)
                    ledger.regions[region][0] -= left
                    self.lost += left
            if not any(ledger.rebuild.values()):
                log.info("spill p%d: spill re-read from the source log", self.partition)
            ledger.rebuild = {}

    def log_restarted(self) -> int:
        """The source log started over (core.sourcelog).  A rebuild under way re-read part of
        the old log, which is gone: what it re-read stays, the rest is lost (loudly) and takes
        its place in the spill as *gaps* (records without an event, counted as ``lost`` when
        drained), so that sequence numbers are never given twice (a crash before the next
        state write finds the spill as that state says).  The spilled events not drained yet
        stay to be drained, and their old offsets stop holding commits back
        (``SpillLedger.log_restarted``).  Returns how many events there are (gaps aside)."""
        ledger = self.ledger
        lost = 0
        if ledger.rebuild:
            self.rebuild_flush(done=False)
            for region, left in ledger.rebuild.items():
                if left:
                    log.error("spill p%d: region %r: the source log started over while %d spilled events were "
                              "being re-read from it; they are lost", self.partition, region, left)
                    seq = ledger.rebuild_seq(region)
                    gaps: list[SpillRecord] = [[seq + i, -1, None, None] for i in range(left)]
                    self._ensure_disk()
                    self.store.append(region, [orjson.dumps(r) for r in gaps])
                    ledger.rebuilt(region, gaps)
                    lost += left
            ledger.rebuild = {}
        self.rebuild_ids = {}
        self.rebuild_from, self.rebuild_tries = None, 0
        return ledger.log_restarted() - lost

    # ---------------------------------------------------------------- input
    def write(self, split: Split) -> int:
        """Durably append the spilled part of a batch; returns how many were spilled.

        All or nothing: on an ``OSError`` what was appended for the batch is cut off
        again, the ledger is left as it was, and :class:`SpillDiskError` is raised."""
        store = self.store
        self._cut_uncommitted()
        n = 0
        dumps = orjson.dumps
        done: list[tuple[str, int]] = []
        for region, lst in split.spills.items():
            try:
                self._ensure_disk()
                store.append(region, [dumps(r) for r in lst])
            except OSError as e:  # SpillStore.append keeps nothing of a failed call
                self._roll_back(done)
                raise SpillDiskError("write", self.partition, region, e) from e
            done.append((region, len(lst)))
            n += len(lst)
        self.ledger.commit_split(split)
        return n

    def _roll_back(self, done: list[tuple[str, int]]) -> None:
        """Cut off the records just appended for a batch that is not committed."""
        first = not self.uncommitted
        for region, k in done:
            self.uncommitted[region] = self.uncommitted.get(region, 0) + k
        try:
            self._cut_uncommitted()
        except SpillDiskError as e:
            # until they are cut off they are never drained (the ledger does not count
            # them) and a restart's reconcile drops them; the next write tries first
            if first:
                log.error("spill p%d: %s; cut off before the next write", self.partition, e)

    def _cut_uncommitted(self) -> None:
        store = self.store
        for region, k in list(self.uncommitted.items()):
            try:
                store.truncate_after(region, store.backlog(region) - k, quiet=True)
            except OSError as e:
                raise SpillDiskError("rollback", self.partition, region, e) from e
            del self.uncommitted[region]

    # ---------------------------------------------------------------- drain
    def drain(self, limits: RateLimits, now: float, unlimited: bool = False) -> list[Event]:
        """Take the oldest records of each backlogged region at its rate (at most DRAIN_MAX
        of each: :meth:`drain_aggs` with ``more`` takes the rest of the tick's allowance).

        The ledger moves on now; the store acknowledges them in :meth:`acked`."""
        return self.drain_aggs(limits, now, unlimited)[0]

    def _grant(self, limits: RateLimits, now: float, unlimited: bool) -> None:
        """A tick's allowance of each backlogged region: its rate since its last drain
        (``RateLimits.take_drain``; at most DRAIN_PER_S a second of it or the rate, a second's
        if drains are less than a second apart), none while PENDING_MAX of its drained records wait for
        a state write (their payloads are not kept, but what is counted and not written must
        stay bounded)."""
        ledger = self.ledger
        self.grants = grants = {}
        for region in ledger.backlogged():
            if region in ledger.rebuild:
                continue  # still being re-read from the source log
            backlog = ledger.backlog(region)
            pending = self.store.taken(region)
            want = backlog if not pending else min(backlog, PENDING_MAX - pending)
            if want > 0:
                n = want if unlimited else limits.take_drain(region, want, now, DRAIN_PER_S)
                if n > 0:
                    grants[region] = n

    def drain_aggs(self, limits: RateLimits, now: float, unlimited: bool = False, reread: bool = True,
                   more: bool = False) -> tuple[list[Event], list[Agg | None] | None]:
        """:meth:`drain`, with what each event adds to its cell's aggregates (None: no
        record had it).  ``reread`` False: records found missing wait to be re-read (the
        partition holds batches for the spill disk, which must be applied first).  ``more``:
        the next DRAIN_MAX of each region of the allowance the last call without it gave
        (the caller applies each call's events before the next: memory stays one call's);
        ``grants`` is empty when there is no more."""
        events: list[Event] = []
        aggs: list[Agg | None] | None = None
        ledger, store = self.ledger, self.store
        loads = orjson.loads
        if not more:
            self.read_error = None
            self._grant(limits, now, unlimited)
        grants = self.grants
        for region in list(grants):
            if region in ledger.rebuild or not ledger.backlog(region):
                del grants[region]
                continue
            backlog = ledger.backlog(region)
            n = min(grants[region], DRAIN_MAX, backlog)
            grants[region] -= n
            if grants[region] <= 0:
                del grants[region]
            try:
                recs = store.peek(region, n + 1)
            except OSError as e:  # nothing of this region moves: read again at the next drain
                self.read_error = SpillDiskError("read", self.partition, region, e)
                grants.pop(region, None)
                continue
            entry = ledger.regions[region]
            expect = entry[1]  # the sequence number of the oldest undrained record
            fence = ledger.fences.get(region)
            # the offset after the last record taken, of the current log (records below a
            # fence are of a log that has started over: the ledger's low is the new log's)
            low = entry[2]
            taken = 0
            for raw in recs[:n]:
                rec = loads(raw)
                seq, off, its, cts = rec[:4]
                if seq != expect + taken:
                    break  # a record missing (found damaged while draining): see below
                if its is not None:
                    if len(rec) > 4 and aggs is None:
                        aggs = [None] * len(events)
                    events.append((region, its, cts))
                    if aggs is not None:
                        aggs.append(rec[4].encode("latin-1") if len(rec) > 4 else None)
                else:  # a gap: an event lost (log_restarted), counted as such as it drains
                    self.lost += 1
                taken += 1
                if fence is None or seq >= fence:
                    low = off + 1
            after = recs[taken] if len(recs) > taken else None  # what the disk has next
            next_seq = loads(after)[0] if after is not None else None
            if taken == n and (n == backlog or next_seq == expect + n):
                next_low = loads(after)[1] if after is not None else -1
                ledger.drained(region, n, next_low)
                store.take(region, n)
                self.pending_acks.append((region, n))
                continue
            # records missing: the store found one damaged (quarantined) or cut a torn tail
            grants.pop(region, None)
            if taken:
                ledger.drained(region, taken, low)
                store.take(region, taken)
                self.pending_acks.append((region, taken))
            self._missing(region, store.taken(region), entry[0] if next_seq is None else next_seq, low, reread)
        return events, aggs

    def _missing(self, region: str, on_disk: int, next_seq: int, low: int, reread: bool = True) -> None:
        """Records of ``region`` from the next undrained one up to ``next_seq`` (the next on
        disk) are missing.  Those of a log that has started over cannot be read again: they
        are lost, loudly, and drained past.  The others are re-read from the source log
        from ``low`` (the offset after the last one drained), as after a restart that finds
        a spill damaged: the region's undrained records are cut off the disk and
        ``rebuild_from`` tells the worker where to seek.  A re-read waits while another
        rebuild is under way (the next drain finds the records missing again)."""
        ledger = self.ledger
        e = ledger.regions[region]
        fence = ledger.fences.get(region)
        if fence is not None and e[1] < fence:
            gone = min(next_seq, fence) - e[1]
            log.error("spill p%d: region %r: %d spilled records of a source log that has started over "
                      "since are damaged on disk: they are lost", self.partition, region, gone)
            self.lost += gone
            self.damaged += gone
            ledger.drained(region, gone, e[2])
            return
        if ledger.rebuild or self.rebuild_from is not None or not reread:
            return
        try:
            self.store.truncate_after(region, on_disk)
        except OSError as exc:  # cut them next time: the drain finds the same records missing
            self.read_error = SpillDiskError("read", self.partition, region, exc)
            return
        if low < 0:
            left = ledger.backlog(region)
            log.error("spill p%d: region %r: %d spilled records are damaged on disk and their source "
                      "offset is not known: they are lost", self.partition, region, left)
            self.lost += left
            self.damaged += left
            ledger.drained(region, left, -1)
            return
        self.damaged += next_seq - e[1]
        e[2] = low
        ledger.rebuild[region] = e[0] - e[1]
        self.rebuild_from = low
        log.error("spill p%d: region %r: %d spilled records are damaged or missing on disk; "
                  "re-reading them from the source log from offset %d", self.partition, region,
                  ledger.rebuild[region], low)

    def acked(self) -> None:
        """The state that counts the drained records is durable: drop them from disk."""
        acks = self.pending_acks
        while acks:
            region, n = acks[0]
            try:
                self.store.ack(region, n)
            except OSError as e:  # it could not read them (the cursor is best effort): later
                log.warning("spill p%d: region %r: acknowledging %d drained records failed (%s); "
                            "retried at the next checkpoint", self.partition, region, n, e)
                return
            acks.pop(0)

    # ------------------------------------------------------------- figures
    def backlog_by_region(self) -> dict[str, tuple[int, int]]:
        """region -> (undrained events, bytes on disk)."""
        return {r: (self.ledger.backlog(r), self.store.bytes(r))
                for r in set(self.ledger.regions) | set(self.store.regions())}

    def total_bytes(self) -> int:
        return self.store.total_bytes()

    def held_bytes(self) -> int:
        """Bytes that count towards AGG_SPILL_MAX_BYTES: all but those of regions being re-read
        from the source log (they cannot drain until the re-read, which needs fetches, ends)."""
        store = self.store
        return store.total_bytes() - sum(store.bytes(r) for r in self.ledger.rebuild)

    def close(self) -> None:
        self.store.close()
