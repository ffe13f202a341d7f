"""The worker's side of core.sourcelog: is a partition of ``clicks`` still the log its
window book counted, and what to do when it has started over (docs/contract.md §4).

``check_source`` runs on the first batch since a partition was opened, or on one from
below the book's next offset; ``reread_due`` says when a quiet, caught-up partition is to
be read again from just before the book's offset to check it (a log refilled to just
that offset gives no batch to check)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from aggregator.core.sourcelog import CHECK_IDLE_MS, restarted
from aggregator.core.topics import Topics
from aggregator.metrics import Metrics
from aggregator.worker.decoder import Record
from aggregator.worker.partitions import PartitionState

log = logging.getLogger("aggregator.worker")


class _Kafka(Protocol):
    topics: Topics  # the names behind AGG_TOPIC_PREFIX

    def highwater(self, partition: int) -> int | None: ...

    def log_restarted(self, partition: int) -> None: ...

    def position(self, partition: int) -> int | None: ...

    def end_seen(self, partition: int, topic: str | None = None) -> tuple[int | None, int] | None: ...


def check_source(p: PartitionState, records: Sequence[Record], start: int, kafka: _Kafka, metrics: Metrics) -> int:
    """Is ``records``' log still the one the book counted?  If it started over, say so
    (error, metric), count it again from where the detector says, and commit nothing of a
    state taken before.  Returns the book's next offset."""
    known = p.restart_pending
    restart = restarted(p.partition, start, p.source_ts, records, kafka.highwater(p.partition),
                        None if known is None else known.why, known is None or not known.behind)
    if restart is None and known is not None:
        p.known_next = records[-1].offset + 1
        return start  # the part of a log cut short that was counted before: read on, checked
    p.source_checked = True
    if restart is None:
        return start
    p.restart_pending = p.verify_at = None
    log.error(restart.message())
    metrics.source_log_reset(p.partition)
    kafka.log_restarted(p.partition)
    n = p.book.next_offset = restart.count_from
    p.book.log_epoch += 1  # what its forwarded records carry from now on (core.repartition)
    p.book.dirty = True
    old = p.spill.log_restarted()
    if old:
        log.warning("partition %d: %d spilled events read from the old log stay in the spill and are counted "
                    "as it drains; their offsets no longer hold commits back", p.partition, old)
    # the stamp of the record before it, if this batch has it (the next batch applied sets it)
    p.source_ts = next((r.timestamp for r in records if r.offset == n - 1), None)
    p.commit_ok = False  # a checkpoint in flight holds a state of the old log: not its offset
    return n


def reread_due(p: PartitionState, now_ms: int, highwater: int | None, kafka: _Kafka) -> bool:
    """Whether a quiet, caught-up partition is due for the check of its log."""
    n = p.book.next_offset
    return (highwater == n > 0 and p.source_ts is not None and p.restart_pending is None
            and not p.spill.ledger.rebuild and now_ms - max(p.clicks_ms or 0, p.verify_ms) >= CHECK_IDLE_MS
            and (p.source_checked or kafka.position(p.partition) == n))


def log_end(p: PartitionState, kafka: _Kafka, metrics: Metrics) -> tuple[int | None, int | None]:
    """The partition's end offset as of the last fetch (None: not known yet) and when that
    fetch was sent (the older for ``clicks-repartition``; None: none answered); sets the lag.
    While records forwarded to it wait, the end given is past what it has applied."""
    hw, seen_ms = kafka.end_seen(p.partition) or (None, None)
    forwarded, fseen_ms = kafka.end_seen(p.partition, kafka.topics.clicks_repartition) or (None, None)
    waiting = 0 if forwarded is None else max(0, forwarded - p.book.repart_next)
    if hw is not None:
        p.lag = max(0, hw - p.book.next_offset) + waiting
        metrics.partition_lag(p.partition, p.lag)
    seen_ms = min((t for t in (seen_ms, fseen_ms) if t is not None), default=None)
    return (p.book.next_offset + waiting if waiting else hw), seen_ms


def positioned(p: PartitionState, kafka: _Kafka) -> bool:
    """Whether the consumer is where the partition's state says: not so before its log is
    checked while the consumer reads from below the state's offset (a replay, or a log
    that started over: counted in order, its events must not find their windows closed
    by the clock) or does not know where it is yet."""
    if p.source_checked:
        return True
    position = kafka.position(p.partition)
    return position is not None and position >= p.book.next_offset
