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
their records (``record_keys``).  The state names the buckets it leaves out (``gone``), so
the owner that restores it deletes them should the one that wrote it stop first.

A write that fails may still have been stored, header and all (a timeout is not a
refusal), and that header names the records it was sent with.  So a key is never written
again with other content while such a header may be the latest: the records of a write not
confirmed are kept (``unconfirmed``) and sent again as they are by the next
``take_records``, and what the log gained since goes to the keys after them.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any

RECORD_BYTES = 400_000  # JSON bytes per record at most: under statechunks' bound (512 KiB)


class Prepared:
    """What a state about to be written holds of a ``RecordLog``."""

    __slots__ = ("index", "n_pending", "n_expiring", "gone")

    def __init__(self, index: dict[int, int], n_pending: int, n_expiring: int,
                 gone: list[tuple[int, int]] | None = None) -> None:
        self.index = index  # bucket -> records
        self.n_pending = n_pending
        self.n_expiring = n_expiring
        # (bucket, records) the state leaves out: deleted after it is durable, and named in it
        # so a crash or a revoke before the deletes leaves them to the next owner (``restore_gone``)
        self.gone = gone or []

    def to_json(self) -> dict[str, int]:
        return {str(b): n for b, n in sorted(self.index.items())}

    def gone_json(self) -> list[list[int]]:
        return [[b, n] for b, n in self.gone]


class RecordLog:
    TAG = ""  # the key's part after the partition

    def __init__(self) -> None:
        self.pending: list[Any] = []  # (bucket, ...) items not written yet
        self.written: dict[int, int] = {}  # bucket -> records the durable state names
        self.expiring: list[tuple[int, int]] = []  # (bucket, records) left out of the state being written
        self.expired: list[tuple[int, int]] = []  # (bucket, records) no durable state names: delete them
        # per bucket, the records sent by writes not confirmed since the last durable state
        # (keys from ``written``'s count on), how many of the bucket's pending items they hold,
        # and the bucket's record count with them
        self.unconfirmed: dict[int, tuple[list[tuple[str, dict[str, Any]]], int, int]] = {}

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
        self._expire_unconfirmed(by_bucket)
        index = dict(self.written)
        records: list[tuple[str, dict[str, Any]]] = []
        value_of = self._value
        sent: dict[int, tuple[list[tuple[str, dict[str, Any]]], int, int]] = {}
        for b in sorted(by_bucket):
            items = by_bucket[b]
            # what a write not confirmed sent of the bucket: again, as it was (its items are
            # the first of the bucket's pending ones: a bucket's items are only appended, or
            # dropped all together, which ends it)
            mine, start, _ = self.unconfirmed.get(b, ([], 0, 0))
            mine = list(mine)
            seq = index.get(b, 0) + len(mine)
            items = items[start:]
            # cut greedily: a record takes items while their sizes add up to at most
            # RECORD_BYTES (always at least one), found by bisecting the running total
            total = list(accumulate(self._sizes(items), initial=0))
            start = 0
            while start < len(items):
                end = max(start + 1, bisect_right(total, total[start] + RECORD_BYTES, start + 1) - 1)
                mine.append((self.record_key(partition, b, seq), value_of(items[start:end])))
                seq += 1
                start = end
            records += mine
            index[b] = seq
            sent[b] = (mine, len(by_bucket[b]), seq)
        self.unconfirmed = sent
        return records, Prepared(index, len(self.pending), len(self.expiring), list(self.expiring))

    def _expire_unconfirmed(self, live: dict[int, list[Any]]) -> None:
        """Buckets of writes not confirmed that have nothing pending now were dropped (their
        window closed, a compaction or the horizon ended them): their records, up to the
        last one sent, go with the bucket (``expiring``), not only the ones ``written`` names."""
        for b, (_, _, end) in list(self.unconfirmed.items()):
            if b in live:
                continue
            del self.unconfirmed[b]
            for i, (eb, n) in enumerate(self.expiring):
                if eb == b:
                    self.expiring[i] = (b, max(n, end))
                    break
            else:
                if b not in self.written:  # else still live, with nothing new: written as it is
                    self.expiring.append((b, end))

    def confirm(self, prepared: Prepared) -> None:
        """The state holding ``prepared`` is durable: its pending items are written, and the
        records of the buckets it no longer names may be deleted."""
        self.written.update(prepared.index)
        self.unconfirmed = {}  # the state naming them is durable: they are written
        del self.pending[:prepared.n_pending]
        self.expired += self.expiring[:prepared.n_expiring]
        del self.expiring[:prepared.n_expiring]

    def restore_gone(self, gone: Any) -> list[int]:
        """A restored state's ``Prepared.gone_json()``: their records are deleted with the next
        write (the owner that wrote the state may have stopped before it deleted them);
        -> their buckets.  ValueError when it is not a list of ``[bucket, records]``."""
        pairs = []
        for item in gone or ():
            if not (isinstance(item, list) and len(item) == 2 and all(type(x) is int and x >= 0 for x in item)):
                raise ValueError(f"a malformed bucket of records to delete: {item!r}")
            pairs.append((item[0], item[1]))
        self.expired += pairs
        return [b for b, _ in pairs]

    def take_expired(self) -> list[tuple[int, int]]:
        """(bucket, records) to delete; given back with ``expired[:0] = ...`` when the
        delete fails."""
        taken, self.expired = self.expired, []
        return taken


class LeftRecords(RecordLog):
    """The records of a restored state that its new owner does not keep (``AGG_AGGREGATES``
    turned off across a restart: the aggregates' records of its open windows): named as
    gone by the next state written, deleted once that state is durable, like a log's
    expired buckets.  ``index`` and ``gone``: the state's index and gone list (JSON)."""

    def __init__(self, tag: str, index: Any, gone: Any) -> None:
        super().__init__()
        self.TAG = tag
        for b, n in (index or {}).items():
            if not (str(b).isdigit() and type(n) is int and n >= 0):
                raise ValueError(f"a malformed index entry of records: {b!r}: {n!r}")
            self.expiring.append((int(b), n))
        self.restore_gone(gone)
