"""The worker: batches of ``clicks`` records -> window books -> state changelog -> snapshots.

Composes the parts, each owning its state, around the Faust app (``faust_app``:
consumer group, changelog-backed table, recovery, offset commits):

* ``consumer.BatchConsumer`` hands each fetched batch of ``clicks`` to ``on_batch``
  (with tracing on, inside a span linked to the request spans of its records);
* ``decoder.RecordDecoder`` turns records into events (dead letters aside), and sets aside
  those whose region's home is another partition, forwarded through ``clicks-repartition``;
* ``throttle.Throttle`` spills what is over a region's rate and drains it back;
* ``partitions.Partitions`` holds each owned partition's book, spill and lag;
* ``clock.advance_target`` lets a quiet, caught-up partition's stream time follow the clock;
* ``checkpoint.Checkpointer`` writes state, confirms it, marks offsets safe, publishes.

Per owned partition, the whole state (window book, spill ledger, next source offset) is
written to the table ``window-state`` (core.statechunks).  After a crash it is recovered,
records before the book's ``next_offset`` are skipped, and the outbox is published again,
identical; a log that started over is counted from its start (``core.sourcelog``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import cast

from faust.types import TP

from aggregator import tracing
from aggregator.config import Settings
from aggregator.core.contract import FUTURE_TS, BookEvent
from aggregator.core.ratelimit import RateLimits
from aggregator.core.regioncap import RegionCap
from aggregator.core.repartition import Foreign, forward_record, home
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer, SnapshotSink
from aggregator.worker.clock import ClockSkew, RebalanceWatch, advance_target
from aggregator.worker.decoder import Record, RecordDecoder
from aggregator.worker.faust_app import FaustApp
from aggregator.worker.partitions import BookSettings, Partitions, PartitionState, Refused, SpillDiskError
from aggregator.worker.sourcecheck import forwarded_gap, log_end, positioned, reread_due, vet_batch
from aggregator.worker.throttle import HeldBatch, Throttle, rebuild_replay, skip_applied

REREAD_TRIES = 4  # batches sent back before a re-read of a damaged spill starts where the source does

log = logging.getLogger("aggregator.worker")


def _said_behind(skew: ClockSkew, changed: bool) -> None:
    """One line when whether this worker's clock is behind the records' stamps changed."""
    if changed and skew.behind_ms:
        log.error("%s; windows count nothing meanwhile", skew.behind())
    elif changed:
        log.warning("this worker's clock is no longer behind the records' stamps")


class WorkerService:
    def __init__(self, settings: Settings, metrics: Metrics, sinks: Sequence[SnapshotSink]) -> None:
        self.s = settings
        self.metrics = metrics
        self.kafka = kafka = FaustApp(settings)
        self.app = app = kafka.app
        self.clicks_topic, self.repart_topic = kafka.topics.clicks, kafka.topics.clicks_repartition  # prefixed
        # the region cap holds over all partitions of this worker (core.regioncap)
        self.region_cap = RegionCap(settings.max_regions, settings.idle_ms)
        self.decoder = RecordDecoder(settings.partitions, self.region_cap, settings.aggregates,
                                     settings.url_keep_query)
        self.throttle = Throttle(RateLimits(settings.rate_limit, settings.rate_limits), settings.spill_max_bytes,
                                 metrics)
        books = BookSettings(settings.window_ms, settings.grace_ms, settings.late_after_ms, settings.idle_ms,
                             settings.max_regions, settings.partitions, settings.dedup_ms, settings.dedup_max_ids,
                             settings.sketch_params() if settings.aggregates else None, settings.top_urls)
        self.partitions = Partitions(books, settings.spill_path, kafka.stored_state, metrics, kafka.stored_record)
        self.checkpointer = Checkpointer(lambda: app.producer, kafka.state_confirmed, self._mark_safe, metrics, sinks,
                                         kafka.mark_safe_forwarded, kafka.not_member, kafka.topics)
        self.max_ahead_ms = settings.max_ahead_ms
        self.clock_skew = ClockSkew(settings.max_ahead_ms)  # this clock against the records' stamps
        self.wake = asyncio.Event()  # set when snapshots wait to be published
        # a rebalance that lasts: a gauge, and a warning every so often (5 session timeouts, >= 30 s)
        self.rebalance = RebalanceWatch(max(30.0, 5 * settings.session_timeout), settings.stuck_rebalance_seconds)
        self.started = False
        # tracing on: a consumer span per batch, linked to the request spans of its records
        kafka.wire(tracing.TracedBatches(self.on_batch), self._holding, self._ticks, self._on_revoked, self._on_assigned)

    # ------------------------------------------------------------ readiness
    def _both(self, partition: int) -> tuple[TP, TP]:  # Faust's type: its resume needs it
        return TP(self.clicks_topic, partition), TP(self.repart_topic, partition)

    def not_ready(self, refusals: bool = True) -> str | None:
        """Why the worker cannot count yet (None: it can); ``refusals`` False: but for partitions
        refused or waiting for the spill disk (the others can be opened)."""
        if (refused := self.kafka.refused()) is not None:  # (before the start: it never comes then)
            return refused
        if not self.started:
            return "starting"
        if not self.kafka.recovered():
            return "recovering window state from the changelog"
        if self.app.rebalancing:
            lasted = self.rebalance.lasted(time.monotonic())
            return "consumer group rebalancing" + ("" if lasted is None else f" for {lasted:.0f} s")
        if not refusals:
            return self.checkpointer.failing
        return (self.checkpointer.failing or self.throttle.disk_error or self.partitions.refusal()
                or self.clock_skew.behind())

    def not_alive(self) -> str | None:
        """Why the worker should be restarted (None: it should not): a rebalance that has
        made no progress for AGG_STUCK_REBALANCE_SECONDS (faust-streaming #21, #74)."""
        if (refused := self.kafka.refused()) is not None:  # aiokafka waits for good: a restart, once granted
            return refused
        now = time.monotonic()
        self.rebalance.track(*self._rebalance_state(now))  # here too: the ticks begin after the first assignment
        stalled = self.rebalance.stalled(now)
        if stalled is None:
            return None
        reason = (f"{'starting' if not self.started else 'consumer group rebalance'} without progress for "
                  f"{stalled:.0f} s (AGG_STUCK_REBALANCE_SECONDS): restart this worker")
        if self.rebalance.first_stall_report():  # once a stall: what Faust's side was then
            log.warning("/healthz: %s; %s", reason, self.kafka.recovery_state())
        return reason

    def _rebalance_state(self, now: float) -> tuple[bool, float, object]:
        """What ``RebalanceWatch`` is fed: whether the worker counts nothing because the group
        is (re)balancing or has not assigned partitions yet, the time, and Faust's progress."""
        joining = not self.started or bool(self.app.rebalancing)
        return joining, now, self.kafka.recovery_progress() if joining else None

    def ready(self) -> bool:
        return self.not_ready() is None

    # -------------------------------------------------------------- hot path
    def on_batch(self, tp: TP, records: Sequence[Record]) -> int | None:
        """One call per fetched batch of one partition; no await, no logging per record.
        Returns an offset to fetch the partition again from, the batch not counted (a check
        of its log, core.sourcelog), or None."""
        t0 = time.perf_counter()
        partition = tp.partition
        p = self.partitions.get(partition)
        if p is None:
            if partition not in self.kafka.assigned():
                return None  # fetched before a rebalance moved it: the new owner reads it
            p = self._open(partition)
            if p is None:  # its stored state is refused, or its spill disk: not fetched here, /readyz says why
                self.app.consumer.pause_partitions(self._both(partition))
                return records[0].offset
        now_ms = int(time.time() * 1000)
        if tp.topic == self.repart_topic:
            if self.throttle.held_here(p):  # applied after the held batches of clicks, as without the hold
                self.app.consumer.pause_partitions([TP(self.repart_topic, partition)])
                return records[0].offset  # fetched again once they are applied
            self._on_forwarded(p, records, now_ms)
            return None
        quiet_since = p.last_record_ms
        book, spill = p.book, p.spill
        last = records[-1].offset
        first = records[0]
        back = spill.rebuild_from
        if back is not None:  # spilled records found missing while draining: re-read from ``back``
            if first.offset > back and spill.rebuild_tries < REREAD_TRIES:
                spill.rebuild_tries += 1
                return back  # fetched before the seek back: not counted here
            spill.rebuild_from = None  # the re-read (or the source starts later: what is gone is lost)
        start, again = vet_batch(p, records, now_ms, self.kafka, self.metrics)
        if again is not None:
            return again
        if spill.ledger.rebuild and records[0].offset >= start:
            spill.rebuild_flush(done=True)  # the source starts past the lost spill: nothing to re-read
        if records[0].offset < start:
            # already applied (counted or spilled) before a crash: never count twice
            if spill.ledger.rebuild:
                rebuild_replay(p, self.decoder, records, start, now_ms, now_ms + self.max_ahead_ms)
            records = skip_applied(records, start)
            if not records:
                return None
        throttle = self.throttle
        foreign: list[Foreign] | None = [] if self.decoder.partitions > 1 else None
        events, offsets, rejected, future, ids, aggs = self.decoder.decode(
            records, now_ms, partition, throttle.limiting, self.checkpointer.dead, now_ms + self.max_ahead_ms,
            foreign)
        if foreign:
            self._forward(partition, foreign, book.log_epoch)
            if not events and not rejected and not future:
                p.last_record_ms = quiet_since  # nothing of its own: still quiet (its clock may follow)
        t1 = time.perf_counter()
        self.metrics.batch_decoded(len(records), rejected, t1 - t0)
        held = HeldBatch(events, offsets, future, last + 1, ids, aggs, end_ts=records[-1].timestamp)
        if not throttle.held_here(p) and self._count(p, held, now_ms):
            self._watch_clock(p, held, now_ms)
            return None
        # the spill disk refused its write: nothing of it is applied; fetch no more of this
        # partition and offer it again every tick, behind any batch held before (contract §6);
        # nor what is forwarded to it: applied now, it would move stream time past the held batch
        keys = self._both(partition)
        if throttle.hold_batch(p, keys, held):
            self.app.consumer.pause_partitions(keys)
        return None

    def _count(self, p: PartitionState, b: HeldBatch, now_ms: int) -> bool:
        """Apply a decoded batch to the book (spilling what is over its rate); False:
        the spill disk refused, nothing of it was applied."""
        throttle, book = self.throttle, p.book
        events, offsets, aggs, remembered, dups = b.events, b.offsets, b.aggs, 0, None
        if b.ids is not None and p.dedup.horizon_ms:
            # repeats never reach a window, the late bucket or the spill (core.dedup)
            before = len(p.dedup.pending)
            events, kept_offsets, dups, aggs = p.dedup.filter(events, b.ids, offsets if throttle.limiting else None,
                                                               aggs)
            offsets = kept_offsets or []
            remembered = len(p.dedup.pending) - before
        batch: Sequence[BookEvent] = events
        n_window = len(events)
        if throttle.limiting and events:
            limited = throttle.limit(p, events, offsets, self.partitions, aggs)
            if limited is None:
                p.dedup.undo(remembered)  # offered again later, whole
                return False  # its repeats are counted when it is applied, once
            batch, n_window = limited
        if dups:
            self.metrics.duplicates(dups)
        t2 = time.perf_counter()
        book.apply(batch, b.end, now_ms, aggs)  # spilled events (markers) are not aggregated: core.aggstate
        p.source_ts = b.end_ts
        if b.future:
            self._add_future(p, b.future, now_ms)
        if book.outbox:
            self.wake.set()
        self.metrics.batch_windowed(n_window, time.perf_counter() - t2)
        return True

    def _watch_clock(self, p: PartitionState, b: HeldBatch, now_ms: int) -> None:
        """Is this worker's clock ahead of what it reads, or behind (``ClockSkew``)?  Said when that changes."""
        hw = self.kafka.highwater(p.partition)
        live, p.clock_live = p.clock_live, hw is not None and self.kafka.read_to(p.partition, b.end) >= hw
        skew, its = self.clock_skew, b.events[-1][1] if b.events else None
        # behind: judged as ``future_ts`` is, by the events' ingest times, not the broker's stamp
        _said_behind(skew, skew.stamped(now_ms, getattr(b.future, "newest", 0) or its, live and p.clock_live))
        if live and p.clock_live and skew.batch(now_ms, b.end_ts, its):
            if skew.ahead_ms:
                log.error("this worker's clock is %.1f s ahead of the records it reads at the end of their partitions "
                          "(over AGG_MAX_AHEAD_SECONDS=%.1f): quiet partitions' windows now close by the records' "
                          "time; set the clock right (NTP)", skew.ahead_ms / 1000, self.max_ahead_ms / 1000)
            else:
                log.warning("this worker's clock agrees with the records' stamps again")

    def _add_future(self, p: PartitionState, future: dict[str, int], now_ms: int) -> None:
        """A batch's ``future_ts`` events into the late bucket, their repeats left out (an
        event id or a retried request's key, core.dedup): a repeat is counted nowhere."""
        ids = getattr(future, "ids", None)
        if ids and p.dedup.horizon_ms:
            future, dups = p.dedup.filter_late(future, ids, now_ms)
            if dups:
                self.metrics.duplicates(dups)
        if future:
            p.book.add_late(future, FUTURE_TS)

    def _mark_safe(self, partition: int, offset: int) -> None:
        """The checkpoint's word that ``offset`` may be committed, unless the partition's log is
        not checked yet or started over since the state was taken (``sourcecheck.check_source``)."""
        p = self.partitions.get(partition)
        if p is None or p.commit_ok:
            self.kafka.mark_safe(partition, offset)

    def _retry_held(self, parts: Sequence[PartitionState], now_ms: int) -> None:
        """Offer the batches held for the spill disk again, oldest first; resume fetching a
        partition once all of its batches are applied."""
        throttle = self.throttle
        for p in parts:
            h = throttle.held.get(p.partition)
            if h is None or h.p is not p or p.spill.ledger.rebuild:
                continue  # (a rebuild under way: its re-spilled records come first)
            while h.batches and self._count(p, h.batches[0], now_ms):
                h.batches.popleft()
            if not h.batches:
                throttle.release(p.partition)
                self.app.consumer.resume_partitions(cast(tuple[TP, ...], h.keys))

    def _forward(self, partition: int, foreign: Sequence[Foreign], epoch: int) -> None:
        """Queue foreign events for their home partitions, with the log epoch of the source
        partition; the next checkpoint sends them before the state that covers their offsets
        (core.repartition)."""
        homes = self.decoder.homes
        n = self.decoder.partitions
        out = self.checkpointer.forward
        for f in foreign:
            h = homes.get(f[0])
            out.append((home(f[0], n) if h is None else h, *forward_record(partition, f, epoch)))
        self.metrics.repartitioned(len(foreign))

    def _on_forwarded(self, p: PartitionState, records: Sequence[Record], now_ms: int) -> None:
        """A batch of ``clicks-repartition``: events other partitions forwarded to this one,
        counted like its own (not rate-limited: the spill accounting is by offset of
        ``clicks``).  What was applied before is dropped by its source's (log epoch, offset)
        mark, not by this topic's offset: records before the book's ``repart_next`` are
        repeats after a crash (the mark covers them), unless this topic itself started over
        (the broker back empty), and then they are new."""
        book = p.book
        p.last_record_ms = now_ms
        forwarded_gap(p, records[0].offset, self.kafka, self.metrics)  # offsets lost to retention or a reset
        (events, _, rejected, future, ids, aggs), repeats = self.decoder.decode_forwarded(
            records, p.partition, book.forwarded, self.checkpointer.dead, now_ms + self.max_ahead_ms,
            book.forwarded_epochs)
        t1 = time.perf_counter()
        if rejected:  # by reason; not in stage "decode", which counts the records read from clicks
            self.metrics.rejected(rejected)
        if repeats:  # after a source's crash or refused forwards: one line per batch
            log.info("partition %d: %d forwarded records dropped as repeats (their source offsets applied "
                     "before)", p.partition, repeats)
        if ids is not None and p.dedup.horizon_ms:
            events, _, dups, aggs = p.dedup.filter(events, ids, None, aggs)
            if dups:
                self.metrics.duplicates(dups)
        book.apply(events, book.next_offset, now_ms, aggs)
        book.repart_next = records[-1].offset + 1
        if future:
            self._add_future(p, future, now_ms)
            skew = self.clock_skew  # forwarded events ahead count as well (judged here, at their home)
            _said_behind(skew, skew.stamped(now_ms, getattr(future, "newest", 0) or None, False))
        if book.outbox:
            self.wake.set()
        self.metrics.batch_windowed(len(events), time.perf_counter() - t1)

    # ------------------------------------------------------ state + publish
    async def tick(self, only: Sequence[int] | None = None) -> None:
        """Drain spills, advance quiet partitions' clocks, then checkpoint: every owned
        partition, or ``only`` these (a revoke)."""
        now_ms = int(time.time() * 1000)
        partitions = self.partitions
        if only is None:
            self._sync_assignment()
        fetching = not self._holding() and not self.app.rebalancing
        parts = [p for p in partitions if only is None or p.partition in only]
        if self.throttle.held:
            self._retry_held(parts, now_ms)
        for p in parts:
            p.commit_ok = p.source_checked  # the states written below are taken after any restart seen
            self.throttle.drain(p, now_ms)
            if p.spill.rebuild_from is not None and not p.spill.rebuild_tries:
                p.spill.rebuild_tries = 1  # then on_batch sends back what was fetched before it
                await self.kafka.seek(p.partition, p.spill.rebuild_from)
            book = p.book
            if book.tally:
                tally = book.take_tally()
                self.region_cap.touch(tally, now_ms)  # regions with events keep their place
                self.metrics.counted(tally)
            # read once: the consumer's thread moves the position meanwhile (past a transaction's
            # marker after its last record)
            read = self.kafka.read_to(p.partition, book.next_offset)
            hw, seen_ms = log_end(p, read, self.kafka, self.metrics)
            moving = fetching and not self.throttle.held_here(p)
            target = advance_target(now_ms, p.last_record_ms, hw, seen_ms, read, moving and positioned(p, self.kafka))
            if target is not None:
                book.advance_to(target - self.clock_skew.ahead_ms)
            if moving and reread_due(p, now_ms, hw, read, self.kafka):
                await self.kafka.seek(p.partition, p.reread(now_ms))
        self.throttle.report(partitions, self.checkpointer.held() is not None)  # as of the last checkpoint
        _said_behind(self.clock_skew, self.clock_skew.expire(now_ms))  # a span with no batch over the tolerance
        self.metrics.clock_ahead(self.clock_skew.ahead_ms, self.clock_skew.behind_ms)
        partitions.report()
        await self.checkpointer.checkpoint(parts, only is None)

    async def _on_assigned(self, app: object, assigned: set[TP], **kwargs: object) -> None:
        """The group's assignment reached this worker: the spills left here of partitions it
        does not give back may go at the next tick (spill.tidy.LeftSpills), not before."""
        self.partitions.left.received({tp.partition for tp in assigned if tp.topic == self.clicks_topic})

    def _sync_assignment(self) -> None:
        try:
            owned = self.kafka.assigned()
        except Exception:  # noqa: BLE001 - unknown: keep everything
            return
        self.partitions.keep_only(owned)
        for partition in list(self.throttle.unopened):  # the spill disk refused to open them: again
            if partition not in owned:
                self.throttle.opened(partition)  # revoked: its next owner opens it
            elif self._open(partition) is not None:
                self.app.consumer.resume_partitions(self._both(partition))
        if self.not_ready(refusals=False) is None:
            # the state of assigned partitions that have no new record (after a restart with
            # nothing new to read, their open windows must still close and publish)
            for partition in owned:
                if partition not in self.partitions and partition not in self.partitions.refused:
                    self._open(partition)

    def _open(self, partition: int) -> PartitionState | None:
        """The partition's state (its book's regions keep their places in the cap); None: refused,
        or its spill could not be opened (and is not due to be tried again yet)."""
        if not self.throttle.open_due(partition):
            return None
        try:
            p = self.partitions.open(partition)
        except Refused:
            return None
        except SpillDiskError as e:  # nothing of it kept: opened again every tick (contract §6)
            self.throttle.open_failed(partition, e)
            return None
        self.throttle.opened(partition)
        self.region_cap.hold(p.book.last_seen, int(time.time() * 1000))
        return p

    def _holding(self) -> bool:
        """Whether the consumer fetches nothing: the spill is over its bound, or the broker
        refuses the checkpoint's writes (state, forwards, dead letters or snapshots: what a
        fetch adds would only pile up in memory until they are acknowledged again) or holds them."""
        return (self.throttle.hold or self.checkpointer.held() is not None) and not self.app.rebalancing

    async def _on_revoked(self, app: object, revoked: set[TP], **kwargs: object) -> None:
        self.metrics.rebalanced()
        parts = [tp.partition for tp in revoked if tp.topic == self.clicks_topic]
        if not parts:
            return
        try:
            async with self.checkpointer.lock:
                await self.tick(parts)
        except Exception:  # logged with its traceback
            log.exception("checkpoint on revoke failed; the next owner replays from the last state")
        for partition in parts:
            self.partitions.forget(partition)

    async def _ticks(self) -> None:
        self.started = True
        interval = self.s.state_flush_seconds
        while True:
            try:  # a tick, or at once when a batch closed windows (snapshot delay)
                await asyncio.wait_for(self.wake.wait(), interval)
            except TimeoutError:
                pass
            self.wake.clear()
            rebalancing, now, progress = self._rebalance_state(time.monotonic())  # started: the group's state
            lasted, warn = self.rebalance.observe(rebalancing, now, progress)
            self.metrics.rebalancing_for(lasted)
            if warn:
                log.warning("consumer group rebalancing for %.0f s, counting nothing: %s", lasted,
                            self.kafka.recovery_state())
            if rebalancing:
                continue
            try:
                async with self.checkpointer.lock:
                    await self.tick()
            except Exception:  # retried on the next tick
                log.exception("state flush failed; will retry")
