"""The recent final snapshots a process has published, bounded: what
``GET /v1/snapshots`` answers from.  Pure: no I/O."""
from __future__ import annotations

import collections
from collections.abc import Iterable

from aggregator.core.contract import Snapshot, snapshot_content


class SnapshotStore:
    """The most recent final snapshots, bounded."""

    def __init__(self, maxlen: int = 20000) -> None:
        self.items: collections.deque[Snapshot] = collections.deque(maxlen=maxlen)
        self.latest: dict[tuple[str, int], Snapshot] = {}

    def add(self, snaps: Iterable[Snapshot]) -> None:
        """A snapshot re-published after a rebalance or restart with identical content
        (docs/contract.md §1) is listed once."""
        items, latest = self.items, self.latest
        for s in snaps:
            key = (s["region"], s["window_start"])
            prev = latest.get(key)
            if prev is not None and snapshot_content(prev) == snapshot_content(s):
                continue
            if len(items) == items.maxlen:
                old = items[0]
                okey = (old["region"], old["window_start"])
                if latest.get(okey) is old:
                    del latest[okey]
            items.append(s)
            latest[key] = s

    def query(self, region: str | None, since: int | None) -> list[Snapshot]:
        return [s for s in self.items
                if (region is None or s["region"] == region)
                and (since is None or s["window_end"] > since)]
