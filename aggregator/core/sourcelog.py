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
  the one the state kept (another record at that offset); or, when it does not hold it,
* the batch's first record has a broker-stamped time (LogAppendTime, what the service
  asks for on ``clicks``) later than ``last_ts``: on the same log every record below
  ``next_offset`` was appended no later than the one at ``next_offset - 1``.

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

    def message(self) -> str:
        end = "unknown" if self.log_end is None else str(self.log_end)
        return (f"partition {self.partition} of clicks started over ({self.why}): the window state had applied "
                f"offsets below {self.next_offset}, the log now ends at {end}; counting it from offset "
                f"{self.count_from} (nothing of the new log is skipped)")


def restarted(partition: int, next_offset: int, last_ts: int | None, records: Sequence[SourceRecord],
              log_end: int | None) -> Restart | None:
    """A ``Restart`` if the fetched batch ``records`` (in offset order, not empty) comes from
    a log that started over since the state (``next_offset``; ``last_ts``: the timestamp of
    the record at ``next_offset - 1``, None if unknown) was counted; ``log_end``: the
    partition's end offset, None if unknown.  None: the same log (or nothing below
    ``next_offset``)."""
    first = records[0]
    if first.offset >= next_offset:
        return None
    stamped = last_ts is not None and first.timestamp_type == LOG_APPEND_TIME
    if log_end is not None and log_end < next_offset:
        why = f"its end offset {log_end} is below the state's {next_offset}"
    elif last_ts is None:
        return None  # a state of the earlier format: nothing to compare with
    elif (prev := _at(records, next_offset - 1)) is not None:
        if prev.timestamp == last_ts:
            return None
        why = f"the record at offset {next_offset - 1} has timestamp {prev.timestamp}, the state recorded {last_ts}"
    elif stamped and first.timestamp > last_ts:
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
    return Restart(partition, next_offset, log_end, count_from, why)


def _at(records: Sequence[SourceRecord], offset: int) -> SourceRecord | None:
    """The batch's record at ``offset``, if it holds it."""
    i = offset - records[0].offset  # where it is if the batch has no gaps
    if 0 <= i < len(records) and records[i].offset == offset:
        return records[i]
    return next((r for r in records if r.offset == offset), None)
