"""Detecting a partition of ``clicks`` that started over (issue 15, fault 1)."""
from __future__ import annotations

from typing import NamedTuple

from aggregator.core.sourcelog import CHECK_GAP_MS, LOG_APPEND_TIME, needs_check, restarted

CREATE_TIME = 0


class Rec(NamedTuple):
    offset: int
    timestamp: int
    timestamp_type: int = LOG_APPEND_TIME


def batch(first: int, last: int, ts: int, step: int = 1, kind: int = LOG_APPEND_TIME) -> list[Rec]:
    """Records ``first``..``last`` appended at ``ts``, ``ts + step``, ..."""
    return [Rec(o, ts + (o - first) * step, kind) for o in range(first, last + 1)]


# the state: offsets below 600 applied, the record at 599 was appended at 1_599
STATE = (600, 1_599)
OLD = batch(0, 599, 1_000)  # the log the state counted


def test_a_replay_of_the_same_log_is_not_a_restart():
    # after a crash the consumer replays from the committed offset: same records, same stamps
    assert restarted(0, *STATE, OLD[500:550], 900) is None     # 599 not in the batch, older stamps
    assert restarted(0, *STATE, OLD[500:], 900) is None        # 599 in it, with the stamp the state kept
    assert restarted(0, *STATE, OLD[599:], 600) is None        # exactly the last applied one
    assert restarted(0, 600, None, batch(0, 10, 9_999), 900) is None  # a state without a stamp


def test_nothing_below_the_state_offset_is_never_a_restart():
    assert restarted(0, *STATE, batch(600, 610, 9_999), 100) is None
    assert restarted(0, *STATE, batch(700, 710, 9_999), 800) is None


def test_a_new_log_that_ends_below_the_state_offset():
    r = restarted(3, *STATE, batch(0, 39, 5_000), 40)
    assert r is not None and r.count_from == 0 and r.log_end == 40 and r.next_offset == 600
    msg = r.message()
    assert "partition 3" in msg and "below 600" in msg and "ends at 40" in msg and "from offset 0" in msg
    # the same without a stamp kept, or with the producers' clocks: counted from its first record
    assert restarted(3, 600, None, batch(0, 39, 5_000), 40).count_from == 0
    assert restarted(3, *STATE, batch(0, 39, 5, kind=CREATE_TIME), 40).count_from == 0


def test_a_new_log_as_long_as_the_old_one_differs_at_the_last_applied_offset():
    r = restarted(1, *STATE, batch(0, 599, 9_000), 600)  # ends where the old one did
    assert r is not None and r.count_from == 0 and "timestamp 9599" in r.why and "recorded 1599" in r.why
    r = restarted(1, *STATE, batch(0, 999, 9_000), 2_000)  # grew past it already
    assert r is not None and r.count_from == 0


def test_a_first_record_appended_after_the_last_applied_one_means_a_new_log():
    # the batch does not reach offset 599: the broker's stamp of its first record decides
    r = restarted(2, *STATE, batch(0, 99, 1_600), None)
    assert r is not None and r.count_from == 0 and "appended at 1600" in r.why and "unknown" in r.message()
    assert restarted(2, *STATE, batch(0, 99, 1_599, step=0), None) is None  # same millisecond: the same log
    # a producer's own clock (CreateTime) proves nothing
    assert restarted(2, *STATE, batch(0, 99, 5_000, kind=CREATE_TIME), None) is None


def test_the_record_before_the_state_offset_outweighs_the_first_stamp():
    # the batch holds offset 599 with the kept stamp: the same log, whatever its first stamp says
    recs = [Rec(0, 5_000), *OLD[1:]]
    assert restarted(0, *STATE, recs, 900) is None


def test_a_log_cut_short_keeps_what_is_left_of_it_counted():
    # the broker lost the tail from 550 on (say an unclean leader election), then took new
    # records: those appended before the state's last one were counted, the rest are new
    cut = OLD[500:550] + batch(550, 649, 2_000)
    r = restarted(0, *STATE, cut, 650)
    assert r is not None and r.count_from == 550
    # nothing new yet: counting goes on from its end
    r = restarted(0, *STATE, OLD[500:550], 550)
    assert r is not None and r.count_from == 550 and "end offset 550 is below" in r.why


def test_gaps_in_offsets_are_searched():
    recs = [Rec(0, 5_000), Rec(5, 5_001), Rec(599, 1_599)]  # compacted or aborted records between
    assert restarted(0, *STATE, recs, 600) is None
    assert restarted(0, *STATE, [Rec(0, 5_000), Rec(5, 5_001), Rec(599, 7_000)], 600).count_from == 0


def test_a_batch_continuing_the_state_after_a_pause_is_checked_first():
    # a log deleted, created again and refilled past 600 between two fetches continues at 600:
    # only a pause tells, and then the record at 599 is read again before anything is counted
    at = Rec(600, 1_600)
    assert not needs_check(*STATE, at, 0)  # a steady stream
    assert not needs_check(*STATE, at, CHECK_GAP_MS - 1)
    assert needs_check(*STATE, at, CHECK_GAP_MS)  # no batch for that long
    assert needs_check(*STATE, at, None)  # the first batch since the partition was opened
    assert needs_check(*STATE, Rec(600, 1_599 + CHECK_GAP_MS), 0)  # appended that long after the last
    assert not needs_check(*STATE, Rec(600, 1_598 + CHECK_GAP_MS), 0)
    assert not needs_check(*STATE, Rec(600, 1_599 + CHECK_GAP_MS, CREATE_TIME), 0)  # a producer's clock
    # below the state's offset the batch itself is checked; above it, or with nothing to
    # compare with (a fresh state, a state without a stamp), there is nothing to re-read
    assert not needs_check(*STATE, Rec(599, 1_599), None)
    assert not needs_check(*STATE, Rec(601, 1_600), None)
    assert not needs_check(0, 1_599, Rec(0, 1_600), None)
    assert not needs_check(600, None, at, None)


def test_a_restart_found_at_the_offset_before_is_counted_from_the_log_start():
    # found on the re-read of 599 (another record there); the log read again from its start:
    # a batch that does not reach 599 and has no broker stamps (CreateTime) still restarts
    new = batch(0, 99, 5, kind=CREATE_TIME)
    assert restarted(0, *STATE, new, 900) is None  # by itself it looks like a replay
    r = restarted(0, *STATE, new, 900, known="the record at offset 599 is another one")
    assert r is not None and r.count_from == 0 and r.why == "the record at offset 599 is another one"
    r = restarted(0, *STATE, batch(0, 99, 2_000), 900, known="599 differs")  # stamped after the state's
    assert r is not None and r.count_from == 0 and r.why == "599 differs"


def test_a_restart_known_skips_the_part_a_log_cut_short_kept_however_long():
    # the log was cut at 550 and refilled past 600 (an unclean leader election): read again
    # from its start, its first batches hold only records appended before the state's last
    # one, counted then; they are read on, never counted again, up to the first new record
    kept, refilled = OLD[:550], batch(550, 699, 2_000)
    assert restarted(0, *STATE, kept[:100], 700, known="599 differs") is None
    assert restarted(0, *STATE, kept[100:400], 700, known="599 differs") is None
    r = restarted(0, *STATE, kept[400:] + refilled[:20], 700, known="599 differs")
    assert r is not None and r.count_from == 550
    # records at or past the state's offset are new whatever their stamp (a clock behind)
    behind = batch(590, 620, 1_000)
    r = restarted(0, *STATE, behind, 700, known="599 differs")
    assert r is not None and r.count_from == 600


def test_a_record_before_stamped_earlier_than_the_state_says_the_clock_is_behind():
    r = restarted(0, *STATE, batch(500, 650, 1_000), 900)  # 599 stamped 1_099 < 1_599
    assert r is not None and r.behind
    assert not restarted(0, *STATE, batch(500, 650, 9_000), 900).behind
    # then its stamps tell nothing: the log read from its start is counted whole
    kept_looking = batch(0, 99, 500)
    assert restarted(0, *STATE, kept_looking, 900, known="599 differs") is None
    r = restarted(0, *STATE, kept_looking, 900, known="599 differs", stamps=False)
    assert r is not None and r.count_from == 0
