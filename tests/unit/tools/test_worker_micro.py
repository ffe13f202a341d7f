"""tools/worker_micro.py runs and prints a per-event cost for each case (a small run;
the numbers themselves are in docs/analytics.md)."""
from __future__ import annotations

import re

from tools.worker_micro import CASES, backlog, main, warm_passes, worker_pass


def test_the_backlog_is_fetched_batches_the_worker_counts_exactly():
    batches = backlog(5_000)
    assert sum(len(b) for b in batches) == 5_000 and batches[-1][-1].offset == 4_999
    assert worker_pass(batches, aggregates=True, typed=True) > 0


def test_worker_micro_prints_each_case(capsys):
    main(["--events", "4000", "--runs", "1"])
    out = capsys.readouterr().out
    labels = ["bare loop"] + [f"aggregates {a}, typed parse {t}" for a in ("on", "off") for t in ("on", "off")]
    for label in labels:
        line = next(ln for ln in out.splitlines() if label in ln)
        assert float(re.search(r"([0-9.]+) µs/event", line).group(1)) > 0


def test_each_case_runs_its_warm_passes_and_says_so(capsys):
    batches = backlog(2_000)
    for case in CASES:
        assert warm_passes(batches, case, 2) > warm_passes(batches, case, 0) == 0.0
    main(["--events", "2000", "--case", "on", "--passes", "1"])
    assert re.fullmatch(r"on: 1 warm passes, [0-9.]+ µs/event\n", capsys.readouterr().out)
