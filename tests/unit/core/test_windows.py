"""The pure window logic of docs/contract.md §1."""
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.contract import FUTURE_TS
from aggregator.core.windows import CLIENT_DELAY, CLOSED_WINDOW, OTHER_REGION, WindowBook, first_open_window, window_start

W, G, LATE, IDLE = 60_000, 5_000, 300_000, 3_600_000
T0 = 1_700_000_040_000  # a minute boundary (divisible by 60 000)


def book(**kw):
    args = dict(window_ms=W, grace_ms=G, late_after_ms=LATE, idle_ms=IDLE)
    args.update(kw)
    return WindowBook(**args)


def snaps_by_key(b):
    return {(s["region"], s["window_start"]): s for s in b.outbox}


def test_window_start_is_epoch_aligned_to_the_millisecond():
    assert T0 % W == 0
    assert window_start(T0, W) == T0
    assert window_start(T0 - 1, W) == T0 - W
    assert window_start(T0 + W - 1, W) == T0
    assert window_start(T0 + W, W) == T0 + W


def test_window_closes_only_after_end_plus_grace():
    end = T0 + W
    assert first_open_window(end + G, W, G) == T0          # exactly end+grace: still open
    assert first_open_window(end + G + 1, W, G) == T0 + W  # passed: closed
    b = book()
    b.apply([("eu", T0 + 10, None), ("eu", T0 + W - 1, None)], 2, 0)
    b.apply([("eu", end + G, None)], 3, 0)
    assert b.outbox == []
    b.apply([("eu", end + G + 1, None)], 4, 123)
    assert [(s["region"], s["window_start"], s["count"], s["emitted_at"]) for s in b.outbox] == [
        ("eu", T0, 2, 123)]
    assert b.outbox[0]["window_end"] == end


def test_event_at_window_end_belongs_to_the_next_window():
    b = book()
    b.apply([("eu", T0 + W - 1, None), ("eu", T0 + W, None), ("eu", T0 + W, None)], 3, 0)
    b.advance_to(T0 + 2 * W + G + 1)
    got = snaps_by_key(b)
    assert got[("eu", T0)]["count"] == 1
    assert got[("eu", T0 + W)]["count"] == 2


def test_event_within_grace_is_counted_in_its_window_and_after_grace_is_late():
    b = book()
    b.apply([("eu", T0 + 1, None), ("eu", T0 + W + G - 1, None)], 2, 0)
    # stream time is in the grace period of window T0: an event of T0 still counts
    b.apply([("eu", T0 + 5, None)], 3, 0)
    b.apply([("eu", T0 + W + G + 1, None)], 4, 0)  # closes T0
    b.apply([("eu", T0 + 7, None)], 5, 0)           # T0 already closed: late
    got = snaps_by_key(b)
    assert got[("eu", T0)]["count"] == 2
    assert got[("eu", T0)]["late"] == 0
    b.advance_to(T0 + 2 * W + G + 1)
    got = snaps_by_key(b)
    nxt = got[("eu", T0 + W)]
    assert nxt["count"] == 2
    assert nxt["late"] == 1
    assert nxt["late_by_reason"] == {CLOSED_WINDOW: 1, CLIENT_DELAY: 0, FUTURE_TS: 0}


def test_client_delay_goes_to_late_bucket_not_to_a_window():
    b = book()
    its = T0 + 1000
    b.apply([("eu", its, its - LATE),          # exactly the limit: not late
             ("eu", its, its - LATE - 1),      # over the limit: late
             ("eu", its, its + 999_999)], 3, 0)  # a client clock ahead is not late
    b.advance_to(T0 + W + G + 1)
    s = snaps_by_key(b)[("eu", T0)]
    assert s["count"] == 2
    assert s["late"] == 1
    assert s["late_by_reason"] == {CLOSED_WINDOW: 0, CLIENT_DELAY: 1, FUTURE_TS: 0}


def test_quiet_region_window_closes_on_time_with_wall_clock_and_zero_counts():
    b = book()
    b.apply([("eu", T0 + 1, None), ("us", T0 + 2, None)], 2, 0)
    b.advance_to(T0 + W + G)                    # not yet past grace
    assert b.outbox == []
    assert b.advance_to(T0 + W + G + 1)
    assert {(s["region"], s["count"]) for s in b.outbox} == {("eu", 1), ("us", 1)}
    b.published(len(b.outbox))
    # next window: no events at all, both regions seen within idle -> zero-count snapshots
    b.advance_to(T0 + 2 * W + G + 1)
    assert {(s["region"], s["window_start"], s["count"]) for s in b.outbox} == {
        ("eu", T0 + W, 0), ("us", T0 + W, 0)}


def test_regions_idle_longer_than_region_idle_get_no_more_snapshots():
    b = book(idle_ms=2 * W)
    b.apply([("eu", T0 + 1, None)], 1, 0)
    b.advance_to(T0 + 5 * W + G + 1)
    starts = sorted(s["window_start"] for s in b.outbox)
    # seen at T0+1: reported while its last event is within idle (2 W) of the window end
    assert starts == [T0, T0 + W]


def test_a_region_back_after_idle_gets_its_zero_count_snapshots_again():
    """The event that brings an idle region back also closes the windows that forget it:
    the region is seen again from that event on, so a later window without its events
    still has its snapshot (count 0), as for a region new at that event."""
    b = book(idle_ms=2 * W)
    b.apply([("eu", T0, None)], 1, 0)
    for m in range(1, 4):  # another region closes the windows up to T0 + 2 W, before eu is forgotten
        b.apply([("us", T0 + m * W, None)], 1 + m, 0)
    b.apply([("eu", T0 + 9 * W, None)], 6, 0)  # closes the windows that forget eu
    b.apply([("eu", T0 + 11 * W, None)], 7, 0)  # none in T0 + 10 W
    b.advance_to(T0 + 12 * W + G + 1)
    got = snaps_by_key(b)
    assert got[("eu", T0 + 10 * W)]["count"] == 0
    assert got[("eu", T0 + 9 * W)]["count"] == got[("eu", T0 + 11 * W)]["count"] == 1


def test_events_already_counted_as_other_take_no_place_in_the_book():
    b = book(max_regions=1)
    b.apply([(OTHER_REGION, T0, None), ("y", T0 + 1, None), ("z", T0 + 2, None)], 3, 0)
    assert b.open_total() == {OTHER_REGION: 2, "y": 1}


def test_backlog_after_downtime_lands_in_its_own_windows():
    """Records read late (after a restart) carry their ingest time: they fill
    their own windows, which close as stream time passes them, none late."""
    b = book()
    events = [("eu", T0 + i * 7_000, None) for i in range(60)]  # 7 minutes of data
    b.apply(events, 60, 0)   # read all at once, much later
    b.advance_to(T0 + 10 * W)
    got = snaps_by_key(b)
    assert sum(s["count"] for s in got.values()) == 60
    assert sum(s["late"] for s in got.values()) == 0
    for m in range(7):
        expected = sum(1 for _, ts, _ in events if T0 + m * W <= ts < T0 + (m + 1) * W)
        assert got[("eu", T0 + m * W)]["count"] == expected


def test_result_does_not_depend_on_batch_boundaries():
    events = [("eu" if i % 3 else "us", T0 + (i * 1_337) % (3 * W) + (i // 50) * W, None)
              for i in range(400)]
    one = book()
    one.apply(events, 400, 0)
    one.advance_to(T0 + 10 * W)
    many = book()
    for i in range(0, 400, 7):
        many.apply(events[i:i + 7], i + 7, 0)
    many.advance_to(T0 + 10 * W)
    assert one.outbox == many.outbox


def test_accounting_identity_holds():
    b = book()
    events = [("r%d" % (i % 5), T0 + i * 500, (T0 - LATE - 10) if i % 17 == 0 else None)
              for i in range(1000)]
    events += [("r1", T0 + 3, None)] * 10  # late once stream time has moved on
    b.apply(events, len(events), 0)
    b.advance_to(T0 + 6 * W)
    closed = sum(s["count"] for s in b.outbox)
    late = sum(s["late"] for s in b.outbox) + sum(
        n for per in b.late.values() for r in per.values() for n in r.values())
    open_counts = sum(b.open_total().values())
    assert closed + late + open_counts == len(events)


def test_region_cap_counts_extra_regions_as_other():
    b = book(max_regions=2)
    b.apply([("a", T0, None), ("b", T0, None), ("c", T0, None), ("d", T0, None)], 4, 0)
    b.advance_to(T0 + W + G + 1)
    assert {(s["region"], s["count"]) for s in b.outbox} == {("a", 1), ("b", 1), (OTHER_REGION, 2)}


def test_state_round_trips_through_json_and_keeps_counting():
    b = book()
    b.apply([("eu", T0 + 1, None), ("eu", T0 + W + G + 2, None)], 17, 5)
    assert len(b.outbox) == 1
    restored = book()
    restored.load(orjson.loads(orjson.dumps(b.to_dict())))
    assert restored.next_offset == 17
    assert restored.outbox == b.outbox
    for x in (b, restored):
        x.apply([("eu", T0 + W + 3, None)], 18, 6)
        x.advance_to(T0 + 3 * W)
    assert restored.outbox == b.outbox


def test_a_new_window_length_on_a_published_state_starts_on_its_boundary_after_the_old_windows():
    """Found by a review: AGG_WINDOW_SECONDS 60 -> 300 on a state with every window published
    kept the first open window on the old minute.  Events of the rest of that 5-minute window
    were closed_window late in a window never emitted (lost; open data forever), and the first
    windows published were not on a 5-minute boundary, one overlapping a published minute."""
    W5 = 5 * W
    m = T0 - T0 % W5 + 3 * W  # a minute start that is not a 5-minute start
    old = book()
    old.apply([("eu", m - 30_000, None)], 1, m)
    old.advance_to(m + G + 1)  # a quiet partition: the minute before m closes and is published
    assert [(s["window_start"], s["window_end"]) for s in old.outbox] == [(m - W, m)]
    old.published(1)
    assert not old.holds_open_data() and old.first_open == m
    new = book(window_ms=W5)  # restarted with AGG_WINDOW_SECONDS=300
    new.load(orjson.loads(orjson.dumps(old.to_dict())))
    assert new.first_open == m + 2 * W and new.close_at == m + 2 * W + W5 + G  # the next 5-minute boundary
    ticks = list(range(m + 20_000, m + 20 * W, 1000))  # an event and a tick a second
    for t in ticks:
        new.apply([("eu", t, None)], new.next_offset + 1, t)
        new.advance_to(t + 500)
    new.advance_to(m + 25 * W)
    assert [s["window_start"] for s in new.outbox] == [m + 2 * W + k * W5 for k in range(4)]
    assert all(s["window_start"] % W5 == 0 and s["window_start"] >= m for s in new.outbox)
    first = new.outbox[0]  # the events before its start: closed_window late in it, not lost
    assert first["count"] == W5 // 1000 and first["late_by_reason"][CLOSED_WINDOW] == 100 == first["late"]
    assert sum(s["count"] + s["late"] for s in new.outbox) == len(ticks)
    assert not new.holds_open_data()
    # a length that divides the old one: its boundaries are boundaries of the new one, nothing moves
    shorter = book(window_ms=W // 2)
    shorter.load(old.to_dict())
    assert shorter.first_open == m


def test_future_late_events_never_move_stream_time_and_land_in_the_open_window():
    b = book()
    b.apply([("eu", T0 + 1000, None)], 1, 0)
    b.add_late({"eu": 2, "us": 1}, FUTURE_TS)
    assert b.stream_time == T0 + 1000 and b.dirty
    b.apply([("eu", T0 + 2000, None)], 2, 0)
    b.advance_to(T0 + W + G + 1)
    s = snaps_by_key(b)
    assert s[("eu", T0)]["count"] == 2
    assert s[("eu", T0)]["late_by_reason"] == {CLOSED_WINDOW: 0, CLIENT_DELAY: 0, FUTURE_TS: 2}
    assert s[("us", T0)]["count"] == 0 and s[("us", T0)]["late"] == 1


def test_future_late_events_before_the_first_event_wait_for_stream_time_and_survive_a_restart():
    b = book()
    b.add_late({"eu": 3}, FUTURE_TS)  # the partition's first records were all a day ahead
    restored = book()
    restored.load(orjson.loads(orjson.dumps(b.to_dict())))
    for x in (b, restored):
        x.apply([("eu", T0 + 5 * W + 10, None)], 4, 0)  # stream time starts long after the wall clock did
        x.advance_to(T0 + 6 * W + G + 1)
        s = snaps_by_key(x)[("eu", T0 + 5 * W)]
        assert (s["count"], s["late_by_reason"][FUTURE_TS]) == (1, 3)
        assert x.pending_late == {}
    assert restored.outbox == b.outbox
    assert "pending_late" not in b.to_dict()  # the common state record stays as it was


_EVENT = st.tuples(st.sampled_from(["eu", "us", "ap", None]),  # None: a spilled marker
                   st.integers(0, 4 * W), st.one_of(st.none(), st.integers(-1_000, LATE + 1_000)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_EVENT, max_size=30), max_size=6), st.integers(1, 3))
def test_counts_with_aggregates_on_equal_counts_with_them_off(batches, max_regions):
    """With aggregates on, ``apply`` keeps a run's counts in the staged cells (``Staged.run``)
    instead of a dict: the same batches (window changes, windows closed mid-batch, late and
    spilled events, regions past the cap) give the same counts, late buckets and snapshots."""
    books = [book(max_regions=max_regions), book(max_regions=max_regions, aggs=WindowAggregates())]
    for i, batch in enumerate(batches):
        events = [(r, T0 + t, None if d is None else T0 + t - d) for r, t, d in batch]
        for b in books:
            agg_list = [None if r is None else (7, 9, "/a") for r, _, _ in events] if b.aggs is not None else None
            b.apply(events, i + 1, 0, agg_list)
    for b in books:
        b.advance_to(T0 + 6 * W)
    off, on = books
    assert on.counts == off.counts and on.tally == off.tally and on.late == off.late
    assert on.first_seen == off.first_seen and on.last_seen == off.last_seen
    assert [(s["region"], s["window_start"], s["count"], s.get("late")) for s in on.outbox] == [
        (s["region"], s["window_start"], s["count"], s.get("late")) for s in off.outbox]
