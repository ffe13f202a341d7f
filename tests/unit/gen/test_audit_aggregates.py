"""The audit of the per-cell aggregates (issue 18): unique users, top URLs and client-delay
quantiles against the generator's exact truth.  Hand-made truths and snapshots for each
rule, and a seeded generator stream whose snapshots come from the real sketch layer
(core.sketches.CellAggregates fed the same events, as the worker feeds it)."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from aggregator.core.sketches import CellAggregates, SketchParams, normalise_url, url_hash, user_hash
from aggregator.gen.audit import EXACT_USERS, audit, unambiguous_top
from aggregator.gen.generator import EventSource
from aggregator.gen.truth import Truth, exact_quantile

W = 2000
WS = 10_000


def cell(users: int, top: list[list[Any]], url_next: int = 0, delay: dict[str, int] | None = None) -> dict:
    return {"unique_users": users, "top_urls": top, "url_next": url_next,
            "url_events": sum(c for _, c in top) + url_next, "delays": 100 if delay else 0,
            "client_delay_ms": delay}


TOP = [["/a", 50], ["/b", 30], ["/c", 20], ["/d", 10]]
DELAY = {"p50": 1000, "p90": 2000, "p99": 5000}


def truth(c: dict, count: int = 200) -> dict:
    return {"window_ms": W, "counts": {"eu": {str(WS): count}}, "aggregates": {"eu": {str(WS): c}}}


def snap(users: int | None = 100, top: list | None = None, delay: Any = "default", count: int = 200) -> dict:
    s: dict[str, Any] = {"region": "eu", "window_start": WS, "window_end": WS + W, "count": count, "late": 0,
                         "late_by_reason": {}, "emitted_at": WS + W + 1}
    if users is not None:
        s["unique_users"] = users
        s["top_urls"] = [{"url": u, "count": n} for u, n in (TOP if top is None else top)]
        s["client_delay_ms"] = {k: float(v) for k, v in DELAY.items()} if delay == "default" else delay
    return s


def test_exact_aggregates_pass() -> None:
    assert audit(truth(cell(100, TOP, delay=DELAY)), [snap()]) == []


def test_unique_users_exact_up_to_the_threshold() -> None:
    assert EXACT_USERS == SketchParams().exact_users == 256
    t = truth(cell(256, TOP, delay=DELAY))
    assert audit(t, [snap(256)]) == []
    assert audit(t, [snap(255)]) == [f"eu window {WS}: unique_users 255 != 256 (exact up to 256 users)"]
    assert audit(truth(cell(1, TOP, delay=DELAY)), [snap(2)]) != []


def test_unique_users_within_five_percent_above_it() -> None:
    t = truth(cell(10_000, TOP, delay=DELAY))
    assert audit(t, [snap(10_499)]) == audit(t, [snap(9_501)]) == []
    problems = audit(t, [snap(10_600)])
    assert problems == [f"eu window {WS}: unique_users 10600 off by 6.0% from 10000 (bound 5.0%)"]
    assert audit(truth(cell(257, TOP, delay=DELAY)), [snap(269)]) == []  # 5 % of 257: 12.85
    assert audit(truth(cell(257, TOP, delay=DELAY)), [snap(270)]) != []


def test_the_unique_users_bound_follows_the_precision() -> None:
    """Three standard errors (1.04 / sqrt(2^p)), rounded up to half a percent: the 5 % of the
    default precision would be 1.5 standard errors at precision 10, and loose at 16."""
    assert [SketchParams(hll_p=p).users_bound for p in (10, 12, 14, 16)] == [0.1, 0.05, 0.025, 0.015]
    t = truth(cell(10_000, TOP, delay=DELAY))
    assert audit(t, [snap(10_900)], users_bound=SketchParams(hll_p=10).users_bound) == []
    assert audit(t, [snap(10_200)], users_bound=SketchParams(hll_p=16).users_bound) != []


def test_top_urls_exact_up_to_the_url_capacity() -> None:
    """At most 128 distinct URLs (here 4): the list is the truth's, counts and order."""
    t = truth(cell(100, TOP, delay=DELAY))
    assert audit(t, [snap(top=[["/a", 52], ["/b", 29], ["/c", 20], ["/d", 10]])]) == [
        f"eu window {WS}: top_urls[0] /a count 52, true count 50 (exact: at most 128 distinct URLs)",
        f"eu window {WS}: top_urls[1] /b count 29, true count 30 (exact: at most 128 distinct URLs)"]
    swapped = audit(t, [snap(top=[["/b", 30], ["/a", 50], ["/c", 20], ["/d", 10]])])
    assert swapped == [f"eu window {WS}: top_urls[1] /a (50) out of order after /b (30): most frequent first, "
                       "ties by URL"]
    assert audit(t, [snap(top=[["/a", 50]])]) == [
        f"eu window {WS}: top_urls lacks {u} (true count {n}) though it lists 1 URLs of 10 (exact: at most 128 "
        "distinct URLs)" for u, n in TOP[1:]]
    # AGG_TOP_URLS=1: the first only
    assert audit(t, [snap(top=[["/a", 50]])], top_n=1) == []


SKETCHED = [["/a", 500], ["/b", 300], ["/c", 200], ["/d", 100]]  # of 1290 URL events over 500 URLs


def sketched(top: list[list[Any]] = SKETCHED, url_next: int = 5) -> dict:
    return dict(cell(100, top, url_next, delay=DELAY), url_events=1290, url_distinct=500)


def test_top_three_in_order_within_five_percent_beyond_the_capacity() -> None:
    """Past 128 distinct URLs counts are within the Misra-Gries bound (here + 20); and, as
    measured on skewed streams, the true top 3 come first in order, within 5 %."""
    t = truth(sketched())
    assert audit(t, [snap(top=[["/a", 510], ["/b", 300], ["/c", 200], ["/d", 100]])]) == []
    swapped = audit(t, [snap(top=[["/b", 320], ["/a", 500], ["/c", 200], ["/d", 100]])])
    assert swapped == [f"eu window {WS}: top_urls[1] /a (500) out of order after /b (320): most frequent first, "
                       "ties by URL",
                       f"eu window {WS}: top_urls[0] is /b (320), expected /a (500)",
                       f"eu window {WS}: top_urls[1] is /a (500), expected /b (300)"]
    assert audit(t, [snap(top=[["/a", 500], ["/b", 300], ["/c", 211], ["/d", 100]])]) == [
        f"eu window {WS}: top_urls[2] /c count 211 not within 5% of 200"]
    assert audit(t, [snap(top=[["/a", 500]])], top_n=1) == []


def test_ambiguous_places_take_any_url_that_can_rank_there() -> None:
    tied_3rd_4th = cell(100, [["/a", 50], ["/b", 30], ["/c", 10], ["/d", 10]], delay=DELAY)
    assert [u for u, _ in unambiguous_top(tied_3rd_4th)] == ["/a", "/b"]
    t = truth(tied_3rd_4th)
    # exact (4 distinct URLs): ties go by URL, so /c is 3rd
    assert audit(t, [snap(top=[["/a", 50], ["/b", 30], ["/c", 10]])], top_n=3) == []
    assert audit(t, [snap(top=[["/a", 50], ["/b", 30], ["/d", 10]])], top_n=3) != []
    # beyond the capacity /c or /d: either is right (their counts may be over by up to 20)
    ts = truth(sketched([["/a", 500], ["/b", 300], ["/c", 100], ["/d", 100]]))
    assert audit(ts, [snap(top=[["/a", 500], ["/b", 300], ["/d", 110]])], top_n=3) == []
    assert audit(ts, [snap(top=[["/a", 500], ["/b", 300], ["/c", 100]])], top_n=3) == []
    assert audit(ts, [snap(top=[["/b", 300], ["/a", 300], ["/d", 110]])], top_n=3) != []  # /a, /b are certain
    # the 3rd above the 21st URL that is not listed: the next count decides
    twenty = [[f"/u{i:02d}", 100 - i] for i in range(20)]
    assert len(unambiguous_top(cell(100, twenty, url_next=5))) == 3
    assert unambiguous_top(cell(100, [["/a", 5], ["/b", 5]])) == []
    assert unambiguous_top(cell(100, [["/a", 5]])) == [("/a", 5)]  # one URL: above nothing
    assert audit(truth(cell(100, [], delay=DELAY)), [snap(top=[])]) == []  # no URLs at all


def test_delay_quantiles_within_their_relative_bound() -> None:
    t = truth(cell(100, TOP, delay=DELAY))
    near = {"p50": 1009.9, "p90": 1980.0, "p99": 5050.0}
    assert audit(t, [snap(delay=near)]) == []
    far = dict(near, p99=5060.1)
    assert audit(t, [snap(delay=far)]) == [f"eu window {WS}: client_delay_ms p99 5060.1 not within 1% of 5000 ms"]
    assert audit(t, [snap(delay=None)]) == [f"eu window {WS}: client_delay_ms None, expected about {DELAY}"]
    # no ts in the cell: null, and nothing else
    t0 = truth(cell(100, TOP, delay=None))
    assert audit(t0, [snap(delay=None)]) == []
    assert audit(t0, [snap()])[0].endswith("expected null (no event had a ts)")
    # a delay of 0 (clock ahead): 0 exactly, give or take the rounding
    tz = truth(cell(100, TOP, delay={"p50": 0, "p90": 0, "p99": 3}))
    assert audit(tz, [snap(delay={"p50": 0.0, "p90": 0.0, "p99": 3.0})]) == []
    assert audit(tz, [snap(delay={"p50": 0.1, "p90": 0.0, "p99": 3.0})]) != []


def test_snapshots_without_aggregates() -> None:
    t = truth(cell(100, TOP, delay=DELAY))
    assert audit(t, [snap(users=None)]) != []  # none at all: a problem (test_audit_strict.py)
    assert audit(t, [snap(users=None)], aggregates=False) == []  # aggregates off: counts only
    other = copy.deepcopy(snap(users=0, top=[], delay=None))  # a quiet window's: empty aggregates
    other["window_start"], other["window_end"], other["count"] = WS + W, WS + 2 * W, 0
    assert audit(t, [snap(users=None), other]) == [
        f"eu window {WS}: no unique_users/top_urls/client_delay_ms in the snapshot"]
    # a spilled region's events may be counted in a later window: not checked
    assert audit(t, [snap(users=3)], {"eu"}) == []
    # a truth without aggregates (an older generator) checks counts only
    assert audit({"window_ms": W, "counts": {"eu": {str(WS): 200}}}, [snap(users=3)]) == []


def test_exact_quantile_is_the_rank_the_sketch_states() -> None:
    from collections import Counter
    delays = Counter(range(1, 101))  # 1..100
    assert exact_quantile(delays, 0.5) == 50   # rank floor(0.5 * 99) = 49 -> 50
    assert exact_quantile(delays, 0.99) == 99  # rank floor(0.99 * 99) = 98 -> 99
    assert exact_quantile(Counter({7: 1}), 0.99) == 7
    sk = CellAggregates()
    for d in range(1, 101):
        sk.add(None, None, None, d)
    p50, p99 = sk.delay_quantiles([0.5, 0.99])  # type: ignore[misc]
    assert p50 == 50  # integers below 58 ms have a bucket each: exact
    assert abs(p99 - 99) <= 0.01 * 99  # within 1 % at the same rank


# --- a generator stream, its truth, and snapshots from the real sketch layer --------------

def stream(seed: int, events: int, windows: int) -> tuple[dict, list[dict], Truth]:
    """``events`` of a seeded EventSource over ``windows`` 2 s windows: the truth the generator
    keeps, and a snapshot per cell from a CellAggregates fed the same events."""
    src = EventSource(seed, 6, skew=0.6, delayed_fraction=0.01)
    t = Truth(W, aggregates=True)
    sketches: dict[tuple[str, int], CellAggregates] = {}
    counts: dict[tuple[str, int], int] = {}
    t0 = 1_700_000_000_000
    per = events // (windows * 10)
    for b in range(windows * 10):
        its = t0 + b * (W // 10) + 7
        lines, regs, _ = src.batch(per, its - 50)
        ok = [(r, p) for r, p in zip(regs, src.last_parts, strict=True)
              if r is not None and not (p[2] is not None and its - p[2] > 300_000)]
        t.add([r for r, _ in ok], its, [p for _, p in ok])
        for r, (user, url, cts) in ok:
            key = (r, its - its % W)
            sk = sketches.setdefault(key, CellAggregates(SketchParams()))
            counts[key] = counts.get(key, 0) + 1
            norm = normalise_url(url) if url is not None else None
            sk.add(None if user is None else user_hash(user), None if norm is None else url_hash(norm), norm,
                   None if cts is None else its - cts)
    snaps = [{"region": r, "window_start": ws, "window_end": ws + W, "count": counts[(r, ws)], "late": 0,
              "late_by_reason": {}, "emitted_at": ws + W + 1, **sk.result(10)} for (r, ws), sk in sketches.items()]
    tj = t.to_json()
    tj.pop("late")  # the delayed events' late counts are not part of this check
    return tj, snaps, t  # type: ignore[return-value]


def test_generator_truth_and_sketched_snapshots_agree() -> None:
    tj, snaps, _ = stream(seed=4, events=60_000, windows=3)
    assert audit(tj, snaps) == []
    cells = [c for per in tj["aggregates"].values() for c in per.values()]
    users = sorted(c["unique_users"] for c in cells)
    assert users[0] <= EXACT_USERS < users[-1], users  # both sides of the exact threshold
    assert sum(1 for c in cells if len(unambiguous_top(c)) == 3) >= len(cells) // 2  # a clear top 3 mostly
    assert all(c["client_delay_ms"] is not None for c in cells)
    assert all(c["url_distinct"] > 128 for c in cells)  # top_urls from Misra-Gries counters beyond the exact
    small, small_snaps, _ = stream(seed=6, events=3000, windows=3)  # and at most 128 distinct URLs: exact
    assert audit(small, small_snaps) == []
    assert all(c["url_distinct"] <= 128 for per in small["aggregates"].values() for c in per.values())
    assert all(c["url_events"] < c["unique_users"] * 100 for c in cells)
    # the truth's counts are the snapshots' counts
    assert {(r, int(w)): n for r, per in tj["counts"].items() for w, n in per.items()} == {
        (s["region"], s["window_start"]): s["count"] for s in snaps}


@pytest.mark.parametrize("tamper", ["users", "top", "delay"])
def test_tampered_sketch_answers_are_caught(tamper: str) -> None:
    tj, snaps, _ = stream(seed=5, events=20_000, windows=2)
    big = max(snaps, key=lambda s: s["unique_users"])
    if tamper == "users":
        big["unique_users"] = round(big["unique_users"] * 1.07)
        want = "unique_users"
    elif tamper == "top":
        big["top_urls"][0], big["top_urls"][1] = big["top_urls"][1], big["top_urls"][0]
        want = "top_urls[1]"  # out of order after [0]
    else:
        big["client_delay_ms"]["p90"] *= 1.03
        want = "client_delay_ms p90"
    problems = audit(tj, snaps)
    assert len(problems) >= 1 and all(f"{big['region']} window {big['window_start']}" in p for p in problems)
    assert want in problems[0], problems


def test_the_audit_says_what_it_checked() -> None:
    from aggregator.gen.cli import aggregates_note

    t = truth(cell(100, TOP, delay=DELAY))
    t["aggregates"]["us"] = {str(WS): cell(1000, TOP, delay=DELAY)}
    assert aggregates_note(t, [snap()], frozenset()) == (
        "audit: aggregates of 2 cells checked (1 with unique users <= 256: exact; 1 above: within 5.0%; top URLs "
        "exact up to 128 distinct, else within the Misra-Gries bound, in order; delay quantiles within 1%)")
    assert "of 1 cells checked" in aggregates_note(t, [snap()], frozenset({"us"}))
    assert "no snapshot carries them" in aggregates_note(t, [snap(users=None)], frozenset())
    assert "aggregates off" in aggregates_note(t, [snap(users=None)], frozenset(), aggregates=False)
    assert aggregates_note({"counts": {}}, [snap()], frozenset()) == ""
