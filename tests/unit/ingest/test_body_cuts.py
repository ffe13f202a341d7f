"""A slice that ``decode_slices`` has handed out not held by it (docs/contract.md §3)."""
from __future__ import annotations

import gc
import tracemalloc

import pytest

from aggregator.ingest.body import SLICE_BYTES, decode_slices
from tests.unit.ingest.test_body import JSON, NDJSON

# ------------------------------------------------------------------ a slice handed out

LISTS = b"[" + b",".join([b"[]"] * 2000) + b"]"  # parsed: some 17 times its size
JUNK = b'"props":' + LISTS


@pytest.mark.parametrize("body, ct", [
    (b"[" + b",".join([b'{"region":"eu",' + JUNK + b"}"] * 20) + b"]", JSON),  # parsed whole
    (b'{"region":"eu",' + b",".join(b'"p%d":' % i + LISTS for i in range(20)) + b"}", JSON),  # one object
    (b"\n".join([b'{"region":"eu",' + JUNK + b"}"] * 20), NDJSON),             # lines at once
    (b"\n".join([b'{"region":"eu",' + JUNK + b"}"] * 20) + b"\n{bad", NDJSON),  # line by line
], ids=["array", "object", "ndjson", "ndjson-bad-line"])
def test_a_slice_handed_out_is_not_held_while_the_handler_waits(body: bytes, ct: str) -> None:
    """The handler drops a slice (``del items``) before it waits for the broker (seconds
    when it is slow): the slices must not hold it meanwhile (they held 12-17 times the
    body: a list iterator until its next ``next``, a generator in a local)."""
    assert len(body) <= SLICE_BYTES  # one slice
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        slices = decode_slices(body, ct)
        items = next(slices)
        assert len(items) >= 1 and tracemalloc.get_traced_memory()[0] - base > 5 * len(body)
        del items
        held = tracemalloc.get_traced_memory()[0] - base
        assert list(slices) == []
    finally:
        tracemalloc.stop()
    assert held < len(body) // 4
