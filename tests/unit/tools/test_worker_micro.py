"""tools/worker_micro.py does the work it times (the book it fills counts every event of
the backlog, by the backlog's own rule) and prints a per-event cost for each case in its
format (a small run; the numbers themselves are in docs/analytics.md)."""
from __future__ import annotations

import re

import pytest

from tools.worker_micro import CASES, backlog, main, warm_passes, worker_pass

COST = r"[0-9]+\.[0-9]{3} µs/event"


def expected_per_region(n: int) -> dict[str, int]:
    """Event i of the backlog is in region ``r{i % 16}``."""
    return {f"r{k}": len(range(k, n, 16)) for k in range(16)}


@pytest.mark.parametrize("aggregates", [True, False])
@pytest.mark.parametrize("typed", [True, False])
def test_the_backlog_is_fetched_batches_the_worker_counts_exactly(aggregates, typed):
    batches = backlog(5_000)
    assert sum(len(b) for b in batches) == 5_000 and batches[-1][-1].offset == 4_999
    one = worker_pass(batches, aggregates=aggregates, typed=typed)
    assert one.decoded == 5_000
    # every event in its region, in the one window of the backlog's ingest times, none late
    # (client ts at most 2 s before ingest: far within late_after)
    assert one.book.open_total() == expected_per_region(5_000)
    assert len(one.book.counts) == 1 and one.book.late == {} and one.book.next_offset == 5_000


def test_the_decoder_alone_fills_no_book():
    one = worker_pass(backlog(2_000), aggregates=True, typed=True, book_too=False)
    assert one.decoded == 2_000 and one.book.open_total() == {}


def test_worker_micro_prints_each_case(capsys):
    main(["--events", "4000", "--runs", "1"])
    lines = capsys.readouterr().out.splitlines()
    labels = ["bare loop"] + [f"aggregates {a}, typed parse {t}" for a in ("on", "off") for t in ("on", "off")]
    assert len(lines) == len(labels)
    for label, line in zip(labels, lines, strict=True):
        assert label in line and re.fullmatch(rf".+ +{COST}", line), line


def test_each_case_runs_its_warm_passes_and_says_so(capsys):
    batches = backlog(2_000)
    for case in CASES:
        assert warm_passes(batches, case, 2)[1] == 2 * 2_000, case  # the first pass is not among them
        assert warm_passes(batches, case, 0) == (0.0, 0), case
    main(["--events", "2000", "--case", "on", "--passes", "1"])
    assert re.fullmatch(rf"on: 1 warm passes, {COST}\n", capsys.readouterr().out)
