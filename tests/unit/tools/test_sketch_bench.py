"""tools/sketch_bench.py runs and prints a per-event cost for each path (a small run;
the numbers themselves are in docs/analytics.md)."""
from __future__ import annotations

import re

import orjson

from aggregator.core.sketches import CellAggregates
from tools.sketch_bench import main, synthetic


def test_synthetic_events_are_seeded_and_complete():
    events = synthetic(2_000, seed=5, n_users=300, n_urls=40)
    assert events == synthetic(2_000, seed=5, n_users=300, n_urls=40)
    assert all(None not in e for e in events)
    assert len({e[1] for e in events}) <= 40 and len({e[0] for e in events}) <= 300
    assert any(e[3] <= 0 for e in events)  # a few clients ahead of the server


def test_sketch_bench_prints_each_cost(capsys):
    main(["--events", "5000", "--runs", "1", "--users", "500", "--urls", "100"])
    lines = capsys.readouterr().out.splitlines()
    events = synthetic(5000, n_users=500, n_urls=100)  # what main measured
    users, urls = len({e[0] for e in events}), len({e[1] for e in events})
    assert re.fullmatch(rf"5000 events, {users} distinct users, {urls} distinct URLs, median of 1 runs, "
                        r"Python [0-9.]+\S*", lines[0]), lines[0]
    cost = r"-?[0-9]+\.[0-9]{3}"
    assert re.fullmatch(rf"  bare loop over the tuples +{cost} µs/event", lines[1]), lines[1]
    for label, line in zip(("CellAggregates.add", "add_many, one batch", "add_many, batches of 1000"), lines[2:5],
                           strict=True):
        assert line.startswith(f"  {label}") and re.search(rf" {cost} µs/event  \({cost} over the bare loop\)$", line)
    cell = CellAggregates()
    cell.add_many(*(list(c) for c in zip(*events, strict=True)))
    assert re.fullmatch(rf"  state of this cell: {len(orjson.dumps(cell.to_json()))} bytes; "
                        r"to_json\+dumps [0-9.]+ ms, loads\+from_json [0-9.]+ ms, result\(\) [0-9.]+ ms", lines[5])
    assert len(lines) == 6
