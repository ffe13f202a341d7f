"""A partition's window state as changelog records of bounded size.

The state of one partition of ``clicks`` (its book, the spill ledger and the next
source offset) grows with the regions and the windows not yet published: one record
of it was about 465 KB at 1000 regions, and Kafka refuses records over its topic's
``max.message.bytes`` (1 MiB by default).  So the state is written as chunks of at
most ``MAX_RECORD_BYTES`` each, then a small header that names them:

* chunk ``i`` of slot ``s``: key ``"<partition>/<s>/<i>"`` (a JSON string),
  value ``{"c": "<a piece of the state's JSON text>"}``;
* header: key ``<partition>`` (the key a whole state had before), value
  ``{"chunks": {"slot": s, "n": n, "crc": crc32 of the state}}``.

A new state goes to a slot no stored header may name (the current one, or one whose
header was sent but not acknowledged: the broker may have stored it; worker.checkpoint
``free_slot``), and its header is sent only after every chunk is confirmed: a crash (or
a failed write) in between leaves the latest header naming chunks that are untouched.
Keys repeat (slots 0 and 1 in turn while writes pass, one more for each header not
acknowledged in a row, whose chunks are deleted once no stored header can name them;
at most as many chunks as the state ever needed), so the compacted changelog stays
bounded.  Every key and value is JSON because Faust's table recovery
decodes them as JSON.  Pure: no I/O.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson

# A character of a piece takes at most 4 bytes in the chunk's value: 4 in UTF-8, or 2
# for an ASCII one escaped in a JSON string (the state's text is JSON: no control
# characters), so a chunk record of PIECE_CHARS characters stays under the bound.
PIECE_CHARS = 120_000
MAX_RECORD_BYTES = 512 * 1024  # under Kafka's default max.message.bytes (1 MiB) with room to spare


class StateCorrupt(ValueError):
    """The stored chunks do not add up to the state their header names."""


def header_key(partition: int) -> bytes:
    return str(partition).encode()


def chunk_key(partition: int, slot: int, i: int) -> str:
    return f"{partition}/{slot}/{i}"


def encode_chunks(partition: int, state: bytes, slot: int) -> tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes]]:
    """-> (the chunk records, the header record) of ``state`` in ``slot``."""
    text = state.decode()
    pieces = [text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)] or [""]
    chunks = [(orjson.dumps(chunk_key(partition, slot, i)), orjson.dumps({"c": piece}))
              for i, piece in enumerate(pieces)]
    header = orjson.dumps({"chunks": {"slot": slot, "n": len(pieces), "crc": zlib.crc32(state)}})
    return chunks, (header_key(partition), header)


def _obj(raw: Any) -> Any:
    """A stored value: JSON-decoded already (recovered by Faust) or our bytes."""
    return orjson.loads(raw) if isinstance(raw, bytes | bytearray | memoryview) else raw


def header_slot(stored: Any) -> int | None:
    """The slot a stored header value names (None: no chunked state)."""
    obj = _obj(stored) if stored else None
    if isinstance(obj, Mapping) and isinstance(obj.get("chunks"), Mapping):
        return int(obj["chunks"]["slot"])
    return None


def decode_state(partition: int, stored: Any, chunk: Callable[[str], Any]) -> tuple[dict[str, Any], int | None] | None:
    """-> (the state, its slot) from the value stored under the header key; ``chunk(key)``
    gives a chunk's stored value (None: missing).  A value without a header is a whole
    state of the earlier format (slot None).  None: nothing stored."""
    if not stored:
        return None
    obj = _obj(stored)
    if not isinstance(obj, Mapping):
        raise StateCorrupt(f"partition {partition}: state is not an object")
    head = obj.get("chunks")
    if not isinstance(head, Mapping):
        return dict(obj), None
    slot, n, crc = int(head["slot"]), int(head["n"]), int(head["crc"])
    parts = []
    for i in range(n):
        raw = chunk(chunk_key(partition, slot, i))
        piece = _obj(raw) if raw is not None else None
        if not isinstance(piece, Mapping) or not isinstance(piece.get("c"), str):
            raise StateCorrupt(f"partition {partition}: chunk {i} of {n} (slot {slot}) is missing")
        parts.append(piece["c"])
    state = "".join(parts).encode()
    if zlib.crc32(state) != crc:
        raise StateCorrupt(f"partition {partition}: the {n} chunks of slot {slot} do not match their checksum")
    loaded = orjson.loads(state)
    if not isinstance(loaded, dict):
        raise StateCorrupt(f"partition {partition}: state is not an object")
    return loaded, slot
