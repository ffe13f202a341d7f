"""When a partition's stream time may follow the wall clock (docs/contract.md §1).  Pure.

A quiet, caught-up partition's stream time follows the wall clock minus a slack
(records still in flight), up to when its last answered fetch was sent, so its windows
close about grace + slack + one tick after their end instead of waiting for its next
record.  A partition that receives records
keeps pure stream time; nothing advances while the consumer is not fetching
(backpressure, rebalance): the end offset it knows is stale then.
"""
from __future__ import annotations

ADVANCE_SLACK_MS = 300  # wall clock minus this: records produced just before may still be in flight
ADVANCE_IDLE_MS = 300  # no record for this long: the partition is quiet
CAUGHT_UP_IDLE_MS = 1000  # end offset unknown: no record for this long counts as caught up


def advance_target(now_ms: int, last_record_ms: int | None, highwater: int | None, seen_ms: int | None,
                   read_to: int, fetching: bool) -> int | None:
    """The stream time to advance the partition to, or None to leave it.

    ``last_record_ms``: wall time of its last fetched batch (None: none since assignment);
    ``highwater``: its end offset as of the last fetch answered (None: not known yet);
    ``seen_ms``: when that fetch was sent (None: none answered yet);
    ``read_to``: where the partition stands as read (``FaustApp.read_to``): the consumer's
    position, once its state has applied every record the consumer handed over, else the
    first offset its state has not applied.  Not the state's offset alone: a transaction's
    commit or abort marker takes an offset no record is applied at, and a log that ends in
    one would never count as caught up (its last window waiting for the next record).
    Records of a transaction still open are past the last stable offset, where a read
    committed consumer stops: the partition is not caught up until it ends.

    The end offset holds what was appended before the fetch was sent, no later: the
    stream time follows the wall clock only up to then.  A worker that stood still (a
    stopped process, a paused VM) has an end offset as old as the stop, and the records
    written meanwhile are still to be read into their windows."""
    if not fetching:
        return None
    quiet = last_record_ms is None or now_ms - last_record_ms >= ADVANCE_IDLE_MS
    if not quiet:
        return None
    if highwater is not None:
        # an end below the state's offset is a log that started over (or truncated) before the
        # worker has noticed: its new records are yet to be read, so the clock must wait
        caught_up = highwater == read_to
    else:
        caught_up = last_record_ms is not None and now_ms - last_record_ms >= CAUGHT_UP_IDLE_MS
    if not caught_up:
        return None
    return (now_ms if seen_ms is None else min(now_ms, seen_ms)) - ADVANCE_SLACK_MS


SKEW_SPAN_MS = 30_000  # the least lag of live batches is taken per span of this length
SKEW_SPANS = 4  # ... over the last this many spans


class ClockSkew:
    """How far this worker's clock runs ahead of the time its records were stamped with
    (ingest's clock, or the broker's), seen from *live* batches: a batch that reaches the
    end of its partition, whose batch before did too, was written just before it was
    fetched, so the wall clock minus its newest stamp is the write-to-fetch latency -- or,
    when that stays over the tolerance (``AGG_MAX_AHEAD_SECONDS``), a clock ahead.  (The
    first batch a worker reads of a partition may be its tail written long ago: not live.)
    A quiet partition's stream time follows the wall clock (``advance_target``); a clock
    an hour ahead would close sixty windows early and make every event after it late.
    Taken off the wall clock there, the lead keeps windows on the records' time.

    The lead is the least lag of the live batches of the last SKEW_SPANS spans, taken
    once two spans saw one (one batch of old stamps is not a clock ahead), dropped at once
    when a fresh record shows the clocks agree, and otherwise kept while nothing is read
    (a lead dropped too early would close quiet windows early: late events; one kept too
    long only holds them open until the next record).

    A clock *behind* shows the other way: events stamped more than the tolerance after
    this clock's now, which the decoder sets aside as ``future_ts`` (every one of them, once
    the clock is that far behind: windows then count nothing).  ``stamped`` judges each
    batch as the decoder does, by its events' ingest times (not the broker's stamp: a
    leader's clock ahead makes no event ``future_ts``): a batch with a ``future_ts`` event
    (of any age: old records are never stamped in the future) is over the tolerance.  The
    clock is behind from the second such batch in a row (one odd producer's clock is not
    this worker's), by the latest one's lead, until a live batch is stamped within it.  A
    batch behind its partition's end within the tolerance neither ends the run nor
    breaks it: old records always look within it, and a partition replaying a backlog
    beside live ones (after a rebalance) would hide the clock behind.  Nor does it last
    while nothing over the tolerance is read: ``expire`` ends it SKEW_SPAN_MS after the
    last batch over it (no event is ``future_ts`` meanwhile), asked every tick, so that a
    worker whose clock was set right is ready again without waiting for a record."""

    __slots__ = ("tolerance_ms", "spans", "ahead_ms", "behind_ms", "over", "over_ms")

    def __init__(self, tolerance_ms: int) -> None:
        self.tolerance_ms = tolerance_ms
        self.spans: dict[int, int] = {}  # span (wall time // SKEW_SPAN_MS) -> least lag seen in it
        self.ahead_ms = 0  # taken off the wall clock: 0, or the lead over the tolerance
        self.behind_ms = 0  # 0, or how far the records' stamps run ahead of this clock (over the tolerance)
        self.over = 0  # batches in a row stamped over the tolerance ahead of this clock
        self.over_ms = 0  # when the last such batch was read

    def batch(self, now_ms: int, end_ts: int | None, last_its: int | None) -> bool:
        """A live batch (its last record's broker timestamp ``end_ts``, its last event's
        ingest time ``last_its``) fetched at ``now_ms``.  True when that changed whether
        the clock is ahead."""
        stamped = -1 if end_ts is None else end_ts
        if last_its is not None and last_its > stamped:
            stamped = last_its
        if stamped <= 0:
            return False
        was = self.ahead_ms > 0
        self.observe(now_ms, stamped)
        return (self.ahead_ms > 0) != was

    def stamped(self, now_ms: int, newest_its: int | None, live: bool) -> bool:
        """A batch read at ``now_ms``, the newest ingest time of its events ``newest_its``
        (None: no event of its own), ``live``: as ``batch``'s.  True when that changed
        whether this clock is behind (``behind_ms``)."""
        if newest_its is None or newest_its <= 0:
            return False
        lead = newest_its - now_ms
        was = self.behind_ms > 0
        if lead > self.tolerance_ms:  # as the decoder's ``future_ts``: ingest time past now + tolerance
            self.over, self.over_ms = self.over + 1, now_ms
            if self.over >= 2:
                self.behind_ms = lead
        elif live:
            self.over = self.behind_ms = 0
        return (self.behind_ms > 0) != was

    def expire(self, now_ms: int) -> bool:
        """The clock behind ends SKEW_SPAN_MS after the last batch over the tolerance
        (asked every tick: with no batch at all as well).  True when it ended now."""
        if self.behind_ms and now_ms - self.over_ms >= SKEW_SPAN_MS:
            self.behind_ms = 0
            return True
        return False

    def behind(self) -> str | None:
        """Why the worker cannot count (/readyz) while its clock is behind; None: it is not."""
        if not self.behind_ms:
            return None
        return (f"this worker's clock is {self.behind_ms / 1000:.1f} s behind the records' stamps (over "
                f"AGG_MAX_AHEAD_SECONDS; or the clocks that stamp them ahead): their events are set aside as "
                f"future_ts; set the clock right (NTP)")

    def observe(self, now_ms: int, stamped_ms: int) -> None:
        lag = now_ms - stamped_ms
        span = now_ms // SKEW_SPAN_MS
        spans = self.spans
        for old in [s for s in spans if not span - SKEW_SPANS < s <= span]:  # (or the clock went back)
            del spans[old]
        if span not in spans or lag < spans[span]:
            spans[span] = lag
        lead = min(spans.values())
        if lead <= self.tolerance_ms:
            self.ahead_ms = 0
        elif len(spans) >= 2:
            self.ahead_ms = lead


class RebalanceWatch:
    """How long the consumer group's rebalance (with the changelog recovery Faust runs
    before it resumes the streams) has lasted on this worker, when to say so again, and
    whether it has stalled.

    Faust's recovery can stall after back-to-back rebalances (faust-streaming issues #21,
    #74): the worker then keeps its partitions, heartbeats and counts nothing.  It is not
    ready all that time (``/readyz``); this makes it also loud: a gauge of the seconds,
    and a warning with Faust's recovery state every ``warn_s`` while it lasts.  A long
    rebalance that moves (a new generation, changelog records recovered) is not a stall:
    ``stalled`` counts from the last change of ``observe``'s ``progress`` marker, so that
    ``/healthz`` can fail only a worker that has been stuck for ``stall_s``."""

    __slots__ = ("since", "warned", "warn_s", "stall_s", "marker", "moved", "stall_said")

    def __init__(self, warn_s: float, stall_s: float = 0.0) -> None:
        self.warn_s = warn_s
        self.stall_s = stall_s  # 0: never a stall
        self.since: float | None = None  # monotonic time the current rebalance was first seen
        self.warned = 0.0
        self.marker: object = None  # the last progress marker seen in this rebalance
        self.moved = 0.0  # when it last changed (or the rebalance began)
        self.stall_said = False  # this rebalance's stall has been told (``first_stall_report``)

    def lasted(self, now: float) -> float | None:
        """Seconds the current rebalance has lasted (None: none seen)."""
        return None if self.since is None else now - self.since

    def stalled(self, now: float) -> float | None:
        """Seconds the current rebalance has gone without progress, when that is ``stall_s``
        or more (else None)."""
        if self.since is None or not self.stall_s or now - self.moved < self.stall_s:
            return None
        return now - self.moved

    def first_stall_report(self) -> bool:
        """True the first time it is asked in a rebalance (a stall is logged once)."""
        said, self.stall_said = self.stall_said, True
        return not said

    def track(self, rebalancing: bool, now: float, progress: object = None) -> None:
        """Whether a rebalance runs now, and ``progress``: a marker of its progress (any
        change counts as progress)."""
        if not rebalancing:
            self.since = None
        elif self.since is None:
            self.since = self.warned = self.moved = now
            self.marker, self.stall_said = progress, False
        elif progress != self.marker:
            self.marker, self.moved = progress, now

    def observe(self, rebalancing: bool, now: float, progress: object = None) -> tuple[float, bool]:
        """``track``, then -> (seconds the rebalance has lasted, 0 when none; True: warn now)."""
        self.track(rebalancing, now, progress)
        if self.since is None:
            return 0.0, False
        if now - self.warned >= self.warn_s:
            self.warned = now
            return now - self.since, True
        return now - self.since, False
