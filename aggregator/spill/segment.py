"""Append-only spill segment format.

Each record is::

    4-byte big-endian payload length | 4-byte big-endian CRC32 (zlib) of payload | payload

A *torn tail* is an incomplete header or payload at the end of the file, or a
header whose length is absurd (> ``MAX_RECORD_BYTES``) or runs past EOF; the
scan stops there.  A complete record whose CRC does not match is *corrupt*: it
is reported and skipped, and the scan continues after it (its length is
trusted because it fits in the file).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_RECORD_BYTES",
    "Entry",
    "ScanResult",
    "encode_record",
    "encode_records",
    "read_segment",
    "scan_bytes",
]

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size  # 8
MAX_RECORD_BYTES = 16 * 1024 * 1024

_crc32 = zlib.crc32
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class Entry(NamedTuple):
    offset: int  # offset of the header
    end: int  # offset just past the payload
    payload: bytes
    ok: bool  # CRC matched


class ScanResult(NamedTuple):
    entries: list[Entry]
    good_bytes: int  # length of the file prefix made of complete records (truncate to this)
    corrupt: int
    torn: bool


def encode_record(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"spill record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    return _pack(len(payload), _crc32(payload)) + payload


def encode_records(payloads: Iterable[bytes]) -> bytes:
    """All records as one buffer (for a single write())."""
    parts: list[bytes] = []
    append = parts.append
    for p in payloads:
        n = len(p)
        if n > MAX_RECORD_BYTES:
            raise ValueError(f"spill record of {n} bytes exceeds {MAX_RECORD_BYTES}")
        append(_pack(n, _crc32(p)))
        append(p)
    return b"".join(parts)


def scan_bytes(data: bytes, start: int = 0) -> ScanResult:
    """Scan ``data[start:]``; see the module docstring for the rules."""
    entries: list[Entry] = []
    size = len(data)
    pos = start
    corrupt = 0
    torn = False
    mv = memoryview(data)
    while pos < size:
        if size - pos < HEADER_SIZE:
            torn = True
            break
        length, crc = _unpack_from(data, pos)
        body = pos + HEADER_SIZE
        end = body + length
        if length > MAX_RECORD_BYTES or end > size:
            torn = True
            break
        payload = bytes(mv[body:end])
        ok = _crc32(payload) == crc
        if not ok:
            corrupt += 1
        entries.append(Entry(pos, end, payload, ok))
        pos = end
    return ScanResult(entries, pos, corrupt, torn)


def read_segment(path: str | os.PathLike[str]) -> tuple[list[bytes], int, int, bool]:
    """Read a whole segment: ``(records, good_bytes, corrupt, torn)``.

    ``records`` are the payloads with a valid CRC, in order; ``good_bytes`` is
    where the torn tail (if any) starts, i.e. the size to truncate the file to;
    ``corrupt`` counts skipped CRC mismatches; ``torn`` says a tail was cut.
    """
    with open(path, "rb") as f:
        data = f.read()
    res = scan_bytes(data)
    return [e.payload for e in res.entries if e.ok], res.good_bytes, res.corrupt, res.torn
