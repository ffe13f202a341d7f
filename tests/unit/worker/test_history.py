"""The snapshot view's reading of ``click-snapshots`` (worker/history.py): a record that is
not a snapshot -- not JSON, or JSON of another shape -- is skipped with its offset and
reason, never stored.  ``{}``, ``5`` or ``[]`` used to raise in SnapshotStore.add (the
read abandoned and retried every second, forever), and an object with a region and a
window_start but no window_end was stored and made every ``?since=`` a 500."""
from __future__ import annotations

from types import SimpleNamespace

import orjson

from aggregator.core.snapshots import SnapshotStore
from aggregator.worker.history import parse_snapshots
from tests.unit.core.test_snapshot_store import BAD, snap


def records(values: list[bytes | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(value=v, offset=n) for n, v in enumerate(values)]


def test_records_that_are_not_snapshots_are_skipped_and_the_view_still_answers():
    good = [snap("eu", 0, 3), snap("us", 2000, 4)]
    values = [orjson.dumps(good[0]), b"not json", None, *(orjson.dumps(b) for b in BAD), orjson.dumps(good[1])]
    snaps, bad = parse_snapshots(records(values))
    assert snaps == good
    assert [off for off, _ in bad] == list(range(1, len(values) - 1))
    assert bad[:5] == [(1, "not JSON"), (2, "not JSON"), (3, "no region"), (4, "not a JSON object (int)"),
                       (5, "not a JSON object (list)")]
    assert dict(bad)[3 + BAD.index({"region": "eu", "window_start": 0})] == "no integer window_end"
    store = SnapshotStore()
    store.add(snaps)  # raised KeyError / TypeError with them
    assert store.query(None, 2000) == [good[1]]  # was a 500 with the window_end-less one stored
    assert store.query("eu", None) == [good[0]]


def test_a_batch_of_nothing_but_snapshots_skips_none():
    good = [snap(f"r{i}", 0, i) for i in range(5)]
    assert parse_snapshots(records([orjson.dumps(s) for s in good])) == (good, [])
