"""The worker's side of core.sourcelog: is a partition of ``clicks`` still the log its
window book counted, and what to do when it has started over (docs/contract.md §4).

``vet_batch`` decides, per batch of ``clicks``, whether it is counted now or the partition
is read again first; ``check_source`` runs on the first batch since a partition was opened,
or on one from below the book's next offset; ``reread_due`` says when a quiet, caught-up
partition is to be read again from just before the book's offset to check it (a log
refilled to just that offset gives no batch to check).

Offsets lost (``_gap``, ``forwarded_gap``): a batch that starts above the book's next offset
``N`` skips offsets the state never applied.  The consumer knows which offsets it read
(``consumer.note_read``): where it read every offset from ``N`` (or below) up to the
batch's first record and handed none of them over, they hold no record (transaction
markers, aborted transactions' batches: read committed): the batch continues the book.
Otherwise its position jumped over ``N`` (an offset reset to the log's start: what it was
to read next was deleted by retention, a worker down or paused longer than the retention;
or a seek): the partition is read again from ``N``.  A read that jumps past ``N`` again
after that seek (the reset again) shows the offsets deleted: one error line names the
topic, the partition and the offsets, and ``clickstream_source_offsets_lost_total`` counts
them.  ``clicks-repartition`` is written by the workers alone, without transactions: any
gap there is reported as it is seen."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from aggregator.core.sourcelog import CHECK_IDLE_MS, needs_check, restarted, unproven
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

    def read_from(self, partition: int) -> tuple[int, int | None] | None: ...

    def end_seen(self, partition: int, topic: str | None = None) -> tuple[int | None, int] | None: ...


def vet_batch(p: PartitionState, records: Sequence[Record], now_ms: int, kafka: _Kafka,
              metrics: Metrics) -> tuple[int, int | None]:
    """Whether a batch of ``clicks`` may be counted (core.sourcelog): -> (the book's next
    offset, None), or (_, an offset to fetch the partition again from, the batch not counted).
    A batch sent back (not counted) or a re-read with nothing new leaves the partition as
    quiet as it was: its clock may follow, and its next batch is checked."""
    start = p.book.next_offset
    first = records[0]
    still_quiet = False
    if p.restart_pending is not None and first.offset >= start and p.known_next != first.offset:
        # the log is to be read from its start first (a seek refused, or lost to a reset)
        again = p.reread_batch(now_ms, 0)
        if again is not None:
            return start, again
        p.known_next = first.offset  # what the log gives: it is counted from there
    if first.offset > start > 0 and p.restart_pending is None:
        again, read = _gap(p, first.offset, kafka, metrics)
        if again is None and read:  # over markers only: it continues the book, as a batch at its offset
            again = _paused(p, first, now_ms)
        if again is not None:
            return start, again
    elif first.offset == start and p.restart_pending is None:
        again = _paused(p, first, now_ms)
        if again is not None:
            return start, again
    elif first.offset == p.verify_at == start - 1:  # the re-read the check asked for
        found = restarted(p.partition, start, p.source_ts, records, kafka.highwater(p.partition))
        # the record before proven, a lost spill's replay goes on from where it needs (it needs no more)
        rebuild = found is None and bool(p.spill.ledger.rebuild)
        if found is not None or records[-1].offset >= start or rebuild:  # else it proves nothing of a batch at start
            p.verify_at, p.verify_tries = None, 0
        else:
            still_quiet = True  # nothing new in it
        if found is not None and first.offset > 0:  # another log: read it from its start, the restart known
            p.restart_pending, p.known_next = found, None
            p.source_checked = p.commit_ok = False  # no clock, no commit till it is counted again
            return start, 0
        if rebuild and p.commit_offset() < first.offset:
            p.source_checked = True
            return start, p.commit_offset()
    elif (p.restart_pending is None and not (p.spill.ledger.rebuild and p.source_checked)
          and unproven(start, p.source_ts, records, kafka.highwater(p.partition))):
        # a replay that does not reach the record before the book's offset: that record tells
        # (a lost spill's replay too: read on from where it needs once it is proven)
        again = p.reread_batch(now_ms)
        if again is not None:
            return start, again
    if not still_quiet:
        p.last_record_ms = p.clicks_ms = now_ms
    if first.offset < start or not p.source_checked:
        start = check_source(p, records, start, kafka, metrics)
    return start, None


def _paused(p: PartitionState, first: Record, now_ms: int) -> int | None:
    """An offset to read the partition again from before a batch that continues the book
    (``first``) is counted after a pause (``needs_check``), or None."""
    if p.spill.ledger.rebuild or not needs_check(
            first.offset, p.source_ts, first, None if p.clicks_ms is None else now_ms - p.clicks_ms):
        return None
    return p.reread_batch(now_ms)


def _gap(p: PartitionState, first: int, kafka: _Kafka, metrics: Metrics) -> tuple[int | None, bool]:
    """A batch of ``clicks`` that starts at ``first``, above the book's next offset ``n``:
    (an offset to read the partition again from, _): the consumer's position jumped over
    ``n``; (None, True): the consumer read every offset from ``n`` to ``first`` and they hold
    no record; (None, False): it jumped over ``n`` again when sought back there: the
    offsets up to where it read on from are reported lost."""
    n = p.book.next_offset
    read = kafka.read_from(p.partition)
    clear, sought = (first, n) if read is None else read  # (not known: said lost, never counted silently)
    if clear <= n:
        return None, True
    if sought is None or sought > n:
        return n, False  # a reset or another's seek: whatever is still there from n is read
    _lost(kafka.topics.clicks, "clicks", p.partition, n, clear, metrics)
    return None, False


def forwarded_gap(p: PartitionState, first: int, kafka: _Kafka, metrics: Metrics) -> None:
    """A batch of ``clicks-repartition`` that starts at ``first``: its offsets from the
    book's ``repart_next`` up to it, if any, are lost (reported)."""
    n = p.book.repart_next
    if first > n > 0:
        _lost(kafka.topics.clicks_repartition, "clicks-repartition", p.partition, n, first, metrics)


def _lost(topic: str, label: str, partition: int, n: int, first: int, metrics: Metrics) -> None:
    log.error("partition %d of %s: offsets %d..%d are no longer in the log (deleted by retention, or skipped by an "
              "offset reset after the worker was down or paused longer than the retention); the %d events there "
              "were never counted and are lost; counting on from offset %d", partition, topic, n, first - 1,
              first - n, first)
    metrics.source_offsets_lost(label, first - n)


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


def reread_due(p: PartitionState, now_ms: int, highwater: int | None, n: int, kafka: _Kafka) -> bool:
    """Whether a quiet, caught-up partition is due for the check of its log; ``n``: where it
    stands as read (``kafka.read_to``)."""
    return (highwater == n > 0 and p.source_ts is not None and p.restart_pending is None
            and not p.spill.ledger.rebuild and now_ms - max(p.clicks_ms or 0, p.verify_ms) >= CHECK_IDLE_MS
            and (p.source_checked or kafka.position(p.partition) == n))


def log_end(p: PartitionState, n: int, kafka: _Kafka, metrics: Metrics) -> tuple[int | None, int | None]:
    """The partition's end offset as of the last fetch (None: not known yet) and when that
    fetch was sent (the older for ``clicks-repartition``; None: none answered); sets the lag
    from ``n``, where it stands as read (``kafka.read_to``).  While records forwarded to it
    wait, the end given is past what it has applied."""
    hw, seen_ms = kafka.end_seen(p.partition) or (None, None)
    forwarded, fseen_ms = kafka.end_seen(p.partition, kafka.topics.clicks_repartition) or (None, None)
    waiting = 0 if forwarded is None else max(0, forwarded - p.book.repart_next)
    if hw is not None:
        p.lag = max(0, hw - n) + waiting
        metrics.partition_lag(p.partition, p.lag)
    seen_ms = min((t for t in (seen_ms, fseen_ms) if t is not None), default=None)
    return (n + waiting if waiting else hw), seen_ms


def positioned(p: PartitionState, kafka: _Kafka) -> bool:
    """Whether the consumer is where the partition's state says: not so before its log is
    checked while the consumer reads from below the state's offset (a replay, or a log
    that started over: counted in order, its events must not find their windows closed
    by the clock) or does not know where it is yet."""
    if p.source_checked:
        return True
    position = kafka.position(p.partition)
    return position is not None and position >= p.book.next_offset
