"""Records for the worker's unit tests: real fetched records (``fetched``, tools/records.py)
and a table's stored state as Faust's recovery reads it (``recovered``)."""
from __future__ import annotations

import orjson

from tools.records import fetched

__all__ = ["fetched", "recovered"]


def recovered(partition: int, value: bytes, slot: int = 0):
    """A ``stored_state`` callable over a table holding ``value`` as Faust's recovery
    would: the state's chunk and header records, keys and values JSON-decoded."""
    from aggregator.core.statechunks import decode_state, encode_chunks

    chunks, header = encode_chunks(partition, value, slot)
    data = {orjson.loads(k): orjson.loads(v) for k, v in [*chunks, header]}
    return lambda p: decode_state(p, data.get(p), data.get)
