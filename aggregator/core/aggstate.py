"""The aggregates of a partition's open windows, as exactly-once state.

Pure: standard library, orjson and core.sketches.  One ``WindowAggregates`` per window
book (AGG_AGGREGATES on): a ``CellAggregates`` per (window, region) for the events counted
in that window, and the log of what went into them.

A cell is a few KiB to ~46 KiB, and every active region's cell changes between two
checkpoints, so writing the cells themselves each checkpoint would cost megabytes a
tick.  What a checkpoint writes instead is the cells' *input* since the last one -- per
event (region, user hash, url hash, the URL's text when the cell will read it, client
delay) -- as changelog records keyed by window and sequence number, named in the
partition's state by ``Prepared.to_json()``.  After a crash the cells are rebuilt by
adding the logged events again in the same order, which gives byte-identical cells
(core.sketches is deterministic), so a re-published snapshot is identical.  When a
window closes its cells become the snapshot's fields (in the book's outbox, which is
state) and its records are deleted after the state that no longer names them is durable.

The URL text is logged only when the cell does not hold the URL's counter at that moment
(the only time ``CellAggregates.add`` reads it); on replay the same events meet the same
cells, so the text is there exactly when it is needed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aggregator.core.contract import Agg
from aggregator.core.recordlog import Prepared, RecordLog
from aggregator.core.sketches import CellAggregates, SketchParams

EMPTY_RESULT: dict[str, Any] = {"unique_users": 0, "top_urls": [], "client_delay_ms": None}

# (window start, region, user hash, url hash, url text or None, delay ms or None)
Entry = tuple[int, str, "int | None", "int | None", "str | None", "int | None"]


class WindowAggregates(RecordLog):
    TAG = "g"

    def __init__(self, params: SketchParams | None = None, top_n: int = 10) -> None:
        super().__init__()  # pending: the entries logged since the last durable state
        self.params = params or SketchParams()
        self.top_n = top_n
        self.cells: dict[int, dict[str, CellAggregates]] = {}  # window start -> region -> cell

    # ------------------------------------------------------------------ per event
    def add(self, ws: int, region: str, agg: Agg | None, delay: int | None) -> None:
        """One event counted in window ``ws`` of ``region``."""
        if agg is None:
            if delay is None:
                return
            user = url_h = url = None
        else:
            user, url_h, url = agg
        per_window = self.cells.get(ws)
        if per_window is None:
            per_window = self.cells[ws] = {}
        cell = per_window.get(region)
        if cell is None:
            cell = per_window[region] = CellAggregates(self.params)
        text = None
        if url_h is not None and not cell.holds_url(url_h):
            text = url.decode() if isinstance(url, bytes) else url
        cell.add(user, url_h, text, delay)
        self.pending.append((ws, region, user, url_h, text, delay))

    # ------------------------------------------------------------------ closing
    def result(self, ws: int, region: str) -> dict[str, Any]:
        """The snapshot fields of a cell (of a window closing now)."""
        cell = self.cells.get(ws, {}).get(region)
        return dict(EMPTY_RESULT) if cell is None else cell.result(self.top_n)

    def close(self, ws: int) -> None:
        """Window ``ws`` is closed (its results are in snapshots): forget its cells."""
        self.cells.pop(ws, None)

    # ------------------------------------------------------------------ changelog
    def take_records(self, partition: int) -> tuple[list[tuple[str, dict[str, Any]]], Prepared]:
        """``RecordLog.take_records``, after moving the windows closed since (their results are
        in snapshots) out of the index and their pending entries out of the log."""
        open_windows = self.cells
        for ws in [ws for ws in self.written if ws not in open_windows]:
            self.expiring.append((ws, self.written.pop(ws)))
        if any(e[0] not in open_windows for e in self.pending):
            self.pending = [e for e in self.pending if e[0] in open_windows]
        return super().take_records(partition)

    def _size(self, e: Entry) -> int:
        return 80 + (len(e[1]) + (len(e[4]) if e[4] is not None else 0)) * 6

    def _value(self, entries: Sequence[Entry]) -> dict[str, Any]:
        """Columns: regions, user hashes, url hashes, delays (null where none), and the URL
        texts by position (only where logged)."""
        value: dict[str, Any] = {"r": [e[1] for e in entries], "u": [e[2] for e in entries],
                                 "h": [e[3] for e in entries], "d": [e[5] for e in entries]}
        texts = {str(i): e[4] for i, e in enumerate(entries) if e[4] is not None}
        if texts:
            value["t"] = texts
        return value

    def load(self, partition: int, index: Any, record: Callable[[str], Any], open_windows: set[int]) -> None:
        """Rebuild the cells of ``open_windows`` from a state's ``index`` and the stored records
        (``record(key)`` -> its JSON value; a missing one raises ValueError)."""
        if not index:
            return
        for ws_text, n in sorted(index.items(), key=lambda kv: int(kv[0])):
            ws = int(ws_text)
            if ws not in open_windows:  # closed in the state: its records go
                self.expiring.append((ws, int(n)))
                continue
            for seq in range(int(n)):
                value = record(self.record_key(partition, ws, seq))
                if not isinstance(value, dict):
                    raise ValueError(f"partition {partition}: aggregates record {ws}/{seq} is missing")
                self._replay(ws, value)
            self.written[ws] = int(n)
        self.pending = []  # the replay re-logged what is written already

    def _replay(self, ws: int, value: dict[str, Any]) -> None:
        texts = value.get("t", {})
        for i, (region, user, url_h, delay) in enumerate(zip(value["r"], value["u"], value["h"], value["d"],
                                                             strict=True)):
            per_window = self.cells.setdefault(ws, {})
            cell = per_window.get(region)
            if cell is None:
                cell = per_window[region] = CellAggregates(self.params)
            cell.add(user, url_h, texts.get(str(i)), delay)

