"""GET /v1/snapshots' store: identical re-publications are listed once, different ones are not hidden."""
from aggregator.core.snapshots import SnapshotStore


def snap(region, ws, count, emitted_at=0):
    return {"region": region, "window_start": ws, "window_end": ws + 2000, "count": count, "late": 0,
            "late_by_reason": {"closed_window": 0, "client_delay": 0, "future_ts": 0}, "emitted_at": emitted_at}


def test_identical_republication_listed_once_and_a_different_one_kept():
    st = SnapshotStore()
    st.add([snap("eu", 0, 3, 10), snap("us", 0, 1, 10)])
    st.add([snap("eu", 0, 3, 99)])                       # after a rebalance: same numbers, later time
    assert [s["count"] for s in st.query("eu", None)] == [3]
    st.add([snap("eu", 0, 4, 100)])                      # a contract violation stays visible
    assert [s["count"] for s in st.query("eu", None)] == [3, 4]
    assert len(st.query(None, None)) == 3


def test_bounded_and_evicted_keys_forgotten():
    st = SnapshotStore(maxlen=3)
    st.add([snap("r", ws, 1) for ws in (0, 2000, 4000, 6000)])
    assert [s["window_start"] for s in st.query(None, None)] == [2000, 4000, 6000]
    assert set(st.latest) == {("r", 2000), ("r", 4000), ("r", 6000)}
    st.add([snap("r", 0, 1)])
    assert [s["window_start"] for s in st.query(None, None)] == [4000, 6000, 0]


def pages(st: SnapshotStore, region=None, since=None, limit=7):
    """Every page from the oldest on, each from the last one's number."""
    out, after = [], None
    while True:
        page, after, more = st.page(region, since, after, limit)
        assert len(page) <= limit
        out.append(page)
        if not more:
            return out, after


def test_paging_lists_every_matching_snapshot_once_and_goes_on_with_new_ones():
    st = SnapshotStore(maxlen=100)
    st.add([snap(r, ws, 1) for ws in range(0, 40_000, 2000) for r in ("eu", "us", "ap")])  # 60, one window_end each 3
    for region, since in ((None, None), ("eu", None), (None, 10_000), ("us", 21_000), ("zz", None)):
        got, after = pages(st, region, since)
        assert [s for p in got for s in p] == st.query(region, since)  # each once, in the store's order
        assert all(len(p) == 7 for p in got[:-1])  # full pages until the last
        assert after == st.seq  # the end: a poller from here sees only what comes
    _, after = pages(st)
    assert st.page(None, None, after, 7) == ([], after, False)
    st.add([snap("eu", 40_000, 1)])
    assert st.page(None, None, after, 7) == ([st.items[-1]], st.seq, False)


def test_a_page_ends_where_more_would_not_fit_even_within_one_window():
    """1000 regions with one window_end: ``since`` alone could not cut them; the number can."""
    st = SnapshotStore()
    st.add([snap(f"r{i}", 0, i) for i in range(1000)])
    got, _ = pages(st, since=0, limit=300)
    assert [len(p) for p in got] == [300, 300, 300, 100]
    assert [s["count"] for p in got for s in p] == list(range(1000))


def test_paging_past_evicted_snapshots_goes_on_from_the_oldest_kept():
    st = SnapshotStore(maxlen=5)
    st.add([snap("r", ws, 1) for ws in range(0, 10_000, 2000)])
    page, after, more = st.page(None, None, None, 2)
    assert [s["window_start"] for s in page] == [0, 2000] and more
    st.add([snap("r", ws, 1) for ws in range(10_000, 16_000, 2000)])  # evicts 0..4000
    page, after, more = st.page(None, None, after, 10)
    assert [s["window_start"] for s in page] == [6000, 8000, 10_000, 12_000, 14_000] and not more


BAD = [{}, 5, [], "x", None, {"region": "eu", "window_start": 0},  # no window_end: every ?since= was a 500
       {**snap("eu", 0, 1), "count": "3"}, {**snap("eu", 0, 1), "window_end": True},
       {**snap("eu", 0, 1), "region": ""}, {**snap("eu", 0, 1), "late_by_reason": [1]},
       {**snap("eu", 0, 1), "top_urls": [{"url": 1, "count": 1}]}, {**snap("eu", 0, 1), "unique_users": 1.5},
       {**snap("eu", 0, 1), "client_delay_ms": {"p50": "1"}}, {**snap("eu", 0, 1), "window_end": 0}]


def test_what_is_not_a_snapshot_is_named():
    from aggregator.core.snapshots import snapshot_problem

    assert [b for b in BAD if snapshot_problem(b) is None] == []
    good = {**snap("eu", 0, 1), "unique_users": 3, "top_urls": [{"url": "/a", "count": 2}],
            "client_delay_ms": {"p50": 1.0, "p90": 2.5, "p99": 3}}
    for s in (snap("eu", 0, 1), good, {**good, "client_delay_ms": None}, {**good, "extra": [1]}):
        assert snapshot_problem(s) is None, s


def test_recent_is_the_newest_that_match_oldest_first_and_says_whether_older_ones_match():
    st = SnapshotStore(maxlen=100)
    assert st.recent(None, 5) == ([], 0, False)
    st.add([snap(r, ws, ws // 2000) for ws in range(0, 20_000, 2000) for r in ("eu", "us")])  # 20
    for region, limit in ((None, 5), ("eu", 3), ("eu", 10), ("us", 11), ("zz", 4), (None, 20)):
        every = st.query(region, None)
        got, end, older = st.recent(region, limit)
        assert got == every[-limit:] and end == st.seq and older == (len(every) > limit)
    got, _, _ = st.recent("eu", 2)
    assert [s["window_start"] for s in got] == [16_000, 18_000]  # oldest first within the answer
