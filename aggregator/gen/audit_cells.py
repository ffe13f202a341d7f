"""The audit of one snapshot's aggregates (gen/audit.py's ``audit_aggregates``).

Of every snapshot that carries aggregates (``check_snapshot``), whatever the truth:
all three fields; ``top_urls`` a list of ``{"url", "count"}`` (count >= 1), each URL once,
at most ``top_n`` (AGG_TOP_URLS) long, most frequent first with ties by URL text; and in
a window that counted no event ``unique_users`` 0, ``top_urls`` [] and
``client_delay_ms`` null (aggstate.EMPTY_RESULT: what the worker publishes for them).

Against a truth cell (``check_cell``):

* ``unique_users``: exact while the truth has at most ``SketchParams.exact_users`` (256)
  users, else within the sketches' stated bound (``SketchParams.users_bound``: 5 % at the
  default precision);
* ``top_urls`` (``check_top``): ``[]`` exactly when no counted event had a URL.  A cell
  of at most ``SketchParams.url_capacity`` (128) distinct URLs is exact: the list is the
  truth's top ``top_n``, counts and order.  Beyond, each listed URL's count is within the
  Misra-Gries bound of its true count, ``true <= count <= true + 2N/129`` (N: the cell's
  URL events; docs/contract.md §4), a URL past the truth's listed 20 within it of
  ``url_next``; a URL whose true count is over that bound holds a counter, so it is listed
  when it would rank above the last listed one (its count is at least its true one) or
  when the list is shorter than ``top_n``; and, as measured (docs/analytics.md), the true
  top 3 where their order is certain come first in that order, within 5 %;
* ``client_delay_ms``: p50/p90/p99 each within the sketch's relative accuracy
  (``SketchParams.delay_accuracy``, 1 %) of the truth's delay at the same rank
  (``floor(q * (n - 1))``, the rank core.sketches states its bound for), plus 0.05 ms for
  the snapshot's rounding to 0.1 ms; null exactly when no counted event carried a ``ts``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

from aggregator.core.sketches import SketchParams

EXACT_USERS = SketchParams().exact_users  # unique users are exact up to this many
UNIQUE_USERS_TOLERANCE = SketchParams().users_bound  # at the default precision; audit(users_bound=...)
URL_CAPACITY = SketchParams().url_capacity  # top_urls' counts are exact up to this many distinct URLs
URL_COUNT_TOLERANCE = 0.05
DELAY_TOLERANCE = SketchParams().delay_accuracy  # relative, at the same rank
DELAY_ROUNDING_MS = 0.05  # the snapshot's quantiles are rounded to 0.1 ms
TOP_CHECKED = 3
AGGREGATE_FIELDS = ("unique_users", "top_urls", "client_delay_ms")


class CellTruthJSON(TypedDict):
    """The exact aggregates of one (region, window) cell (gen.truth.CellTruth)."""

    unique_users: int
    top_urls: list[list[Any]]  # [[normalised url, count]], most frequent first (ties by url), at most 20
    url_next: int  # the count of the URL after the listed ones (0: none)
    url_events: int  # events of the cell with a URL to count
    url_distinct: NotRequired[int]  # distinct URLs of the cell (older truths: absent)
    delays: int  # events of the cell with a client ts
    client_delay_ms: dict[str, int] | None  # {"p50", "p90", "p99"}: the delay at rank floor(q * (n - 1))


def has_aggregates(snap: Mapping[str, Any]) -> bool:
    return any(f in snap for f in AGGREGATE_FIELDS)


def url_slack(url_events: int, capacity: int = URL_CAPACITY) -> int:
    """How far over its true count a URL's reported count may be once a cell has more than
    ``capacity`` distinct URLs: the Misra-Gries offset, at most 2N/(capacity + 1) for N URL
    events (docs/contract.md §4), floored (counts are integers)."""
    return 2 * url_events // (capacity + 1)


def url_exact(cell: CellTruthJSON, capacity: int = URL_CAPACITY) -> bool:
    """Whether the cell's URL counters are exact: at most ``capacity`` distinct URLs (known
    from ``url_distinct``, or when the truth lists every URL, or when it has no more URL
    events than that)."""
    distinct = cell.get("url_distinct")
    if distinct is not None:
        return int(distinct) <= capacity
    return int(cell.get("url_next", 0)) == 0 or int(cell["url_events"]) <= capacity


def check_snapshot(where: str, snap: Mapping[str, Any], top_n: int) -> list[str]:
    """The problems of a snapshot's aggregates that need no truth (module docstring)."""
    out: list[str] = []
    missing = [f for f in AGGREGATE_FIELDS if f not in snap]
    if missing:
        out.append(f"{where}: no {'/'.join(missing)} in the snapshot (with the aggregates on every snapshot "
                   "has all three)")
    got = snap.get("top_urls", [])
    listed = listed_urls(got)
    if listed is None:
        out.append(f"{where}: top_urls {got!r} is not a list of {{url, count >= 1}}")
    else:
        if len(listed) > top_n:
            out.append(f"{where}: top_urls lists {len(listed)} URLs, more than AGG_TOP_URLS ({top_n})")
        seen: set[str] = set()
        for i, (u, c) in enumerate(listed):
            if u in seen:
                out.append(f"{where}: top_urls[{i}] {u} listed twice")
            elif i and (-c, u) < (-listed[i - 1][1], listed[i - 1][0]):
                out.append(f"{where}: top_urls[{i}] {u} ({c}) out of order after {listed[i - 1][0]} "
                           f"({listed[i - 1][1]}): most frequent first, ties by URL")
            seen.add(u)
    if snap.get("count") == 0:
        if snap.get("unique_users", 0) != 0:
            out.append(f"{where}: unique_users {snap['unique_users']!r} in a window that counted no event "
                       "(expected 0)")
        if got != []:
            out.append(f"{where}: top_urls {got!r} in a window that counted no event (expected [])")
        if snap.get("client_delay_ms") is not None:
            out.append(f"{where}: client_delay_ms {snap['client_delay_ms']!r} in a window that counted no event "
                       "(expected null)")
    return out


def listed_urls(got: Any) -> list[tuple[str, int]] | None:
    """``top_urls`` as (url, count) pairs; None: not a list of ``{"url": str, "count": int >= 1}``."""
    if not isinstance(got, list):
        return None
    out = []
    for e in got:
        if not isinstance(e, dict) or not isinstance(e.get("url"), str) or type(e.get("count")) is not int \
                or e["count"] < 1:
            return None
        out.append((e["url"], e["count"]))
    return out


def check_cell(where: str, cell: CellTruthJSON, snap: Mapping[str, Any], top_n: int = 10,
               users_bound: float = UNIQUE_USERS_TOLERANCE) -> list[str]:
    """The problems of one cell's published aggregates against its truth."""
    out: list[str] = []
    want_u, got_u = cell["unique_users"], snap.get("unique_users")
    if type(got_u) is not int:
        out.append(f"{where}: unique_users {got_u!r}, expected {want_u}")
    elif want_u <= EXACT_USERS:
        if got_u != want_u:
            out.append(f"{where}: unique_users {got_u} != {want_u} (exact up to {EXACT_USERS} users)")
    elif abs(got_u - want_u) > users_bound * want_u:
        out.append(f"{where}: unique_users {got_u} off by {abs(got_u - want_u) / want_u:.1%} from {want_u} "
                   f"(bound {users_bound:.1%})")
    listed = listed_urls(snap.get("top_urls"))
    if listed is not None:  # else check_snapshot says what is wrong
        out += check_top(where, cell, listed, top_n)
    out += _check_delays(where, cell.get("client_delay_ms"), snap.get("client_delay_ms"))
    return out


def check_top(where: str, cell: CellTruthJSON, listed: list[tuple[str, int]], top_n: int,
              capacity: int = URL_CAPACITY) -> list[str]:
    """The problems of a cell's ``top_urls`` (as ``listed_urls``) against its truth."""
    n_events = int(cell["url_events"])
    if n_events == 0:
        return [] if not listed else [f"{where}: top_urls {listed} but no counted event of the cell had a URL "
                                      "(expected [])"]
    known = {str(u): int(c) for u, c in cell["top_urls"]}
    nxt = int(cell.get("url_next", 0))
    exact = url_exact(cell, capacity)
    slack = 0 if exact else url_slack(n_events, capacity)
    bound = (f"exact: at most {capacity} distinct URLs" if exact else
             f"Misra-Gries: true <= count <= true + 2*{n_events}/{capacity + 1} = true + {slack}")
    out = []
    for i, (u, c) in enumerate(listed):
        t = known.get(u)
        if t is not None:
            if not t <= c <= t + slack:
                out.append(f"{where}: top_urls[{i}] {u} count {c}, true count {t} ({bound})")
        elif nxt == 0:
            out.append(f"{where}: top_urls[{i}] {u} ({c}): no counted event of the cell had that URL")
        elif c - slack > nxt:
            out.append(f"{where}: top_urls[{i}] {u} count {c}, but no URL past the truth's {len(known)} listed "
                       f"has more than {nxt} ({bound})")
    names = {u for u, _ in listed}
    full = len(listed) >= top_n
    for u, t in known.items():
        if u in names or t <= slack:  # t <= slack: it may have lost its counter
            continue
        if not full:
            out.append(f"{where}: top_urls lacks {u} (true count {t}) though it lists {len(listed)} URLs of "
                       f"{top_n} ({bound})")
        elif (-t, u) < (-listed[-1][1], listed[-1][0]):
            out.append(f"{where}: top_urls lacks {u} (true count {t}), which ranks above its last, "
                       f"{listed[-1][0]} ({listed[-1][1]}) ({bound})")
    if not full and nxt > slack and names <= known.keys():
        out.append(f"{where}: top_urls lists {len(listed)} URLs of {top_n}, none past the truth's {len(known)} "
                   f"listed, though the next has {nxt} events ({bound})")
    if not exact:
        out += _check_sure_top(where, cell, listed, top_n)
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


def _check_sure_top(where: str, cell: CellTruthJSON, listed: list[tuple[str, int]], top_n: int) -> list[str]:
    """Beyond the exact threshold, as measured (not guaranteed): the true top 3, where their
    order is certain, first in that order, each within ``URL_COUNT_TOLERANCE`` of its count."""
    out = []
    for i, (url, n) in enumerate(unambiguous_top(cell, min(TOP_CHECKED, top_n))):
        if i >= len(listed):
            out.append(f"{where}: top_urls[{i}] missing, expected {url} ({n})")
            continue
        g_url, g_n = listed[i]
        if g_url != url:
            out.append(f"{where}: top_urls[{i}] is {g_url} ({g_n}), expected {url} ({n})")
        elif abs(g_n - n) > URL_COUNT_TOLERANCE * n:
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
