"""The worker: batches of ``clicks`` records -> window books -> state changelog -> snapshots.

Composes the parts, each owning its state, around a Faust app (consumer group,
changelog-backed table, recovery, offset commits):

* ``consumer.BatchConsumer`` hands each fetched batch of ``clicks`` to ``on_batch``;
* ``decoder.RecordDecoder`` turns records into events (dead letters aside);
* ``throttle.Throttle`` spills what is over a region's rate and drains it back;
* ``partitions.Partitions`` holds each owned partition's book, spill and lag;
* ``clock.advance_target`` lets a quiet, caught-up partition's stream time follow the clock;
* ``checkpoint.Checkpointer`` writes state, confirms it, marks offsets safe, publishes.

Per owned partition, the whole state (window book, spill ledger, next source offset)
is one record of the table ``window-state`` (key = partition number).  After a crash
it is recovered from the changelog, records before the book's ``next_offset`` are
skipped, and the outbox is published again with identical content.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust

from aggregator.config import Settings
from aggregator.core.contract import CLICKS
from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer, SnapshotSink
from aggregator.worker.clock import advance_target
from aggregator.worker.consumer import BatchConsumer, BatchTransport
from aggregator.worker.decoder import Record, RecordDecoder
from aggregator.worker.partitions import BookSettings, Partitions
from aggregator.worker.throttle import Throttle, rebuild_replay, skip_applied

log = logging.getLogger("aggregator.worker")
STATE_TABLE = "window-state"


class _App(faust.App):
    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)


def faust_app(s: Settings) -> faust.App:
    return _App(
        "clickstream-aggregator", broker=s.faust_broker(), datadir=str(s.data_dir) + "/faust",
        topic_partitions=s.partitions, topic_replication_factor=1, table_cleanup_interval=3600,
        web_enabled=False, broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=max(0.5, s.session_timeout / 4), broker_commit_interval=s.state_flush_seconds,
        consumer_auto_offset_reset="earliest", consumer_max_fetch_size=4 * 1024 * 1024, stream_wait_empty=False,
        producer_acks=-1, logging_config=None, key_serializer="raw", value_serializer="raw")


class WorkerService:
    def __init__(self, settings: Settings, metrics: Metrics, sinks: Sequence[SnapshotSink]) -> None:
        self.s = settings
        self.metrics = metrics
        self.app = app = faust_app(settings)
        self.clicks = app.topic(CLICKS, key_type=bytes, value_type=bytes, partitions=settings.partitions,
                                internal=False)
        self.table = app.Table(STATE_TABLE, partitions=settings.partitions)
        self.decoder = RecordDecoder()
        self.throttle = Throttle(RateLimits(settings.rate_limit, settings.rate_limits), settings.spill_max_bytes,
                                 metrics)
        books = BookSettings(settings.window_ms, settings.grace_ms, settings.late_after_ms, settings.idle_ms,
                             settings.max_regions)
        self.partitions = Partitions(books, settings.spill_path, self._stored_state, metrics)
        self.checkpointer = Checkpointer(lambda: app.producer, self._write_state, self._mark_safe, metrics, sinks)
        self.wake = asyncio.Event()  # set when snapshots wait to be published
        self.started = False
        BatchConsumer.batch_topics = frozenset({CLICKS})
        BatchConsumer.batch_handler = self.on_batch
        BatchConsumer.hold = self._holding

        @app.agent(self.clicks)
        async def _clicks(stream: Any) -> None:  # subscribes the topic; batches bypass it
            async for _ in stream:  # pragma: no cover
                pass

        app.task(self._ticks)
        # Faust calls it with (app, revoked); its signal type declares a bare (sender, *args)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]

    # ------------------------------------------------------------ readiness
    def ready(self) -> bool:
        app = self.app
        try:
            # TableManager has it; the TableManagerT it is declared as does not
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - no recovery yet
            recovered = False
        return self.started and not app.rebalancing and recovered

    # -------------------------------------------------------------- hot path
    def on_batch(self, tp: Any, records: Sequence[Record]) -> None:
        """One call per fetched batch of one partition; no await, no logging per record."""
        t0 = time.perf_counter()
        partition = tp.partition
        p = self.partitions.get(partition)
        if p is None:
            if tp not in self.app.consumer.assignment():
                return  # fetched before a rebalance moved it: the new owner reads it
            p = self.partitions.open(partition)
        now_ms = int(time.time() * 1000)
        p.last_record_ms = now_ms
        book, spill = p.book, p.spill
        start = book.next_offset
        last = records[-1].offset
        if spill.ledger.rebuild and records[0].offset >= start:
            spill.rebuild_flush(done=True)  # the source starts past the lost spill: nothing to re-read
        if records[0].offset < start:
            # already applied (counted or spilled) before a crash: never count twice
            if spill.ledger.rebuild:
                rebuild_replay(p, self.decoder, records, start, now_ms)
            records = skip_applied(records, start)
            if not records:
                return
        throttle = self.throttle
        events, offsets, rejected = self.decoder.decode(records, now_ms, partition, throttle.limiting,
                                                        self.checkpointer.dead)
        t1 = time.perf_counter()
        self.metrics.batch_decoded(len(records), rejected, t1 - t0)
        n_window = len(events)
        if throttle.limiting and events:
            events, n_window = throttle.limit(p, events, offsets, self.partitions)  # type: ignore[assignment]
        t2 = time.perf_counter()
        book.apply(events, last + 1, now_ms)
        if book.outbox:
            self.wake.set()
        self.metrics.batch_windowed(n_window, time.perf_counter() - t2)

    # ------------------------------------------------------ state + publish
    async def tick(self, only: Sequence[int] | None = None) -> None:
        """Drain spills, advance quiet partitions' clocks, then checkpoint: every owned
        partition, or ``only`` these (a revoke)."""
        app = self.app
        now_ms = int(time.time() * 1000)
        partitions = self.partitions
        if only is None:
            self._sync_assignment()
        fetching = not self.throttle.hold and not app.rebalancing
        parts = [p for p in partitions if only is None or p.partition in only]
        for p in parts:
            self.throttle.drain(p, now_ms)
            book = p.book
            if book.tally:
                self.metrics.counted(book.take_tally())
            target = advance_target(now_ms, p.last_record_ms, self._highwater(p.partition, p), book.next_offset,
                                    fetching)
            if target is not None:
                book.advance_to(target)
        self.throttle.report(partitions)
        partitions.report()
        await self.checkpointer.checkpoint(parts)

    def _sync_assignment(self) -> None:
        try:
            owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == CLICKS}
        except Exception:  # noqa: BLE001 - unknown: keep everything
            return
        self.partitions.keep_only(owned)
        if self.ready():
            # the state of assigned partitions that have no new record (after a restart with
            # nothing new to read, their open windows must still close and publish)
            for partition in owned:
                if partition not in self.partitions:
                    self.partitions.open(partition)

    def _highwater(self, partition: int, p: Any) -> int | None:
        """The partition's end offset as of the last fetch (None: not known yet); sets the lag."""
        try:
            hw = self.app.consumer.highwater(faust.types.TP(CLICKS, partition))
        except Exception:  # noqa: BLE001 - no consumer yet
            return None
        if hw is None or hw < 0:
            return None
        p.lag = max(0, hw - p.book.next_offset)
        self.metrics.partition_lag(partition, p.lag)
        return int(hw)

    def _stored_state(self, partition: int) -> Any:
        # Faust hands recovered keys back decoded (b"3" -> 3): accept every spelling
        data = self.table.data
        return data.get(partition) or data.get(str(partition).encode()) or data.get(str(partition))

    def _write_state(self, partition: int, value: bytes) -> None:
        self.table.data[partition] = value
        self.table.send_changelog(partition, str(partition).encode(), value)

    def _mark_safe(self, partition: int, offset: int) -> None:
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            consumer.mark_safe(faust.types.TP(CLICKS, partition), offset)

    def _holding(self) -> bool:
        return self.throttle.hold and not self.app.rebalancing

    async def _on_revoked(self, app: Any, revoked: set[Any], **kwargs: Any) -> None:
        self.metrics.rebalanced()
        parts = [tp.partition for tp in revoked if tp.topic == CLICKS]
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
            if self.app.rebalancing:
                continue
            try:
                async with self.checkpointer.lock:
                    await self.tick()
            except Exception:  # retried on the next tick
                log.exception("state flush failed; will retry")
