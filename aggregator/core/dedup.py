"""Exact duplicate detection within a horizon: ``Idempotency-Key`` retries and ``event_id``s.

Pure: standard library and core only.  What identifies an event (its dedup id) is
core.dedupid's.  One ``DedupStore`` per partition of ``clicks``, part of
the partition's exactly-once state (docs/contract.md §3, "Retries").

Exact: a dedup id is stored whole, never as a filter that could call two distinct ids
one; only request keys are digests, and two distinct keys collide only if their 128-bit
digests do (for N keys within the horizon, probability below N²/2¹²⁹).  An idempotency key keeps a
bitmap of the indices seen (one bit per index up to the highest), so a request of 1000
events costs about 250 bytes, not 1000 ids; an index far past the bitmap's end (a body
whose items were mostly refused) goes to a set instead (``keybits.mark``), so a key's memory
follows the events it brought, never the body's length.

Bounded by ``max_ids`` (AGG_DEDUP_MAX_IDS) whatever the mix: an event id counts as one, a
request key as the ids its memory would hold (``KEY_MEMORY`` plus ``keybits.cost`` of its
indices, over ID_MEMORY: a key of one event counts about 2.3).  A key's cost is a function
of its indices alone, kept in its entry and summed in ``key_bytes`` (recomputed once a
batch for each key the batch brought indices to), so a store restored from the records
counts what the original did and the same calls evict the same buckets in both.

Bounded by the horizon: an id belongs to the *bucket* (``horizon / BUCKETS`` of
ingest time) of the first time it was seen, and a bucket is forgotten once the
partition's stream time is a whole horizon past its end: a repeat is dropped as long
as it comes within the horizon of the first sighting (and possibly a bucket longer).

A request's ids are remembered as runs: consecutive indices of one key that one batch
brings (all of a request's events that go to one partition, usually) are one pending item
``(bucket, [key, first, last])`` and one ``[first, last]`` in a record (runs of three or
more), not an item and a number an event.

Written incrementally: what a checkpoint adds is ``take_records()`` (changelog records
of at most ``recordlog.RECORD_BYTES`` each (core.recordlog), keyed by bucket and sequence number), named in the
partition's state (``Prepared.to_json()``); buckets that expire leave the index and their
records are deleted (tombstones) after the state that no longer names them is durable.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aggregator.core.dedupid import EVENT_ID, IDEMPOTENCY_KEY, DedupId
from aggregator.core.keybits import SPARSE_BYTES, cost, mark, runs
from aggregator.core.recordlog import RecordLog

BUCKETS = 10  # a horizon is this many buckets
DEFAULT_MAX_IDS = 1_000_000  # event ids one partition remembers at most (AGG_DEDUP_MAX_IDS)
KEY_BYTES = 38  # a request key's part of a record's JSON, without its indices: "<32 hex>":[],
# worker memory of a remembered request key besides its bitmap's and far set's bytes (digest,
# entry, its place in its bucket), and of an event id of ~20 characters, measured alike (RSS
# of a million in a store): 355 bytes a key of one event, 151 an id.  Their ratio weighs a key
# against AGG_DEDUP_MAX_IDS (``cost``)
KEY_MEMORY = 350
ID_MEMORY = 150

# what a pending item holds: an event id, or a run [request key's digest, first, last index]
PendingId = str | list[int]


class DedupStore(RecordLog):
    """The ids seen on one partition within the horizon; ``horizon_ms`` 0: no dedup.
    At most ``max_ids`` event ids or their memory's worth of request keys (``cost``)."""

    TAG = "d"

    def __init__(self, horizon_ms: int, max_ids: int = DEFAULT_MAX_IDS) -> None:
        super().__init__()  # pending: (bucket, id) not written yet
        self.horizon_ms = horizon_ms
        self.max_ids = max_ids  # event ids remembered at most (memory: about ID_MEMORY each), keys by ``cost``
        self.evicted = 0  # event ids and request keys forgotten before their horizon because of max_ids
        self.key_bytes = 0  # the request keys' memory: the sum of their entries' [3]
        self.bucket_ms = max(1, horizon_ms // BUCKETS)
        self.events: dict[str, int] = {}  # event id -> its bucket
        # request key -> [its bucket, bytearray bitmap of indices, set of far indices or None
        # (``keybits.mark``), KEY_MEMORY + ``keybits.cost`` of them when last counted in ``key_bytes``]
        self.keys: dict[int, list[Any]] = {}
        self.buckets: dict[int, list[Any]] = {}  # bucket -> the event ids and request keys first seen in it
        self.newest = 0  # the newest ingest time seen (ms)
        # the lowest bucket an id may go to: above every bucket dropped, whose records are
        # deleted after the next durable state; a bucket made again under the same keys would
        # have its new records deleted with them (an event of an old ingest time: forwarded,
        # another ingest's clock), so such an id goes to this bucket instead
        self.floor = 0

    def size(self) -> tuple[int, int]:
        """-> (event ids, request keys) remembered."""
        return len(self.events), len(self.keys)

    def cost(self) -> int:
        """-> what is remembered, in event ids: the ids, and the keys by their memory
        (``key_bytes`` over ID_MEMORY, rounded up); ``expire`` keeps it at most ``max_ids``."""
        return len(self.events) + -(-self.key_bytes // ID_MEMORY)

    # ------------------------------------------------------------------ hot path
    def filter(self, events: Sequence[tuple[Any, int, Any]], ids: Sequence[DedupId | None],
               offsets: Sequence[int] | None = None, aggs: Sequence[Any] | None = None,
               ) -> tuple[list[Any], list[int] | None, dict[tuple[Any, str], int], list[Any] | None]:
        """-> (the events that are not duplicates, their offsets (when given), duplicates
        by (region, source), their ``aggs`` (when given)).  ``ids[i]`` is the dedup id of ``events[i]`` (None: it has
        none, always counted).  Ids kept are remembered (and written at the next
        checkpoint)."""
        kept: list[Any] = []
        kept_offsets: list[int] | None = None if offsets is None else []
        kept_aggs: list[Any] | None = None if aggs is None else []
        dups: dict[tuple[Any, str], int] = {}
        seen_events, seen_keys, buckets, pending = self.events, self.keys, self.buckets, self.pending
        bucket_ms = self.bucket_ms
        newest = self.newest
        floor = self.floor
        touched: set[int] = set()  # the keys given indices: their cost counted again at the end
        # the run of a request's indices this call appended last, and its bucket: an index
        # that follows it extends it (only a run of this call: ``undo`` takes this call's
        # items back whole, and a checkpoint may have taken earlier ones)
        run: list[int] | None = None
        run_b = -1
        for n, (ev, did) in enumerate(zip(events, ids, strict=True)):
            if did is not None:
                its = ev[1]
                if its > newest:
                    newest = its
                if isinstance(did, str):
                    if did in seen_events:
                        d = (ev[0], EVENT_ID)
                        dups[d] = dups.get(d, 0) + 1
                        continue
                    b = its // bucket_ms
                    if b < floor:
                        b = floor
                    seen_events[did] = b
                    ids_of = buckets.get(b)
                    if ids_of is None:
                        ids_of = buckets[b] = []
                    ids_of.append(did)
                    pending.append((b, did))
                else:
                    kh, i = did
                    entry = seen_keys.get(kh)
                    byte, bit = i >> 3, 1 << (i & 7)
                    if entry is None:
                        b = its // bucket_ms
                        if b < floor:
                            b = floor
                        # (its memory is counted with the run it starts below: ``touched``)
                        entry = seen_keys[kh] = [b, bytearray(byte + 1) if byte < SPARSE_BYTES else bytearray(), None, 0]
                        ids_of = buckets.get(b)
                        if ids_of is None:
                            ids_of = buckets[b] = []
                        ids_of.append((kh,))
                    bitmap = entry[1]
                    if byte >= len(bitmap):
                        if byte - len(bitmap) < SPARSE_BYTES and entry[2] is None:
                            bitmap.extend(bytes(byte + 1 - len(bitmap)))
                            bitmap[byte] |= bit
                        elif not mark(entry, i):
                            d = (ev[0], IDEMPOTENCY_KEY)
                            dups[d] = dups.get(d, 0) + 1
                            continue
                    elif bitmap[byte] & bit:
                        d = (ev[0], IDEMPOTENCY_KEY)
                        dups[d] = dups.get(d, 0) + 1
                        continue
                    else:
                        bitmap[byte] |= bit
                    b = entry[0]
                    if run is not None and run[2] == i - 1 and run[0] == kh and run_b == b:
                        run[2] = i
                    else:
                        run = [kh, i, i]
                        run_b = b
                        pending.append((b, run))
                        touched.add(kh)
            kept.append(ev)
            if kept_offsets is not None:
                kept_offsets.append(offsets[n])  # type: ignore[index]
            if kept_aggs is not None:
                kept_aggs.append(aggs[n])  # type: ignore[index]
        self.newest = newest
        for kh in touched:  # a run's work, not an event's
            self._recount(seen_keys[kh])
        return kept, kept_offsets, dups, kept_aggs

    def _recount(self, entry: list[Any]) -> None:
        """Count a key's memory again after its indices changed (``filter``, ``undo``, ``load``)."""
        now = KEY_MEMORY + cost(entry)
        self.key_bytes += now - entry[3]
        entry[3] = now

    def filter_late(self, counts: Mapping[str, int], ids: Sequence[tuple[str, DedupId]], now_ms: int,
                    ) -> tuple[dict[str, int], dict[tuple[Any, str], int]]:
        """Events set aside as too far ahead (``future_ts``: late, not placed), by region in
        ``counts``, ``ids`` the (region, dedup id) of those that have one: -> (``counts``
        without the repeats, the repeats as ``filter`` gives them).  Their ids are remembered
        as seen at the newest ingest time so far (``now_ms`` before any): their own ingest
        time would move the horizon ahead."""
        newest = self.newest
        at = newest or now_ms
        _, _, dups, _ = self.filter([(region, at, None) for region, _ in ids], [did for _, did in ids])
        self.newest = newest
        out = dict(counts)
        for (region, _source), n in dups.items():
            out[region] -= n
            if not out[region]:
                del out[region]
        return out, dups

    def undo(self, n: int) -> None:
        """Forget what the last ``n`` pending items hold: the ids ``filter`` remembered in
        the call that appended them (their batch was not applied: the spill disk refused it,
        and it is offered again later); ``n`` is how much that call grew ``pending``."""
        kept: dict[int, list[Any]] = {}  # keys that had indices before: counted again
        for b, did in reversed(self.pending[len(self.pending) - n:]):
            if isinstance(did, str):
                del self.events[did]
                self._unlist(b, did)
            else:
                kh, first, last = did
                entry = self.keys[kh]
                _, bitmap, far, _ = entry
                for i in range(first, last + 1):
                    if i >> 3 < len(bitmap):
                        bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    else:
                        far.discard(i)
                if any(bitmap) or far:
                    kept[kh] = entry
                else:  # the batch brought the key: forget it, and its place in its bucket
                    self.key_bytes -= entry[3]
                    del self.keys[kh]
                    kept.pop(kh, None)
                    self._unlist(b, (kh,))
        for entry in kept.values():
            bitmap = entry[1]
            del bitmap[len(bitmap.rstrip(b"\0")):]  # the memory of indices taken back
            if not entry[2]:
                entry[2] = None
            self._recount(entry)
        del self.pending[len(self.pending) - n:]

    def _unlist(self, b: int, entry: DedupId | tuple[int]) -> None:
        """Take ``entry`` out of bucket ``b``'s list (it is at or near the end: the batch
        being undone appended it), and the bucket with it when nothing else is in it."""
        ids_of = self.buckets[b]
        for j in range(len(ids_of) - 1, -1, -1):
            if ids_of[j] == entry:
                del ids_of[j]
                break
        if not ids_of and b not in self.written:
            del self.buckets[b]

    # ------------------------------------------------------------------ horizon
    def expire(self, now_ms: int | None = None) -> int:
        """Forget the buckets a whole horizon past their end at ``now_ms`` (default: the
        newest ingest time seen), then, while what is remembered costs more than ``max_ids``
        event ids (``cost``: request keys by their memory), the oldest bucket but the newest
        (its event ids and request keys counted in ``evicted``: repeats of them within the
        horizon are no longer caught); -> ids and keys forgotten.  Their records are deleted
        after the next durable state (``take_expired``)."""
        now = self.newest if now_ms is None else now_ms
        limit = (now - self.horizon_ms) // self.bucket_ms  # buckets below it ended a horizon ago
        gone = 0
        for b in sorted(b for b in self.buckets if b < limit):
            gone += self._drop(b)
        while self.cost() > self.max_ids and len(self.buckets) > 1:
            b = min(self.buckets)
            n = self._drop(b)
            self.evicted += n
            gone += n
            limit = max(limit, b + 1)
        if gone:
            self.pending = [(b, did) for b, did in self.pending if b >= limit]
        return gone

    def _drop(self, b: int) -> int:
        ids_of = self.buckets.pop(b)
        self.floor = max(self.floor, b + 1)
        for did in ids_of:
            if isinstance(did, str):
                self.events.pop(did, None)
            else:
                entry = self.keys.pop(did[0], None)
                if entry is not None:
                    self.key_bytes -= entry[3]
        n = self.written.pop(b, 0)
        if n:
            self.expiring.append((b, n))
        return len(ids_of)

    # ------------------------------------------------------------------ changelog
    def _sizes(self, items: Sequence[tuple[int, PendingId]]) -> list[int]:
        # an event id's JSON string (any escapes: at most 6 bytes a character) + quotes and
        # comma; a run of a key's indices (``[first,last],``: up to 24 bytes; one or two: 11 each)
        # and, where the key differs from the item before, the key itself (``"<32 hex>":[...],``:
        # 38 bytes); a key seen again later in the record is counted again, an over-estimate
        sizes = []
        last = None
        for _, did in items:
            if isinstance(did, str):
                sizes.append(len(did) * 6 + 3)
                continue
            kh, first, end = did
            size = 24 if end - first >= 2 else 11 * (end - first + 1)
            sizes.append(size if kh == last else size + KEY_BYTES)
            last = kh
        return sizes

    def _value(self, items: Sequence[tuple[int, PendingId]]) -> dict[str, Any]:
        return _record_value(did for _, did in items)

    def load(self, partition: int, index: Any, record: Callable[[str], Any], bucket_ms: Any = None,
             now_ms: int = 0, gone: Any = None) -> None:
        """Restore from a state's ``index`` and the stored records (``record(key)`` -> its
        JSON value, None when missing: ValueError).  ``bucket_ms``: the bucket length the
        records were written with (None: a state of an earlier version, written with this
        one's); another (``AGG_DEDUP_SECONDS`` changed) moves every id to the bucket of this
        length that holds the end of its own (``_rebucket``; ``now_ms``: the wall clock).
        ``gone``: the buckets the state left out (``restore_gone``): no id goes to one again
        before their records are deleted (``floor``)."""
        if bucket_ms is not None and bucket_ms != self.bucket_ms and (index or gone):
            if type(bucket_ms) is not int or bucket_ms < 1:
                raise ValueError(f"partition {partition}: a dedup bucket length of {bucket_ms!r}")
            old = DedupStore(self.horizon_ms, self.max_ids)
            old.bucket_ms = bucket_ms
            old.load(partition, index, record, gone=gone)
            self._rebucket(old, now_ms)
            return
        dropped = self.restore_gone(gone)
        if dropped:
            self.floor = max(self.floor, max(dropped) + 1)
        if not index:
            return
        for b_text, n in sorted(index.items(), key=lambda kv: int(kv[0])):
            b = int(b_text)
            ids_of = self.buckets.setdefault(b, [])
            for seq in range(int(n)):
                value = record(self.record_key(partition, b, seq))
                if not isinstance(value, dict):
                    raise ValueError(f"partition {partition}: dedup record {b}/{seq} is missing")
                self._load_value(b, value, ids_of)
            self.written[b] = int(n)
            self.newest = max(self.newest, (b + 1) * self.bucket_ms - 1)
        for entry in self.keys.values():
            self._recount(entry)

    def _rebucket(self, old: DedupStore, now_ms: int) -> None:
        """Take the ids of ``old`` (restored with its own bucket length) into buckets of this
        one's: each to the bucket that holds its old bucket's end, so it is kept at least as
        long as the old bucket would be.  They are all written again (pending) and ``old``'s
        records deleted once a state without them is durable (``expiring``).  Its bucket
        numbers must stay apart from this one's until then (the same record keys): a longer
        bucket numbers lower, and HorizonClash when its numbers could reach the old ones
        within a horizon of now (a horizon of hours raised by a second or so)."""
        newest = old.newest
        numbers = [*old.written, *(b for b, _ in old.expired)]  # of records still stored
        if self.bucket_ms > old.bucket_ms and (max(newest, now_ms) + self.horizon_ms) // self.bucket_ms >= min(numbers):
            raise HorizonClash(
                f"the dedup state was written with buckets of {old.bucket_ms} ms and AGG_DEDUP_SECONDS now makes "
                f"them {self.bucket_ms} ms: too close to move the state without its records meeting; set "
                f"AGG_DEDUP_SECONDS back to {old.bucket_ms * BUCKETS / 1000:g}, or change it by more")
        # a shorter bucket numbers later: every id goes above the old numbers (``floor``)
        floor = max(numbers) + 1 if self.bucket_ms < old.bucket_ms else 0
        pending = self.pending
        for b, ids_of in sorted(old.buckets.items()):
            nb = max(((b + 1) * old.bucket_ms - 1) // self.bucket_ms, floor)
            mine = self.buckets.setdefault(nb, [])
            for did in ids_of:
                mine.append(did)
                if isinstance(did, str):
                    self.events[did] = nb
                    pending.append((nb, did))
                    continue
                kh = did[0]
                entry = self.keys[kh] = [nb, *old.keys[kh][1:]]
                pending += ((nb, run) for run in runs(kh, entry))
        self.key_bytes = old.key_bytes
        self.newest = newest
        self.floor = floor
        self.expiring += sorted(old.written.items())
        self.expired += old.expired

    def _load_value(self, b: int, value: dict[str, Any], ids_of: list[Any]) -> None:
        for did in value.get("e", ()):
            if did not in self.events:
                self.events[did] = b
                ids_of.append(did)
        for kh_text, indices in value.get("k", {}).items():
            kh = int(kh_text, 16)
            entry = self.keys.get(kh)
            if entry is None:
                entry = self.keys[kh] = [b, bytearray(), None, 0]
                ids_of.append((kh,))
            bitmap = entry[1]
            for x in indices:
                if type(x) is int:
                    first = last = x
                else:  # a run, [first, last]
                    first, last = x
                    if not (type(first) is int and type(last) is int and first <= last):
                        raise ValueError(f"a malformed run of indices: {x!r}")
                for i in range(first, last + 1):  # as ``filter`` marks them (far ones in the set)
                    if i >> 3 < len(bitmap):
                        bitmap[i >> 3] |= 1 << (i & 7)
                    else:
                        mark(entry, i)


class HorizonClash(ValueError):
    """Stored dedup records that cannot be moved to the buckets of the horizon set now."""


def _record_value(dids: Iterable[PendingId]) -> dict[str, Any]:
    """``{"e": ["<region>\\n<event_id>", ...], "k": {"<key hex>": [index or [first, last], ...]}}``
    of pending ids: event ids, and runs ``[key, first, last]`` of a request's indices."""
    events: list[str] = []
    keys: dict[str, list[Any]] = {}
    last, indices = None, []  # a request's runs come one after the other: its key's hex once
    for did in dids:
        if isinstance(did, str):
            events.append(did)
        else:
            kh, first, end = did
            if kh != last:
                last, indices = kh, keys.setdefault(f"{kh:032x}", [])
            if end - first >= 2:
                indices.append([first, end])
            else:  # one or two numbers are shorter than a run
                indices += range(first, end + 1)
    value: dict[str, Any] = {}
    if events:
        value["e"] = events
    if keys:
        value["k"] = keys
    return value
