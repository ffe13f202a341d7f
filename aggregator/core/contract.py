"""The names and shapes of docs/contract.md that every role shares.  Standard library only.

Topic names, the header the HTTP ingest writes on its records, the event that the
window book counts and the snapshot it publishes.  Nothing else in the package
spells these.
"""
from __future__ import annotations

from itertools import repeat
from typing import NotRequired, TypedDict

from aggregator.core.sketches.urls import Parts

# --- Kafka topics (contract §4)
CLICKS = "clicks"
DLQ = "clicks-dlq"
SNAPSHOTS = "click-snapshots"
# Records of ``clicks`` that arrived on a partition other than their region's home
# (core.repartition) are forwarded here, to partition home(region); as many partitions as
# ``clicks`` (Faust's assignor then gives partition p of both topics to one worker).
CLICKS_REPARTITION = "clicks-repartition"

# The worker's consumer group and the changelog topic of its window state (Faust names it
# ``<app id>-<table>-changelog``); keyed by partition of ``clicks``, so it must have as many.
APP_ID = "clickstream-aggregator"
STATE_TABLE = "window-state"
STATE_CHANGELOG = f"{APP_ID}-{STATE_TABLE}-changelog"
# Faust's leader assignor's topic (one partition): its group members subscribe to it
LEADER_TOPIC = f"{APP_ID}-__assignor-__leader"

# --- regions (contract §2)
OTHER_REGION = "__other__"  # what regions beyond AGG_MAX_REGIONS are counted as

# --- late-bucket reasons (contract §1)
CLOSED_WINDOW = "closed_window"
CLIENT_DELAY = "client_delay"
FUTURE_TS = "future_ts"  # ingest time too far ahead of the worker's clock: never moves stream time
LATE_REASONS = (CLOSED_WINDOW, CLIENT_DELAY, FUTURE_TS)

# --- the ingest header
# On every record the HTTP ingest writes to ``clicks``: ``<ingest_ts>``, ``<ingest_ts>,<client ts>``
# or, for an event with a dedup id (core.dedup: an ``event_id``, or an ``Idempotency-Key``
# and the event's index), ``<ingest_ts>,<client ts or nothing>,<dedup id>`` (ASCII), next
# to key = the normalised region.  The worker counts such a record from key and header
# without parsing its JSON value (which it must do for records produced straight to Kafka).
INGEST_HEADER = "clickstream-ingest"
# On every record of ``clicks-repartition``, after the ingest header: ``<partition>,<offset>``
# (ASCII) of the record of ``clicks`` it forwards.
SOURCE_HEADER = "clickstream-source"
# With aggregates on (AGG_AGGREGATES), on a record the HTTP ingest writes for an event with
# a ``user_id`` or a ``url``, right after the ingest header (after the source header on
# ``clicks-repartition``): ``<user hash>,<url hash>,<normalised url>`` -- the 64-bit hashes
# in hex (core.sketches.user_hash / url_hash), each part empty when the event has none.
AGG_HEADER = "clickstream-agg"

Header = tuple[str, bytes]
# What the aggregates of an event are made of: (user hash, url hash, normalised url as
# ASCII bytes or str), parts None when the event has none, or the value of its agg header
# as it came (parsed a batch at a time, core.aggstate), or ``Parts`` (core.sketches: the
# worker's decoder, of a record produced straight to Kafka); None: nothing to aggregate.
AggParts = tuple["int | None", "int | None", "bytes | str | None"]
Agg = AggParts | bytes | Parts


# the user hash of an agg header: zero-padded to 16 hex digits, so that the worker reads a
# batch of such headers in bulk (core.aggstate); it still reads a shorter one
USER_HASH_DIGITS = 16
USER_HASH_FORMAT = b"%%0%dx" % USER_HASH_DIGITS


def agg_header_value(user_h: int | None, url_h: int | None, url: bytes | str | None) -> bytes:
    text = url.encode() if isinstance(url, str) else (url or b"")
    return b"%s,%s,%s" % (b"" if user_h is None else USER_HASH_FORMAT % user_h, b"" if url_h is None else b"%x" % url_h,
                          text)


def agg_bytes(agg: Agg) -> bytes:
    """An event's aggregates input as its agg header (a spill record and a forwarded record keep it)."""
    if isinstance(agg, bytes):
        return agg
    return agg_header_value(*(agg.as_tuple() if isinstance(agg, Parts) else agg))


HEX_DIGITS = b"0123456789abcdefABCDEF"


def parse_hash64(text: bytes) -> int:
    """A 64-bit hash written as 1-16 hex digits (ValueError else).  Not ``int(text, 16)``
    alone, which also takes a sign, ``0x``, ``_`` and whitespace: a forged ``-1`` would
    reach the sketches, whose state cannot hold a negative hash."""
    if not 0 < len(text) <= USER_HASH_DIGITS or text.translate(None, HEX_DIGITS):
        raise ValueError("a hash of 1-16 hex digits expected")
    return int(text, 16)


def parse_hashes64(texts: list[bytes]) -> list[int]:
    """``parse_hash64`` of each (none empty), checked over the list in C-level passes: for
    per-batch paths, not a Python call an event."""
    sizes = list(map(len, texts))
    if b"".join(texts).translate(None, HEX_DIGITS) or (sizes and not 0 < min(sizes) <= max(sizes) <= USER_HASH_DIGITS):
        raise ValueError("a hash of 1-16 hex digits expected")
    return list(map(int, texts, repeat(16)))


def parse_agg_header(value: bytes) -> AggParts:
    """-> (user hash, url hash, url bytes), parts None when empty; ValueError when it is not
    what ingest writes (a hash that is not 1-16 hex digits included)."""
    u, sep, rest = value.partition(b",")
    h, sep2, url = rest.partition(b",")
    if not (sep and sep2):
        raise ValueError("<user hash>,<url hash>,<url> expected")
    url_h = parse_hash64(h) if h else None
    if (url_h is None) != (not url):
        raise ValueError("a url hash needs its url, and a url its hash")
    return (parse_hash64(u) if u else None), url_h, (url or None)


def ingest_header_value(ingest_ts: int, client_ts: int | None, dedup: bytes | None = None) -> bytes:
    if dedup is not None:
        if client_ts is None:
            return b"%d,,%s" % (ingest_ts, dedup)
        return b"%d,%d,%s" % (ingest_ts, client_ts, dedup)
    if client_ts is None:
        return b"%d" % ingest_ts
    return b"%d,%d" % (ingest_ts, client_ts)


def ingest_header(ingest_ts: int, client_ts: int | None, dedup: bytes | None = None) -> list[Header]:
    return [(INGEST_HEADER, ingest_header_value(ingest_ts, client_ts, dedup))]


def parse_ingest_header(value: bytes) -> tuple[int, int | None, bytes | None]:
    """-> (ingest_ts, client ts or None, dedup id field or None); ValueError when it is not
    what ingest writes."""
    f = value.split(b",", 2)  # one call, not two partitions: this runs once per record
    its = int(f[0])
    if its < 0:
        raise ValueError("an ingest time before the epoch")
    if len(f) == 2:
        return its, int(f[1]), None
    if len(f) == 1:
        return its, None, None
    dedup = f[2]
    if not dedup:
        raise ValueError("an empty dedup id")
    return its, (int(f[1]) if f[1] else None), dedup


# --- what the window book counts
# ``(region, ingest_ts, client_ts or None)``, epoch ms.  A plain tuple, not a NamedTuple:
# the decoder builds one per record, and a NamedTuple costs about eight times a tuple
# literal to build (0.3 µs against 0.04 µs, in a loop whose whole budget is ~1.6 µs).
# A region of ``None`` marks an event that was spilled (spill.ledger.SPILLED): it moves
# stream time but is counted when drained.
Event = tuple[str, int, int | None]
BookEvent = tuple[str | None, int, int | None]


class Snapshot(TypedDict):
    """One final snapshot of one (region, window), as published to ``click-snapshots``."""

    region: str
    window_start: int
    window_end: int
    count: int
    late: int
    late_by_reason: dict[str, int]
    emitted_at: int
    # with aggregates on (AGG_AGGREGATES; core.sketches), of the events counted in the window
    unique_users: NotRequired[int]
    top_urls: NotRequired[list[dict[str, object]]]  # [{"url", "count"}], most frequent first
    client_delay_ms: NotRequired[dict[str, float] | None]  # {"p50", "p90", "p99"}; None: no event had a ts


# A snapshot re-published after a crash or rebalance repeats these exactly;
# ``emitted_at`` may differ (contract §1).
CONTENT_FIELDS = ("region", "window_start", "window_end", "count", "late", "late_by_reason", "unique_users",
                  "top_urls", "client_delay_ms")


def snapshot_content(s: Snapshot | dict[str, object]) -> dict[str, object]:
    return {k: s.get(k) for k in CONTENT_FIELDS}
