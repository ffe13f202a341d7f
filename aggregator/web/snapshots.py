"""What ``GET /v1/snapshots`` (docs/contract.md §3) reads and how its query is read:
the snapshot source a process serves, and the query's bounds.  No aiohttp here."""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

from aggregator.core.contract import Snapshot

# a page is at most SNAPSHOTS_MAX_LIMIT snapshots (SNAPSHOTS_LIMIT unless ``limit`` says), at
# most SNAPSHOT_VIEWS answers are built or sent at once (beyond: 503), and one not taken by
# its client within SNAPSHOT_SEND_S is cut off
SNAPSHOTS_LIMIT = 1000
SNAPSHOTS_MAX_LIMIT = 2000
SNAPSHOT_VIEWS = 4
SNAPSHOT_SEND_S = 10.0


class SnapshotSource(Protocol):
    """core.snapshots.SnapshotStore: ``page`` and ``recent`` -> (snapshots, the number to go
    on after, whether more match after them / older ones match)."""

    instance: str

    def page(self, region: str | None, since: int | None, after: int | None,
             limit: int) -> tuple[list[Snapshot], int, bool]: ...

    def recent(self, region: str | None, limit: int) -> tuple[list[Snapshot], int, bool]: ...


class NoSnapshots:
    """The snapshot source of a process that runs no worker (``AGG_ROLE=ingest``)."""

    instance = "none"

    def page(self, region: str | None, since: int | None, after: int | None,
             limit: int) -> tuple[list[Snapshot], int, bool]:
        return [], after or 0, False

    def recent(self, region: str | None, limit: int) -> tuple[list[Snapshot], int, bool]:
        return [], 0, False


class SnapshotQuery(NamedTuple):
    region: str | None
    since: int | None
    after: int | None
    limit: int


def snapshot_query(q: Mapping[str, str], instance: str) -> SnapshotQuery | str:
    """The query of a request to the snapshot source named ``instance``, or why it is a 400."""
    try:
        since = int(q["since"]) if "since" in q else None
    except ValueError:
        return "since must be epoch milliseconds"
    try:
        limit = int(q.get("limit", SNAPSHOTS_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= SNAPSHOTS_MAX_LIMIT:
        return f"limit must be an integer from 1 to {SNAPSHOTS_MAX_LIMIT}"
    after = None
    if "after" in q:
        name, _, num = q["after"].partition(".")
        if not (num.isdigit() and num.isascii() and len(num) <= 20):
            return "after must be the next of an earlier answer"
        if name != instance:
            return "after is the next of another process (another worker, or before a restart): " \
                   "start again without it (or with since)"
        after = int(num)
    return SnapshotQuery(q.get("region"), since, after, limit)


def snapshot_answer(source: SnapshotSource, query: SnapshotQuery) -> dict[str, object]:
    """The answer's JSON object: without ``since`` or ``after``, the newest snapshots that match
    (``older``: whether older ones match too); else a page from there on (``more``)."""
    region, since, after, limit = query
    if since is None and after is None:
        snaps, nxt, older = source.recent(region, limit)
        return {"snapshots": snaps, "next": f"{source.instance}.{nxt}", "more": False, "older": older}
    snaps, nxt, more = source.page(region, since, after, limit)
    return {"snapshots": snaps, "next": f"{source.instance}.{nxt}", "more": more}
