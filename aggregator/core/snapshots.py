"""The recent final snapshots a process has published, bounded: what
``GET /v1/snapshots`` answers from.  Pure: no I/O.

Each snapshot stored gets the next number of this store (``seq``), so an answer can be
cut into bounded pages: ``page`` returns at most ``limit`` of them from a number on, and
where to go on from; ``recent`` the newest ``limit`` of them.  The numbers are this store's only (another process, or this one
after a restart, numbers its own): ``instance`` names them in a cursor."""
from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import Iterable

from aggregator.core.contract import Snapshot, snapshot_content

INT_FIELDS = ("window_start", "window_end", "count", "late", "emitted_at")


def _int(v: object) -> bool:
    return type(v) is int  # not a bool, not a float


def snapshot_problem(s: object) -> str | None:
    """Why ``s`` (a decoded record of ``click-snapshots``) is not a snapshot of the contract
    (docs/contract.md §4), or None when it is one: what the store and its queries rely on."""
    if type(s) is not dict:
        return f"not a JSON object ({type(s).__name__})"
    region = s.get("region")
    if type(region) is not str or not region:
        return "no region"
    for f in INT_FIELDS:
        if not _int(s.get(f)):
            return f"no integer {f}"
    if s["window_end"] <= s["window_start"]:
        return "window_end not after window_start"
    lbr = s.get("late_by_reason")
    if type(lbr) is not dict or not all(_int(v) for v in lbr.values()):  # (older versions had fewer reasons)
        return "no late_by_reason of integers"
    if "unique_users" in s and not _int(s["unique_users"]):
        return "unique_users not an integer"
    top = s.get("top_urls", [])
    if type(top) is not list or not all(type(t) is dict and type(t.get("url")) is str and _int(t.get("count"))
                                        for t in top):
        return "top_urls not a list of {url, count}"
    delay = s.get("client_delay_ms")
    if delay is not None and (type(delay) is not dict
                              or not all(type(v) in (int, float) for v in delay.values())):
        return "client_delay_ms not an object of numbers"
    return None


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

    def recent(self, region: str | None, limit: int) -> tuple[list[Snapshot], int, bool]:
        """-> (the newest ``limit`` snapshots that match, oldest first; the number to go on
        after (the end: a poller from there sees only what is stored later); whether older
        ones match too).  What ``GET /v1/snapshots`` answers without ``since`` or ``after``."""
        out: list[Snapshot] = []
        for s in reversed(self.items):
            if region is None or s["region"] == region:
                if len(out) == limit:
                    out.reverse()
                    return out, self.seq, True
                out.append(s)
        out.reverse()
        return out, self.seq, False
