"""A Faust consumer that hands whole fetched batches of ``clicks`` (and
``clicks-repartition``) records to one function, instead of one awaited
message at a time.

Everything else (the consumer group, rebalances, changelog recovery of the
window-state table, offset commits) stays Faust's.  Records of other
topics (table changelogs during recovery) take Faust's normal path.

Commits: for batch topics Faust's per-message ack list is bypassed; the
offset committed is ``safe_offsets[tp]``, which the worker advances only
after the window state holding every record before it has been written to
the changelog (and Faust flushes the producer before every commit).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, cast

import aiokafka.errors as _errors
import google_crc32c
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.record.memory_records import MemoryRecords
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as _Consumer
from faust.transport.drivers.aiokafka import Transport as _Transport
from faust.types import TP

from aggregator.worker.arenas import ArenaKeeper

BatchHandler = Callable[[TP, list], "int | None"]  # an offset to fetch the partition again from

# Faust hard-codes fetch_max_wait_ms=1500; a broker that holds a fetch that long
# (Tansu does, for small batches) adds up to 1.5 s to every snapshot's delay.
FETCH_MAX_WAIT_MS = 100
# one fetch response at most (aiokafka's default is 50 MB): with four partitions of 4 MiB
# each (faust_app.FETCH_MAX_BYTES) the worker held 16 MiB responses and went over figure 4b's
# 300 MB at 3M events on Kafka (311-319 MB); 12 MiB gave 262-285 MB at no cost to figure 1c
# seen in alternating rounds (docs/performance.md); one partition's fetches are unchanged
FETCH_RESPONSE_MAX_BYTES = 12 * 1024 * 1024


class RawTopics:
    """Value "deserializer" that marks a consumer whose records of ``topics``
    are handed over as the records parsed from the fetch response, without
    aiokafka's ``ConsumerRecord`` wrapper (eleven fields, a headers tuple, two
    ``len`` calls per record).  The batch handler reads only ``offset``,
    ``timestamp``, ``timestamp_type``, ``key``, ``value`` and ``headers``, which
    the parsed record has.  For every other topic it is the identity, like no
    deserializer at all."""

    __slots__ = ("topics",)

    def __init__(self, topics: frozenset) -> None:
        self.topics = topics

    def __call__(self, value: Any) -> Any:
        return value


# CRC-32C in hardware (SSE 4.2): 0.8 µs a 16 KiB record batch, where aiokafka's table-driven
# check takes 8.8 (docs/performance.md).  None where google-crc32c has no compiled module: its
# pure-Python fallback is slower than aiokafka's, which then does the check.
_crc32c = google_crc32c.value if google_crc32c.implementation == "c" else None


class _MemoryRecords(MemoryRecords):
    """aiokafka's view of a partition's fetched bytes, which keeps the bytes for
    :meth:`_PartitionRecords.take_all`'s CRC check."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self.raw = raw


class _PartitionRecords(_fetcher.PartitionRecords):
    next_fetch_offset: int
    def __init__(self, tp: Any, records: Any, aborted: Any, fetch_offset: int, key_deserializer: Any,
                 value_deserializer: Any, check_crcs: bool, isolation_level: int) -> None:
        super().__init__(tp, records, aborted, fetch_offset, key_deserializer, value_deserializer,
                         check_crcs, isolation_level)
        self.raw = value_deserializer.__class__ is RawTopics and tp.topic in value_deserializer.topics

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        if self.raw:
            return record
        return super()._consumer_record(tp, record)

    def take_all(self) -> list:
        """Every record of a raw topic's fetch, a whole record batch at a time: what
        ``_unpack_records`` gives record by record.  Read committed (the worker's consumer
        is), the batches of aborted transactions are skipped as aiokafka skips them: a
        producer is aborting from the first offset of one of the fetch's aborted
        transactions up to its abort marker.  A fetch without aborted transactions (ingest's
        producer is idempotent, not transactional) asks nothing of its batches for it."""
        out: list = []
        records = self._records
        next_offset = self.next_fetch_offset
        check = self._check_crcs
        crc = _crc32c if check else None
        raw = None if crc is None else getattr(records, "raw", None)
        committed = self._isolation_level == _fetcher.READ_COMMITTED
        aborted = self._aborted_transactions  # (producer id, first offset), by first offset
        aborting = self._aborted_producers
        at = 0  # where the batch starts in ``raw``: batches follow each other
        while records.has_next():
            batch = records.next_batch()
            if raw is not None and crc is not None:
                end = at + 12 + int.from_bytes(raw[at + 8:at + 12], "big")  # offset, length, then the batch
                # a v2 batch's CRC-32C covers what follows it, from the attributes (byte 21) to the end
                ok = batch.crc == crc(raw[at + 21:end]) if raw[at + 16] == 2 else batch.validate_crc()
                at = end
            else:
                ok = not check or batch.validate_crc()
            if not ok:
                raise _errors.CorruptRecordException(f"Invalid CRC - {self._tp}")
            if committed and (aborted or aborting) and batch.producer_id is not None:
                if aborted:
                    self._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch:
                    if self._contains_abort_marker(batch):
                        aborting.discard(batch.producer_id)
                elif batch.is_transactional and batch.producer_id in aborting:
                    next_offset = batch.next_offset  # an aborted transaction's: never handed over
                    continue
            if not batch.is_control_batch:
                recs = list(batch)
                if recs and recs[0].offset < next_offset:  # a compressed message set starts before
                    recs = [r for r in recs if r.offset >= next_offset]
                out += recs
            next_offset = batch.next_offset
        self.next_fetch_offset = next_offset
        self._records_iterator = None
        return out


class _FetchResult(_fetcher.FetchResult):
    _partition_records: Any
    def getall(self, max_records: int | None = None) -> list:
        records = self._partition_records
        if max_records is None and getattr(records, "raw", False):
            if not self.check_assignment(self._topic_partition):
                return []
            fetch_offset = records.next_fetch_offset
            out = records.take_all()
            state = self._assignment.state_value(self._topic_partition)
            # the end of what it hands over, before the position moves (``read_to`` reads them
            # the other way round, in another thread); nothing handed over: none from the fetch on
            state.data_end = out[-1].offset + 1 if out else min(getattr(state, "data_end", 0), fetch_offset)
            note_read(state, fetch_offset, out, records.next_fetch_offset)
            self._update_position()
            self._partition_records = None
            return out
        return super().getall(max_records)


def note_read(state: Any, fetch_offset: int, out: list, end: int) -> None:
    """Keep in a partition's state, per fetch (from ``fetch_offset``, handing over ``out``,
    the position now ``end``), from where the consumer read every offset handing no record
    over (markers, aborted batches) up to the position (``quiet_from``) and up to ``out``'s
    first record (``clear_from``).  A fetch from inside that (or from the first record last
    handed over: a batch sent back) reads on; from elsewhere, or not where the worker's
    last seek went (a reset since): a new run, ``run_sought`` that seek (None: none)."""
    quiet, sought = getattr(state, "quiet_from", None), getattr(state, "sought", None)
    if sought is not None and fetch_offset != sought:
        quiet = None
    elif quiet is not None and quiet <= fetch_offset <= state.read_end:
        pass  # read on
    elif fetch_offset == getattr(state, "last_first", None):
        quiet = state.clear_from  # read again from the batch it handed over last
    else:
        quiet = None
    if quiet is None:
        quiet, state.run_sought = fetch_offset, sought
    state.sought = None
    if out:
        state.clear_from, state.last_first = quiet, out[0].offset
        quiet = out[-1].offset + 1
    state.quiet_from, state.read_end = quiet, end


# The fetcher builds these from its module globals; the subclasses change nothing for
# consumers without a RawTopics marker.
_fetcher.PartitionRecords = _PartitionRecords
_fetcher.MemoryRecords = _MemoryRecords
_fetcher.FetchResult = _FetchResult

class _ConsumerThread(AIOKafkaConsumerThread):
    fetched_to: Mapping[Any, int | None] = {}  # per partition of the last fetch: where it left aiokafka's position

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # both are read by the fetcher the consumer builds at start()
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        consumer._fetch_max_bytes = FETCH_RESPONSE_MAX_BYTES
        # read committed: a transactional producer's aborted records are never handed over, and
        # an open transaction's only once it commits (docs/contract.md §1); the fetch stops at
        # the last stable offset.  Faust's producer (changelogs) and ingest's are not
        # transactional, so nothing else it reads changes
        consumer._isolation_level = "read_committed"
        if consumer._value_deserializer is None:
            consumer._value_deserializer = RawTopics(BatchConsumer.batch_topics)
        return consumer

    async def _fetch_records(self, consumer: Any, active_partitions: Any,
                             timeout: float | None = None,  # noqa: ASYNC109 - Faust's signature
                             max_records: int | None = None) -> Any:
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                               max_records=max_records)
        self.fetched_to = positions(consumer, records)
        return records

    async def seek_here(self, tp: Any, offset: int) -> None:
        """aiokafka's seek, run in the consumer's thread: aiokafka's fetcher there drops the
        partition's fetched records and wakes its waiter, which is safe only in that thread,
        and the seek cannot fall between :func:`unfetch`'s look at the position and its own
        seek."""
        consumer = self._ensure_consumer()
        consumer.seek(tp, offset)
        _state(consumer, tp).sought = offset  # assigned (else the seek raised): ``note_read``

    async def unfetch(self, first: Mapping[Any, int]) -> list[Any]:
        """:func:`unfetch` the last fetch, run in the consumer's thread (where its seeks run)."""
        return unfetch(self._ensure_consumer(), self.fetched_to, first)


def unfetch(consumer: Any, fetched_to: Mapping[Any, int | None], first: Mapping[Any, int]) -> list[Any]:
    """Seek each partition back to ``first``, the offset of the first of its fetched records
    that were not handed over, unless its position has moved since the fetch left it at
    ``fetched_to`` (a seek of Faust's recovery, or a rebalance): the newer seek stands.
    Returns the partitions sought back."""
    now = positions(consumer, first)
    back = []
    for tp, offset in first.items():
        at = now[tp]
        if at is not None and at == fetched_to.get(tp) and offset < at:  # back, never forward
            consumer.seek(tp, offset)
            back.append(tp)
    return back


def _state(consumer: Any, tp: Any) -> Any:
    """aiokafka's state of ``tp`` in ``consumer`` (None: not assigned)."""
    subscription = consumer._subscription.subscription
    assignment = None if subscription is None else subscription.assignment
    return None if assignment is None else assignment.state_value(tp)


def read_from(consumer: Any, tp: Any) -> tuple[int, int | None] | None:
    """Of the last batch of ``tp`` handed over (:func:`note_read`): from where the consumer
    read up to its first record handing nothing over, and the worker's seek that read
    began with (None: an offset reset, Faust's seek); None: no batch since assigned."""
    state = _state(consumer, tp)
    clear = getattr(state, "clear_from", None)
    return None if clear is None else (clear, state.run_sought)


def read_to(consumer: Any, tp: Any, next_offset: int) -> int:
    """Where a partition whose records are applied up to ``next_offset`` stands as read:
    the consumer's position, past the transaction markers and aborted batches it skipped
    after the last record it handed over, once every record it handed over is applied
    (``next_offset`` at or past the end of them); else ``next_offset``.  So a partition
    whose log ends in a marker is caught up when its end offset is reached."""
    state = _state(consumer, tp)
    if state is None:
        return next_offset
    # the position first: ``_FetchResult.getall`` (in the consumer's thread) writes ``data_end``
    # before it, so a position read here is never newer than the ``data_end`` read after it
    position = state.position if state.has_valid_position else None
    data_end = getattr(state, "data_end", 0)
    if position is None or position < next_offset or next_offset < data_end:
        return next_offset
    return int(position)


def positions(consumer: Any, tps: Any) -> dict[Any, int | None]:
    """aiokafka's fetch position of each of ``tps`` (None: not assigned, or not known)."""
    states = {tp: _state(consumer, tp) for tp in tps}
    return {tp: s.position if s is not None and s.has_valid_position else None for tp, s in states.items()}


class _NeverEmpty:
    """Faust's live set of active partitions, as aiokafka's fetch asks it (``tp in``), but
    never empty: given an empty set, aiokafka hands out the records of every partition, and
    a rebalance pauses them all (the set then empties under a fetch in flight)."""

    __slots__ = ("tps",)

    def __init__(self, tps: set) -> None:
        self.tps = tps

    def __contains__(self, tp: object) -> bool:
        return tp in self.tps

    def __bool__(self) -> bool:
        return True


class BatchConsumer(_Consumer):
    batch_topics: frozenset = frozenset()
    batch_handler: BatchHandler | None = None
    hold: Callable[[], bool] | None = None  # True: fetch nothing for now (backpressure)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.safe_offsets: dict[TP, int] = {}
        self.arenas = ArenaKeeper()  # the fetched records' memory, kept from fetch to fetch

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: TP) -> int | None:
        if tp.topic in self.batch_topics:
            return self.safe_offsets.get(tp)
        return super()._new_offset(tp)

    def mark_safe(self, tp: TP, offset: int) -> None:
        """Every record of ``tp`` before ``offset`` is durably accounted for."""
        self.safe_offsets[tp] = offset
        self._acked[tp]

    def log_restarted(self, tp: TP) -> None:
        """``tp``'s log started over (core.sourcelog): forget the offsets committed and marked
        on the old one, so that the new log's (lower) offsets are committed again."""
        self._committed_offset[tp] = None
        self.safe_offsets.pop(tp, None)

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:  # noqa: ASYNC109 - Faust's
        # asked only ``tp in`` (aiokafka's Fetcher.fetched_records)
        live = None if active_partitions is None else cast(Any, _NeverEmpty(active_partitions))
        return await super()._getmany(live, timeout)

    async def _fetch_again(self, records: Mapping[TP, list], start: TP | None = None) -> None:
        """Records fetched but not handed over (flow stopped for a rebalance, the generation
        changed under the loop, from ``start`` on; or a partition paused since the fetch): seek
        back to the first of them, so that they are fetched again, where nothing moved the
        position since the fetch.  Faust drops them: its ``perform_seek`` goes back to the
        committed offset, and does nothing where none is committed (aiokafka seeks only to a
        committed offset above 0), so a partition whose group offsets are gone (its topic was
        created again) would skip them for good, and a changelog fetched under recovery's
        feet (Faust commits none) would never be recovered: a recovery that waits forever."""
        handing = start is None
        first = {}
        for tp, recs in records.items():
            handing = handing or tp == start
            if handing and recs:
                first[tp] = recs[0].offset
        if first:
            thread = cast(_ConsumerThread, self._thread)
            try:
                back = await thread.call_thread(thread.unfetch, first)
            except Exception as exc:  # noqa: BLE001 - stopping: dropping them is what Faust does
                self.log.warning("fetched records not handed over could not be fetched again: %r", exc)
                return
            if back:  # a few lines a rebalance at most: docs/runbooks.md, a stalled recovery
                self.log.info("fetched records not handed over, to be fetched again: %s",
                              ", ".join(f"{tp.topic} {tp.partition} from {first[tp]}" for tp in back))

    async def seek_quietly(self, tp: TP, offset: int) -> None:
        """Seek in the consumer's thread (``_ConsumerThread.seek_here``; Faust's ``seek`` runs
        aiokafka's from this thread), and say so only where it failed on a partition still
        assigned."""
        thread = cast(_ConsumerThread, self._thread)
        try:
            await thread.call_thread(thread.seek_here, tp, offset)
        except Exception as exc:  # noqa: BLE001 - no longer assigned: its next owner reads it from its commit
            if tp in self.assignment():
                self.log.warning("seek of %r to %d failed: %r", tp, offset, exc)
            return
        self._read_offset[tp] = offset if offset else None  # as Faust's seek

    async def on_partitions_revoked(self, revoked: set) -> None:
        await super().on_partitions_revoked(revoked)
        for tp in revoked:
            self.safe_offsets.pop(tp, None)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - run via Faust
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_read_offset = self._read_offset.__setitem__
        batch_topics = self.batch_topics
        handler = self.batch_handler or _no_handler
        to_message = self._to_message
        hold = self.hold
        keep = self.arenas.keep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                if hold is not None and hold():
                    await asyncio.sleep(0.05)  # heartbeats go on in the background
                    continue
                records, active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)
                if not records or self.should_stop or not self.flow_active:
                    if records and not self.flow_active:
                        await self._fetch_again(records)
                        try:
                            await self.perform_seek()
                        except _errors.IllegalStateError:
                            # a partition left the assignment while we sought (a rebalance): its
                            # next owner starts from the committed offset; nothing to do here
                            pass
                    continue
                generation = self.app.consumer_generation_id
                for tp, recs in records.items():
                    if not recs:
                        continue
                    if self.app.consumer_generation_id != generation or not self.flow_active:
                        await self._fetch_again(records, tp)
                        break
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        await self._fetch_again({tp: recs})  # paused since it was fetched
                        continue
                    if tp.topic in batch_topics:
                        again = handler(tp, recs)
                        keep(recs)
                        if again is None:
                            set_read_offset(tp, recs[-1].offset)
                        else:
                            await self.seek_quietly(tp, again)
                    else:
                        for rec in recs:
                            await self.wait_first(callback(to_message(tp, rec)),
                                                  self.suspend_flow.wait())
                            set_read_offset(tp, rec.offset)
                # the records die here, in this thread, while they are in its caches: else the
                # last reference is the consumer thread's (mode's method queue keeps its last
                # call, the fetch, till the next one), which then frees them all, holding the GIL
                cast(dict, records).clear()  # Faust types it a Mapping; it is the fetch's dict
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise


def _no_handler(tp: TP, records: list[Any]) -> None:
    raise RuntimeError(f"BatchConsumer.batch_handler is not set, and {tp.topic} is a batch topic")


class BatchTransport(_Transport):
    Consumer = BatchConsumer
