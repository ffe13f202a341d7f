"""tools/sketch_bench.py runs and prints a per-event cost for each path (a small run;
the numbers themselves are in docs/analytics.md)."""
from __future__ import annotations

import re

from tools.sketch_bench import main, synthetic


def test_synthetic_events_are_seeded_and_complete():
    events = synthetic(2_000, seed=5, n_users=300, n_urls=40)
    assert events == synthetic(2_000, seed=5, n_users=300, n_urls=40)
    assert all(None not in e for e in events)
    assert len({e[1] for e in events}) <= 40 and len({e[0] for e in events}) <= 300
    assert any(e[3] <= 0 for e in events)  # a few clients ahead of the server


def test_sketch_bench_prints_each_cost(capsys):
    main(["--events", "5000", "--runs", "1", "--users", "500", "--urls", "100"])
    out = capsys.readouterr().out
    for label in ("bare loop", "CellAggregates.add", "add_many, one batch", "add_many, batches of 1000"):
        line = next(ln for ln in out.splitlines() if label in ln)
        assert float(re.search(r"([0-9.]+) µs/event", line).group(1)) > 0
    assert re.search(r"state of this cell: \d+ bytes", out)
