"""Has a partition of ``clicks`` started over under the worker's feet?

A partition's state holds the next source offset it has applied (``next_offset``) and
the broker timestamp of the record just before it (``last_ts``).  When the topic is
deleted and created again, or the broker comes back without its data, the log restarts
at offset 0 while the state still says ``next_offset``: the new log's records below it
would be skipped as "already applied" and lost without a trace.

The question only arises for a batch that starts below ``next_offset`` (a replay of the
same log after a crash or a rebalance, or a new log).  The log has started over when:

* the partition's end offset is below ``next_offset`` (a log never shrinks otherwise);
* the batch holds the record at ``next_offset - 1`` and it carries another timestamp than
  the one the state kept (another record at that offset).

A batch that does not hold that record while the log reaches ``next_offset`` (a replay
from a committed offset more than a fetch below it, or a new log as long as the old one)
is not judged by its stamps: broker append times are not monotonic (a leader moved to a
broker whose clock is behind, an NTP step back), so a record of the same log below
``next_offset`` may be stamped after the one at ``next_offset - 1``.  The partition is
re-read from ``next_offset - 1`` first (``unproven``).  Only where the end offset is not
known does the stamp of the batch's first record decide (LogAppendTime, later than
``last_ts``: a new log).

A batch that starts exactly at ``next_offset`` cannot tell: a log deleted, created again
and refilled up to or past that offset between two fetches continues it seamlessly.  So a
partition is re-read from ``next_offset - 1`` (the record just before, the one the state
kept the timestamp of) before such a batch is counted when it follows a pause
(``needs_check``: no batch for ``CHECK_GAP_MS``, or its first record appended that long
after the last one applied, or the first batch since the partition was opened), and every
``CHECK_IDLE_MS`` while the partition is quiet and caught up (the new log may hold just
as many records as the old one and get no more).  Where that record is another one, the
log is read again from its start, the restart already known (``known``).

Where to count from: the batch's first record; but with broker-stamped times, records
appended no later than ``last_ts`` were counted before (a log cut short by the broker
rather than a new one keeps its first records), so counting starts at the first record
appended after it, or at the log's end if the batch holds none.

Pure: the worker hands in what it fetched.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

LOG_APPEND_TIME = 1  # a record's timestamp_type when the broker stamped it
CHECK_GAP_MS = 500  # a batch continuing the state's offset after a pause this long is checked first
CHECK_IDLE_MS = 2000  # a quiet, caught-up partition is checked this often
CHECK_TRIES = 3  # re-reads that do not hold the record before and the next one before the batch is let be


class SourceRecord(Protocol):
    """What the detector reads of a fetched record."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def timestamp_type(self) -> int: ...


@dataclass(frozen=True)
class Restart:
    """The partition's log started over: what the state said, what the log says now, and the
    offset from which the worker counts again."""

    partition: int
    next_offset: int  # the state's
    log_end: int | None  # the broker's end offset, when known
    count_from: int  # the first offset counted (again)
    why: str
    behind: bool = False  # the record at next_offset - 1 is stamped before the state's: the broker's clock is behind

    def message(self) -> str:
        end = "unknown" if self.log_end is None else str(self.log_end)
        return (f"partition {self.partition} of clicks started over ({self.why}): the window state had applied "
                f"offsets below {self.next_offset}, the log now ends at {end}; counting it from offset "
                f"{self.count_from} (nothing of the new log is skipped)")


def needs_check(next_offset: int, last_ts: int | None, first: SourceRecord, quiet_ms: int | None) -> bool:
    """Whether a batch whose first record is ``first`` must wait for the partition to be
    re-read from ``next_offset - 1`` before it is counted: it continues the state's offset
    after a pause (``quiet_ms``: since the partition's last batch, None: none since it was
    opened), so the log may have started over in between."""
    if first.offset != next_offset or next_offset == 0 or last_ts is None:
        return False  # below: checked as it is; above or a fresh state: nothing to compare with
    if quiet_ms is None or quiet_ms >= CHECK_GAP_MS:
        return True
    return first.timestamp_type == LOG_APPEND_TIME and first.timestamp - last_ts >= CHECK_GAP_MS


def restarted(partition: int, next_offset: int, last_ts: int | None, records: Sequence[SourceRecord],
              log_end: int | None, known: str | None = None, stamps: bool = True) -> Restart | None:
    """A ``Restart`` if the fetched batch ``records`` (in offset order, not empty) comes from
    a log that started over since the state (``next_offset``; ``last_ts``: the timestamp of
    the record at ``next_offset - 1``, None if unknown) was counted; ``log_end``: the
    partition's end offset, None if unknown.  None: the same log (or nothing below
    ``next_offset``).  ``known``: why the log is already known to have started over (found
    at ``next_offset - 1``; the batch is read from the log's start): only where to count
    from is asked, and with broker stamps a batch that holds only records appended no later
    than ``last_ts`` below ``next_offset`` is the part of a log cut short that the state
    counted (None: read on), unless ``stamps`` is False (a broker's clock found behind: its
    stamps tell nothing, the whole log is counted)."""
    first = records[0]
    if first.offset >= next_offset and known is None:
        return None
    stamped = stamps and last_ts is not None and first.timestamp_type == LOG_APPEND_TIME
    behind = False
    if known is not None:
        why = known
    elif log_end is not None and log_end < next_offset:
        why = f"its end offset {log_end} is below the state's {next_offset}"
    elif last_ts is None:
        return None  # a state of the earlier format: nothing to compare with
    elif (prev := _at(records, next_offset - 1)) is not None:
        if prev.timestamp == last_ts:
            return None
        why = f"the record at offset {next_offset - 1} has timestamp {prev.timestamp}, the state recorded {last_ts}"
        behind = prev.timestamp < last_ts
    elif stamped and log_end is None and first.timestamp > last_ts:  # else re-read first (``unproven``)
        why = (f"the record at offset {first.offset} was appended at {first.timestamp}, after the record at "
               f"{next_offset - 1} the state applied ({last_ts})")
    else:
        return None
    count_from = first.offset
    if stamped and last_ts is not None:
        newer = next((r.offset for r in records if r.timestamp > last_ts), None)
        if newer is not None:
            count_from = newer
        elif log_end is not None and log_end < next_offset:
            count_from = log_end  # cut short: what is left of it was counted
        elif known is not None:
            past = next((r.offset for r in records if r.offset >= next_offset), None)
            if past is None:
                return None  # all of it counted before: the new records come later
            count_from = past  # never counted, whatever its stamp says
    return Restart(partition, next_offset, log_end, count_from, why, behind)


def unproven(next_offset: int, last_ts: int | None, records: Sequence[SourceRecord], log_end: int | None) -> bool:
    """Whether a batch from below ``next_offset`` leaves open if its log is the one the state
    counted: it does not hold the record at ``next_offset - 1`` and the log reaches
    ``next_offset`` (``log_end``), so only that record, read again, can tell (``restarted``
    on the re-read): its stamps cannot (append times are not monotonic)."""
    return (records[0].offset < next_offset and last_ts is not None and log_end is not None
            and log_end >= next_offset
            and (records[-1].offset < next_offset - 1 or _at(records, next_offset - 1) is None))


def _at(records: Sequence[SourceRecord], offset: int) -> SourceRecord | None:
    """The batch's record at ``offset``, if it holds it."""
    i = offset - records[0].offset  # where it is if the batch has no gaps
    if 0 <= i < len(records) and records[i].offset == offset:
        return records[i]
    return next((r for r in records if r.offset == offset), None)
