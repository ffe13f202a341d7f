"""Spill accounting for one partition (pure: no I/O, no Faust).

Per region the ledger keeps three numbers, stored with the partition's window
state in the same changelog record (so they always agree with the counts):

* ``spilled``  events ever written to the region's spill (the next spill sequence number)
* ``drained``  events drained back and counted (spill records with seq < drained are done)
* ``low``      source offset of the oldest undrained spilled event (-1: backlog empty)

Order rule: while a region's backlog is not empty, *every* new event of that
region goes to the spill, so the region's events are counted in source order.
It also means the undrained backlog of region R is exactly the events of R
with a source offset in ``[low, next_offset)``.  The consumer therefore never
commits past the smallest ``low``: if the spill files are lost (another host
took the partition over, a disk was replaced, a record was corrupt), the
backlog is rebuilt by replaying that range from Kafka.  Nothing is lost and,
because every spill record carries its sequence number, nothing is drained
twice.

Splitting a batch is a pure function of the ledger, the token buckets and the
batch, so the shell can write the spill first and commit the split after.

When the source log starts over (core.sourcelog: the topic created again, the broker
back empty), the offsets of what is spilled and not drained yet belong to a log that is
gone.  Those events were acknowledged and are on disk: they stay, and are drained and
counted in order like any other.  But their offsets must neither hold commits of the new
log back nor be re-read from it, whose records at those offsets are other events.  So
``log_restarted`` puts a *fence* on each backlogged region (the spill sequence number
where the new log begins): records below it hold nothing back (``low`` is the offset of
the oldest undrained record at or past the fence, -1 while there is none), and if they
are not on disk after a restart they cannot be rebuilt: they are counted as lost.  The
fence is stored as a fourth number of the region's entry while records below it remain.

A region drained and quiet for a while is forgotten (``sweep``, ``forget``: the caller
deletes its spill directory too), so regions that spilled once do not stay in every state
written.  Sequence numbers are still never given twice: ``next_seq`` is at or past every
number a forgotten region used, and a region without an entry starts there.  It is stored
under the key ``""`` (never a region) as ``[next_seq, next_seq, -1]``: what an earlier
version reads as a region drained long ago, with nothing on disk.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

from aggregator.core.contract import Agg, BookEvent, Event, agg_bytes
from aggregator.core.ratelimit import RateLimits

# An event whose region is None only moves stream time: it was spilled.
SPILLED = None

# ``[seq, source offset, ingest_ts, client_ts or None]`` (and, with aggregates on, the event's
# agg header as Latin-1 text), the payload of a spill record.
# A list, not a tuple: ``split`` builds it before it knows the seq and fills that in after.
SpillRecord = list[int | str | None]


def spill_agg(agg: Agg) -> str:
    """An event's aggregates input as its spill record keeps it: the agg header's bytes
    (core.contract), as Latin-1 text (any byte, in JSON)."""
    return agg_bytes(agg).decode("latin-1")


class Split:
    """The outcome of :meth:`SpillLedger.split` for one batch."""

    __slots__ = ("events", "spills", "limited")

    def __init__(self, events: list[BookEvent], spills: dict[str, list[SpillRecord]],
                 limited: dict[str, int]) -> None:
        self.events = events      # what the window book applies (spilled ones as (None, its, None))
        self.spills = spills      # region -> [SpillRecord] to append, in order
        self.limited = limited    # region -> events over the token bucket (metric)


SEQ_KEY = ""  # the key ``to_dict`` stores ``next_seq`` under (module doc)


class SpillLedger:
    def __init__(self) -> None:
        # region -> [spilled, drained, low]
        self.regions: dict[str, list[int]] = {}
        # the first sequence number of a region without an entry: past every one a forgotten region used
        self.next_seq = 0
        # region -> its spilled count when the last ``sweep`` found it drained (not stored)
        self.quiet: dict[str, int] = {}
        # region -> events still to re-spill from the source log (spill files lost)
        self.rebuild: dict[str, int] = {}
        # region -> spill seq where the current source log begins: records below it were read
        # from a log that started over since (drained as usual, never re-read)
        self.fences: dict[str, int] = {}
        # region -> spilled events of such a log found missing from disk by ``reconcile``
        # (the caller reports and clears it)
        self.lost: dict[str, int] = {}

    # --------------------------------------------------------------- queries
    def backlog(self, region: str) -> int:
        e = self.regions.get(region)
        return e[0] - e[1] if e else 0

    def total_backlog(self) -> int:
        return sum(e[0] - e[1] for e in self.regions.values())

    def backlogged(self) -> list[str]:
        return [r for r, e in self.regions.items() if e[0] > e[1]]

    def low_offset(self, next_offset: int) -> int:
        """The offset it is safe to commit: no undrained spilled event before it."""
        low = next_offset
        for e in self.regions.values():
            if e[0] > e[1] and 0 <= e[2] < low:
                low = e[2]
        return low

    # ----------------------------------------------------------------- input
    def split(self, events: list[Event], offsets: list[int], limits: RateLimits, now: float,
              aggs: Sequence[Agg | None] | None = None) -> Split | None:
        """Decide which events of a batch are counted now and which are spilled.  ``aggs``
        (aggregates on): what each event adds to its cell, kept in its spill record.

        Returns None when everything is counted now (the common case)."""
        per: dict[str, int] = {}
        for e in events:
            r = e[0]
            per[r] = per.get(r, 0) + 1
        allow: dict[str, int] = {}
        limited: dict[str, int] = {}
        for region, n in per.items():
            if self.backlog(region) > 0:
                allow[region] = 0  # keep order: the backlog drains first
                continue
            granted = limits.take(region, n, now)
            if granted < n:
                allow[region] = granted
                limited[region] = n - granted
        if not allow:
            return None
        out: list[BookEvent] = []
        spills: dict[str, list[SpillRecord]] = {}
        append = out.append
        for i, e in enumerate(events):
            region = e[0]
            a = allow.get(region)
            if a is None:
                append(e)
            elif a > 0:
                allow[region] = a - 1
                append(e)
            else:
                lst = spills.get(region)
                if lst is None:
                    lst = spills[region] = []
                agg = None if aggs is None else aggs[i]
                if agg is None:
                    lst.append([0, offsets[i], e[1], e[2]])
                else:
                    lst.append([0, offsets[i], e[1], e[2], spill_agg(agg)])
                append((SPILLED, e[1], None))
        for region, lst in spills.items():
            entry = self.regions.get(region)
            seq = self.next_seq if entry is None else entry[0]
            for rec in lst:
                rec[0] = seq
                seq += 1
        return Split(out, spills, limited)

    def commit_split(self, split: Split) -> None:
        """The spill records of ``split`` are durably written."""
        for region, lst in split.spills.items():
            self.spilled(region, lst)

    def spilled(self, region: str, records: list[SpillRecord]) -> None:
        e = self.regions.get(region)
        if e is None:
            e = self.regions[region] = [self.next_seq, self.next_seq, -1]
        if e[0] == e[1] or e[2] < 0:  # the first undrained of this log (records of an older one hold nothing)
            e[2] = cast(int, records[0][1])  # the source offset: never None
        e[0] += len(records)

    def drained(self, region: str, n: int, next_low: int) -> None:
        """``n`` records drained and counted; ``next_low`` is the source offset of
        the next undrained one (ignored when the backlog is now empty)."""
        e = self.regions[region]
        e[1] += n
        if e[1] > e[0]:
            raise ValueError(f"spill ledger: region {region!r} drained past its spill")
        fence = self.fences.get(region)
        if fence is not None:
            if e[1] < fence and e[0] > e[1]:
                return  # still records of an old log: low stays the current log's (or -1)
            del self.fences[region]
        # the entry stays (low -1) until it is forgotten, and then ``next_seq`` is past it:
        # sequence numbers never restart, so a record left on disk by a crash before its
        # ack can never pass for a new one
        e[2] = -1 if e[0] == e[1] else next_low

    def log_restarted(self) -> int:
        """The source log started over: the undrained spilled events stay to be drained, but
        their offsets are of the old log (module doc).  Returns how many there are."""
        old = 0
        for region, e in self.regions.items():
            if e[0] > e[1]:
                self.fences[region] = e[0]
                e[2] = -1
                old += e[0] - e[1]
        return old

    # ------------------------------------------------------------ recovery
    def reconcile(self, region: str, first_seq: int | None, on_disk: int) -> tuple[int, int]:
        """Compare the ledger with a region's spill on disk after a restart.

        ``first_seq`` is the sequence number of the oldest record on disk
        (None if none), ``on_disk`` how many records are there.  Returns
        ``(ack, keep)``: acknowledge the first ``ack`` records (already
        drained and counted), then keep the next ``keep`` and truncate the
        rest (spilled by a batch whose state was never written; the source
        replays them).  When the disk holds fewer than the backlog, keep is 0
        and the region is marked for rebuild from the source log.

        Records below a fence (read from a log that started over since) cannot be re-read:
        if the disk holds them all they are kept and only the rest is rebuilt; otherwise
        they are lost (``lost``, marked drained) and the rest is reconciled as usual."""
        e = self.regions.get(region)
        # no entry: a region forgotten (its records on disk were all drained) or never spilled
        spilled, drained = (e[0], e[1]) if e else (self.next_seq, self.next_seq)
        need = spilled - drained
        ack = 0
        if first_seq is not None and first_seq < drained:
            ack = min(on_disk, drained - first_seq)
            first_seq += ack
            on_disk -= ack
        if need == 0:
            return ack, 0
        if on_disk > 0 and first_seq == drained and on_disk >= need:
            return ack, need
        old = min(self.fences.get(region, 0), spilled) - drained
        if e is not None and old > 0:
            if on_disk > 0 and first_seq == drained and on_disk >= old:
                self.rebuild[region] = need - old  # the current log's part is re-read
                return ack, old
            # neither all on disk nor in the source log any more
            self.lost[region] = self.lost.get(region, 0) + old
            e[1] += old
            del self.fences[region]
            if e[0] == e[1]:
                e[2] = -1
            more, keep = self.reconcile(region, first_seq, on_disk)
            return ack + more, keep
        self.rebuild[region] = need
        return ack, 0

    def rebuilt(self, region: str, records: list[SpillRecord]) -> None:
        """Records re-spilled from the source log during a rebuild; the first of a rebuild of
        the whole backlog gives its low (the offset it was re-read from is only a bound)."""
        e = self.regions[region]
        if records and self.rebuild[region] == e[0] - e[1] and region not in self.fences:
            e[2] = cast(int, records[0][1])
        self.rebuild[region] -= len(records)

    # ------------------------------------------------------------ forgetting
    def sweep(self) -> list[str]:
        """Regions drained (no fence, no rebuild) and with nothing spilled since the last
        sweep found them so: those the caller may ``forget``, once nothing of them is left
        on disk or waits for an acknowledgement."""
        now = {r: e[0] for r, e in self.regions.items() if self._drained(r, e)}
        quiet = [r for r, spilled in now.items() if self.quiet.get(r) == spilled]
        self.quiet = now
        return quiet

    def _drained(self, region: str, e: list[int]) -> bool:
        """Everything spilled of ``region`` drained, and no fence or rebuild on it."""
        return e[0] == e[1] and region not in self.fences and region not in self.rebuild

    def forget(self, region: str) -> None:
        """Drop a drained region's entry; its sequence numbers stay used (``next_seq``)."""
        e = self.regions[region]
        if not self._drained(region, e):
            raise ValueError(f"spill ledger: region {region!r} is not drained")
        del self.regions[region]
        self.next_seq = max(self.next_seq, e[0])
        self.quiet.pop(region, None)

    # ---------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, list[int]]:
        fences = self.fences
        d = {r: [*e, fences[r]] if r in fences else list(e) for r, e in self.regions.items()}
        if self.next_seq:
            d[SEQ_KEY] = [self.next_seq, self.next_seq, -1]
        return d

    def load(self, d: Mapping[str, Iterable[int]] | None) -> None:
        self.regions = {}
        self.fences = {}
        self.next_seq = 0
        for r, e in (d or {}).items():
            nums = [int(x) for x in e]
            if str(r) == SEQ_KEY:
                self.next_seq = nums[0]
                continue
            self.regions[str(r)] = nums[:3]
            if len(nums) > 3:
                self.fences[str(r)] = nums[3]
        self.rebuild = {}
        self.lost = {}
        self.quiet = {}

    def rebuild_seq(self, region: str) -> int:
        """Sequence number of the next record a rebuild writes."""
        e = self.regions[region]
        return e[0] - self.rebuild[region]
