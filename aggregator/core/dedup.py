"""Exact duplicate detection within a horizon: ``Idempotency-Key`` retries and ``event_id``s.

Pure: standard library and core only.  One ``DedupStore`` per partition of ``clicks``, part of
the partition's exactly-once state (docs/contract.md §3, "Retries").

What identifies an event (its *dedup id*, computed once where the event enters):

* an event with an ``event_id``: ``event_key(region, event_id)``, the region and the id
  themselves (so an id is counted once *per region*; no digest: hashing cost more than
  the rest of the dedup, and a string cannot collide);
* else, in a request with an ``Idempotency-Key``: ``(request_key(key), index)``, the
  128-bit digest of the key and the event's index in the body.  A retry of the same
  body with the same key repeats every (key, index), whichever ingest process takes it.

Exact: a dedup id is stored whole, never as a filter that could call two distinct ids
one; only request keys are digests, and two distinct keys collide only if their 128-bit
digests do (for N keys within the horizon, probability below N²/2¹²⁹).  An idempotency key keeps a
bitmap of the indices seen (one bit per index up to the highest), so a request of 1000
events costs about 250 bytes, not 1000 ids.

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
from hashlib import blake2b
from typing import Any

from aggregator.core.events import LIMITS, REGION_MAX_CHARS
from aggregator.core.recordlog import RecordLog

BUCKETS = 10  # a horizon is this many buckets
# An event's index in a body is below the body's length (AGG_MAX_BODY_BYTES is at most this),
# so a keyed id's index is below it too: a header with another index is not what ingest wrote,
# and a bitmap never grows past MAX_KEY_INDEX / 8 bytes (2 MiB) for one
MAX_KEY_INDEX = 1 << 24
KEY_HEX_MAX = 32  # a request key's digest (blake2b, 16 bytes) in hex
DEFAULT_MAX_IDS = 1_000_000  # event ids one partition remembers at most (AGG_DEDUP_MAX_IDS)
KEY_BYTES = 38  # a request key's part of a record's JSON, without its indices: "<32 hex>":[],
ID_BYTES = 250  # worker memory of one remembered event id of ~20 characters, measured (README)

IDEMPOTENCY_KEY = "idempotency_key"
EVENT_ID = "event_id"
SOURCES = (IDEMPOTENCY_KEY, EVENT_ID)  # the label values of clickstream_duplicate_events_total

DedupId = str | tuple[int, int]  # "<region>\n<event_id>", or (request key's digest, index)
# what a pending item holds: an event id, or a run [request key's digest, first, last index]
PendingId = str | list[int]


def event_key(region: str, event_id: str) -> str:
    """The dedup id of an event with ``event_id`` counted in ``region``."""
    return region + "\n" + event_id


def request_key(key: str) -> int:
    """The digest of an ``Idempotency-Key``."""
    return int.from_bytes(blake2b(key.encode(), digest_size=16).digest(), "big")


def id_field(did: DedupId, region: str | None = None) -> bytes:
    """The dedup id as the ingest header's third field of a record of ``region`` (its key):
    ``e<event_id>`` (UTF-8) for an event id of that region, ``r<region>\n<event_id>`` for
    one of another (an event counted under ``__other__``: its id stays that of the region
    it came with, so ids of two regions never merge), or ``k<hex>.<index>``.  The empty
    event_id, a valid one (contract §2), is ``e`` and ``r<region>\n``."""
    if isinstance(did, str):
        own, _, eid = did.partition("\n")
        if region is None or own == region:
            return b"e" + eid.encode()
        return b"r" + did.encode()
    kh, i = did
    return b"k%x.%d" % (kh, i)


def other_region_id(raw: bytes, region: str) -> bytes:
    """The id field ``raw`` of an event of ``region`` counted under another (``__other__``):
    ``e<event_id>`` becomes ``r<region>\n<event_id>``; the others stay as they are."""
    return b"r" + region.encode() + b"\n" + raw[1:] if raw[:1] == b"e" else raw


def key_id_fields(kh: int, indices: Iterable[int]) -> list[bytes]:
    """``id_field((kh, i))`` for each body index ``i`` of one request: the key's hex made
    once, not once per event (ingest's per-event path)."""
    prefix = b"k%x." % kh
    return [prefix + b"%d" % i for i in indices]


def parse_id_field(raw: bytes, region: str) -> DedupId:
    """``id_field``'s inverse for a record of ``region``; ValueError when it is not one (nor
    within what ingest writes: an event_id of at most 128 characters, a region of at most
    64, a key's index below ``MAX_KEY_INDEX``)."""
    kind = raw[:1]
    if kind == b"e":  # an empty event_id ("e" alone) is an id like any other
        eid = raw[1:].decode()
        if len(eid) > LIMITS["event_id"]:
            raise ValueError("event_id over 128 characters")
        return region + "\n" + eid
    if kind == b"r":
        did = raw[1:].decode()
        own, nl, eid = did.partition("\n")
        if not (own and nl) or len(own) > REGION_MAX_CHARS or len(eid) > LIMITS["event_id"]:
            raise ValueError("r<region>\\n<event_id> expected")  # the event_id after the newline may be empty
        return did
    if kind == b"k":
        kh, dot, i = raw[1:].partition(b".")
        if not dot or len(kh) > KEY_HEX_MAX:
            raise ValueError("k<hex>.<index> expected")
        return int(kh, 16), key_index(i)
    raise ValueError("dedup id must start with e or k")


def key_index(raw: bytes) -> int:
    """A keyed id's index in its body; ValueError when it is not one ingest writes."""
    i = int(raw)
    if not 0 <= i < MAX_KEY_INDEX:
        raise ValueError(f"a body index must be 0 to {MAX_KEY_INDEX - 1}")
    return i


class DedupStore(RecordLog):
    """The ids seen on one partition within the horizon; ``horizon_ms`` 0: no dedup.
    At most ``max_ids`` event ids (an idempotency key's bitmap costs a bit per index)."""

    TAG = "d"

    def __init__(self, horizon_ms: int, max_ids: int = DEFAULT_MAX_IDS) -> None:
        super().__init__()  # pending: (bucket, id) not written yet
        self.horizon_ms = horizon_ms
        self.max_ids = max_ids  # event ids remembered at most (memory: about ID_BYTES each)
        self.evicted = 0  # ids forgotten before their horizon because of max_ids
        self.bucket_ms = max(1, horizon_ms // BUCKETS)
        self.events: dict[str, int] = {}  # event id -> its bucket
        self.keys: dict[int, list[Any]] = {}  # request key -> [its bucket, bytearray bitmap of indices]
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
                        entry = seen_keys[kh] = [b, bytearray(byte + 1)]
                        ids_of = buckets.get(b)
                        if ids_of is None:
                            ids_of = buckets[b] = []
                        ids_of.append((kh,))
                    bitmap = entry[1]
                    if byte >= len(bitmap):
                        bitmap.extend(bytes(byte + 1 - len(bitmap)))
                    elif bitmap[byte] & bit:
                        d = (ev[0], IDEMPOTENCY_KEY)
                        dups[d] = dups.get(d, 0) + 1
                        continue
                    bitmap[byte] |= bit
                    b = entry[0]
                    if run is not None and run[2] == i - 1 and run[0] == kh and run_b == b:
                        run[2] = i
                    else:
                        run = [kh, i, i]
                        run_b = b
                        pending.append((b, run))
            kept.append(ev)
            if kept_offsets is not None:
                kept_offsets.append(offsets[n])  # type: ignore[index]
            if kept_aggs is not None:
                kept_aggs.append(aggs[n])  # type: ignore[index]
        self.newest = newest
        return kept, kept_offsets, dups, kept_aggs

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
        for b, did in reversed(self.pending[len(self.pending) - n:]):
            if isinstance(did, str):
                del self.events[did]
                self._unlist(b, did)
            else:
                kh, first, last = did
                bitmap = self.keys[kh][1]
                for i in range(first, last + 1):
                    bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                if not any(bitmap):  # the batch brought the key: forget it, and its place in its bucket
                    del self.keys[kh]
                    self._unlist(b, (kh,))
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
        newest ingest time seen), then, while more than ``max_ids`` event ids are
        remembered, the oldest bucket (counted in ``evicted``: repeats of those ids within
        the horizon are no longer caught); -> ids forgotten.  Their records are deleted
        after the next durable state (``take_expired``)."""
        now = self.newest if now_ms is None else now_ms
        limit = (now - self.horizon_ms) // self.bucket_ms  # buckets below it ended a horizon ago
        gone = 0
        for b in sorted(b for b in self.buckets if b < limit):
            gone += self._drop(b)
        while len(self.events) > self.max_ids and len(self.buckets) > 1:
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
                self.keys.pop(did[0], None)
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

    def load(self, partition: int, index: Any, record: Callable[[str], Any]) -> None:
        """Restore from a state's ``index`` and the stored records (``record(key)`` -> its
        JSON value, None when missing: ValueError)."""
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

    def _load_value(self, b: int, value: dict[str, Any], ids_of: list[Any]) -> None:
        for did in value.get("e", ()):
            if did not in self.events:
                self.events[did] = b
                ids_of.append(did)
        for kh_text, indices in value.get("k", {}).items():
            kh = int(kh_text, 16)
            entry = self.keys.get(kh)
            if entry is None:
                entry = self.keys[kh] = [b, bytearray()]
                ids_of.append((kh,))
            bitmap = entry[1]
            for x in indices:
                if type(x) is int:
                    first = last = x
                else:  # a run, [first, last]
                    first, last = x
                    if not (type(first) is int and type(last) is int and first <= last):
                        raise ValueError(f"a malformed run of indices: {x!r}")
                byte = last >> 3
                if byte >= len(bitmap):
                    bitmap.extend(bytes(byte + 1 - len(bitmap)))
                for i in range(first, last + 1):
                    bitmap[i >> 3] |= 1 << (i & 7)


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
