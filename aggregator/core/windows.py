"""Tumbling windows by ingest time, and the per-partition window book.

Pure Python, standard library only.  All times are integer epoch
milliseconds.  The book is the state machine of docs/contract.md §1:

* an event's window is ``floor(ingest_ts / W) * W`` (epoch aligned);
* *stream time* is the largest ingest timestamp seen on the partition,
  or the wall clock when the shell says the partition is caught up;
* window ``[s, s+W)`` closes once stream time passes ``s + W + grace``;
* an event whose window is already closed goes to the late bucket with
  reason ``closed_window``; one whose client ``ts`` is more than
  ``late_after`` older than its ingest time goes there with reason
  ``client_delay``.  Late events are attached to the window that is open
  at stream time when they are processed (or to the first open window, when
  that is still ahead: a state re-aligned to a new window length, ``load``);
* closing a window yields one snapshot per region seen within
  ``region_idle`` of the window end, zero counts included.

The book is deterministic for a given record sequence, whatever the batch
boundaries are: closing is checked on every stream-time advance, never only
at the end of a batch.  That is what makes replay after a crash exact.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aggregator.core.aggstate import FLUSH_MIN, Staged, WindowAggregates
from aggregator.core.contract import CLIENT_DELAY, CLOSED_WINDOW, LATE_REASONS, OTHER_REGION, Agg, BookEvent, Snapshot

__all__ = ["CLIENT_DELAY", "CLOSED_WINDOW", "OTHER_REGION", "STATE_FORMAT", "WindowBook", "first_open_window",
           "window_start"]

STATE_FORMAT = 1  # the "v" of the state ``to_dict`` writes; worker.partitions refuses a later one


def window_start(ts_ms: int, window_ms: int) -> int:
    """Start of the epoch-aligned tumbling window that holds ``ts_ms``."""
    return ts_ms - ts_ms % window_ms


def first_open_window(stream_time: int, window_ms: int, grace_ms: int) -> int:
    """Start of the oldest window still open at ``stream_time``.

    Window ``s`` is closed iff ``stream_time > s + W + grace``.
    """
    return window_start(stream_time - grace_ms - 1, window_ms)


class WindowBook:
    """Window state of one partition: open windows, late bucket, outbox.

    ``apply`` takes a batch of already decoded events; ``advance_to``
    moves stream time with the wall clock.  Snapshots of closed windows are
    appended to ``outbox``; the shell publishes them once the state that
    closed them is durable, then calls ``published``.
    """

    __slots__ = (
        "window_ms", "grace_ms", "late_after_ms", "idle_ms", "max_regions",
        "next_offset", "stream_time", "first_open", "close_at",
        "counts", "late", "first_seen", "last_seen", "outbox", "dirty", "tally", "pending_late",
        "partitions", "forwarded", "forwarded_epochs", "repart_next", "log_epoch", "aggs",
    )

    def __init__(self, window_ms: int, grace_ms: int, late_after_ms: int,
                 idle_ms: int, max_regions: int = 1000, aggs: WindowAggregates | None = None) -> None:
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.late_after_ms = late_after_ms
        self.idle_ms = idle_ms
        self.max_regions = max_regions
        self.next_offset = 0          # first source offset not yet applied
        self.stream_time = -1         # -1: nothing seen yet
        self.first_open = -1          # start of the oldest open window
        self.close_at = -1            # stream time beyond which first_open closes
        # window start -> region -> count
        self.counts: dict[int, dict[str, int]] = {}
        # window start -> region -> reason -> count
        self.late: dict[int, dict[str, dict[str, int]]] = {}
        self.first_seen: dict[str, int] = {}
        self.last_seen: dict[str, int] = {}
        self.outbox: list[Snapshot] = []
        self.dirty = False
        # region -> events counted into a window since the shell last took it (metrics)
        self.tally: dict[str, int] = {}
        # region -> reason -> late events seen before the first event started stream time
        self.pending_late: dict[str, dict[str, int]] = {}
        # repartitioning (core.repartition): the partition count of ``clicks`` the homes were
        # computed with (0: not known yet), per source partition the highest source offset
        # applied from ``clicks-repartition`` and the log epoch of that offset (0s left out),
        # the first offset of this partition of ``clicks-repartition`` not yet applied, and
        # this partition's own log epoch (one more each time its log of ``clicks`` started
        # over, core.sourcelog), which its forwarded records carry
        self.partitions = 0
        self.forwarded: dict[int, int] = {}
        self.forwarded_epochs: dict[int, int] = {}
        self.repart_next = 0
        self.log_epoch = 0
        # unique users, top URLs, client delays per (window, region) (AGG_AGGREGATES; core.aggstate)
        self.aggs = aggs

    # ------------------------------------------------------------------ input
    def canonical_region(self, region: str) -> str:
        """The region as counted: beyond ``max_regions`` it is ``__other__``."""
        if region in self.last_seen or len(self.last_seen) - (OTHER_REGION in self.last_seen) < self.max_regions:
            return region  # (``__other__`` itself takes no place)
        return OTHER_REGION

    def apply(self, events: Iterable[BookEvent], next_offset: int, now_ms: int,
              aggs: Sequence[Agg | None] | None = None) -> None:
        """Count a batch of ``(region, ingest_ts, client_ts_or_None)``.

        An event with region ``None`` was spilled: it moves stream time as if
        seen (so window closing does not depend on the rate limit) but is
        counted later, when drained.

        ``next_offset`` is the source offset after the batch; ``now_ms`` is
        the emission time stamped on snapshots that this batch closes.

        ``aggs`` (with aggregates on): what each event adds to its cell's aggregates
        (core.aggstate), parallel to ``events``; spilled markers add nothing (their events
        add theirs when drained, from their spill records); without it the events are
        counted but not aggregated.
        """
        W = self.window_ms
        late_after = self.late_after_ms
        counts = self.counts
        tally = self.tally
        last_seen = self.last_seen
        st = self.stream_time
        close_at = self.close_at
        cells = self.aggs if aggs is not None else None
        # indexed lists, not a zip: compiled, an index is cheaper than an iterator's step
        evs: list[BookEvent] = events if isinstance(events, list) else list(events)
        agg_l: list[Any] = []  # Any: an agg is only passed on, untyped costs no check an event
        if cells is not None and aggs is not None:
            agg_l = aggs if isinstance(aggs, list) else list(aggs)
        n = len(evs) if cells is None else min(len(evs), len(agg_l))
        agg: Any = None
        # the window of the event before, its counts and staged cells (core.aggstate, added at
        # the end): a batch rarely spans two
        cur_ws = -1
        per_window: dict[str, int] = {}
        staged_w: dict[str, Staged] = {}
        # this run of events of the window ``cur_ws``, by region (aggregates on: in its staged
        # cells, ``Staged.run``): added to ``per_window`` and ``tally`` when the window changes,
        # before windows close, and at the end (``_end_run``; one count an event, not two)
        run: dict[str, int] = {}
        # the delays' codes (sketches.delays.delay_code) for delays in the table: its objects
        codes: list[Any] = [] if cells is None else cells.delay_codes
        table_n = len(codes)
        seen: int | None
        for i in range(n):
            region, its, cts = evs[i]
            if cells is not None:
                agg = agg_l[i]
            # one look-up an event: the region's last ingest time (None: not seen, or a spilled marker)
            if region is not None:
                seen = last_seen.get(region)
                if seen is None:
                    region = self.canonical_region(region)
                    seen = last_seen.get(region)
                    if seen is None:
                        self.first_seen[region] = its
            else:
                seen = None
            if its > st:
                st = its
                if close_at < 0:
                    self._start(st)
                    close_at = self.close_at
                elif st > close_at:
                    _end_run(run, staged_w, per_window, tally)
                    self.stream_time = st
                    self._close_through(st, now_ms)
                    close_at = self.close_at
                    cur_ws = -1  # the cached window may have closed
                    if region is not None:
                        seen = last_seen.get(region)
                        if seen is None:
                            self.first_seen[region] = its  # forgotten (idle) by the windows this event closed
            if region is None:
                continue  # spilled: seen (moves stream time), counted when drained
            if its > (-1 if seen is None else seen):
                last_seen[region] = its
            if cts is not None and its - cts > late_after:
                self._add_late(region, CLIENT_DELAY, st)
                continue
            ws = its - its % W
            if ws != cur_ws:
                _end_run(run, staged_w, per_window, tally)
                if ws < self.first_open:
                    self._add_late(region, CLOSED_WINDOW, st)
                    continue
                pw = counts.get(ws)
                if pw is None:
                    pw = counts[ws] = {}
                per_window = pw
                if cells is not None:
                    staged_w = cells.staged_window(ws)
                cur_ws = ws
            if cells is None:
                run[region] = run.get(region, 0) + 1
            else:  # the run's count in the staged cell: one look-up an event, not three
                staged = staged_w.get(region)
                if staged is None:
                    staged = staged_w[region] = Staged()
                staged.run += 1
                staged.aggs.append(agg)
                if cts is not None:
                    d = its - cts
                    staged.codes.append(codes[d] if 0 <= d < table_n else (-1 if d < 0 else -d))
        _end_run(run, staged_w, per_window, tally)
        if cells is not None:
            cells.n_staged += len(aggs)  # type: ignore[arg-type]
            if cells.n_staged >= FLUSH_MIN and cells.flush_due():
                cells.flush()  # else at the checkpoint (take_records) or when a window closes
        self.stream_time = st
        self.next_offset = next_offset
        self.dirty = True

    def add_late(self, by_region: Mapping[str, int], reason: str) -> None:
        """Late events that take no part in stream time (``future_ts``), by region: attached,
        like every late event, to the window open at stream time; before the partition's
        first event has started stream time, to the first window that opens then."""
        for raw, n in by_region.items():
            region = self.canonical_region(raw)
            if self.close_at < 0:
                pending = self.pending_late.setdefault(region, {})
                pending[reason] = pending.get(reason, 0) + n
            else:
                self._add_late(region, reason, self.stream_time, n)
        self.dirty = True

    def advance_to(self, now_ms: int) -> bool:
        """Move stream time to the wall clock (partition caught up).

        Returns True when windows closed."""
        if self.close_at < 0 or now_ms <= self.stream_time:
            return False
        self.stream_time = now_ms
        if now_ms > self.close_at:
            self._close_through(now_ms, now_ms)
            self.dirty = True
            return True
        return False

    # --------------------------------------------------------------- internal
    def _start(self, st: int) -> None:
        self.stream_time = st
        self.first_open = first_open_window(st, self.window_ms, self.grace_ms)
        self.close_at = self.first_open + self.window_ms + self.grace_ms
        if self.pending_late:
            for region, by_reason in self.pending_late.items():
                for reason, n in by_reason.items():
                    self._add_late(region, reason, st, n)
            self.pending_late = {}

    def _add_late(self, region: str, reason: str, st: int, n: int = 1) -> None:
        ws = st - st % self.window_ms
        if ws < self.first_open:  # only in a book re-aligned by ``load``: its first window is still ahead
            ws = self.first_open
        per_window = self.late.get(ws)
        if per_window is None:
            per_window = self.late[ws] = {}
        per_region = per_window.get(region)
        if per_region is None:
            per_region = per_window[region] = {}
        per_region[reason] = per_region.get(reason, 0) + n

    def _close_through(self, st: int, now_ms: int) -> None:
        """Close every window that stream time ``st`` has passed."""
        W = self.window_ms
        new_first_open = first_open_window(st, W, self.grace_ms)
        # Windows with no data at all and no region to report are skipped
        # cheaply: only windows up to idle after the last event matter.
        s = self.first_open
        newest_seen = max(self.last_seen.values(), default=-1)
        while s < new_first_open:
            if s + W - self.idle_ms > newest_seen and s not in self.counts and s not in self.late:
                # nothing can be reported for this or any later empty window
                nxt = min([w for w in self.counts if w > s] + [w for w in self.late if w > s]
                          + [new_first_open])
                s = nxt
                continue
            self._emit(s, now_ms)
            s += W
        self.first_open = new_first_open
        self.close_at = new_first_open + W + self.grace_ms

    def _emit(self, ws: int, now_ms: int) -> None:
        we = ws + self.window_ms
        counts = self.counts.pop(ws, {})
        late = self.late.pop(ws, {})
        horizon = we - self.idle_ms
        regions = set(counts) | set(late)
        for region, seen in self.last_seen.items():
            if seen >= horizon and self.first_seen.get(region, seen) < we:
                regions.add(region)
        aggs = self.aggs
        for region in sorted(regions):
            by_reason = late.get(region, {})
            snap: Snapshot = {
                "region": region,
                "window_start": ws,
                "window_end": we,
                "count": counts.get(region, 0),
                "late": sum(by_reason.values()),
                "late_by_reason": {r: by_reason.get(r, 0) for r in LATE_REASONS},
                "emitted_at": now_ms,
            }
            if aggs is not None:
                snap.update(aggs.result(ws, region))  # type: ignore[typeddict-item]
            self.outbox.append(snap)
        if aggs is not None:
            aggs.close(ws)
        # forget regions idle for longer than the horizon
        for region in [r for r, seen in self.last_seen.items() if seen < horizon]:
            del self.last_seen[region]
            self.first_seen.pop(region, None)

    def take_tally(self) -> dict[str, int]:
        """Events counted per region since the last call (for metrics)."""
        t, self.tally = self.tally, {}
        return t

    # ---------------------------------------------------------------- outbox
    def published(self, n: int) -> None:
        """The first ``n`` snapshots of the outbox are published."""
        if n:
            del self.outbox[:n]
            self.dirty = True

    # ----------------------------------------------------------- accounting
    def open_total(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for per_window in self.counts.values():
            for region, n in per_window.items():
                out[region] = out.get(region, 0) + n
        return out

    # ---------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "v": STATE_FORMAT,
            "next_offset": self.next_offset,
            "stream_time": self.stream_time,
            "first_open": self.first_open,
            "counts": {str(k): v for k, v in self.counts.items()},
            "late": {str(k): v for k, v in self.late.items()},
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "outbox": self.outbox,
            **({"pending_late": self.pending_late} if self.pending_late else {}),
            **({"partitions": self.partitions} if self.partitions else {}),
            **({"forwarded": {str(k): v for k, v in self.forwarded.items()}} if self.forwarded else {}),
            **({"forwarded_epochs": {str(k): v for k, v in self.forwarded_epochs.items()}}
               if self.forwarded_epochs else {}),
            **({"repart_next": self.repart_next} if self.repart_next else {}),
            **({"log_epoch": self.log_epoch} if self.log_epoch else {}),
        }

    def load(self, d: dict[str, Any]) -> None:
        """The state ``to_dict`` wrote.  One whose first open window is not on a boundary of
        this book's window length was made under another (``AGG_WINDOW_SECONDS`` changed;
        worker.partitions refuses one that still holds open data): its first open window moves
        up to the next boundary, so no window of this length overlaps one of the other length
        closed before it (every one of those ends at or before the stored first open window).
        Events before it are then ``closed_window`` late, in that first window (``_add_late``)."""
        self.next_offset = int(d["next_offset"])
        self.stream_time = int(d["stream_time"])
        self.first_open = int(d["first_open"])
        if self.first_open >= 0 and self.first_open % self.window_ms:
            self.first_open += self.window_ms - self.first_open % self.window_ms
        self.close_at = (self.first_open + self.window_ms + self.grace_ms
                         if self.first_open >= 0 else -1)
        self.counts = {int(k): dict(v) for k, v in d["counts"].items()}
        self.late = {int(k): {r: dict(x) for r, x in v.items()} for k, v in d["late"].items()}
        self.first_seen = dict(d["first_seen"])
        self.last_seen = dict(d["last_seen"])
        self.outbox = list(d["outbox"])
        self.pending_late = {r: dict(x) for r, x in d.get("pending_late", {}).items()}
        self.partitions = int(d.get("partitions", 0))
        self.forwarded = {int(k): int(v) for k, v in d.get("forwarded", {}).items()}
        self.forwarded_epochs = {int(k): int(v) for k, v in d.get("forwarded_epochs", {}).items()}
        self.repart_next = int(d.get("repart_next", 0))
        self.log_epoch = int(d.get("log_epoch", 0))
        self.dirty = False

    def holds_open_data(self) -> bool:
        """Counts or late events of windows not closed yet (a change of home would split them)."""
        return bool(self.counts or self.late or self.pending_late)


def _end_run(run: dict[str, int], staged_w: dict[str, Staged], per_window: dict[str, int],
             tally: dict[str, int]) -> None:
    """The run of events of one window (``WindowBook.apply``) into its counts and the tally:
    ``run`` (aggregates off) and the runs kept in the window's staged cells (aggregates on);
    both emptied."""
    for region, staged in staged_w.items():
        if staged.run:
            run[region] = run.get(region, 0) + staged.run
            staged.run = 0
    for region, n in run.items():
        per_window[region] = per_window.get(region, 0) + n
        tally[region] = tally.get(region, 0) + n
    run.clear()
