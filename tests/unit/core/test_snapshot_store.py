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
