"""How a big JSON array body is cut into parts parsed one at a time (docs/contract.md §3):
``json_array_spans``, which ``body.decode_slices`` uses.  No aiohttp here.

A cut is made between two objects of the array (``}`` ``,`` ``{``).  Only those outside
strings are tried once a cut has failed (``outside``, ``next_cut``), so a ``},{`` in a
string (a URL that carries a JSON filter) costs nothing; whether a cut is also outside
nested values is for a parse to tell.  No per-byte Python loop: the string state at a
position is the parity of the unescaped quotes before it, counted with ``bytes.count``,
and strings are skipped with compiled regular expressions.  Exact for valid JSON; for
JSON that is not valid, a cut taken is still checked by the parse of its part.
"""
from __future__ import annotations

import re

import msgspec
import orjson

# the probes of cuts that fail (inside a nested value) may read at most this many times
# the body (msgspec skips JSON some 10 times faster than orjson builds it: a probe that
# orjson makes counts _ORJSON_COST times)
PROBE_FACTOR = 8
_ORJSON_COST = 10
# JSON that nests arrays and objects deeper than the parsers go is refused whole: orjson's
# "depth limit exceeded" past 1024 levels, or this message past msgspec's (some 1000, the
# interpreter's recursion limit: its RecursionError) where msgspec alone may read the body
DEEP = "body not taken: its JSON nests arrays and objects too deeply (some 1000 levels or more)"
JSON_WS = b" \t\r\n"
_LEADING_WS = re.compile(rb"[ \t\r\n]*")


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_array_spans(body: bytes, slice_bytes: int, item_max: int) -> list[tuple[int, int]] | None:
    """A big JSON array as ``[(start, end)]`` spans whose ``[body[start:end]]`` parse to
    consecutive parts of the array; None for a body that is parsed whole (small, or not
    cut into parts, and at most ``slice_bytes`` + ``item_max`` long).  Every part is
    parsed here once (and its objects dropped), so a body that is not valid JSON is a 400
    before anything of it is produced; so is a body longer than that which cannot be cut
    into parts that long (docs/contract.md §3).

    Exact: a cut is made at ``}`` ``,`` ``{``; when ``[`` + the part before it parses, the
    parser is at the top level of the array after it (it reads the body left to right,
    in the state the array's own ``[`` leaves it), so the comma separates two elements.
    A part that does not parse is joined to the next one (the cut was inside a string or
    a nested value): the next cuts are only those outside strings, each probed with
    msgspec's skipping parse (no objects built; orjson's past what msgspec nests), within
    PROBE_FACTOR times the body, and the one it takes is parsed by orjson, whose error, if
    any, is the body's (the cut is between two elements then; or the body nests deeper
    than orjson goes, whatever the cut)."""
    if len(body) <= slice_bytes:
        return None
    start = _LEADING_WS.match(body).end()  # type: ignore[union-attr]  # (lstrip would copy the body)
    end = len(body)
    while end > start and body[end - 1] in JSON_WS:
        end -= 1
    part_max = slice_bytes + item_max
    if end - start < 2 or body[start] != 0x5B or body[end - 1] != 0x5D:  # [ ... ]
        if end - start > part_max:
            raise _uncut(body, f"a JSON body that is not an array is one event, at most {item_max} bytes")
        return None
    start += 1
    end -= 1
    probes = PROBE_FACTOR * len(body)  # bytes the probes may still read
    spans: list[tuple[int, int]] = []
    a = start
    while a < end:
        search_from = a + slice_bytes
        limit = min(end, a + part_max)
        exact = False  # after a cut that did not parse: cuts outside strings, each probed
        while True:
            if search_from >= limit:
                m = None
            else:
                m = next_cut(body, search_from, limit) if exact else NEXT_OBJECT.search(body, search_from, limit + 1)
            if m is None:
                if end > limit:  # no place to cut within part_max
                    raise _uncut(body, f"no place to cut it between two objects in bytes {a}-{limit}: "
                                               f"a JSON body of over {slice_bytes} bytes must be an array of "
                                               f"event objects, each at most {item_max} bytes")
                if not spans:
                    return None  # one part: the whole body, parsed once as it is
            b = m.start() + 1 if m is not None else end
            buf = b"[" + body[a:b] + b"]"
            if exact and m is not None:
                probes -= len(buf)
                if probes < 0:
                    raise _uncut(body, f"too many objects nested in arrays to cut it between two of "
                                               f"its events (bytes {a}-{b}): send it as NDJSON")
                try:
                    _SKIP(buf)
                except msgspec.DecodeError:
                    search_from = m.end()  # not between two elements: the next cut
                    continue
                except RecursionError:  # deeper than msgspec goes: orjson decides
                    probes -= _ORJSON_COST * len(buf)
                else:
                    m = None  # between two elements: orjson's error is the body's
            try:
                orjson.loads(buf)
            except orjson.JSONDecodeError as exc:
                if m is None or _deep(exc):  # (too deep: the body is, there, whatever the cut)
                    raise BodyError(400, f"body is not valid JSON: {exc.msg} (near byte {a + max(exc.pos - 1, 0)})"
                                    ) from None
                # join the next part: the next cut outside strings
                search_from = m.end() if exact else outside(body, a, m.end())
                exact = True
                continue
            break
        spans.append((a, b))
        if b == end:
            break
        a = body.index(b"{", b)  # the "{" of the next element
    return spans


_SKIP = msgspec.json.Decoder(msgspec.Raw).decode


def _uncut(body: bytes, why: str) -> BodyError:
    """The 400 of a JSON body not cut into parts: its JSON error when it is not valid
    JSON, else ``why``."""
    return BodyError(400, _invalid(body) or f"body not taken: {why}")


def _invalid(buf: bytes) -> str | None:
    """"body is not valid JSON: <why>" when ``buf`` is not, else None (msgspec's skipping
    parse: no objects built)."""
    try:
        _SKIP(buf)
    except msgspec.DecodeError as exc:
        return f"body is not valid JSON: {exc}"
    except RecursionError:
        return DEEP
    return None


def _deep(exc: orjson.JSONDecodeError) -> bool:
    return exc.msg.startswith("depth limit")  # orjson's "depth limit exceeded"


# "}" "," "{" between two objects of an array, whitespace (newlines too) between
NEXT_OBJECT = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
# the rest of a string from within it (not within an escape): up to its closing quote
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.S)
# strings and the bytes between them, as far as it goes without entering a string that
# does not end before ``endpos``
_OUTSIDE = re.compile(rb'(?:[^"]++|"(?:[^"\\]++|\\.)*+")*+', re.S)
# the same, up to the first "}" outside strings that a "," and a "{" follow
_TO_CUT = re.compile(rb'(?:[^"}]++|"(?:[^"\\]++|\\.)*+"|\}(?![ \t\r\n]*+,[ \t\r\n]*+\{))*+', re.S)
# a quote after this many backslashes and more: the strings are skipped by _OUTSIDE
_RUN_MAX = 8


def outside(body: bytes, a: int, s: int) -> int:
    """The first position from ``s`` on that is outside every string, ``a`` (< ``s``) being
    outside: ``s``, or the end of the string ``s`` is in (``len(body)`` when it has none)."""
    # a quote is escaped when an odd run of backslashes is before it: with n(j) the quotes
    # after at least j backslashes, n(1) - n(2) + n(3) - ... of them
    escaped, j, n = 0, 1, body.count(b'\\"', a, s)
    while n and j <= _RUN_MAX:
        escaped += n if j % 2 else -n
        j += 1
        n = body.count(b"\\" * j + b'"', a, s)
    if n:  # a longer run: skip the strings one by one
        t = _OUTSIDE.match(body, a, s).end()  # type: ignore[union-attr]  # (it matches "" at least)
        if t == s:
            return s
        t += 1  # within the string that opens there and goes on past s
    elif (body.count(b'"', a, s) - escaped) % 2 == 0:
        return s
    else:  # within a string: from s, or from the run of backslashes that ends at s
        t = a + len(body[a:s].rstrip(b"\\")) if body[s - 1] == 0x5C else s
    m = _STRING_REST.match(body, t)
    return m.end() if m else len(body)


def next_cut(body: bytes, p: int, limit: int) -> re.Match[bytes] | None:
    """The first ``}`` ``,`` ``{`` outside strings from ``p`` (outside strings) that ends
    by ``limit`` + 1, or None."""
    t = _TO_CUT.match(body, p, limit + 1).end()  # type: ignore[union-attr]  # (it matches "" at least)
    return NEXT_OBJECT.match(body, t, limit + 1)
