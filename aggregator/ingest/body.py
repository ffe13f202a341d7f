"""Parsing of ``POST /v1/events`` bodies (docs/contract.md §3).  No aiohttp here.

``decode_body`` turns raw bytes into a list of candidate records or raises
``BodyError`` with the HTTP status and a message that says why;
``validate_records`` splits them into accepted events and per-index errors.
"""
from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from aggregator.core.events import LIMITS, EventError, validate

MAX_ERRORS = 100


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip without ever holding more than ``limit`` bytes.

    Every member of a multi-member gzip body is decompressed (RFC 1952; what
    ``gzip.decompress`` does), so nothing after the first member is silently
    dropped; bytes that are not a further gzip member are a 400."""
    out = bytearray()
    rest = data
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            # max_length is never 0 here (0 would mean "unbounded")
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise BodyError(400, f"body is not valid gzip: {exc}") from None
        if len(out) > limit or d.unconsumed_tail:
            raise BodyError(413, f"body exceeds {limit} bytes after decompression")
        if not d.eof:
            raise BodyError(400, "gzip body is truncated")
        rest = d.unused_data
        if not rest:
            return bytes(out)


# "}" "," "{" within one line, whitespace between: where one line could hold two objects
_OBJECTS_IN_ONE_LINE = re.compile(rb"\}[ \t\r]*,[ \t\r]*\{")
_JSON_WS = b" \t\r\n"


def _ndjson_objects(body: bytes) -> list[Any] | None:
    """An NDJSON body of one JSON object per line, parsed by one ``orjson.loads`` of
    the lines joined into an array (half the cost of a call per line); None when the
    body is not that simple, and the line-by-line parse decides.

    Exactly the line-by-line result: when no line holds ``}`` ``,`` ``{`` (whitespace
    between allowed; anywhere, strings included, else None), the only commas that can
    separate two top-level objects are the n-1 that replaced the n-1 newlines; the array
    must have n items, all objects, so every line was exactly one of them."""
    b = body.strip(_JSON_WS)  # blank lines at either end are skipped line by line too
    if not b or b"\x1e" in b or _OBJECTS_IN_ONE_LINE.search(b):
        return None
    try:
        items = orjson.loads(b"[" + b.replace(b"\n", b",") + b"]")
    except orjson.JSONDecodeError:
        return None  # a blank or bad line somewhere: line by line, with its line number
    if len(items) != b.count(b"\n") + 1:
        return None
    for obj in items:
        if type(obj) is not dict:
            return None
    return items


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


def _ndjson_lines(body: bytes) -> list[Any]:
    items: list[Any] = []
    for lineno, line in enumerate(body.split(b"\n"), 1):
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
_TS_MIN, _TS_MAX = -(2**53), 2**53
_STR_FIELDS = tuple(LIMITS.items())
# the fast path below checks these as length-limited strings: a field of another kind added
# to core.events must be handled there
assert list(LIMITS) == ["event_id", "user_id", "url"], "update ingest._validate_fast"


def _validate_fast(obj: Any) -> dict[str, Any] | None:
    """``validate(obj)`` for the common record: a dict whose region was accepted before,
    string fields within their limits, ``ts`` absent or an int in range.  Gives exactly
    what ``validate`` gives (same keys, same order); None when the record needs the full
    check (which then decides, and raises the error)."""
    if type(obj) is not dict:
        return None
    raw = obj.get("region")
    if type(raw) is not str:
        return None
    region = _REGION_CACHE.get(raw)
    if region is None:
        return None
    out: dict[str, Any] = {"region": region}
    get = obj.get
    for name, limit in _STR_FIELDS:
        v = get(name)
        if v is not None:
            if type(v) is not str or len(v) > limit:
                return None
            out[name] = v
    v = get("ts")
    if v is not None:
        if type(v) is not int or not _TS_MIN < v < _TS_MAX:
            return None
        out["ts"] = v
    return out


def validate_records(items: list[Any]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """-> (valid events, first 100 errors, rejected counts by reason)."""
    good: list[dict] = []
    append = good.append
    errors: list[dict] = []
    reasons: dict[str, int] = {}
    fast = _validate_fast
    cache = _REGION_CACHE
    for i, obj in enumerate(items):
        try:
            ev = fast(obj)
            if ev is None:
                if isinstance(obj, _BadLine):
                    raise EventError("bad_json", obj.message)
                ev = validate(obj)
                raw = obj["region"]
                if type(raw) is str and raw not in cache and len(cache) < _REGION_CACHE_MAX:
                    cache[raw] = ev["region"]
            append(ev)
        except EventError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            if len(errors) < MAX_ERRORS:
                errors.append({"index": i, "error": str(exc)})
        except Exception:  # noqa: BLE001 - a client's record never makes a 500
            reasons["invalid"] = reasons.get("invalid", 0) + 1
            if len(errors) < MAX_ERRORS:
                errors.append({"index": i, "error": "invalid record"})
    return good, errors, reasons
