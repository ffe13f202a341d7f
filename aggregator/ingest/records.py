"""What ingest writes for each accepted event (docs/contract.md §4): the record's value
(``body.Event`` encoded by msgspec), its ``clickstream-ingest`` header, and with
aggregates on its ``clickstream-agg`` header (``AggHeaders``); a sampled request's
``traceparent`` follows them.  Per-event code: no await, no log line.  No aiohttp here."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import repeat

import msgspec
from xxhash import xxh3_64_intdigest

from aggregator import tracing
from aggregator.core.contract import (
    AGG_HEADER,
    INGEST_HEADER,
    USER_HASH_FORMAT,
    Header,
    ingest_header,
    ingest_header_value,
)
from aggregator.core.sketches import UrlCache, url_parts
from aggregator.ingest.body import Event

_USER_ONLY, _WITH_USER = USER_HASH_FORMAT + b",,", USER_HASH_FORMAT + b",%s"  # agg_header_value's forms


class AggHeaders:
    """The ``clickstream-agg`` header value of an event (core.contract.agg_header_value of
    ``user_hash(user_id)``, ``url_hash(normalise_url(url))`` and the normalised URL).

    Per-event ingest work.  The URL part, ``<hex hash>,<normalised url>``, is remembered
    per raw ``url`` (core.sketches.UrlCache: at most ``max_entries`` URLs of at most 256
    characters).  The user part is hashed every time: users repeat less, and a
    cache miss costs more than the hash.  The user hash is core.sketches.user_hash
    (XXH3-64 of the UTF-8) called directly: the two Python calls of ``user_hash`` cost
    as much as the hash (~0.35 us an event; tests/unit/ingest/test_agg_header.py keeps
    the two equal)."""

    __slots__ = ("keep_query", "_cache", "_urls")

    def __init__(self, keep_query: bool = False, max_entries: int = 16384) -> None:
        self.keep_query = keep_query
        self._cache = UrlCache(self._url_part, max_entries)
        self._urls = self._cache.known  # read inline per event; ``_cache.parts`` on a miss

    def value(self, user_id: str | None, url: str | None) -> bytes | None:
        """The header value; None when the event has neither a user nor a URL to count
        (no ``user_id``, and no ``url`` or one that normalises to nothing)."""
        if url is None:
            return None if user_id is None else _USER_ONLY % xxh3_64_intdigest(user_id.encode())
        part = self._urls.get(url)
        if part is None:
            part = self._cache.parts(url)
        if user_id is None:
            return None if part == b"," else b"," + part
        return _WITH_USER % (xxh3_64_intdigest(user_id.encode()), part)

    def _url_part(self, url: str) -> bytes:
        h, norm = url_parts(url, self.keep_query)
        if h is None or norm is None:  # nothing to count: both or neither
            return b","
        return b"%x,%s" % (h, norm.encode())


class Records:
    """``(value, headers)`` of events, serialised one by one as the batch takes them."""

    __slots__ = ("plain", "headers", "agg", "ingest_ts", "tail")

    def __init__(self, ingest_ts: int, traceparent: bytes | None, agg: AggHeaders | None = None) -> None:
        self.ingest_ts = ingest_ts
        self.plain = ingest_header(ingest_ts, None)  # shared by the records without a client ts
        self.headers: Callable[..., list[Header]] = (
            ingest_header if traceparent is None else _with_header((tracing.TRACEPARENT, traceparent)))
        # what follows the ingest header (and the agg header) on every record
        self.tail: list[Header] = [] if traceparent is None else [(tracing.TRACEPARENT, traceparent)]
        if traceparent is not None:
            self.plain.append((tracing.TRACEPARENT, traceparent))
        self.agg = agg

    def of(self, events: list[Event], ids: list[bytes | None] | None = None) -> Iterator[tuple[bytes, list[Header]]]:
        """``(value, headers)`` of each event; ``ids``: their dedup ids (None: none has one)."""
        if self.agg is not None:
            return self._of_agg(events, ids, self.agg)
        return self._of(events, ids)

    def _of(self, events: list[Event], ids: list[bytes | None] | None) -> Iterator[tuple[bytes, list[Header]]]:
        encode = _ENCODE
        plain = self.plain
        headers = self.headers
        its = self.ingest_ts
        # a keyed request's ingest header in one formatting (not with a traceparent after it)
        pre = None if self.tail else b"%d," % its
        for ev, did in zip(events, repeat(None) if ids is None else ids, strict=False):  # ids: one an event
            cts = ev.ts
            if did is None:
                yield encode(ev), (plain if cts is None else headers(its, cts))
            elif pre is not None:
                # core.contract.ingest_header(its, cts, did), inlined: every event of a request
                # with an Idempotency-Key (tests/unit/ingest/test_agg_header.py holds them equal)
                yield encode(ev), [(INGEST_HEADER, b"%s,%s" % (pre, did) if cts is None
                                    else b"%s%d,%s" % (pre, cts, did))]
            else:
                yield encode(ev), headers(its, cts, did)

    def _of_agg(self, events: list[Event], ids: list[bytes | None] | None,
                agg: AggHeaders) -> Iterator[tuple[bytes, list[Header]]]:
        """As ``_of``, with ``clickstream-agg`` second (before a ``traceparent``) on the
        records of events with a user or a URL."""
        encode = _ENCODE
        plain = self.plain
        headers = self.headers
        value = agg.value
        its = self.ingest_ts
        first = plain[0]  # the ingest header of an event without client ts or dedup id
        tail = self.tail
        for n, ev in enumerate(events):
            cts = ev.ts
            did = None if ids is None else ids[n]
            a = value(ev.user_id, ev.url)
            if a is None:
                yield encode(ev), (plain if cts is None and did is None else headers(its, cts, did))
            else:
                ih = first if cts is None and did is None else (INGEST_HEADER, ingest_header_value(its, cts, did))
                yield encode(ev), ([ih, (AGG_HEADER, a), *tail] if tail else [ih, (AGG_HEADER, a)])


_ENCODE = msgspec.json.encode  # an Event's record value (see body.Event)


def _with_header(extra: Header) -> Callable[..., list[Header]]:
    """``ingest_header`` followed by ``extra`` (the request span's ``traceparent``)."""
    def headers(ingest_ts: int, client_ts: int | None, dedup: bytes | None = None) -> list[Header]:
        out = ingest_header(ingest_ts, client_ts, dedup)
        out.append(extra)
        return out
    return headers
