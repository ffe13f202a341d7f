"""The recent final snapshots a process has published, bounded: what
``GET /v1/snapshots`` answers from.  Pure: no I/O.

Each snapshot stored gets the next number of this store (``seq``), so an answer can be
cut into bounded pages: ``page`` returns at most ``limit`` of them from a number on, and
where to go on from.  The numbers are this store's only (another process, or this one
after a restart, numbers its own): ``instance`` names them in a cursor."""
from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import Iterable

from aggregator.core.contract import Snapshot, snapshot_content


class SnapshotStore:
    """The most recent final snapshots, bounded."""

    def __init__(self, maxlen: int = 20000) -> None:
        self.items: collections.deque[Snapshot] = collections.deque(maxlen=maxlen)
        self.latest: dict[tuple[str, int], Snapshot] = {}
        self.seq = 0  # the number of the last snapshot stored (the first is 1)
        self.instance = secrets.token_hex(4)  # names this store's numbers in a cursor

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
            self.seq += 1
            latest[key] = s

    def query(self, region: str | None, since: int | None) -> list[Snapshot]:
        return self.page(region, since, None, len(self.items) or 1)[0]

    def page(self, region: str | None, since: int | None, after: int | None,
             limit: int) -> tuple[list[Snapshot], int, bool]:
        """-> (at most ``limit`` snapshots stored after number ``after`` (None: from the
        oldest) that match, oldest first; the number to go on after; whether more match
        after it).  Going on from each answer's number lists every snapshot stored once,
        also those stored meanwhile (not those evicted meanwhile: the store is bounded)."""
        first = self.seq - len(self.items) + 1  # the number of items[0]
        start = 0 if after is None else max(0, after + 1 - first)
        out: list[Snapshot] = []
        last = max(self.seq, after or 0)
        for n, s in enumerate(itertools.islice(self.items, start, None), first + start):
            if (region is None or s["region"] == region) and (since is None or s["window_end"] > since):
                if len(out) == limit:
                    return out, last, True
                out.append(s)
                last = n
        return out, max(self.seq, after or 0), False
