"""The Faust worker: batches of ``clicks`` records -> window books -> state
changelog -> snapshots.

Per owned partition there is one ``WindowBook`` (aggregator.core.windows).
Its whole state, including the next source offset it has applied, is one
record of the Faust table ``window-state`` (key = partition number), written
to the table's changelog at most every ``state_flush_seconds``.  Offsets are
committed only up to the offset held by a state record already sent (Faust
flushes the producer before it commits).  After a crash the table is
recovered from its changelog, records before the book's ``next_offset`` are
skipped, and snapshots that were closed but not yet published (the book's
outbox) are published again with identical content: exactly-once counts.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaProducer

from aggregator.broker import CLICKS, DLQ, SNAPSHOTS
from aggregator.config import Settings
from aggregator.core.events import REGION_RE, EventError, parse_client_ts
from aggregator.core.windows import WindowBook
from aggregator.web.metrics import Metrics
from aggregator.web.server import SnapshotStore, WebService
from aggregator.worker.consumer import BatchConsumer, BatchTransport

log = logging.getLogger("aggregator.worker")

LOG_APPEND_TIME = 1
CAUGHT_UP_IDLE_MS = 1000  # no record for this long + no known lag => caught up


class _App(faust.App):
    def _new_transport(self):  # noqa: ANN202 - Faust's hook
        return BatchTransport(self.conf.broker_consumer, self)


class Worker:
    def __init__(self, settings: Settings, on_snapshots=None) -> None:
        self.s = settings
        self.metrics = Metrics()
        self.snapshots = SnapshotStore()
        self.on_snapshots = on_snapshots  # callback(list[dict]) e.g. console table
        self.books: dict[int, WindowBook] = {}
        self.last_record_ms: dict[int, int] = {}
        self.valid_regions: dict[str, str] = {}
        self.dlq: list[tuple[bytes | None, bytes]] = []
        self.started = False
        self.producer: AIOKafkaProducer | None = None
        # one flush at a time: the tick and a rebalance's revoke must not publish one outbox twice
        self.flush_lock = asyncio.Lock()
        self.app = _App(
            "clickstream-aggregator",
            broker=settings.faust_broker(),
            datadir=str(settings.data_dir) + "/faust",
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            table_cleanup_interval=3600,
            web_enabled=False,
            broker_session_timeout=settings.session_timeout,
            broker_heartbeat_interval=max(0.5, settings.session_timeout / 4),
            broker_commit_interval=settings.state_flush_seconds,
            consumer_auto_offset_reset="earliest",
            stream_wait_empty=False,
            producer_acks=-1,
            logging_config=None,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.clicks = self.app.topic(CLICKS, key_type=bytes, value_type=bytes,
                                     partitions=settings.partitions, internal=False)
        self.table = self.app.Table("window-state", partitions=settings.partitions)
        BatchConsumer.batch_topics = frozenset({CLICKS})
        BatchConsumer.batch_handler = self.handle_batch

        @self.app.agent(self.clicks)
        async def _clicks(stream):  # subscribes the topic; batches bypass it
            async for _ in stream:  # pragma: no cover
                pass

        self.app.task(self._run)
        self.app.on_partitions_revoked.connect(self._on_revoked)

    # ------------------------------------------------------------ readiness
    def ready(self) -> bool:
        app = self.app
        try:
            recovered = app.tables.recovery.completed.is_set()
        except Exception:  # noqa: BLE001
            recovered = False
        return self.started and not app.rebalancing and recovered

    # -------------------------------------------------------------- hot path
    def _book(self, partition: int) -> WindowBook:
        s = self.s
        book = WindowBook(s.window_ms, s.grace_ms, s.late_after_ms, s.idle_ms, s.max_regions)
        # Faust hands recovered keys back decoded (b"3" -> 3): accept every spelling
        data = self.table.data
        raw = data.get(partition) or data.get(str(partition).encode()) or data.get(str(partition))
        if raw:
            # recovered values come back JSON-decoded; live ones are our bytes
            book.load(raw if isinstance(raw, dict) else orjson.loads(raw))
            log.info("partition %d: recovered window state at offset %d (%d open windows, %d unpublished snapshots)",
                     partition, book.next_offset, len(book.counts), len(book.outbox))
        self.books[partition] = book
        return book

    def handle_batch(self, tp: Any, records: list) -> None:
        """One call per fetched batch of one partition; no await, no logging per record."""
        t0 = time.perf_counter()
        partition = tp.partition
        book = self.books.get(partition)
        if book is None:
            book = self._book(partition)
        now_ms = int(time.time() * 1000)
        self.last_record_ms[partition] = now_ms
        start = book.next_offset
        loads = orjson.loads
        valid = self.valid_regions
        events = []
        append = events.append
        rejected: dict[str, int] = {}
        for rec in records:
            if rec.offset < start:
                continue  # already applied before a crash: never count twice
            try:
                d = loads(rec.value)
                region = valid.get(d["region"])
                if region is None:
                    region = self._valid_region(d["region"])
                its = d.get("ingest_ts")
                if type(its) is not int:
                    if its is not None:
                        raise EventError("bad_ingest_ts", "ingest_ts must be epoch milliseconds")
                    its = rec.timestamp if rec.timestamp_type == LOG_APPEND_TIME else now_ms
                cts = d.get("ts")
                if cts is not None and type(cts) is not int:
                    cts = parse_client_ts(cts)
            except Exception as exc:  # noqa: BLE001 - a bad record never stops the stage
                reason = exc.reason if isinstance(exc, EventError) else "undecodable"
                rejected[reason] = rejected.get(reason, 0) + 1
                self.dlq.append((rec.key, orjson.dumps({
                    "reason": reason, "error": str(exc)[:200], "partition": partition,
                    "offset": rec.offset, "raw": (rec.value or b"")[:65536].decode("utf-8", "replace")})))
                continue
            append((region, its, cts))
        if records[-1].offset + 1 > start:
            book.apply(events, records[-1].offset + 1, now_ms)
        if rejected:
            Metrics.add_counts(self.metrics.rejected, rejected)
            self.metrics.stage_errors.labels("decode").inc(sum(rejected.values()))
        m = self.metrics
        m.stage_processed.labels("decode").inc(len(records))
        m.stage_processed.labels("window").inc(len(events))
        m.stage_duration.labels("window").observe(time.perf_counter() - t0)

    def _valid_region(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise EventError("bad_region", "region must be a string")
        region = raw.lower()
        if not REGION_RE.match(region):
            raise EventError("bad_region", "region must be 1-64 characters of [a-z0-9._-]")
        if len(self.valid_regions) < 100000:
            self.valid_regions[raw] = region
        return region

    # ------------------------------------------------------ state + publish
    async def flush(self, partitions: list[int] | None = None) -> None:
        """Write dirty books to the changelog, then publish their outboxes."""
        app = self.app
        consumer = app.consumer
        now_ms = int(time.time() * 1000)
        sent: list[tuple[int, WindowBook, int, int]] = []
        if partitions is None:
            self._drop_unowned(consumer)
        for partition in (partitions if partitions is not None else list(self.books)):
            book = self.books.get(partition)
            if book is None:
                continue
            if book.tally:
                Metrics.add_counts(self.metrics.counted, book.take_tally())
            last = self.last_record_ms.get(partition, 0)
            if now_ms - last >= CAUGHT_UP_IDLE_MS and not self._lagging(partition, book):
                book.advance_to(now_ms)
            if not book.dirty:
                continue
            value = orjson.dumps(book.to_dict())
            book.dirty = False
            self.table.data[partition] = value
            self.table.send_changelog(partition, str(partition).encode(), value)
            sent.append((partition, book, book.next_offset, len(book.outbox)))
        if not sent and not self.dlq:
            return
        dlq, self.dlq = self.dlq, []
        for key, value in dlq:
            await app.producer.send(DLQ, key, value, None, None, None)
        await app.producer.flush()  # state durable before offsets move or snapshots go out
        published: list[dict] = []
        t0 = time.perf_counter()
        for partition, book, offset, n_out in sent:
            if n_out:
                snaps = book.outbox[:n_out]
                for snap in snaps:
                    await app.producer.send(SNAPSHOTS, snap["region"].encode(), orjson.dumps(snap), None, None, None)
                published.append((book, snaps))
            if isinstance(consumer, BatchConsumer):
                consumer.mark_safe(faust.types.TP(CLICKS, partition), offset)
        if published:
            await app.producer.flush()
            self._published([s for _, snaps in published for s in snaps], t0)
            for book, snaps in published:
                book.published(len(snaps))

    def _drop_unowned(self, consumer: Any) -> None:
        """A batch fetched before a rebalance can arrive after the revoke: the book it
        re-creates belongs to a partition another worker owns now. Never write its state
        or publish from it (a stale changelog record would be recovered by a later owner)."""
        try:
            owned = {tp.partition for tp in consumer.assignment() if tp.topic == CLICKS}
        except Exception:  # noqa: BLE001 - unknown: keep everything
            return
        for p in [p for p in self.books if p not in owned]:
            log.warning("partition %d is not assigned here (any more): dropping its window book", p)
            self.books.pop(p, None)
            self.last_record_ms.pop(p, None)

    def _lagging(self, partition: int, book: WindowBook) -> bool:
        try:
            hw = self.app.consumer.highwater(faust.types.TP(CLICKS, partition))
        except Exception:  # noqa: BLE001
            return False
        if hw is not None and hw >= 0:
            self.metrics.consumer_lag.labels(str(partition)).set(max(0, hw - book.next_offset))
            return hw > book.next_offset
        return False

    def _published(self, snaps: list[dict], t0: float) -> None:
        m = self.metrics
        now = time.time()
        for snap in snaps:
            r = snap["region"]
            m.window_events.labels(r).set(snap["count"])
            m.window_end.labels(r).set(snap["window_end"] / 1000)
            for reason, n in snap["late_by_reason"].items():
                if n:
                    m.late.labels(r, reason).inc(n)
            m.snapshot_delay.observe(max(0.0, now - snap["window_end"] / 1000))
        m.snapshots_published.inc(len(snaps))
        m.stage_processed.labels("publish").inc(len(snaps))
        m.stage_duration.labels("publish").observe(time.perf_counter() - t0)
        self.snapshots.add(snaps)
        if self.on_snapshots:
            try:
                self.on_snapshots(snaps)
            except Exception:  # noqa: BLE001
                log.exception("snapshot callback failed")

    async def _on_revoked(self, app: Any, revoked: set, **kwargs: Any) -> None:
        parts = [tp.partition for tp in revoked if tp.topic == CLICKS]
        if not parts:
            return
        try:
            async with self.flush_lock:
                await self.flush(parts)
        except Exception:  # noqa: BLE001
            log.exception("flush on revoke failed; the next owner replays from the last state")
        for p in parts:
            self.books.pop(p, None)
            self.last_record_ms.pop(p, None)

    # ----------------------------------------------------------- lifecycle
    async def _run(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.s.bootstrap(), acks="all",
                                         linger_ms=5, max_batch_size=1 << 20,
                                         request_timeout_ms=5000, enable_idempotence=False)
        web_service = WebService(self.s, self.metrics, self.snapshots, self.ready, self.producer)
        await web_service.start()
        try:
            await self.producer.start()
        except Exception as exc:  # noqa: BLE001
            log.error("ingest producer cannot connect: %r", exc)
        self.started = True
        interval = self.s.state_flush_seconds
        try:
            while True:
                await asyncio.sleep(interval)
                if self.app.rebalancing:
                    continue
                try:
                    async with self.flush_lock:
                        await self.flush()
                except Exception:  # noqa: BLE001 - retried on the next tick
                    log.exception("state flush failed; will retry")
        finally:
            await web_service.stop()
            await self.producer.stop()
