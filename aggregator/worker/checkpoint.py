"""The checkpoint protocol: changelog write -> broker confirms -> offsets safe to
commit -> snapshots published.

One checkpoint at a time (a tick and a rebalance's revoke must not publish one outbox
twice).  For each partition whose book changed, its state (book + spill ledger, with
the next source offset) goes to the changelog as chunks of bounded size and then a
header naming them (core.statechunks), each step flushed and every send's
acknowledgement checked, so the state is durable before anything depends on it; only
then may the consumer commit up to the offset that state holds (``mark_safe``),
drained spill records be deleted, and the snapshots that the state's outbox holds be
published.  Records forwarded to their region's home partition (``clicks-repartition``,
core.repartition) go out with the dead letters, before any header: a source's state,
whose offset covers them, never counts before they are acknowledged.  A write the
broker refuses stops exactly that: the partition's offsets are not committed and its
snapshots wait, ``/readyz`` says why, the failure is counted
(``clickstream_state_write_failures_total``) and the write is retried every checkpoint.
After a crash the state is recovered from the changelog and its outbox published again with identical content:
exactly once in effect (docs/contract.md §1).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import orjson

from aggregator.core.contract import Header, Snapshot
from aggregator.core.recordlog import Prepared
from aggregator.core.repartition import overtaken, parse_source_header
from aggregator.core.statechunks import chunk_key, encode_chunks
from aggregator.core.topics import DEFAULT, Topics
from aggregator.core.windows import WindowBook
from aggregator.metrics import Metrics
from aggregator.worker.decoder import DeadLetter
from aggregator.worker.partitions import PartitionState

log = logging.getLogger("aggregator.worker")

SnapshotSink = Callable[[Sequence[Snapshot]], None]
Forward = tuple[int, bytes, bytes, list[Header]]  # home partition, key, value, headers (clicks-repartition)


class Producer(Protocol):
    """What a checkpoint needs of the producer (Faust's): buffered sends and a flush that
    returns once the broker has acknowledged everything sent before it."""

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
             timestamp: float | None, headers: list[tuple[str, bytes]] | None) -> Awaitable[object]: ...

    def flush(self) -> Awaitable[None]: ...


def free_slot(confirmed: int | None, maybe: set[int]) -> int:
    """The slot a new state goes to: never the one the last confirmed header names, nor
    one whose header was sent and not acknowledged since (it may be stored: a request
    that timed out), so that a crash before the new header always leaves whichever
    header is latest naming chunks that are whole.  0 and 1 in turn while writes pass."""
    taken = maybe if confirmed is None else {confirmed, *maybe}
    slot = 0
    while slot in taken:
        slot += 1
    return slot


class _Write:
    """One partition's state on its way to the changelog (core.statechunks)."""

    __slots__ = ("p", "slot", "chunks", "header", "offset", "repart_offset", "n_out", "futures", "dedup",
                 "expired", "aggs", "aggs_expired", "tombstones", "stale_slots")

    def __init__(self, p: PartitionState) -> None:
        self.p = p
        self.slot = free_slot(p.state_slot, p.maybe_slots)
        # the dedup ids new since the last durable state, as records beside the chunks; the
        # state names them (and the earlier ones still within the horizon: core.dedup)
        p.dedup.expire()
        records, self.dedup = p.dedup.take_records(p.partition)
        self.expired = p.dedup.take_expired()
        tombstones = p.dedup.record_keys(p.partition, self.expired)
        # the aggregates' input since the last durable state, the same way (core.aggstate)
        book_aggs = p.aggs_log()  # (what a restored state left of them, with AGG_AGGREGATES off)
        self.aggs: Prepared | None = None
        self.aggs_expired: list[tuple[int, int]] = []
        if book_aggs is not None:
            more, self.aggs = book_aggs.take_records(p.partition)
            records += more
            self.aggs_expired = book_aggs.take_expired()
            tombstones += book_aggs.record_keys(p.partition, self.aggs_expired)
        self.tombstones = [orjson.dumps(key) for key in tombstones]
        self.chunks, self.header = encode_chunks(p.partition, p.state_value(self.dedup, self.aggs), self.slot)
        # slots above 1 are taken only after headers not acknowledged (``free_slot``); once no
        # stored header can name one, its chunks are deleted, so the changelog stays bounded
        self.stale_slots = [t for t in p.extra_slots if t not in (p.state_slot, self.slot) and t not in p.maybe_slots]
        self.tombstones += [orjson.dumps(chunk_key(p.partition, t, i)) for t in self.stale_slots
                            for i in range(p.extra_slots[t])]
        if self.slot > 1:
            p.extra_slots[self.slot] = max(p.extra_slots.get(self.slot, 0), len(self.chunks))
        self.chunks += [(orjson.dumps(key), orjson.dumps(value)) for key, value in records]
        self.offset = p.commit_offset()
        self.repart_offset = p.book.repart_next
        self.n_out = len(p.book.outbox)
        self.futures: list[object] = []


async def _send(producer: Producer, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                headers: list[Header] | None = None) -> object:
    """The send's future; a send refused at once (e.g. a record over the producer's
    limit) as a failed one, so it is handled like a write the broker refused."""
    try:
        return await producer.send(topic, key, value, partition, None, headers)
    except Exception as exc:  # noqa: BLE001 - any refusal is a failed write: retried, counted
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        return fut


def _failure(futures: Iterable[object]) -> BaseException | None:
    """The first send that the broker did not acknowledge (after a flush), or None.
    Every future's outcome is looked at, so none is left "never retrieved"."""
    first: BaseException | None = None
    for fut in futures:
        if isinstance(fut, asyncio.Future):
            if not fut.done():
                error: BaseException | None = TimeoutError("not acknowledged by the broker after a flush")
            elif fut.cancelled():
                error = asyncio.CancelledError()
            else:
                error = fut.exception()
            if first is None:
                first = error
    return first


class Checkpointer:
    def __init__(self, producer: Callable[[], Producer],
                 confirmed: Callable[[int, list[tuple[bytes, bytes | None]]], None],
                 mark_safe: Callable[[int, int], None], metrics: Metrics, sinks: Sequence[SnapshotSink],
                 mark_safe_forwarded: Callable[[int, int], None] | None = None,
                 fence: Callable[[], tuple[int, str] | None] | None = None, topics: Topics = DEFAULT) -> None:
        self.producer = producer  # looked up at each checkpoint: Faust creates its producer late
        self.confirmed = confirmed  # partition, records -> acknowledged state records (None: deleted), kept in the table
        self.mark_safe = mark_safe  # partition, offset -> the consumer may commit up to offset
        self.mark_safe_forwarded = mark_safe_forwarded  # the same for the partition of clicks-repartition
        self.metrics = metrics
        self.sinks = sinks
        self.lock = asyncio.Lock()
        self.dead: list[DeadLetter] = []  # dead letters waiting for the next checkpoint
        self.forward: list[Forward] = []  # forwarded records waiting for the next checkpoint
        self.failing: str | None = None  # why the last checkpoint's writes failed (None: they did not)
        # why this worker may no longer own its partitions, and the log level to say it at (None:
        # it does), looked up at each checkpoint and again before the headers; while it says so
        # no state, snapshot or forward is written (``fenced``: what it said)
        self.fence = fence
        self.fenced: str | None = None
        self.topics = topics  # where state, dead letters, forwards and snapshots go (AGG_TOPIC_PREFIX)

    def held(self) -> str | None:
        """Why the writes wait (None: they do not): the broker refuses them, or the group may
        have dropped this worker (``_fenced``)."""
        return self.fenced or self.failing

    def _fenced(self) -> bool:
        """Whether the group may have given this worker's partitions to another (``fence``): a
        worker that stood still longer than its session writes nothing, neither the state
        of partitions another worker may count by now (it would overwrite the new owner's)
        nor their snapshots, until a heartbeat shows the group still has it, or the revoke
        that follows drops what it holds (the next owner counts on from the last state)."""
        said = None if self.fence is None else self.fence()
        why = None if said is None else said[1]
        if said is not None and self.fenced is None:
            log.log(said[0], "window state, snapshots and forwards held: %s", why)
            if said[0] > logging.INFO:  # not a shutdown's leave
                self.metrics.fenced()
        elif why is None and self.fenced is not None:
            log.warning("window state, snapshots and forwards written again: this worker is a member of its group")
        self.fenced = why
        return why is not None

    async def checkpoint(self, parts: Iterable[PartitionState], every: bool = True) -> None:
        """Write the changed states of ``parts``, confirm, mark safe, publish.  Callers
        hold ``lock``.  ``every``: ``parts`` are all the partitions owned (not a revoke's),
        so a checkpoint with nothing left refused may say writes pass again.  A state the
        broker does not acknowledge is written again at the next checkpoint; until then its
        offsets are not committed and its snapshots wait."""
        if self._fenced():  # written once this worker knows the group still has it
            return
        writes = []
        for p in parts:
            if p.book.dirty:
                p.book.dirty = False
                writes.append(_Write(p))
        if not writes and not self.dead and not self.forward:
            if every and self.failing is not None:  # what failed is gone (its partition revoked): nothing waits
                log.warning("no window state, forward or snapshot waits for the broker any more: fetching resumes")
                self.failing = None
            return
        producer = self.producer()
        changelog = self.topics.state_changelog
        dead, self.dead = self.dead, []
        forward, self.forward = self.forward, []
        # 1. the chunks (into the slot the current header does not name), the dead letters and
        # the forwarded records (in the order they were read: a repeat after a crash is a prefix)
        for w in writes:
            for key, value in w.chunks:
                w.futures.append(await _send(producer, changelog, key, value, w.p.partition))
            for key in w.tombstones:  # of dedup records a durable state no longer names
                w.futures.append(await _send(producer, changelog, key, None, w.p.partition))
        dead_futures = [await _send(producer, self.topics.dlq, key, value, None) for key, value in dead]
        dead_futures += [await _send(producer, self.topics.clicks_repartition, key, value, home, headers)
                         for home, key, value, headers in forward]
        await producer.flush()
        error = _failure(dead_futures)
        if error is not None:  # their records are before offsets about to be committed: all wait
            # Sent again in order.  The home drops what is at or below the highest source offset it
            # applied, so this is exact unless the broker took a later forward to a partition after
            # refusing an earlier one (aiokafka has one batch per partition in flight; a refusal
            # after its retries, with a later batch accepted): those are said and not sent again
            forward = self._drop_overtaken(forward, dead_futures[len(dead):])
            self.dead[:0] = dead
            self.forward[:0] = forward
            return self._failed(writes, error)
        outcome = [(w, _failure(w.futures)) for w in writes]
        failed = [w for w, e in outcome if e is not None]
        ok = [w for w, e in outcome if e is None]
        if ok and self._fenced():  # the chunks took so long that the group may have moved on
            self._again(ok)
            ok = []
        # 2. the headers of the states whose chunks are all confirmed: now the new slot counts
        for w in ok:
            w.futures = [await _send(producer, changelog, w.header[0], w.header[1], w.p.partition)]
        if ok:
            await producer.flush()
        outcome = [(w, _failure(w.futures)) for w in ok]
        for w, e in outcome:
            if e is not None:
                w.p.maybe_slots.add(w.slot)  # its header may be stored all the same
        failed += [w for w, e in outcome if e is not None]
        done = [w for w, e in outcome if e is None]
        if failed:
            self._failed(failed, _failure(failed[0].futures) or RuntimeError("state write failed"))
        refused = await self._publish(producer, done)
        if refused is not None:
            if self.failing is None:
                log.error("snapshots not acknowledged by the broker (%r): they stay in the window state and are "
                          "sent again every checkpoint", refused)
            self.failing = f"snapshot publishing failing: {refused!r}"
        elif not failed and every and self.failing is not None:  # ``every``: no other partition still fails
            log.warning("window state and snapshots acknowledged again: offsets and snapshots move on")
            self.failing = None

    def _drop_overtaken(self, forward: list[Forward], futures: Sequence[object]) -> list[Forward]:
        """``forward`` without those a later forward of the same source to the same home overtook
        (core.repartition.overtaken): their home drops them as repeats; said and counted here."""
        lost = overtaken([(home, parse_source_header(headers[1][1])[0]) for home, _, _, headers in forward],
                         [_failure((fut,)) is None for fut in futures])
        if not lost:
            return forward
        log.error("%d records forwarded to %s were not acknowledged by the broker while a later one of the same "
                  "source partition to the same home was: the home has passed them and would drop them as "
                  "repeats, so they are lost unless the broker stored them after all (docs/contract.md §1)",
                  len(lost), self.topics.clicks_repartition)
        self.metrics.forwards_lost(len(lost))
        gone = set(lost)
        return [f for i, f in enumerate(forward) if i not in gone]

    def _failed(self, writes: Sequence[_Write], error: BaseException) -> None:
        self._again(writes)
        if self.failing is None:
            log.error("window state not acknowledged by the broker (%r): offsets are not committed and snapshots "
                      "wait until a write succeeds; retrying every checkpoint", error)
        self.failing = f"window state writes failing: {error!r}"
        self.metrics.state_write_failed(len(writes))

    @staticmethod
    def _again(writes: Sequence[_Write]) -> None:
        """States not written (refused, or held by the fence after their chunks): written
        again next time, to a slot no stored header may name, their deletes with them."""
        for w in writes:
            w.p.book.dirty = True
            w.p.dedup.expired[:0] = w.expired
            aggs = w.p.aggs_log()
            if aggs is not None:
                aggs.expired[:0] = w.aggs_expired

    async def _publish(self, producer: Producer, done: Sequence[_Write]) -> BaseException | None:
        """The states in ``done`` are durable: offsets may be committed, drained spill
        records deleted, and their outboxes published.  Every durable state is taken as
        such first (its slot, its records, its offsets), whatever the snapshots do after.
        A snapshot the broker refuses keeps its book's outbox as it is: the state (which
        holds the outbox) is written again at the next checkpoint and the snapshots sent
        again, identical (a consumer of ``click-snapshots`` may see one twice, as after a
        crash); until then ``/readyz`` says why and the failure is counted.  Returns the first
        refusal, or None."""
        sending: list[tuple[WindowBook, list[Snapshot]]] = []
        t0 = time.perf_counter()
        for w in done:
            p = w.p
            p.state_slot = w.slot
            p.maybe_slots.clear()  # the latest header is this one now
            for t in w.stale_slots:
                p.extra_slots.pop(t, None)
            self.confirmed(p.partition, [*w.chunks, w.header, *((key, None) for key in w.tombstones)])
            p.dedup.confirm(w.dedup)
            aggs = p.aggs_log()
            if w.aggs is not None and aggs is not None:
                aggs.confirm(w.aggs)
            p.spill.acked()  # drained records are counted in durable state
            self.mark_safe(p.partition, w.offset)
            if w.repart_offset and self.mark_safe_forwarded is not None:
                self.mark_safe_forwarded(p.partition, w.repart_offset)
            if w.n_out:
                sending.append((p.book, p.book.outbox[:w.n_out]))
        if not sending:
            return None
        futures = [[await _send(producer, self.topics.snapshots, s["region"].encode(), orjson.dumps(s), None)
                    for s in snaps] for _, snaps in sending]
        try:
            await producer.flush()
        except Exception:  # noqa: BLE001 - the futures say what was not acknowledged
            pass
        published: list[tuple[WindowBook, list[Snapshot]]] = []
        error: BaseException | None = None
        for (book, snaps), futs in zip(sending, futures, strict=True):
            failed = _failure(futs)
            if failed is None:
                published.append((book, snaps))
            else:
                error = error or failed
                book.dirty = True  # its state (with the outbox) and the snapshots go again next time
        if error is not None:
            self.metrics.snapshot_publish_failed(len(sending) - len(published))
        if not published:
            return error
        out = [s for _, snaps in published for s in snaps]
        self.metrics.published(out, t0)
        for sink in self.sinks:
            try:
                sink(out)
            except Exception:  # a view of the snapshots never stops publishing
                log.exception("snapshot sink %r failed", sink)
        for book, snaps in published:
            book.published(len(snaps))
        return error
