"""worker/arenas.py: the fetched records' memory is kept from fetch to fetch, bounded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.worker.arenas import BLOCK_BITS, ArenaKeeper

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
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3], timeout=60).stdout
    before, after, again = map(int, out.split())
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
