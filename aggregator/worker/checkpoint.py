"""The checkpoint protocol: changelog write -> broker confirms -> offsets safe to
commit -> snapshots published.

One checkpoint at a time (a tick and a rebalance's revoke must not publish one outbox
twice).  For each partition whose book changed, its state (book + spill ledger, with
the next source offset) goes to the changelog; the producer is flushed, so the state
is durable before anything depends on it; only then may the consumer commit up to the
offset that state holds (``mark_safe``), drained spill records be deleted, and the
snapshots that the state's outbox holds be published.  After a crash the state is
recovered from the changelog and its outbox published again with identical content:
exactly once in effect (docs/contract.md §1).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import orjson

from aggregator.core.contract import DLQ, SNAPSHOTS, Snapshot
from aggregator.core.windows import WindowBook
from aggregator.metrics import Metrics
from aggregator.worker.decoder import DeadLetter
from aggregator.worker.partitions import PartitionState

log = logging.getLogger("aggregator.worker")

SnapshotSink = Callable[[Sequence[Snapshot]], None]


class Producer(Protocol):
    """What a checkpoint needs of the producer (Faust's): buffered sends and a flush that
    returns once the broker has acknowledged everything sent before it."""

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
             timestamp: float | None, headers: list[tuple[str, bytes]] | None) -> Awaitable[object]: ...

    def flush(self) -> Awaitable[None]: ...


class Checkpointer:
    def __init__(self, producer: Callable[[], Producer], write_state: Callable[[int, bytes], None],
                 mark_safe: Callable[[int, int], None], metrics: Metrics, sinks: Sequence[SnapshotSink]) -> None:
        self.producer = producer  # looked up at each checkpoint: Faust creates its producer late
        self.write_state = write_state  # partition, value -> the state table and its changelog
        self.mark_safe = mark_safe  # partition, offset -> the consumer may commit up to offset
        self.metrics = metrics
        self.sinks = sinks
        self.lock = asyncio.Lock()
        self.dead: list[DeadLetter] = []  # dead letters waiting for the next checkpoint

    async def checkpoint(self, parts: Iterable[PartitionState]) -> None:
        """Write the changed states of ``parts``, confirm, mark safe, publish.  Callers
        hold ``lock``."""
        sent: list[tuple[PartitionState, int, int]] = []  # state, safe offset, snapshots to publish
        for p in parts:
            if not p.book.dirty:
                continue
            value = p.state_value()
            p.book.dirty = False
            self.write_state(p.partition, value)
            sent.append((p, p.commit_offset(), len(p.book.outbox)))
        if not sent and not self.dead:
            return
        producer = self.producer()
        dead, self.dead = self.dead, []
        for key, value in dead:
            await producer.send(DLQ, key, value, None, None, None)
        await producer.flush()  # state durable before offsets move or snapshots go out
        published: list[tuple[WindowBook, list[Snapshot]]] = []
        t0 = time.perf_counter()
        for p, offset, n_out in sent:
            p.spill.acked()  # drained records are counted in durable state
            if n_out:
                snaps = p.book.outbox[:n_out]
                for snap in snaps:
                    await producer.send(SNAPSHOTS, snap["region"].encode(), orjson.dumps(snap), None, None, None)
                published.append((p.book, snaps))
            self.mark_safe(p.partition, offset)
        if published:
            await producer.flush()
            out = [s for _, snaps in published for s in snaps]
            self.metrics.published(out, t0)
            for sink in self.sinks:
                try:
                    sink(out)
                except Exception:  # a view of the snapshots never stops publishing
                    log.exception("snapshot sink %r failed", sink)
            for book, snaps in published:
                book.published(len(snaps))
