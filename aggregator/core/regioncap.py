"""The region cap of one worker, over all the partitions it owns (issue 15, fault 11).

Every per-region structure of the worker (window books, token buckets, spill ledger and
files, metric labels) follows the regions this admits: at most ``max_regions`` named
regions at a time; a further one is counted as ``__other__`` (docs/contract.md §2).  A
region with no event for ``idle_ms`` gives its place up, so a worker that sees many
regions over its life (producers writing straight to Kafka can name any) keeps naming
the active ones.  The cap was per partition before: a worker with four partitions and a
cap of 5 named 11 regions.

Which regions are named depends on the order events arrive in, so after a rebalance or a
restart a region at the edge of the cap may be named where it was ``__other__`` before
(or the reverse): counts stay exact, only the label of such a region's events differs.

Pure: the caller passes the time (ingest time of the batch, ms).
"""
from __future__ import annotations

from collections.abc import Iterable

from aggregator.core.contract import OTHER_REGION

SWEEP_EVERY_MS = 1_000  # a full cap looks for idle regions at most this often


class RegionCap:
    __slots__ = ("max_regions", "idle_ms", "seen", "_next_sweep")

    def __init__(self, max_regions: int, idle_ms: int) -> None:
        self.max_regions = max_regions
        self.idle_ms = idle_ms
        self.seen: dict[str, int] = {}  # named region -> time of its last event (ms)
        self._next_sweep = 0

    def admit(self, region: str, now_ms: int) -> str:
        """``region`` when it is (or can now be) named, else ``__other__``."""
        seen = self.seen
        if region in seen:
            seen[region] = now_ms
            return region
        if region == OTHER_REGION:  # counted as such already (ingest's cap): it takes no place
            return region
        if len(seen) >= self.max_regions and now_ms >= self._next_sweep:
            self._next_sweep = now_ms + SWEEP_EVERY_MS
            self.forget_idle(now_ms)
        if len(seen) < self.max_regions:
            seen[region] = now_ms
            return region
        return OTHER_REGION

    def hold(self, regions: Iterable[str], now_ms: int) -> None:
        """The regions of a window book this worker takes over (recovered: a restart, a
        rebalance) keep their names: they take places first, past ``max_regions`` if need be
        (no new region is named until enough of them are idle), so restarts do not name a
        further ``max_regions`` regions each into the same books."""
        seen = self.seen
        for region in regions:
            if region != OTHER_REGION and region not in seen:
                seen[region] = now_ms

    def touch(self, regions: dict[str, int] | list[str], now_ms: int) -> None:
        """Regions that had events (once per batch or tick, not per event)."""
        seen = self.seen
        for region in regions:
            if region in seen:
                seen[region] = now_ms

    def forget_idle(self, now_ms: int) -> list[str]:
        """Give up the places of regions idle for longer than ``idle_ms`` -> those regions."""
        horizon = now_ms - self.idle_ms
        idle = [r for r, t in self.seen.items() if t < horizon]
        for region in idle:
            del self.seen[region]
        return idle
