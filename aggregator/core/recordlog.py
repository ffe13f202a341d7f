"""State written incrementally: what changed since the last durable state, as changelog
records of bounded size keyed by ``<partition>/<tag>/<bucket>/<seq>``, named in the
partition's state by an index (bucket -> records), deleted once no durable state names
them.  The shared part of core.dedup and core.aggstate.  Pure: standard library only.

A subclass appends ``(bucket, ...)`` tuples to ``pending`` and says how big an item is in
JSON (an upper bound) and how items become a record's value.  ``take_records`` prepares
the records and the index for a state about to be written, changing nothing;
``confirm`` applies it once that state is durable, so a write that fails is prepared
again, whole.  Buckets the subclass drops go to ``expiring`` (left out of the next
index), then, once a state without them is durable, to ``expired``: the caller deletes
their records (``record_keys``).
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any

RECORD_BYTES = 400_000  # JSON bytes per record at most: under statechunks' bound (512 KiB)


class Prepared:
    """What a state about to be written holds of a ``RecordLog``."""

    __slots__ = ("index", "n_pending", "n_expiring")

    def __init__(self, index: dict[int, int], n_pending: int, n_expiring: int) -> None:
        self.index = index  # bucket -> records
        self.n_pending = n_pending
        self.n_expiring = n_expiring

    def to_json(self) -> dict[str, int]:
        return {str(b): n for b, n in sorted(self.index.items())}


class RecordLog:
    TAG = ""  # the key's part after the partition

    def __init__(self) -> None:
        self.pending: list[Any] = []  # (bucket, ...) items not written yet
        self.written: dict[int, int] = {}  # bucket -> records the durable state names
        self.expiring: list[tuple[int, int]] = []  # (bucket, records) left out of the state being written
        self.expired: list[tuple[int, int]] = []  # (bucket, records) no durable state names: delete them

    # what a subclass says
    def _sizes(self, items: Sequence[Any]) -> list[int]:
        """Each item's JSON bytes in a record, at most (a checkpoint sizes every item it
        writes: a subclass gives them in one pass, not a call per item)."""
        raise NotImplementedError

    def _value(self, items: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def record_key(self, partition: int, bucket: int, seq: int) -> str:
        return f"{partition}/{self.TAG}/{bucket}/{seq}"

    def record_keys(self, partition: int, buckets: Iterable[tuple[int, int]]) -> list[str]:
        """The keys of the records of ``(bucket, records)``."""
        return [self.record_key(partition, b, seq) for b, n in buckets for seq in range(n)]

    def take_records(self, partition: int) -> tuple[list[tuple[str, dict[str, Any]]], Prepared]:
        """-> (records of the pending items, cut at RECORD_BYTES; what the state written with
        them holds: their index with every earlier record of the live buckets)."""
        by_bucket: dict[int, list[Any]] = {}
        for item in self.pending:
            by_bucket.setdefault(item[0], []).append(item)
        index = dict(self.written)
        records: list[tuple[str, dict[str, Any]]] = []
        value_of = self._value
        for b in sorted(by_bucket):
            seq = index.get(b, 0)
            items = by_bucket[b]
            # cut greedily: a record takes items while their sizes add up to at most
            # RECORD_BYTES (always at least one), found by bisecting the running total
            total = list(accumulate(self._sizes(items), initial=0))
            start = 0
            while start < len(items):
                end = max(start + 1, bisect_right(total, total[start] + RECORD_BYTES, start + 1) - 1)
                records.append((self.record_key(partition, b, seq), value_of(items[start:end])))
                seq += 1
                start = end
            index[b] = seq
        return records, Prepared(index, len(self.pending), len(self.expiring))

    def confirm(self, prepared: Prepared) -> None:
        """The state holding ``prepared`` is durable: its pending items are written, and the
        records of the buckets it no longer names may be deleted."""
        self.written.update(prepared.index)
        del self.pending[:prepared.n_pending]
        self.expired += self.expiring[:prepared.n_expiring]
        del self.expiring[:prepared.n_expiring]

    def take_expired(self) -> list[tuple[int, int]]:
        """(bucket, records) to delete; given back with ``expired[:0] = ...`` when the
        delete fails."""
        taken, self.expired = self.expired, []
        return taken
