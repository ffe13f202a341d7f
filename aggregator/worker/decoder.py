"""Records of ``clicks`` -> events the window book counts.

The hot loop of the worker: one call per fetched batch, no await, no log line and
one tuple per record.  A record the HTTP ingest wrote (``INGEST_HEADER``, key = a
region as ingest spells it) is taken from key and header; any other record is
parsed and validated with the one region rule of ``core.events``.  A bad record is
counted by reason and, when asked, queued as a dead letter.  An event whose region's
home (``core.repartition``) is another partition is set aside to be forwarded there;
``decode_forwarded`` reads what other partitions forwarded to this one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import msgspec
import orjson
from msgspec.structs import astuple

from aggregator.core.contract import (
    AGG_HEADER,
    FUTURE_TS,
    INGEST_HEADER,
    SOURCE_HEADER,
    Agg,
    Event,
    parse_agg_header,
    parse_ingest_header,
)
from aggregator.core.dedupid import KEY_HEX_MAX, MAX_KEY_INDEX, DedupId, event_key, parse_id_field
from aggregator.core.events import LIMITS, TS_MAX, TS_MIN, EventError, normalise_region, parse_client_ts
from aggregator.core.regioncap import RegionCap
from aggregator.core.repartition import Foreign, home, parse_source_header
from aggregator.core.sketches import NO_URL, Parts, UrlCache, UrlEntry, hash_bytes, url_parts
from aggregator.core.sourcelog import LOG_APPEND_TIME, SourceRecord
from aggregator.worker.click import parse_click

CACHE_MAX = 100_000  # spellings remembered per cache: a producer of ever new regions cannot grow it
EVENT_ID_MAX = LIMITS["event_id"]
DLQ_RAW_MAX = 65_536  # bytes of a rejected record's value kept in its dead letter

DeadLetter = tuple[bytes | None, bytes]  # (key, JSON value) for the dead-letter topic

# what the typed parse raises for a value the full path reads (TypeError: a null value)
_FAST_MISS = (msgspec.DecodeError, TypeError)  # DecodeError: ValidationError too
# records of a batch the typed parse may refuse before the rest of the batch goes the full
# way (a producer whose events carry other fields: an exception costs about 1 us)
FAST_MISSES = 8


class FutureCounts(dict[str, int]):
    """Events with an ingest time too far ahead (``future_ts``), by region; ``ids``: the
    (region, dedup id) of those that have one, for the partition's dedup (core.dedup);
    ``newest``: the latest of their ingest times (0: none), how far ahead the batch runs
    (the worker's clock behind, ``worker.clock.ClockSkew.stamped``)."""

    __slots__ = ("ids", "newest")

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[tuple[str, DedupId]] = []
        self.newest = 0


class Decoded(NamedTuple):
    """What one batch decodes to (one per batch, not per record)."""

    events: list[Event]
    offsets: list[int]  # of the events, when asked for
    rejected: dict[str, int]  # by reason
    future: dict[str, int]  # events with an ingest time too far ahead, by region
    ids: list[DedupId | None] | None = None  # the events' dedup ids (core.dedup); None: none has one
    aggs: list[Agg | None] | None = None  # what each event adds to its window's aggregates (aggregates on)


class Record(SourceRecord, Protocol):
    """What the decoder reads of a fetched record (aiokafka's parsed record has it): what
    core.sourcelog reads (offset, timestamp and its type), and key, value, headers."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...  # Kafka allows a null header value


class RecordDecoder:
    """Owns the caches of accepted region spellings (raw JSON region and record key) and
    of each region's home partition (``partitions`` = partitions of ``clicks``)."""

    def __init__(self, partitions: int = 1, cap: RegionCap | None = None, aggregates: bool = False,
                 url_keep_query: bool = False, fast: bool = True) -> None:
        self.regions: dict[str, str] = {}  # raw region of a JSON value -> region
        self.keys: dict[bytes, str] = {}  # record key -> region, for ingest's records
        self.partitions = partitions
        self.homes: dict[str, int] = {}  # region -> its home partition (core.repartition)
        # the worker's region cap over all its partitions (core.regioncap): an event counted
        # here whose region is not admitted is counted as __other__
        self.cap = cap
        # with aggregates on, each event's aggregates input: the agg header of an ingest record,
        # ``Parts`` (user hash, URL entry) computed from the value of any other
        self.aggregates = aggregates
        # a URL of a record produced straight to Kafka -> its UrlEntry, NO_URL: not a URL to
        # count; bounded in entries and in the length of a URL
        self.url_cache = UrlCache(self._url_entry)
        self.url_keep_query = url_keep_query
        self.url_entries: dict[int, UrlEntry] = {}  # url hash -> its one entry (core.sketches.count_parts)
        self.fast = fast  # the typed parse first (``worker.click.Click``); False: every value the full way

    def decode(self, records: Sequence[Record], now_ms: int, partition: int, want_offsets: bool,
               dead: list[DeadLetter] | None, max_ts: int, forward: list[Foreign] | None = None) -> Decoded:
        """-> ``(events, their offsets (if asked), rejected counts by reason, future events
        by region)``.

        With ``forward`` (a list), an event whose region's home is not ``partition`` is not
        returned but appended to it, with its offset, to be forwarded (whatever its times:
        the home decides whether it is late).

        ``ingest_ts`` is the header's, else the value's, else the broker's log-append time,
        else ``now_ms`` (the time the worker read it).  An event whose ``ingest_ts`` is
        after ``max_ts`` (the worker's clock plus AGG_MAX_AHEAD_SECONDS) is not an event to
        place: it is counted by region as ``future`` (late, reason ``future_ts``) and
        dead-lettered, so that one bad clock cannot move stream time ahead."""
        loads = orjson.loads
        valid = self.regions
        keys = self.keys
        header_name, parse_header, agg_name = INGEST_HEADER, parse_ingest_header, AGG_HEADER
        events: list[Event] = []  # appended with events.append: compiled, a bound method's call costs more
        offsets: list[int] = []
        rejected: dict[str, int] = {}
        future = FutureCounts()
        split = forward is not None and self.partitions > 1
        homes = self.homes
        cap = self.cap
        capped = None if cap is None else cap.seen
        ids: list[DedupId | None] | None = None
        aggregating = self.aggregates
        aggs: list[Agg | None] | None = [] if aggregating else None
        urls = self.url_cache.known
        fast = parse_click if self.fast else None
        misses = 0
        last_k, last_kh = b"", 0  # the last request key field of a keyed record, and its digest
        max_index = MAX_KEY_INDEX  # read once
        # module globals read once (compiled code looks each up in the module's dict per use)
        fields, hash_, key_of, id_max, log_append = astuple, hash_bytes, event_key, EVENT_ID_MAX, LOG_APPEND_TIME
        cts: int | None
        user: str | None
        url: str | None
        for rec in records:
            hs = rec.headers
            region = None
            did: DedupId | None = None
            agg: Agg | None = None
            user = url = None
            if hs and hs[0][0] == header_name:
                region = keys.get(rec.key) or self._key_region(rec.key)  # type: ignore[arg-type]
                if region is not None:
                    try:
                        f = hs[0][1].split(b",", 2)  # type: ignore[union-attr]  # None: AttributeError
                        if len(f) == 2:  # "<ingest_ts>,<ts>": parse_ingest_header's common case, inlined
                            its = int(f[0])
                            cts = int(f[1])
                            if its < 0:
                                raise ValueError("an ingest time before the epoch")
                        elif len(f) == 3 and f[2][:1] == b"k":
                            # "<ingest_ts>,[<ts>],k<key hex>.<index>" (a keyed request's event):
                            # parse_ingest_header and parse_id_field inlined, the key's digest
                            # parsed once per run of its records
                            its = int(f[0])
                            if its < 0:
                                raise ValueError("an ingest time before the epoch")
                            cts = int(f[1]) if f[1] else None
                            kpart, _, index = f[2].partition(b".")  # no ".": int(b"") raises below
                            if kpart != last_k:
                                if len(kpart) > KEY_HEX_MAX + 1:
                                    raise ValueError("not a request key's digest")
                                last_kh = int(kpart[1:], 16)
                                last_k = kpart
                            i = int(index)
                            if not 0 <= i < max_index:  # key_index inlined: not what ingest writes
                                raise ValueError("a body index out of any body")
                            did = (last_kh, i)
                        else:
                            its, cts, raw_id = parse_header(hs[0][1])  # type: ignore[arg-type]
                            if raw_id is not None:
                                did = parse_id_field(raw_id, region)
                        if aggregating and len(hs) > 1 and hs[1][0] == agg_name:
                            agg = hs[1][1]  # read a cell at a time (core.aggstate)
                    except (ValueError, TypeError, AttributeError):  # AttributeError: a null header value
                        region = None  # not what ingest writes: the value decides
            if region is None and fast is not None:
                # the typed parse (see ``worker.click.Click``); anything it does not take, the full path reads
                try:
                    c = fast(rec.value)  # type: ignore[arg-type]
                except _FAST_MISS:
                    c = None
                    misses += 1
                    if misses >= FAST_MISSES:
                        fast = None
                if c is not None:
                    # the fields in one call, in Click's order: 450 instructions an event fewer than
                    # six attribute reads when compiled, 370 more when not (cachegrind)
                    c_region, c_its, c_ts, eid, c_user, c_url = fields(c)
                    region = valid.get(c_region)  # a spelling not seen yet: the full path checks it
                    if region is not None:
                        its = c_its if c_its is not None else (
                            rec.timestamp if rec.timestamp_type == log_append else now_ms)
                        cts = c_ts
                        if eid is not None:
                            if len(eid) > id_max:
                                region = None  # rejected by the full path, with its reason
                            else:
                                did = key_of(region, eid)
                        user = c_user
                        url = c_url
            if region is None:
                try:
                    d = loads(rec.value)  # type: ignore[arg-type]  # None raises, as a bad record
                    raw_region = d["region"]  # no object or no region: undecodable
                    try:
                        region = valid.get(raw_region)
                    except TypeError:  # unhashable (a list, an object): bad_region, as over HTTP
                        region = None
                    if region is None:
                        region = self._region(raw_region)
                    # the fields as JSON gave them (Any), checked before they take their types
                    # (a compiled decoder checks each typed assignment: tools/native.py)
                    raw: Any = d.get("ingest_ts")
                    if type(raw) is int and raw >= 0:
                        its = raw
                    elif raw is None:
                        its = rec.timestamp if rec.timestamp_type == LOG_APPEND_TIME else now_ms
                    else:
                        raise EventError("bad_ingest_ts", "ingest_ts must be epoch milliseconds, not negative")
                    # event_id before ts, as core.events.validate: the same reason as over HTTP
                    raw = d.get("event_id")
                    if raw is not None:
                        if type(raw) is not str or len(raw) > EVENT_ID_MAX:
                            raise EventError("bad_field", f"event_id must be a string of at most {EVENT_ID_MAX} "
                                                          "characters")
                        did = event_key(region, raw)
                    raw = d.get("ts")
                    # out of range: the ingest's rule (parse_client_ts), bad_ts
                    cts = raw if raw is None or (type(raw) is int and TS_MIN < raw < TS_MAX) else parse_client_ts(raw)
                    # a user or url not a string: left out of the aggregates
                    raw = d.get("user_id")
                    user = raw if type(raw) is str else None
                    raw = d.get("url")
                    url = raw if type(raw) is str else None
                except Exception as exc:  # noqa: BLE001 - a bad record never stops the stage
                    _reject(exc, rec, partition, rejected, dead)
                    continue
            if aggregating and (user is not None or url is not None):  # parsed from the value
                user_h = None if user is None else hash_(user.encode())  # sketches.user_hash
                if url is not None:
                    known = urls.get(url)
                    if known is None:
                        known = self.url_cache.parts(url)
                    if known.h >= 0:
                        agg = Parts(user_h, known)
                    elif user_h is not None:
                        agg = Parts(user_h, None)
                else:
                    agg = Parts(user_h, None)
            if capped is not None and region not in capped:
                # before the home: __other__ has one home, so one final snapshot a window
                region = cap.admit(region, now_ms)  # type: ignore[union-attr]
            if split:
                h = homes.get(region)
                if h is None:
                    h = self._home(region)
                if h != partition:
                    forward.append((region, its, cts, rec.offset, did, agg))  # type: ignore[union-attr]
                    continue
            if its > max_ts:
                self._future(region, its, max_ts, future, dead, partition, rec.offset, rec, did)
                continue
            if did is not None and ids is None:
                ids = [None] * len(events)
            events.append((region, its, cts))
            if ids is not None:
                ids.append(did)
            if aggs is not None:
                aggs.append(agg)
            if want_offsets:
                offsets.append(rec.offset)
        return Decoded(events, offsets, rejected, future, ids, aggs)

    def decode_forwarded(self, records: Sequence[Record], partition: int, applied: dict[int, int],
                         dead: list[DeadLetter] | None, max_ts: int,
                         epochs: dict[int, int] | None = None) -> tuple[Decoded, int]:
        """Records of ``clicks-repartition`` (partition ``partition``) -> (``decode``'s
        answer without offsets, repeats dropped).  ``applied``: per source partition, the
        highest source offset applied, ``epochs``: the source's log epoch of that offset
        (0 when absent; both updated here, the rule of ``core.repartition.Watermarks``): a
        record at or below it is a repeat of a source's forwards after its crash, one of a
        lower epoch a repeat from a log that has started over since; both are dropped.  A
        higher epoch (the source's log started over) starts the source's mark again.  Dead
        letters and ``future_ts`` name the record's source partition and offset in ``clicks``."""
        epochs = {} if epochs is None else epochs
        keys = self.keys
        events: list[Event] = []
        rejected: dict[str, int] = {}
        future = FutureCounts()
        repeats = 0
        ids: list[DedupId | None] | None = None
        aggs: list[Agg | None] | None = [] if self.aggregates else None
        ingest_name, source_name, agg_name = INGEST_HEADER, SOURCE_HEADER, AGG_HEADER  # globals read once
        source_of, times_of, agg_of = parse_source_header, parse_ingest_header, parse_agg_header
        for rec in records:
            hs = rec.headers
            try:
                if len(hs) < 2 or hs[0][0] != ingest_name or hs[1][0] != source_name:
                    raise EventError("undecodable", "not a record forwarded by a worker (headers)")
                source, offset, epoch = source_of(hs[1][1])  # type: ignore[arg-type]  # a null value raises
                its, cts, raw_id = times_of(hs[0][1])  # type: ignore[arg-type]
                region = keys.get(rec.key) or self._key_region(rec.key)  # type: ignore[arg-type]
                if region is None:
                    raise EventError("bad_region", "the key of a forwarded record is not a region")
                did = None if raw_id is None else parse_id_field(raw_id, region)
            except Exception as exc:  # noqa: BLE001 - a bad record never stops the stage
                _reject(exc, rec, partition, rejected, dead)
                continue
            agg: Agg | None = None
            if len(hs) > 2 and hs[2][0] == agg_name:
                raw_agg = hs[2][1]
                try:
                    agg = agg_of(raw_agg)  # type: ignore[arg-type]
                except (ValueError, TypeError, AttributeError):
                    # not what ingest writes (forwarded as it came): the event still counts, with
                    # no user and no URL (core.aggstate counts it malformed), as at its home
                    agg = raw_agg if isinstance(raw_agg, bytes) else None
            if epoch or source in epochs:
                known = epochs.get(source, 0)
                if epoch != known:
                    if epoch < known:  # of a log that started over since: stale
                        repeats += 1
                        continue
                    epochs[source] = epoch  # the source's log started over: its offsets start again
                    applied.pop(source, None)
            if offset <= applied.get(source, -1):
                repeats += 1
                continue
            applied[source] = offset
            if its > max_ts:
                self._future(region, its, max_ts, future, dead, source, offset, rec, did)
                continue
            if did is not None and ids is None:
                ids = [None] * len(events)
            events.append((region, its, cts))
            if ids is not None:
                ids.append(did)
            if aggs is not None:
                aggs.append(agg)
        return Decoded(events, [], rejected, future, ids, aggs), repeats

    def _url_entry(self, url: str) -> UrlEntry:
        """The entry a raw URL is counted by: one per URL hash (raw URLs that normalise alike
        share it), NO_URL for one with nothing to count."""
        h, text = url_parts(url, self.url_keep_query)
        if h is None or text is None:
            return NO_URL
        e = self.url_entries.get(h)
        if e is None:
            if len(self.url_entries) >= self.url_cache.max_entries:  # bounded as the URL cache (a few MB)
                self.url_entries.clear()  # entries still staged count on; count_parts sums equal hashes
            e = self.url_entries[h] = UrlEntry(h, text)
        return e

    def _home(self, region: str) -> int:
        h = home(region, self.partitions)
        if len(self.homes) < CACHE_MAX:
            self.homes[region] = h
        return h

    @staticmethod
    def _future(region: str, its: int, max_ts: int, future: FutureCounts, dead: list[DeadLetter] | None,
                partition: int, offset: int, rec: Record, did: DedupId | None) -> None:
        future[region] = future.get(region, 0) + 1
        if its > future.newest:
            future.newest = its
        if did is not None:
            future.ids.append((region, did))
        if dead is not None:
            exc = EventError(FUTURE_TS, f"ingest_ts {its} is {its - max_ts} ms past the worker's clock + "
                                        "AGG_MAX_AHEAD_SECONDS")
            dead.append((rec.key, dead_letter(FUTURE_TS, exc, partition, offset, rec.value)))

    def _key_region(self, key: bytes | None) -> str | None:
        """The region of a record key that is a valid region in its normalised spelling
        (what ingest writes), else None (the value decides)."""
        try:
            raw = key.decode()  # type: ignore[union-attr]  # None: AttributeError
            region = normalise_region(raw)
        except (AttributeError, UnicodeDecodeError, EventError):
            return None
        if region != raw:
            return None
        if len(self.keys) < CACHE_MAX:
            self.keys[key] = region  # type: ignore[index]
        return region

    def _region(self, raw: object) -> str:
        region = normalise_region(raw)
        if len(self.regions) < CACHE_MAX:
            self.regions[raw] = region  # type: ignore[index]  # a str: normalise_region checked
        return region


def _reject(exc: Exception, rec: Record, partition: int, rejected: dict[str, int],
            dead: list[DeadLetter] | None) -> None:
    """A record that is not an event: counted by reason, and a dead letter (if asked)."""
    reason = exc.reason if isinstance(exc, EventError) else "undecodable"
    rejected[reason] = rejected.get(reason, 0) + 1
    if dead is not None:
        dead.append((rec.key, dead_letter(reason, exc, partition, rec.offset, rec.value)))


def dead_letter(reason: str, exc: Exception, partition: int, offset: int, raw: bytes | None) -> bytes:
    """The value of a ``clicks-dlq`` record (docs/contract.md §4)."""
    return orjson.dumps({"reason": reason, "error": str(exc)[:200], "partition": partition, "offset": offset,
                         "raw": (raw or b"")[:DLQ_RAW_MAX].decode("utf-8", "replace")})
