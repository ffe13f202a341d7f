"""The generator: a seeded, skewed stream with bad, delayed and burst records.

Moved from tests/test_gen_audit.py."""
from __future__ import annotations

import orjson

from aggregator.gen.generator import EventSource, rate_summary


def regions_of(seed: int, n: int = 500) -> list:
    src = EventSource(seed, 10, skew=1.1, bad_fraction=0.02, delayed_fraction=0.02)
    out = []
    for _ in range(5):
        lines, regs, delayed = src.batch(n // 5, now_ms=1_700_000_000_000)
        out.extend(zip(regs, delayed, [orjson.loads(x).get("user_id") for x in lines], strict=False))
    return out


def test_same_seed_same_stream():
    a, b = regions_of(7), regions_of(7)
    assert a == b
    assert regions_of(8) != a
    regs = [r for r, _, _ in a]
    assert None in regs                     # some malformed records
    now = 1_700_000_000_000
    assert any(r and now - ts > 300_000 for r, ts, _ in a)   # some client-delayed records
    assert sum(1 for r, ts, _ in a if r and now - ts > 300_000) < len(a) / 10
    # skewed: the first region is the most popular
    named = [r for r in regs if r]
    assert named.count("eu-west") > named.count("ca-central")


def test_hot_region_burst_and_clock_skew():
    src = EventSource(1, 10, skew=1.1, hot_region="eu-west", burst_multiplier=1000.0, clock_skew_ms=-5000)
    now = 1_700_000_000_000
    _, calm, ts_calm = src.batch(2000, now)
    _, hot, _ = src.batch(2000, now, burst=True)
    assert calm.count("eu-west") < 800            # about a third of the traffic normally
    assert hot.count("eu-west") > 1950            # nearly all of it during a 1000x burst
    assert src.burst_rate_factor > 100            # and the total rate grows with it
    assert all(now - 5000 - 2000 < ts <= now - 5000 for ts in ts_calm)  # skewed producer clock


def test_repeated_event_ids_are_ones_sent_within_the_reuse_horizon():
    """At a low rate the pool of accepted ids spans more than the service's dedup horizon:
    only ids sent within ``reuse_within_ms`` are repeated (an older one would be counted
    again by the service, as it should, and the audit would call it a double count)."""
    src = EventSource(3, 4, reuse_fraction=0.5, reuse_within_ms=60_000)
    t0 = 1_700_000_000_000
    lines, regs, _ = src.batch(100, t0)
    src.accepted(lines, regs, set())
    old = {orjson.loads(x)["event_id"] for x in lines}
    lines, regs, _ = src.batch(100, t0 + 30_000)  # within the minute: repeats of the first batch
    assert src.last_dups and {orjson.loads(lines[i])["event_id"] for i in src.last_dups} <= old
    src.accepted([x for i, x in enumerate(lines) if i not in src.last_dups],
                 [r for i, r in enumerate(regs) if i not in src.last_dups], set())
    second = {orjson.loads(x)["event_id"] for i, x in enumerate(lines) if i not in src.last_dups}
    lines, _, _ = src.batch(100, t0 + 61_000)  # the first batch's ids are too old now
    repeated = {orjson.loads(lines[i])["event_id"] for i in src.last_dups}
    assert repeated and repeated <= second and not repeated & old


def test_rate_summary_says_when_target_not_sustained():
    ok = rate_summary(950, 1.0, 1000)
    assert len(ok) == 1 and "achieved 950/s" in ok[0]
    slow = rate_summary(500, 1.0, 1000)
    assert "could not sustain target rate: achieved 500/s of 1000/s" in slow[-1]
    assert len(rate_summary(10, 1.0, 0)) == 1  # 0: as fast as possible, nothing to sustain


# --- the truth of the aggregates (issue 18) ------------------------------------------------

def test_users_urls_and_ts_of_the_stream():
    from collections import Counter

    from aggregator.core.sketches import normalise_url
    from aggregator.gen.generator import user_pool

    src = EventSource(3, 4, skew=0.5)
    now = 1_700_000_000_000
    lines, regs, ts = src.batch(20_000, now)
    parts = src.last_parts
    again = EventSource(3, 4, skew=0.5)
    assert again.batch(20_000, now) == (lines, regs, ts) and again.last_parts == parts  # seeded
    evs = [orjson.loads(x) for x in lines]
    assert [(e.get("user_id"), e.get("url"), e.get("ts")) for e in evs] == parts  # parts are what was sent
    users: dict[str, set] = {}
    for r, (u, _, _) in zip(regs, parts, strict=True):
        if u is not None:
            users.setdefault(r, set()).add(u)
    assert [user_pool(i) for i in range(4)] == [1_000_000, 200, 1_000_000, 200]
    assert len(users["eu-north"]) <= 200 < 256 < len(users["eu-west"])  # both sides of the exact threshold
    pages = Counter(normalise_url(u) for _, u, _ in parts if u is not None)
    (p1, c1), (p2, c2), (p3, c3), (_, c4) = pages.most_common(4)
    assert c1 > c2 > c3 > c4 and p1 == "/p/0"  # Zipf-like: a clear top 3
    assert "https://shop.example.com/p/0" in pages  # the absolute form, host lower-cased, port dropped
    # a few percent lack a field, never all
    for k in range(3):
        missing = sum(1 for p in parts if p[k] is None)
        assert 0.01 * len(parts) < missing < 0.06 * len(parts)


def test_truth_aggregates_of_a_cell_and_folding():
    from aggregator.gen.truth import Truth

    t = Truth(1000, aggregates=True)
    base = 1_700_000_000_000
    t.add(["eu", "eu", "eu", "us"], base + 10,
          [("u1", "/a?x=1", base), ("u1", "/a", base + 5), ("u2", "/b", None), (None, None, base + 20)])
    t.add(["eu"], base + 900, [("u3", "#nothing", base + 1000)])  # a url that is nothing; a clock ahead: 0
    assert ("eu", base) in t.open_cells
    t.add(["eu"], base + 61_000 + 1000, [("u9", "/z", None)])  # 60 s later: the first window is folded
    assert ("eu", base) not in t.open_cells and len(t.open_cells) == 1
    t.add(["eu"], base + 500, [("u4", "/a", None)])  # an answer for a folded cell: not checked
    tj = t.to_json()
    assert tj["counts"]["eu"][str(base)] == 5
    eu = tj["aggregates"]["eu"]
    assert str(base) not in eu and tj["aggregates_incomplete"] == [["eu", base]]
    us = tj["aggregates"]["us"][str(base)]
    assert us == {"unique_users": 0, "top_urls": [], "url_next": 0, "url_events": 0, "url_distinct": 0, "delays": 1,
                  "client_delay_ms": {"p50": 0, "p90": 0, "p99": 0}}  # ts ahead of ingest: delay 0
    t2 = Truth(1000, aggregates=True)
    t2.add(["eu"] * 4, base + 10, [("u1", "/a?x=1", base), ("u1", "/a", base + 5), ("u2", "/b", None),
                                   ("u3", "#x", base + 1000)])
    c = t2.to_json()["aggregates"]["eu"][str(base)]
    assert c == {"unique_users": 2 + 1, "top_urls": [["/a", 2], ["/b", 1]], "url_next": 0, "url_events": 3,
                 "url_distinct": 2, "delays": 3,
                 "client_delay_ms": {"p50": 5, "p90": 5, "p99": 5}}  # [0, 5, 10]: rank floor(q * 2)
    assert Truth(1000, aggregates=True, url_keep_query=True).url_keep_query
    assert "aggregates" not in Truth(1000).to_json()  # off: counts only, as before


def test_two_runs_of_one_seed_share_the_stream_but_no_event_id():
    """A service drops an event_id it saw within AGG_DEDUP_SECONDS: a second run of the same
    seed against it must not look like the first one sent again (its audit failed so)."""
    now = 1_700_000_000_000
    a, b = EventSource(1, 8, run="r1-"), EventSource(1, 8, run="r2-")
    la, ra, _ = a.batch(5_000, now)
    lb, rb, _ = b.batch(5_000, now)
    assert ra == rb  # the same regions, users and urls
    ids_a = {orjson.loads(x).get("event_id") for x in la}
    ids_b = {orjson.loads(x).get("event_id") for x in lb}
    assert len(ids_a) == 5_000 and not ids_a & ids_b
