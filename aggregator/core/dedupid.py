"""What identifies an event for dedup (its *dedup id*; core.dedup remembers them), computed
once where the event enters and carried in the ingest header's third field.  Pure: standard
library and core only.

* an event with an ``event_id``: ``event_key(region, event_id)``, the region and the id
  themselves (so an id is counted once *per region*; no digest: hashing cost more than
  the rest of the dedup, and a string cannot collide);
* else, in a request with an ``Idempotency-Key``: ``(request_key(key, body), index)``, the
  128-bit digest of the key and the body, and the event's index in the body.  A retry of
  the same body with the same key repeats every (key, index), whichever ingest process
  takes it; another body under the same key is another request.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable
from hashlib import blake2b

from aggregator.core.events import LIMITS, REGION_MAX_CHARS

# An event's index in a body is below the body's length (AGG_MAX_BODY_BYTES is at most this),
# so a keyed id's index is below it too: a header with another index is not what ingest wrote,
# and a bitmap never grows past MAX_KEY_INDEX / 8 bytes (2 MiB) for one
MAX_KEY_INDEX = 1 << 24
KEY_HEX_MAX = 32  # a request key's digest (blake2b, 16 bytes) in hex

IDEMPOTENCY_KEY = "idempotency_key"
EVENT_ID = "event_id"
SOURCES = (IDEMPOTENCY_KEY, EVENT_ID)  # the label values of clickstream_duplicate_events_total

DedupId = str | tuple[int, int]  # "<region>\n<event_id>", or (request key's digest, index)


def event_key(region: str, event_id: str) -> str:
    """The dedup id of an event with ``event_id`` counted in ``region``."""
    return region + "\n" + event_id


def request_key(key: str, body: bytes = b"") -> int:
    """The digest of an ``Idempotency-Key`` and of the (decompressed) body it came with: the
    same key on another body (two clients that both chose "batch-1") is another request,
    not a retry whose events are dropped as repeats.  The body counts by its length and
    CRC-32 (24 µs for 110 KB where BLAKE2b took 129; a collision needs the same key, which
    only its client knows)."""
    return int.from_bytes(blake2b(b"%d %d %s" % (len(body), zlib.crc32(body), key.encode()),
                                  digest_size=16).digest(), "big")


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
