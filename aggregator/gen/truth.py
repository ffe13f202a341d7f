"""The generator's ground truth: expected counts per (region, window), late events and
deliberate duplicates, and (issue 18) the exact aggregates of each (region, window) cell:
distinct users, URL counts by normalised URL and client-delay quantiles (``CellTruth``),
folded into their summaries once their window is well past (``Truth``).  The generator
(gen/generator.py) feeds it; ``Truth.to_json`` is the file the audit reads (gen/audit.py).
"""
from __future__ import annotations

import collections
from collections.abc import Sequence

from aggregator.core.sketches import MAX_DELAY_MS, normalise_url
from aggregator.gen.audit import CellTruthJSON, TruthJSON

# What the truth keeps of a cell's URLs: the TRUTH_TOP_URLS most frequent with their counts,
# the count of the next one (the audit's test of an unambiguous top 3 needs the 4th), and
# how many distinct URLs there were (whether the service's counters are exact).
TRUTH_TOP_URLS = 20
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
# One event's parts for the aggregates: (user_id, url, client ts), each None when absent.
Parts = tuple["str | None", "str | None", "int | None"]


def exact_quantile(delays: collections.Counter[int], q: float) -> int:
    """The delay at rank ``floor(q * (n - 1))`` (0-based) of the ``n`` delays sorted: the
    rank core.sketches' quantiles are stated for.  Delays are clamped to
    ``0..MAX_DELAY_MS`` as the sketch clamps them."""
    n = sum(delays.values())
    rank = int(q * (n - 1))
    seen = 0
    for d in sorted(delays):
        seen += delays[d]
        if seen > rank:
            return d
    raise ValueError("no delays")


class CellTruth:
    """The exact aggregates of one (region, window) cell, while its window may still get
    events: the set of its users, a counter of its normalised URLs and one of its client
    delays (ms, clamped; a Counter of values: a few thousand distinct delays at most in
    the generator's streams).  Memory is the cell's distinct users (a Python set of their
    ids: ~100 bytes each); ``Truth`` folds a cell into its summary (``summary()``) once
    its window is well past, so only the recent cells are held."""

    __slots__ = ("users", "urls", "delays")

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.urls: collections.Counter[str] = collections.Counter()
        self.delays: collections.Counter[int] = collections.Counter()

    def summary(self) -> CellTruthJSON:
        ranked = sorted(self.urls.items(), key=lambda uc: (-uc[1], uc[0]))
        top = ranked[:TRUTH_TOP_URLS]
        delay = None
        if self.delays:
            delay = {name: exact_quantile(self.delays, q) for name, q in QUANTILES}
        return {"unique_users": len(self.users), "top_urls": [[u, c] for u, c in top],
                "url_next": ranked[TRUTH_TOP_URLS][1] if len(ranked) > TRUTH_TOP_URLS else 0,
                "url_events": sum(self.urls.values()), "url_distinct": len(self.urls),
                "delays": sum(self.delays.values()), "client_delay_ms": delay}


class Truth:
    """The ground truth.  With ``aggregates`` also the exact aggregates per (region,
    window) cell of events counted in a window (not late, not rejected, not repeats):
    cells are held whole (``CellTruth``) until an answer ``FOLD_AFTER_WINDOWS`` windows
    (at least FOLD_AFTER_MS) past their end arrives, then kept as their summary, so memory
    is bounded by the recent windows' distinct users and URLs, not by the run's length.
    An answer for a cell already folded (a request answered that late) marks the cell
    ``incomplete``: the audit does not check its aggregates."""

    FOLD_AFTER_WINDOWS = 3
    FOLD_AFTER_MS = 60_000

    def __init__(self, window_ms: int, aggregates: bool = False, url_keep_query: bool = False) -> None:
        self.window_ms = window_ms
        self.aggregates = aggregates
        self.url_keep_query = url_keep_query
        self.open_cells: dict[tuple[str, int], CellTruth] = {}
        self.cells: dict[str, dict[str, CellTruthJSON]] = {}  # region -> window_start -> folded summary
        self.incomplete: set[tuple[str, int]] = set()
        self.newest_ts = 0
        self._norm: dict[str, str | None] = {}  # raw url -> normalised (the generator's few URLs)
        self.counts: dict[str, dict[str, int]] = {}   # region -> window_start -> n
        self.late: dict[str, dict[str, int]] = {}     # region -> reason -> n
        self.accepted = 0
        self.rejected = 0
        self.sent = 0
        self.elapsed_s = 0.0
        self.target_rate = 0.0
        self.retried_bodies = 0  # bodies sent again with their Idempotency-Key (--retry-fraction)
        self.retried_events = 0  # accepted events in them: each a duplicate the service must drop
        self.reused_ids = 0  # events that repeat an earlier accepted event's event_id (region too)
        self.retry_mismatches = 0  # retries answered with other accepted/rejected counts than the first

    def add(self, regions: list[str], ingest_ts: int, parts: Sequence[Parts] | None = None) -> None:
        """Events of ``regions`` counted in the window of ``ingest_ts``; ``parts``: the
        (user_id, url, client ts) of each (aggregates on)."""
        ws_ms = ingest_ts - ingest_ts % self.window_ms
        ws = str(ws_ms)
        for r in regions:
            per = self.counts.setdefault(r, {})
            per[ws] = per.get(ws, 0) + 1
        if not self.aggregates or parts is None:
            return
        norm = self._norm
        for r, (user, url, cts) in zip(regions, parts, strict=True):
            key = (r, ws_ms)
            cell = self.open_cells.get(key)
            if cell is None:
                if ws in self.cells.get(r, {}):
                    self.incomplete.add(key)
                    continue
                cell = self.open_cells[key] = CellTruth()
            if user is not None:
                cell.users.add(user)
            if url is not None:
                n = norm.get(url, "")
                if n == "":
                    n = norm[url] = normalise_url(url, self.url_keep_query)
                    if len(norm) > 100_000:
                        norm.clear()
                if n is not None:
                    cell.urls[n] += 1
            if cts is not None:
                cell.delays[min(max(ingest_ts - cts, 0), MAX_DELAY_MS)] += 1
        if ingest_ts > self.newest_ts:
            self.newest_ts = ingest_ts
            self.fold(ingest_ts - max(self.FOLD_AFTER_WINDOWS * self.window_ms, self.FOLD_AFTER_MS))

    def fold(self, before_ms: int | None = None) -> None:
        """Keep only the summaries of the cells whose window ended before ``before_ms``
        (None: every cell)."""
        for key in [k for k in self.open_cells if before_ms is None or k[1] + self.window_ms < before_ms]:
            cell = self.open_cells.pop(key)
            self.cells.setdefault(key[0], {})[str(key[1])] = cell.summary()

    def add_late(self, region: str, reason: str) -> None:
        per = self.late.setdefault(region, {})
        per[reason] = per.get(reason, 0) + 1

    def to_json(self) -> TruthJSON:
        out: TruthJSON = {
            "window_ms": self.window_ms, "accepted": self.accepted, "rejected": self.rejected,
            "sent": self.sent, "elapsed_s": round(self.elapsed_s, 3),
            "achieved_rate": round(self.achieved_rate, 1), "target_rate": self.target_rate,
            "counts": self.counts, "late": self.late,
            "duplicates": {"retried_bodies": self.retried_bodies, "retried_events": self.retried_events,
                           "reused_ids": self.reused_ids, "retry_answer_mismatches": self.retry_mismatches}}
        if self.aggregates:
            self.fold()
            for r, ws in self.incomplete:
                self.cells.get(r, {}).pop(str(ws), None)
            out["aggregates"] = self.cells
            out["aggregates_incomplete"] = sorted([r, ws] for r, ws in self.incomplete)
            out["url_keep_query"] = self.url_keep_query
        return out

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
