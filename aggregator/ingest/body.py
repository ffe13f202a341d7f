"""Parsing of ``POST /v1/events`` bodies (docs/contract.md §3).  No aiohttp here.

``decode_body`` turns raw bytes into a list of candidate records or raises
``BodyError`` with the HTTP status and a message that says why;
``validate_records`` splits them into accepted events (``Event``) and per-index errors.

``decode_slices``, which the handler uses, first tries each slice with a typed
msgspec parse straight into ``Event`` structs (``_typed``): no dict per event, and
the accepted event is the parsed struct itself.  It takes only what the orjson path
would accept with the same fields (every field known, of its type and within its
limits); any slice it refuses is parsed by the orjson path, which alone decides
errors.  tests/unit/ingest/test_body_typed.py holds the two paths equal.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
import orjson

from aggregator.core.events import LIMITS, TS_MAX, TS_MIN, EventError, validate
from aggregator.ingest.cuts import JSON_WS, BodyError, json_array_spans

MAX_ERRORS = 100
# a body is parsed, validated and produced in slices of about this many bytes, so that the
# Python objects of all its events never live at once (docs/contract.md §3, memory)
SLICE_BYTES = 1 << 18
# a JSON body is cut between two objects of its array at most this far past a slice's
# size, and an NDJSON line is at most this long, else the body is a 400: parsed into
# Python objects, a part of a body can be some 40 times its size (docs/contract.md §3)
ITEM_MAX_BYTES = 1 << 18
# a gzip body of more members is a 400 (docs/contract.md §3); its bytes are fed to the
# decompressor in slices of GZIP_FEED_BYTES (gunzip_bounded)
GZIP_MAX_MEMBERS = 64
GZIP_FEED_BYTES = 1 << 16


class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """An accepted event as ingest holds and produces it: ``msgspec.json.encode`` of it is
    its record's value, fields in this order, absent ones left out -- byte for byte what
    ``orjson.dumps`` gives of ``validate``'s dict plus ``ingest_ts``.  Parsed straight
    from a body by ``_typed`` (which is why it forbids unknown fields: msgspec would not
    check the JSON of a field it skips), or built from ``validate``'s dict.  Not tracked
    by the garbage collector (strings and ints only)."""
    region: str
    event_id: Annotated[str, msgspec.Meta(max_length=LIMITS["event_id"])] | None = None
    user_id: Annotated[str, msgspec.Meta(max_length=LIMITS["user_id"])] | None = None
    url: Annotated[str, msgspec.Meta(max_length=LIMITS["url"])] | None = None
    ts: Annotated[int, msgspec.Meta(gt=TS_MIN, lt=TS_MAX)] | None = None
    ingest_ts: int | None = None  # a client's is dropped (validate_records); ingest sets it


_TYPED = msgspec.json.Decoder(list[Event]).decode


def _typed(buf: bytes) -> list[Event] | None:
    """``buf`` (a JSON array) as Events, or None: not every element is an object of only
    Event's fields, each of its type and within its limits (a field with a JSON null
    counts as absent, as in ``validate``); the orjson path then decides."""
    try:
        return _TYPED(buf)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError too
        return None


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip without ever holding more than ``limit`` bytes.

    Every member of a multi-member gzip body is decompressed (RFC 1952; what
    ``gzip.decompress`` does), so nothing after the first member is silently
    dropped; bytes that are not a further gzip member are a 400, and so is a body of
    more than GZIP_MAX_MEMBERS members.  The body is fed to the decompressor in
    slices of GZIP_FEED_BYTES, so what is left over after a member (``unused_data``)
    is never more than one slice: linear time, however many members."""
    out = bytearray()
    view = memoryview(data)
    pos, n = 0, len(data)
    members = 0
    while True:
        members += 1
        if members > GZIP_MAX_MEMBERS:
            raise BodyError(400, f"gzip body has more than {GZIP_MAX_MEMBERS} members")
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not d.eof:
            if pos >= n:
                raise BodyError(400, "gzip body is truncated")
            chunk = view[pos:pos + GZIP_FEED_BYTES]
            pos += len(chunk)
            try:
                # max_length is never 0 here (0 would mean "unbounded")
                out += d.decompress(chunk, limit + 1 - len(out))
            except zlib.error as exc:
                raise BodyError(400, f"body is not valid gzip: {exc}") from None
            if len(out) > limit or d.unconsumed_tail:
                raise BodyError(413, f"body exceeds {limit} bytes after decompression")
        pos -= len(d.unused_data)  # the start of the next member, within the last slice
        if pos >= n:
            return bytes(out)


# "}" "," "{" within one line, whitespace between: where one line could hold two objects
_OBJECTS_IN_ONE_LINE = re.compile(rb"\}[ \t\r]*,[ \t\r]*\{")


def _ndjson_objects(body: bytes, typed: bool = False) -> list[Any] | None:
    """An NDJSON body of one JSON object per line, parsed by one ``orjson.loads`` of
    the lines joined into an array (half the cost of a call per line); None when the
    body is not that simple, and the line-by-line parse decides.

    Exactly the line-by-line result: when no line holds ``}`` ``,`` ``{`` (whitespace
    between allowed; anywhere, strings included, else None), the only commas that can
    separate two top-level objects are the n-1 that replaced the n-1 newlines; the array
    must have n items, all objects, so every line was exactly one of them.

    ``typed``: the typed parse first (Events; see ``Event``), the orjson one if it refuses."""
    joined = _ndjson_array(body)
    if joined is None:
        return None
    if typed:
        events = _typed(joined[0])
        if events is not None:
            return events if len(events) == joined[1] else None
    try:
        items = orjson.loads(joined[0])
    except orjson.JSONDecodeError:
        return None  # a blank or bad line somewhere: line by line, with its line number
    if len(items) != joined[1]:
        return None
    for obj in items:
        if type(obj) is not dict:
            return None
    return items


def _ndjson_array(body: bytes) -> tuple[bytes, int] | None:
    """(the lines of ``body`` joined into a JSON array, the number of lines) when it may
    be parsed so (see ``_ndjson_objects``), else None."""
    b = body.strip(JSON_WS)  # blank lines at either end are skipped line by line too
    if not b or b"\x1e" in b or _OBJECTS_IN_ONE_LINE.search(b):
        return None
    return b"[" + b.replace(b"\n", b",") + b"]", b.count(b"\n") + 1


def decode_body(body: bytes, content_type: str) -> list[Any]:
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        fast = _ndjson_objects(body)
        return fast if fast is not None else _ndjson_lines(body)
    if ct in ("application/json", ""):
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, f"body is not valid JSON: {exc}") from None
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):
            return [obj]
        raise BodyError(400, "body must be a JSON array of events or one JSON object")
    raise BodyError(415, f"unsupported content type {ct!r}: use application/json or application/x-ndjson")


def decode_slices(body: bytes, content_type: str, slice_bytes: int = SLICE_BYTES,
                  item_max: int = ITEM_MAX_BYTES) -> Iterator[list[Any]]:
    """``decode_body`` in slices: the lists it yields, joined, are ``decode_body(body, ...)``
    (a slice the typed parse takes as Events in place of its dicts, see ``Event``),
    each from about ``slice_bytes`` of the body.  Whatever makes the whole body an error
    (415, a JSON body that does not parse) is raised here, before any slice is given out,
    so nothing of a body that is refused has been produced.

    No slice is longer than ``slice_bytes`` + ``item_max``: a body that cannot be cut so
    (an NDJSON line longer than ``item_max``; a JSON body with no place to cut between
    two objects of its array within ``item_max`` past a slice's size: one big value, or
    array items that are not objects) is a 400, not parsed whole."""
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        _check_lines(body, item_max)
        return _ndjson_slices(body, slice_bytes)
    if ct in ("application/json", ""):
        spans = json_array_spans(body, slice_bytes, item_max)
        if spans is None:
            whole = _typed(body)
            return _handed(decode_body(body, ct) if whole is None else whole)
        return (_json_part(b"[" + body[a:b] + b"]") for a, b in spans)
    return _handed(decode_body(body, ct))


def _handed(items: list[Any]) -> Iterator[list[Any]]:
    """``items`` as the one slice, not held once handed out (``iter([items])`` would hold
    it until the next ``next``: while the handler waits for the broker)."""
    box = [items]
    del items
    yield box.pop()


def _check_lines(body: bytes, item_max: int) -> None:
    """400 when a line of ``body`` is longer than ``item_max`` bytes (a few ``rfind`` per
    ``item_max`` of body, not a look per line)."""
    pos, n = 0, len(body)
    while n - pos > item_max:
        nl = body.rfind(b"\n", pos, pos + item_max + 1)
        if nl < 0:
            lineno = body.count(b"\n", 0, pos) + 1
            raise BodyError(400, f"line {lineno} is longer than {item_max} bytes: an event is at most "
                                 f"{item_max} bytes of JSON")
        pos = nl + 1


def _json_part(buf: bytes) -> list[Any]:
    items = _typed(buf)
    return orjson.loads(buf) if items is None else items


def _ndjson_slices(body: bytes, slice_bytes: int) -> Iterator[list[Any]]:
    """Slices cut after a newline: every line is parsed as in ``decode_body``, and a line
    number in an error is the line's number in the whole body."""
    pos, n, lineno = 0, len(body), 1
    while pos < n:  # no local holds a slice handed out (the handler drops it before it waits)
        end = body.find(b"\n", pos + slice_bytes)
        end = n if end < 0 else end + 1
        yield _ndjson_part(body[pos:end], lineno)
        lineno += body.count(b"\n", pos, end)
        pos = end


def _ndjson_part(part: bytes, lineno: int) -> list[Any]:
    fast = _ndjson_objects(part, typed=True)
    return fast if fast is not None else _ndjson_lines(part, lineno)


def _ndjson_lines(body: bytes, first_line: int = 1) -> list[Any]:
    items: list[Any] = []
    for lineno, line in enumerate(body.split(b"\n"), first_line):
        line = line.lstrip(b"\x1e")  # application/json-seq (RFC 7464) starts records with RS
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            items.append(_BadLine(f"line {lineno}: invalid JSON: {exc}"))
    return items


class _BadLine:
    """An NDJSON line that is not JSON: rejected by index, the rest goes on."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


# raw region -> normalised region, for regions that ``validate`` has accepted before; bounded
# so that a client sending ever new regions cannot grow it
_REGION_CACHE: dict[str, str] = {}
_REGION_CACHE_MAX = 10000
_EVENT_ID_MAX, _USER_ID_MAX, _URL_MAX = LIMITS["event_id"], LIMITS["user_id"], LIMITS["url"]
# the fast path below checks these as length-limited strings: a field of another kind
# added to core.events must be handled there (and in Event)
assert list(LIMITS) == ["event_id", "user_id", "url"], "update ingest._validate_fast"


def _validate_fast(obj: Any) -> Event | None:
    """``validate(obj)`` for the common record: a dict whose region was accepted before,
    string fields within their limits, ``ts`` absent or an int in range.  Gives exactly
    what ``validate`` gives, as an Event; None when the record needs the full check (which
    then decides, and raises the error)."""
    if type(obj) is not dict:
        return None
    raw = obj.get("region")
    if type(raw) is not str:
        return None
    region = _REGION_CACHE.get(raw)
    if region is None:
        return None
    get = obj.get
    eid, user, url, ts = get("event_id"), get("user_id"), get("url"), get("ts")
    if eid is not None and (type(eid) is not str or len(eid) > _EVENT_ID_MAX):
        return None
    if user is not None and (type(user) is not str or len(user) > _USER_ID_MAX):
        return None
    if url is not None and (type(url) is not str or len(url) > _URL_MAX):
        return None
    if ts is not None and (type(ts) is not int or not TS_MIN < ts < TS_MAX):
        return None
    return Event(region, eid, user, url, ts)


def validate_records(items: list[Any], first_index: int = 0, max_errors: int = MAX_ERRORS,
                     indices: list[int] | None = None) -> tuple[list[Event], list[dict], dict[str, int]]:
    """-> (valid events, first ``max_errors`` errors, rejected counts by reason); an error's
    index counts from ``first_index`` (the slice's place in the body).  With ``indices``
    (a list), the body index of each valid event is appended to it.  ``items``: parsed
    records (dicts and the like), or Events from the typed parse (their region is checked
    here; the rest was checked by the parse)."""
    good: list[Event] = []
    append = good.append
    errors: list[dict] = []
    reasons: dict[str, int] = {}
    fast = _validate_fast
    cache = _REGION_CACHE
    for i, obj in enumerate(items, first_index):
        try:
            if type(obj) is Event:
                region = cache.get(obj.region)
                if region is not None:
                    obj.region = region
                    if obj.ingest_ts is not None:
                        obj.ingest_ts = None  # the client's: not a field of an event
                    append(obj)
                    if indices is not None:
                        indices.append(i)
                    continue
                obj = msgspec.structs.asdict(obj)  # a region not seen yet: the full check
            ev = fast(obj)
            if ev is None:
                if isinstance(obj, _BadLine):
                    raise EventError("bad_json", obj.message)
                checked = validate(obj)
                raw = obj["region"]
                if type(raw) is str and raw not in cache and len(cache) < _REGION_CACHE_MAX:
                    cache[raw] = checked["region"]
                ev = Event(**checked)
            append(ev)
            if indices is not None:
                indices.append(i)
        except EventError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            if len(errors) < max_errors:
                errors.append({"index": i, "error": str(exc)})
        except Exception:  # noqa: BLE001 - a client's record never makes a 500
            reasons["invalid"] = reasons.get("invalid", 0) + 1
            if len(errors) < max_errors:
                errors.append({"index": i, "error": "invalid record"})
    return good, errors, reasons
