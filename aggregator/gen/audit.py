"""Compare published snapshots with a generator's ground truth.

Counts are checked exactly.  With aggregates in the truth (``aggregates``) and in the
snapshots, per (region, window) cell (``audit_aggregates``):

* ``unique_users``: exact while the truth has at most ``SketchParams.exact_users`` (256)
  users, else within the sketches' stated bound (``SketchParams.users_bound``: 5 % at the default precision);
* ``top_urls``: the true top 3 URLs, where they are unambiguous (counts strictly
  decreasing and the 3rd strictly above the 4th), first in that order, each count within
  ``URL_COUNT_TOLERANCE`` (5 %) of the truth;
* ``client_delay_ms``: p50/p90/p99 each within the sketch's relative accuracy
  (``SketchParams.delay_accuracy``, 1 %) of the truth's delay at the same rank
  (``floor(q * (n - 1))``, the rank core.sketches states its bound for), plus 0.05 ms for
  the snapshot's rounding to 0.1 ms; null exactly when no counted event carried a ``ts``.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, NotRequired, TypedDict

from aggregator.broker.security import PLAINTEXT, KafkaSecurity, check_login
from aggregator.core.contract import SNAPSHOTS, Snapshot
from aggregator.core.contract import snapshot_content as content
from aggregator.core.sketches import SketchParams

EXACT_USERS = SketchParams().exact_users  # unique users are exact up to this many
UNIQUE_USERS_TOLERANCE = SketchParams().users_bound  # at the default precision; audit(users_bound=...)
URL_COUNT_TOLERANCE = 0.05
DELAY_TOLERANCE = SketchParams().delay_accuracy  # relative, at the same rank
DELAY_ROUNDING_MS = 0.05  # the snapshot's quantiles are rounded to 0.1 ms
TOP_CHECKED = 3


class CellTruthJSON(TypedDict):
    """The exact aggregates of one (region, window) cell (gen.truth.CellTruth)."""

    unique_users: int
    top_urls: list[list[Any]]  # [[normalised url, count]], most frequent first (ties by url), at most 20
    url_next: int  # the count of the URL after the listed ones (0: none)
    url_events: int  # events of the cell with a URL to count
    delays: int  # events of the cell with a client ts
    client_delay_ms: dict[str, int] | None  # {"p50", "p90", "p99"}: the delay at rank floor(q * (n - 1))


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
          top_n: int = 10, users_bound: float = UNIQUE_USERS_TOLERANCE) -> list[str]:
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
    (``audit_aggregates``; ``top_n``: the service's AGG_TOP_URLS), except for spilled
    regions, whose events may be counted in a later window."""
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
    problems += audit_aggregates(truth, published, spilled_regions, top_n, users_bound)
    return problems


def has_aggregates(snap: Mapping[str, Any]) -> bool:
    return "unique_users" in snap or "top_urls" in snap or "client_delay_ms" in snap


def audit_aggregates(truth: TruthJSON, published: Mapping[tuple[str, int], Snapshot],
                     spilled_regions: Set[str] = frozenset(), top_n: int = 10,
                     users_bound: float = UNIQUE_USERS_TOLERANCE) -> list[str]:
    """Problems of the aggregates of the published cells against the truth's (module
    docstring); nothing when the truth has none or no snapshot carries them (aggregates
    off: counts only), but a snapshot without them where others have them is one."""
    cells = truth.get("aggregates")
    if not cells:
        return []
    with_aggs = [key for key, s in published.items() if has_aggregates(s)]
    if not with_aggs:
        return []
    problems: list[str] = []
    for region, per in sorted(cells.items()):
        if region in spilled_regions:
            continue
        for ws, cell in sorted(per.items(), key=lambda kv: int(kv[0])):
            snap = published.get((region, int(ws)))
            if snap is None:
                continue  # reported as missing already
            where = f"{region} window {ws}"
            if not has_aggregates(snap):
                problems.append(f"{where}: no unique_users/top_urls/client_delay_ms in the snapshot")
                continue
            problems += check_cell(where, cell, snap, top_n, users_bound)
    return problems


def check_cell(where: str, cell: CellTruthJSON, snap: Mapping[str, Any], top_n: int = 10,
               users_bound: float = UNIQUE_USERS_TOLERANCE) -> list[str]:
    """The problems of one cell's published aggregates against its truth."""
    out: list[str] = []
    want_u, got_u = cell["unique_users"], snap.get("unique_users")
    if not isinstance(got_u, int):
        out.append(f"{where}: unique_users {got_u!r}, expected {want_u}")
    elif want_u <= EXACT_USERS:
        if got_u != want_u:
            out.append(f"{where}: unique_users {got_u} != {want_u} (exact up to {EXACT_USERS} users)")
    elif abs(got_u - want_u) > users_bound * want_u:
        out.append(f"{where}: unique_users {got_u} off by {abs(got_u - want_u) / want_u:.1%} from {want_u} "
                   f"(bound {users_bound:.1%})")
    out += _check_top(where, cell, snap.get("top_urls"), top_n)
    out += _check_delays(where, cell.get("client_delay_ms"), snap.get("client_delay_ms"))
    return out


def unambiguous_top(cell: CellTruthJSON, k: int = TOP_CHECKED) -> list[tuple[str, int]]:
    """The true top ``k`` URLs when their order is certain (counts strictly decreasing and
    the k-th strictly above the next), else those of them that are: the leading run of
    strictly decreasing counts each strictly above the one after it."""
    counts = [(str(u), int(c)) for u, c in cell["top_urls"]] + [("", int(cell.get("url_next", 0)))]
    out = []
    for i in range(min(k, len(counts) - 1)):
        if counts[i][1] > counts[i + 1][1]:
            out.append(counts[i])
        else:
            break
    return out


def _check_top(where: str, cell: CellTruthJSON, got: Any, top_n: int) -> list[str]:
    want = unambiguous_top(cell, min(TOP_CHECKED, top_n))
    if not want:
        return []
    if not isinstance(got, list):
        return [f"{where}: top_urls {got!r}, expected a list starting {want}"]
    out = []
    for i, (url, n) in enumerate(want):
        if i >= len(got) or not isinstance(got[i], dict):
            out.append(f"{where}: top_urls[{i}] missing, expected {url} ({n})")
            continue
        g_url, g_n = got[i].get("url"), got[i].get("count")
        if g_url != url:
            out.append(f"{where}: top_urls[{i}] is {g_url} ({g_n}), expected {url} ({n})")
        elif not isinstance(g_n, int) or abs(g_n - n) > URL_COUNT_TOLERANCE * n:
            out.append(f"{where}: top_urls[{i}] {url} count {g_n} not within {URL_COUNT_TOLERANCE:.0%} of {n}")
    return out


def _check_delays(where: str, want: Mapping[str, int] | None, got: Any) -> list[str]:
    if want is None:
        return [] if got is None else [f"{where}: client_delay_ms {got}, expected null (no event had a ts)"]
    if not isinstance(got, dict):
        return [f"{where}: client_delay_ms {got!r}, expected about {dict(want)}"]
    out = []
    for name, v in want.items():
        g = got.get(name)
        if not isinstance(g, (int, float)) or abs(g - v) > DELAY_TOLERANCE * v + DELAY_ROUNDING_MS:
            out.append(f"{where}: client_delay_ms {name} {g} not within {DELAY_TOLERANCE:.0%} of {v} ms")
    return out


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
    """Every snapshot on ``topic`` (the service's ``click-snapshots``), read up to the end
    offsets seen at the start (or until nothing arrives for ``idle`` seconds), with TLS/SASL
    as ``security`` says (a refused login raises ``KafkaLoginError``)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list[Snapshot]:
        address = bootstrap.split("://", 1)[-1]
        await check_login(address, security)
        c = AIOKafkaConsumer(bootstrap_servers=address, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", **security.aiokafka_kwargs())
        out: list[Snapshot] = []
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
                    out.extend(json.loads(r.value) for r in recs)
                positions = {tp: await c.position(tp) for tp in tps}
                if all(positions[tp] >= end[tp] for tp in tps):
                    break
        finally:
            await c.stop()
        return out

    return asyncio.run(read())
