"""Compare published snapshots with a generator's ground truth.

Counts are checked exactly.  With aggregates in the truth (``aggregates``), every
snapshot must carry them (unless the service runs with them off: ``aggregates=False``,
``audit --no-aggregates``, and then none may), and per (region, window) cell
``audit_aggregates`` checks them: against the truth's exact aggregates, and of every
snapshot what needs no truth (gen/audit_cells.py says which checks and bounds).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, NotRequired, TypedDict

from aggregator.broker.security import PLAINTEXT, KafkaSecurity, check_login
from aggregator.core.contract import SNAPSHOTS, Snapshot
from aggregator.core.contract import snapshot_content as content
from aggregator.gen.audit_cells import (
    DELAY_ROUNDING_MS,
    DELAY_TOLERANCE,
    EXACT_USERS,
    UNIQUE_USERS_TOLERANCE,
    URL_CAPACITY,
    URL_COUNT_TOLERANCE,
    CellTruthJSON,
    check_cell,
    check_snapshot,
    has_aggregates,
    unambiguous_top,
)

__all__ = ["DELAY_ROUNDING_MS", "DELAY_TOLERANCE", "EXACT_USERS", "UNIQUE_USERS_TOLERANCE", "URL_CAPACITY",
           "URL_COUNT_TOLERANCE", "CellTruthJSON", "TruthJSON", "audit", "audit_aggregates", "check_cell",
           "fetch_topic", "fetch_topic_snapshots", "has_aggregates", "missing_windows", "of_this_run", "over_counted", "table",
           "unambiguous_top"]


class TruthJSON(TypedDict):
    """The ground truth file a generator writes (``Truth.to_json``); only ``counts`` is
    required by the audit."""

    counts: dict[str, dict[str, int]]  # region -> window_start (a JSON key: str) -> n
    late: NotRequired[dict[str, dict[str, int]]]  # region -> reason -> n
    window_ms: NotRequired[int]
    accepted: NotRequired[int]
    rejected: NotRequired[int]
    sent: NotRequired[int]
    elapsed_s: NotRequired[float]
    achieved_rate: NotRequired[float]
    target_rate: NotRequired[float]
    duplicates: NotRequired[dict[str, int]]  # what the generator sent twice on purpose (--retry-fraction)
    aggregates: NotRequired[dict[str, dict[str, CellTruthJSON]]]  # region -> window_start -> exact aggregates
    aggregates_incomplete: NotRequired[list[list[Any]]]  # [region, window_start]: cells not checked
    url_keep_query: NotRequired[bool]  # how the generator normalised URLs (AGG_URL_KEEP_QUERY)


def expected_windows(truth: TruthJSON) -> set[tuple[str, int]]:
    """Every (region, window_start) the truth expects a snapshot for."""
    return {(r, int(w)) for r, per in truth["counts"].items() for w in per}


def missing_windows(truth: TruthJSON, snapshots: Iterable[Snapshot]) -> set[tuple[str, int]]:
    got = {(s["region"], int(s["window_start"])) for s in snapshots}
    return expected_windows(truth) - got


def audit(truth: TruthJSON, snapshots: Sequence[Snapshot], spilled_regions: Set[str] = frozenset(),
          top_n: int = 10, users_bound: float = UNIQUE_USERS_TOLERANCE, aggregates: bool = True) -> list[str]:
    """Return a list of mismatches (empty: the published numbers are exact).

    ``spilled_regions``: regions over their rate limit.  Their spilled events
    are drained later and keep their ingest time, so some land in the late
    bucket (``closed_window``) instead of their window; for them the check is
    docs/contract.md §1's identity: counted + late closed_window equals what the truth
    has, and no window is over its truth.

    Checks per (region, window): expected vs published count, windows
    missing or unexpected, re-published snapshots whose content differs;
    and late counts per region and reason. Identical re-publications (same content,
    ``emitted_at`` aside) are allowed; extra windows with a count of 0 are fine
    (regions seen recently get zero-count snapshots).  Then the aggregates
    (``audit_aggregates``; ``top_n``: the service's AGG_TOP_URLS; ``aggregates``: its
    AGG_AGGREGATES), against the truth except for spilled regions, whose events may be
    counted in a later window."""
    problems: list[str] = []
    published: dict[tuple[str, int], Snapshot] = {}
    late: dict[str, dict[str, int]] = {}
    for s in snapshots:
        key = (s["region"], int(s["window_start"]))
        prev = published.get(key)
        if prev is not None:
            if content(prev) != content(s):
                problems.append(f"{key[0]} window {key[1]}: re-published with different content "
                                f"({content(prev)} vs {content(s)})")
            continue
        published[key] = s
        for reason, n in s.get("late_by_reason", {}).items():
            if n:
                per = late.setdefault(s["region"], {})
                per[reason] = per.get(reason, 0) + n
    expected = {(r, int(w)): n for r, per in truth["counts"].items() for w, n in per.items()}
    window_ms = truth.get("window_ms")
    if window_ms:
        for key, snap in sorted(published.items()):
            if key[1] % window_ms or int(snap["window_end"]) != key[1] + window_ms:
                problems.append(f"{key[0]} window {key[1]}: bounds [{key[1]}, {snap['window_end']}) "
                                f"do not match {window_ms} ms windows")
    exp_late = truth.get("late", {})
    for key, n in sorted(expected.items()):
        pub = published.get(key)
        if pub is None:
            problems.append(f"{key[0]} window {key[1]}: missing (expected {n})")
        elif key[0] in spilled_regions:
            if pub["count"] > n:
                problems.append(f"{key[0]} window {key[1]}: count {pub['count']} over expected {n}")
        elif pub["count"] != n:
            problems.append(f"{key[0]} window {key[1]}: count {pub['count']} != expected {n}")
    dup = truth.get("duplicates", {})
    if dup.get("retry_answer_mismatches"):
        problems.append(f"{dup['retry_answer_mismatches']} retried bodies got other accepted/rejected counts than "
                        "their first attempt")
    for key, snap in sorted(published.items()):
        if key not in expected and snap["count"] != 0:
            problems.append(f"{key[0]} window {key[1]}: unexpected count {snap['count']}")
    for region in sorted(spilled_regions):
        got = sum(s["count"] for (r, _), s in published.items() if r == region)
        got += late.get(region, {}).get("closed_window", 0)
        want = sum(n for (r, _), n in expected.items() if r == region)
        want += exp_late.get(region, {}).get("closed_window", 0)
        if got != want:
            problems.append(f"{region}: counted + late closed_window = {got} != accepted on time {want}")
    for region in sorted(set(exp_late) | set(late)):
        for reason in sorted(set(exp_late.get(region, {})) | set(late.get(region, {}))):
            if region in spilled_regions and reason == "closed_window":
                continue  # part of the identity above
            e = exp_late.get(region, {}).get(reason, 0)
            g = late.get(region, {}).get(reason, 0)
            if e != g:
                problems.append(f"{region} late {reason}: {g} != expected {e}")
    problems += audit_aggregates(truth, published, spilled_regions, top_n, users_bound, aggregates)
    return problems


def audit_aggregates(truth: TruthJSON, published: Mapping[tuple[str, int], Snapshot],
                     spilled_regions: Set[str] = frozenset(), top_n: int = 10,
                     users_bound: float = UNIQUE_USERS_TOLERANCE, aggregates: bool = True) -> list[str]:
    """Problems of the aggregates of the published snapshots (gen/audit_cells.py).

    ``aggregates`` False (the service's AGG_AGGREGATES off): a snapshot carrying them is
    the one problem.  Else, when the truth has them, no snapshot may lack them: none
    carrying them is one problem, not a "not checked".  Every snapshot that carries them
    is checked for what needs no truth (``check_snapshot``: order, length, the empty
    aggregates of a window that counted nothing), and against its truth cell unless its
    region spilled (its events may be counted in a later window) or the truth has no cell
    for it (``aggregates_incomplete``)."""
    with_aggs = [key for key, s in published.items() if has_aggregates(s)]
    if not aggregates:
        return [f"{len(with_aggs)} snapshots carry unique_users/top_urls/client_delay_ms, but the aggregates are "
                "off (--no-aggregates, AGG_AGGREGATES=false)"] if with_aggs else []
    cells = truth.get("aggregates")
    if not with_aggs:
        return [] if cells is None or not published else [
            "no snapshot carries unique_users/top_urls/client_delay_ms, but the truth has the aggregates (a service "
            "with AGG_AGGREGATES off? audit --no-aggregates then)"]
    problems: list[str] = []
    for key, snap in sorted(published.items()):
        where = f"{key[0]} window {key[1]}"
        if not has_aggregates(snap):
            problems.append(f"{where}: no unique_users/top_urls/client_delay_ms in the snapshot")
            continue
        problems += check_snapshot(where, snap, top_n)
        cell = (cells or {}).get(key[0], {}).get(str(key[1]))
        if cell is not None and key[0] not in spilled_regions:
            problems += check_cell(where, cell, snap, top_n, users_bound)
    return problems


def of_this_run(truth: TruthJSON, snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """The snapshots from the truth's first window on: a service also lists those of earlier
    runs (the README's quick start runs ``gen`` twice against one service), which are not
    this run's double counts or unexpected windows.  (A run that starts in a window still
    holding other traffic cannot be audited: that window's count is over.)"""
    windows = [int(w) for per in truth["counts"].values() for w in per]
    first = min(windows, default=0)
    return [s for s in snapshots if int(s["window_start"]) >= first]


def over_counted(truth: TruthJSON, snapshots: Iterable[Snapshot]) -> int:
    """Double counts: events a region's snapshots hold beyond its truth, in windows and in
    the late bucket together (an event counted late instead of in its window, a spilled
    region's, is not one; a count short elsewhere in the region hides one, which the
    audit's other checks report), summed over regions.  A re-published (region, window)
    counts once."""
    want: dict[str, int] = {}
    for r, per in truth["counts"].items():
        want[r] = want.get(r, 0) + sum(per.values())
    for r, reasons in truth.get("late", {}).items():
        want[r] = want.get(r, 0) + sum(reasons.values())
    published = {(s["region"], int(s["window_start"])): s for s in snapshots}
    got: dict[str, int] = {}
    for (r, _), s in published.items():
        got[r] = got.get(r, 0) + s["count"] + sum(s.get("late_by_reason", {}).values())
    return sum(max(0, n - want.get(r, 0)) for r, n in got.items())


def table(truth: TruthJSON, snapshots: Iterable[Snapshot]) -> str:
    rows: dict[tuple[str, int], int] = {}
    for s in snapshots:
        rows[(s["region"], s["window_start"])] = s["count"]
    lines = [f"{'region':<16}{'window_start':>16}{'expected':>10}{'published':>10}"]
    for r, per in sorted(truth["counts"].items()):
        for w, n in sorted(per.items()):
            got = rows.get((r, int(w)))
            mark = "" if got == n else "  <-- mismatch"
            lines.append(f"{r:<16}{w:>16}{n:>10}{'-' if got is None else got:>10}{mark}")
    return "\n".join(lines)


def fetch_topic_snapshots(bootstrap: str, security: KafkaSecurity = PLAINTEXT, idle: float = 2.0,
                          topic: str = SNAPSHOTS) -> list[Snapshot]:
    """Every snapshot on ``topic`` (the service's ``click-snapshots``): ``fetch_topic``'s values."""
    return [json.loads(value) for _, value in fetch_topic(bootstrap, topic, security, idle) if value is not None]


def fetch_topic(bootstrap: str, topic: str, security: KafkaSecurity = PLAINTEXT,
                idle: float = 2.0) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record of ``topic``, in each partition's order, read up to the
    end offsets seen at the start (or until nothing arrives for ``idle`` seconds), with
    TLS/SASL as ``security`` says (a refused login raises ``KafkaLoginError``)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list[tuple[bytes | None, bytes | None]]:
        address = bootstrap.split("://", 1)[-1]
        await check_login(address, security)
        c = AIOKafkaConsumer(bootstrap_servers=address, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", **security.aiokafka_kwargs())
        out: list[tuple[bytes | None, bytes | None]] = []
        try:
            await c.start()  # in the try: a consumer that could not start is closed too
            parts = c.partitions_for_topic(topic) or set()
            if not parts:
                await c._client.force_metadata_update()
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                return out
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            end = await c.end_offsets(tps)
            while True:
                batch = await c.getmany(timeout_ms=int(idle * 1000))
                if not batch:
                    break
                for recs in batch.values():
                    out.extend((r.key, r.value) for r in recs)
                positions = {tp: await c.position(tp) for tp in tps}
                if all(positions[tp] >= end[tp] for tp in tps):
                    break
        finally:
            await c.stop()
        return out

    return asyncio.run(read())
