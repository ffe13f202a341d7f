"""What a run's worker wrote to its window-state changelog, read back once the run is over
(figure 4b: the aggregates' state bytes per (region, window); figure 2: the dedup records'
bytes at the bench rate).

The changelog (``clickstream-aggregator-window-state-changelog``, compacted) holds, per
partition ``p`` of ``clicks``, records with JSON keys:

  * the partition's state (its book, outbox and indexes): chunks ``"p/<slot>/<i>"`` and a
    header ``p`` naming them (aggregator.core.statechunks), kind ``state``;
  * dedup ids and request keys: ``"p/d/<bucket>/<seq>"`` (aggregator.core.dedup), kind ``d``;
  * the aggregates' input: ``"p/g/<bucket>/<seq>"`` (aggregator.core.aggstate), kind ``g``:
    ``{"c": [[region, ...], ...]}`` (a cell's logged batches) and, once a window's input
    outgrew its cells, ``"b": [[region, cell], ...]`` (the cells whole);

and tombstones (no value) for records no durable state names any more.  ``written`` counts
every value as sent, ``live`` the last value of each key that is not a tombstone (what the
topic holds once compacted, and what a recovering worker reads).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from aggregator.core.aggstate import window_of
from aggregator.core.contract import STATE_CHANGELOG
from aggregator.gen.audit import fetch_topic

KINDS = ("state", "d", "g")


@dataclass
class ChangelogBytes:
    records: int = 0
    written: dict[str, int] = field(default_factory=dict)  # kind -> value bytes of every record
    live: dict[str, int] = field(default_factory=dict)     # kind -> value bytes of each key's last record
    cells: int = 0       # (window, region) cells of every aggregates record written
    live_cells: int = 0  # ... of the live ones

    def to_json(self) -> dict:
        return {"records": self.records, "written": self.written, "live": self.live, "cells": self.cells,
                "live_cells": self.live_cells}


def kind_of(key: bytes | None) -> str:
    """``state``, ``d``, ``g`` or ``other`` (a key the worker does not write)."""
    try:
        k = orjson.loads(key or b"")
    except orjson.JSONDecodeError:
        return "other"
    if type(k) is int:
        return "state"  # a header
    if isinstance(k, str):
        parts = k.split("/")
        if len(parts) == 4 and parts[1] in ("d", "g"):
            return parts[1]
        if len(parts) == 3:
            return "state"  # a chunk
    return "other"


def _cells(key: bytes, value: bytes) -> set[tuple[int, str]]:
    """The (window, region) cells an aggregates record logs."""
    ws = window_of(int(orjson.loads(key).split("/")[2]))
    v = orjson.loads(value)
    regions = [e[0] for e in v.get("c", ())] + [b[0] for b in v.get("b", ())] + list(v.get("r", ()))
    return {(ws, r) for r in regions}


def summarise(records: Iterable[tuple[bytes | None, bytes | None]]) -> ChangelogBytes:
    """``records``: (key, value) in the order the topic holds them (per partition)."""
    out = ChangelogBytes(written=dict.fromkeys(KINDS, 0), live=dict.fromkeys(KINDS, 0))
    last: dict[bytes, tuple[str, bytes | None]] = {}
    cells: set[tuple[int, str]] = set()
    for key, value in records:
        out.records += 1
        kind = kind_of(key)
        if value is not None:
            out.written[kind] = out.written.get(kind, 0) + len(value)
            if kind == "g" and key is not None:
                cells |= _cells(key, value)
        last[key or b""] = (kind, value)
    live_cells: set[tuple[int, str]] = set()
    for key, (kind, value) in last.items():
        if value is None:
            continue
        out.live[kind] = out.live.get(kind, 0) + len(value)
        if kind == "g":
            live_cells |= _cells(key, value)
    out.cells, out.live_cells = len(cells), len(live_cells)
    return out


def read(bootstrap: str, topic: str = STATE_CHANGELOG) -> ChangelogBytes:
    """``topic`` read from its start to the end offsets seen at the start, summarised."""
    return summarise(fetch_topic(bootstrap, topic))
