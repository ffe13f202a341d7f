"""worker/arenas.py: the fetched records' memory is kept from fetch to fetch, bounded."""
from __future__ import annotations

import re
import sys

import pytest

from aggregator.worker.arenas import BLOCK_BITS, ArenaKeeper


def _arenas_now(capfd: pytest.CaptureFixture[str]) -> int:
    """pymalloc's arenas mapped now, from CPython's own allocator statistics."""
    capfd.readouterr()
    sys._debugmallocstats()
    err = capfd.readouterr().err
    found = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", err)
    assert found, err[:500]
    return int(found.group(1).replace(",", ""))


def _fetch(n: int = 60_000) -> list[bytes]:
    """Record-like objects of ~500 bytes: some 30 MB, tens of fresh arenas."""
    return [bytes(420 + i % 40) for i in range(n)]


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="pymalloc is CPython's")
def test_freed_records_leave_their_arenas_mapped_only_when_kept(capfd):
    for keeper in (None, ArenaKeeper()):
        records = _fetch()
        before = _arenas_now(capfd)
        if keeper is not None:
            keeper.keep(records)
        del records
        after = _arenas_now(capfd)
        if keeper is None:
            assert after < before - 15, (before, after)  # what the keeper is for: freed at once
        else:
            assert after >= before - 2, (before, after)
            again = _fetch()  # the next fetch fits in the arenas kept
            assert _arenas_now(capfd) <= before + 2
            del again


def test_one_record_kept_a_block_and_no_more_than_the_limit():
    records = _fetch(20_000)
    keeper = ArenaKeeper()
    keeper.keep(records)
    blocks = {id(r) >> BLOCK_BITS for r in records}
    assert set(keeper.kept) <= blocks
    assert len(keeper.kept) >= len(blocks) - 2  # every block met (a stride of 64 of ~500 in each)
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
