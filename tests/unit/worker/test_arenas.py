"""worker/arenas.py: the fetched records' memory is kept from fetch to fetch, bounded."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.worker.arenas import BLOCK_BITS, MALLOC_ENV, ArenaKeeper, keep_heap


def _child(script: str, mode: str) -> str:
    """What ``script`` prints, run with ``mode`` in a fresh interpreter (its allocator state
    and malloc settings its own)."""
    return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[3], timeout=60).stdout


_CHILD = r"""
import re, sys
from aggregator.worker.arenas import ArenaKeeper

def arenas_now():
    import os, tempfile
    with tempfile.TemporaryFile() as f:  # _debugmallocstats writes to the C stderr
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    return int(re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text).group(1).replace(",", ""))

def fetch():  # record-like objects of ~500 bytes: some 30 MB, tens of fresh arenas
    return [bytes(420 + i % 40) for i in range(60_000)]

keeper = ArenaKeeper() if sys.argv[1] == "keep" else None
records = fetch()
before = arenas_now()
if keeper is not None:
    keeper.keep(records)
del records
after = arenas_now()
again = fetch()  # the next fetch
print(before, after, arenas_now())
"""


def _arenas(mode: str) -> tuple[int, int, int]:
    """pymalloc's arenas mapped (from CPython's own allocator statistics) in a fresh
    interpreter: with a fetch's records alive, once they are freed, and with the next
    fetch's alive."""
    before, after, again = map(int, _child(_CHILD, mode).split())
    return before, after, again


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="pymalloc is CPython's")
def test_freed_records_leave_their_arenas_mapped_only_when_kept():
    before, after, again = _arenas("free")
    assert after < before - 15, (before, after)  # what the keeper is for: freed at once...
    assert again >= before - 2, (before, again)  # ...and mapped (faulted in) again
    before, after, again = _arenas("keep")
    assert after >= before - 2, (before, after)
    assert again <= before + 2, (before, again)  # the next fetch fits in the arenas kept


def _fetch(n: int = 60_000) -> list[bytes]:
    """Record-like objects of ~500 bytes."""
    return [bytes(420 + i % 40) for i in range(n)]


def test_one_record_kept_a_block_and_no_more_than_the_limit():
    records = _fetch(20_000)
    keeper = ArenaKeeper()
    keeper.keep(records)
    blocks = {id(r) >> BLOCK_BITS for r in records}
    assert set(keeper.kept) <= blocks
    # nearly every block met: a stride of 64 of some 500 records in a block (fewer at the
    # edges of the run, or where other objects share the block)
    assert len(keeper.kept) >= 0.8 * len(blocks)
    assert all(id(r) >> BLOCK_BITS == b for b, r in keeper.kept.items())
    kept = dict(keeper.kept)
    keeper.keep(records)  # a block kept keeps its first record
    assert keeper.kept == kept

    small = ArenaKeeper(limit=5)
    small.keep(records)
    assert len(small.kept) == 5
    small.keep(_fetch(20_000))
    assert len(small.kept) == 5


def test_stride_looks_at_every_nth_record():
    records = [object() for _ in range(10)]
    keeper = ArenaKeeper(stride=3)
    keeper.keep(records)
    held = {id(r) for r in keeper.kept.values()}
    assert held <= {id(records[i]) for i in (0, 3, 6, 9)}
    assert held


_HEAP_CHILD = r"""
import resource, sys, threading
from aggregator.worker.arenas import keep_heap

if sys.argv[1] == "keep":
    assert keep_heap({})
faults = []
received = bytes(256 << 10)

def fetches():  # what aiokafka does with each 12 MiB fetch response, in the consumer's thread
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffer = bytearray()
        while len(buffer) < 12 << 20:
            buffer.extend(received)  # asyncio's StreamReader: what each recv gave
        response = bytes(buffer)  # readexactly: the response, whole
        buffer.clear()
        partitions = [response[i << 22:(i + 1) << 22] for i in range(3)]  # a partition's bytes each
        del response, partitions
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

t = threading.Thread(target=fetches)
t.start()
t.join()
print(sum(faults[1:]))  # after the first fetch
"""


def _heap_faults(mode: str) -> int:
    return int(_child(_HEAP_CHILD, mode))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_fetch_buffers_are_faulted_in_again_only_without_keep_heap():
    # glibc's defaults: the response's 12 MiB are mapped for each fetch and unmapped when
    # freed (3,072 pages, twice: the buffer and the response), every fetch
    assert _heap_faults("free") > 7 * 3000
    # kept: the heap's pages stay mapped and serve the next fetch
    assert _heap_faults("keep") < 500


def test_keep_heap_leaves_an_operators_malloc_settings_alone():
    for name in MALLOC_ENV:
        assert keep_heap({name: ""}) is False
