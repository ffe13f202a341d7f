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
from bisect import bisect_left
from operator import attrgetter
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaProducer

from aggregator.core.contract import CLICKS, DLQ, SNAPSHOTS
from aggregator.config import Settings
from aggregator.core.contract import INGEST_HEADER, parse_ingest_header
from aggregator.core.events import REGION_RE, EventError, parse_client_ts
from aggregator.core.ratelimit import RateLimits
from aggregator.core.windows import WindowBook
from aggregator.spill.ledger import SpillLedger
from aggregator.spill.partition import PartitionSpill
from aggregator.metrics import Metrics
from aggregator.ingest.producer import ingest_producer
from aggregator.core.snapshots import SnapshotStore
from aggregator.web.server import WebService
from aggregator.worker.consumer import BatchConsumer, BatchTransport

log = logging.getLogger("aggregator.worker")

LOG_APPEND_TIME = 1
CAUGHT_UP_IDLE_MS = 1000  # highwater unknown: no record for this long => caught up
# A quiet, caught-up partition's stream time follows the wall clock minus a slack
# (records still in flight), so its windows close about grace + slack + one tick
# after their end instead of waiting for its next record.  A partition that
# receives records keeps pure stream time; nothing advances while the consumer
# is not fetching (backpressure, rebalance): the highwater it knows is stale then.
ADVANCE_SLACK_MS = 300
ADVANCE_IDLE_MS = 300
_offset = attrgetter("offset")


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
        self.spills: dict[int, PartitionSpill] = {}
        self.lags: dict[int, int] = {}
        self.limits = RateLimits(settings.rate_limit, settings.rate_limits)
        self.limiting = settings.rate_limit > 0 or any(r > 0 for r in self.limits.per_region.values())
        self.spill_root = settings.spill_path
        self.wake = asyncio.Event()  # set when snapshots wait to be published
        self.hold = False  # spill over AGG_SPILL_MAX_BYTES: stop fetching until it drains
        self.spill_tally: dict[str, int] = {}
        self.limited_tally: dict[str, int] = {}
        self.last_record_ms: dict[int, int] = {}
        self.valid_regions: dict[str, str] = {}
        self.valid_keys: dict[bytes, str] = {}  # record key -> region, for ingest's records
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
            consumer_max_fetch_size=4 * 1024 * 1024,
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
        BatchConsumer.hold = self._holding

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
        ledger = SpillLedger()
        if raw:
            # recovered values come back JSON-decoded; live ones are our bytes
            state = raw if isinstance(raw, dict) else orjson.loads(raw)
            book.load(state)
            ledger.load(state.get("spill"))
            self.metrics.recovered.inc()
            log.info("partition %d: recovered window state at offset %d (%d open windows, %d unpublished "
                     "snapshots, %d spilled events to drain)", partition, book.next_offset, len(book.counts),
                     len(book.outbox), ledger.total_backlog())
        spill = PartitionSpill(self.spill_root, partition, ledger)
        spill.reconcile()
        faults = self.metrics.spill_faults
        faults.labels("corrupt").inc(sum(spill.store.corrupt_records.values()))
        faults.labels("torn").inc(sum(spill.store.torn_tails.values()))
        self.spills[partition] = spill
        self.books[partition] = book
        return book

    def handle_batch(self, tp: Any, records: list) -> None:
        """One call per fetched batch of one partition; no await, no logging per record."""
        t0 = time.perf_counter()
        partition = tp.partition
        book = self.books.get(partition)
        if book is None:
            if tp not in self.app.consumer.assignment():
                return  # fetched before a rebalance moved it: the new owner reads it
            book = self._book(partition)
        spill = self.spills[partition]
        now_ms = int(time.time() * 1000)
        self.last_record_ms[partition] = now_ms
        start = book.next_offset
        last = records[-1].offset
        if spill.ledger.rebuild and records[0].offset >= start:
            spill.rebuild_flush(done=True)  # the source starts past the lost spill: nothing to re-read
        if records[0].offset < start:
            # already applied (counted or spilled) before a crash: never count twice
            if spill.ledger.rebuild:
                self._rebuild(spill, records, start, now_ms)
            records = records[bisect_left(records, start, key=_offset):]
            if not records:
                return
        limiting = self.limiting
        events, offsets, rejected = self._decode(records, now_ms, partition, limiting, self.dlq)
        t1 = time.perf_counter()
        n_window = len(events)
        if limiting and events:
            split = spill.ledger.split(events, offsets, self.limits, time.monotonic())
            if split is not None:
                n_window -= self._spill(spill, split, book)
                events = split.events
        t2 = time.perf_counter()
        book.apply(events, last + 1, now_ms)
        if book.outbox:
            self.wake.set()
        m = self.metrics
        if rejected:
            Metrics.add_counts(m.rejected, rejected)
            m.stage_errors.labels("decode").inc(sum(rejected.values()))
        m.stage_processed.labels("decode").inc(len(records))
        m.stage_duration.labels("decode").observe(t1 - t0)
        m.stage_processed.labels("window").inc(n_window)
        m.stage_duration.labels("window").observe(time.perf_counter() - t2)

    def _spill(self, spill: PartitionSpill, split: Any, book: WindowBook) -> int:
        t0 = time.perf_counter()
        n = spill.write(split)  # fsynced before the batch counts; a disk error stops the worker
        label = book.canonical_region
        for region, lst in split.spills.items():
            r = label(region)
            self.spill_tally[r] = self.spill_tally.get(r, 0) + len(lst)
        for region, n in split.limited.items():
            r = label(region)
            self.limited_tally[r] = self.limited_tally.get(r, 0) + n
        m = self.metrics
        m.stage_processed.labels("spill").inc(n)
        m.stage_duration.labels("spill").observe(time.perf_counter() - t0)
        if self.s.spill_max_bytes > 0 and not self.hold and self._spill_bytes() >= self.s.spill_max_bytes:
            self.hold = True
            log.warning("spill reached AGG_SPILL_MAX_BYTES (%d bytes): consumption paused until it drains",
                        self.s.spill_max_bytes)
        return n

    def _decode(self, records: list, now_ms: int, partition: int, want_offsets: bool,
                dlq: list | None) -> tuple[list, list[int], dict[str, int]]:
        """Records -> ``(region, ingest_ts, client_ts)`` events (and their offsets if asked).

        The hot loop: no await, no log line, one tuple per event.  A record the HTTP ingest
        wrote (``INGEST_HEADER``, key = a valid region as written by ingest) is taken from
        key and header; any other record is parsed and validated.  A bad record is
        counted by reason and, when ``dlq`` is given, queued for the dead-letter topic."""
        loads = orjson.loads
        valid = self.valid_regions
        keys = self.valid_keys
        header_name, parse_header = INGEST_HEADER, parse_ingest_header
        events: list = []
        append = events.append
        offsets: list[int] = []
        rejected: dict[str, int] = {}
        for rec in records:
            hs = rec.headers
            if hs and hs[0][0] == header_name:
                region = keys.get(rec.key)
                if region is None:
                    region = self._valid_key(rec.key)
                if region is not None:
                    try:
                        its, cts = parse_header(hs[0][1])
                    except (ValueError, TypeError):
                        pass  # not what ingest writes: the value decides
                    else:
                        append((region, its, cts))
                        if want_offsets:
                            offsets.append(rec.offset)
                        continue
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
                if dlq is not None:
                    dlq.append((rec.key, orjson.dumps({
                        "reason": reason, "error": str(exc)[:200], "partition": partition,
                        "offset": rec.offset, "raw": (rec.value or b"")[:65536].decode("utf-8", "replace")})))
                continue
            append((region, its, cts))
            if want_offsets:
                offsets.append(rec.offset)
        return events, offsets, rejected

    def _rebuild(self, spill: PartitionSpill, records: list, start: int, now_ms: int) -> None:
        """Replay of records before the state's offset while spill files are lost:
        re-spill the undrained events of the regions being rebuilt."""
        rebuild = spill.ledger.rebuild
        lows = {r: spill.ledger.regions[r][2] for r in rebuild}
        log.info("partition %d: rebuild replay %d..%d (state at %d, lows %s, left %s)", spill.partition,
                 records[0].offset, records[-1].offset, start, lows, rebuild)
        replay = records[:bisect_left(records, start, key=_offset)]
        # bad records went to the dead-letter topic the first time: not again
        events, offsets, _ = self._decode(replay, now_ms, spill.partition, True, None)
        for (region, its, cts), offset in zip(events, offsets):
            if region in rebuild and offset >= lows[region]:
                spill.rebuild_add(region, offset, its, cts)
        spill.rebuild_flush(done=records[-1].offset + 1 >= start)

    def _spill_bytes(self) -> int:
        return sum(sp.total_bytes() for sp in self.spills.values())

    def _holding(self) -> bool:
        return self.hold and not self.app.rebalancing

    def _valid_key(self, key: Any) -> str | None:
        """The region of a record key that is a valid region in its lower-case spelling
        (what ingest writes), else None."""
        try:
            raw = key.decode()
            region = self._valid_region(raw)
        except (AttributeError, UnicodeDecodeError, EventError):
            return None
        if region != raw:
            return None
        if len(self.valid_keys) < 100000:
            self.valid_keys[key] = region
        return region

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
        if partitions is None and self.ready():
            # load the state of assigned partitions that have no new record (after a restart
            # with nothing new to read, their open windows must still close and publish)
            for tp in consumer.assignment():
                if tp.topic == CLICKS and tp.partition not in self.books:
                    self._book(tp.partition)
        fetching = not self.hold and not app.rebalancing
        for partition in (partitions if partitions is not None else list(self.books)):
            book = self.books.get(partition)
            if book is None:
                continue
            spill = self.spills[partition]
            if spill.ledger.total_backlog():
                drained = spill.drain(self.limits, time.monotonic())
                if drained:
                    book.apply(drained, book.next_offset, now_ms)
                    self.metrics.stage_processed.labels("spill").inc(len(drained))
            if book.tally:
                Metrics.add_counts(self.metrics.counted, book.take_tally())
            last = self.last_record_ms.get(partition)
            quiet = last is None or now_ms - last >= ADVANCE_IDLE_MS
            idle = last is not None and now_ms - last >= CAUGHT_UP_IDLE_MS
            hw = self._highwater(partition, book)
            if quiet and fetching and (hw <= book.next_offset if hw is not None else idle):
                book.advance_to(now_ms - ADVANCE_SLACK_MS)
            if not book.dirty:
                continue
            state = book.to_dict()
            state["spill"] = spill.ledger.to_dict()
            value = orjson.dumps(state)
            book.dirty = False
            self.table.data[partition] = value
            self.table.send_changelog(partition, str(partition).encode(), value)
            sent.append((partition, book, spill.ledger.low_offset(book.next_offset), len(book.outbox)))
        self._spill_metrics()
        if not sent and not self.dlq:
            return
        dlq, self.dlq = self.dlq, []
        for key, value in dlq:
            await app.producer.send(DLQ, key, value, None, None, None)
        await app.producer.flush()  # state durable before offsets move or snapshots go out
        published: list[dict] = []
        t0 = time.perf_counter()
        for partition, book, offset, n_out in sent:
            self.spills[partition].acked()  # drained records are counted in durable state
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
            self._forget(p)

    def _spill_metrics(self) -> None:
        m = self.metrics
        if self.spill_tally:
            Metrics.add_counts(m.spilled, self.spill_tally)
            self.spill_tally = {}
        if self.limited_tally:
            Metrics.add_counts(m.rate_limited, self.limited_tally)
            self.limited_tally = {}
        total_backlog = 0
        for partition, spill in self.spills.items():
            label = self.books[partition].canonical_region
            for region, (backlog, nbytes) in spill.backlog_by_region().items():
                m.spill_backlog.labels(label(region)).set(backlog)
                m.spill_bytes.labels(label(region)).set(nbytes)
                total_backlog += backlog
        m.stage_pending.labels("spill").set(total_backlog)
        for spill in self.spills.values():
            if spill.lost:
                m.spill_faults.labels("lost").inc(spill.lost)
                spill.lost = 0
        m.stage_pending.labels("publish").set(sum(len(b.outbox) for b in self.books.values()))
        m.assigned.set(len(self.books))
        m.stage_pending.labels("decode").set(sum(self.lags.get(p, 0) for p in self.books))
        if self.hold and self._spill_bytes() < self.s.spill_max_bytes * 0.9:
            self.hold = False
            log.info("spill below 90%% of AGG_SPILL_MAX_BYTES: consumption resumed")
        m.backpressure.set(1 if self.hold else 0)

    def _highwater(self, partition: int, book: WindowBook) -> int | None:
        """The partition's end offset as of the last fetch (None: not known yet); sets the lag."""
        try:
            hw = self.app.consumer.highwater(faust.types.TP(CLICKS, partition))
        except Exception:  # noqa: BLE001
            return None
        if hw is None or hw < 0:
            return None
        lag = self.lags[partition] = max(0, hw - book.next_offset)
        self.metrics.consumer_lag.labels(str(partition)).set(lag)
        return hw

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
        self.metrics.rebalances.inc()
        parts = [tp.partition for tp in revoked if tp.topic == CLICKS]
        if not parts:
            return
        try:
            async with self.flush_lock:
                await self.flush(parts)
        except Exception:  # noqa: BLE001
            log.exception("flush on revoke failed; the next owner replays from the last state")
        for p in parts:
            self._forget(p)

    def _forget(self, p: int) -> None:
        self.books.pop(p, None)
        self.last_record_ms.pop(p, None)
        self.lags.pop(p, None)
        spill = self.spills.pop(p, None)
        if spill is not None:
            spill.close()  # stays on disk; the next owner reconciles or re-reads it

    # ----------------------------------------------------------- lifecycle
    async def _run(self) -> None:
        if self.s.role == "all":  # AGG_ROLE=worker: POST /v1/events answers 503, ingest runs elsewhere
            self.producer = ingest_producer(self.s.bootstrap())
        web_service = WebService(self.s, self.metrics, self.snapshots, self.ready, self.producer)
        await web_service.start()
        if self.producer is not None:
            try:
                await self.producer.start()
            except Exception as exc:  # noqa: BLE001
                log.error("ingest producer cannot connect: %r", exc)
        self.started = True
        interval = self.s.state_flush_seconds
        try:
            while True:
                try:  # a tick, or at once when a batch closed windows (snapshot delay)
                    await asyncio.wait_for(self.wake.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()
                if self.app.rebalancing:
                    continue
                try:
                    async with self.flush_lock:
                        await self.flush()
                except Exception:  # noqa: BLE001 - retried on the next tick
                    log.exception("state flush failed; will retry")
        finally:
            await web_service.stop()
            if self.producer is not None:
                await self.producer.stop()
