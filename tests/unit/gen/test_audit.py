"""The audit of snapshots against the generator's ground truth, without a service (end to end:
tests/integration/test_gen_audit.py; the generator: test_generator.py)."""
from __future__ import annotations

import copy

from aggregator.gen.audit import audit, missing_windows, of_this_run, over_counted

W = 2000


def snap(region: str, ws: int, count: int, client_delay: int = 0, closed_window: int = 0,
         emitted_at: int | None = None) -> dict:
    return {"region": region, "window_start": ws, "window_end": ws + W, "count": count,
            "late": client_delay + closed_window,
            "late_by_reason": {"closed_window": closed_window, "client_delay": client_delay},
            "emitted_at": emitted_at if emitted_at is not None else ws + W + 1000}


TRUTH = {"window_ms": W, "accepted": 0, "rejected": 0,
         "counts": {"eu-west": {"10000": 5, "12000": 3}, "us-east": {"10000": 2}},
         "late": {"eu-west": {"client_delay": 2}}}


def good_snaps() -> list[dict]:
    return [snap("eu-west", 10000, 5), snap("eu-west", 12000, 3, client_delay=2),
            snap("us-east", 10000, 2), snap("us-east", 12000, 0)]


# --- pure: the audit -----------------------------------------------------------------------

def test_exact_snapshots_pass():
    assert audit(TRUTH, good_snaps()) == []
    assert missing_windows(TRUTH, good_snaps()) == set()


def test_wrong_count_is_caught():
    snaps = good_snaps()
    snaps[0]["count"] = 6
    problems = audit(TRUTH, snaps)
    assert len(problems) == 1 and "eu-west window 10000" in problems[0] and "count 6" in problems[0]


def test_missing_window_is_caught():
    snaps = [s for s in good_snaps() if not (s["region"] == "us-east" and s["window_start"] == 10000)]
    problems = audit(TRUTH, snaps)
    assert problems == ["us-east window 10000: missing (expected 2)"]
    assert missing_windows(TRUTH, snaps) == {("us-east", 10000)}


def test_unexpected_nonzero_window_is_caught():
    snaps = good_snaps() + [snap("ap-south", 12000, 1)]
    problems = audit(TRUTH, snaps)
    assert problems == ["ap-south window 12000: unexpected count 1"]


def test_zero_count_extra_windows_pass():
    snaps = good_snaps() + [snap("ap-south", 12000, 0), snap("eu-west", 14000, 0), snap("us-east", 8000, 0)]
    assert audit(TRUTH, snaps) == []


def test_duplicate_with_different_content_is_caught():
    dup = snap("eu-west", 10000, 4)
    problems = audit(TRUTH, good_snaps() + [dup])
    assert any("re-published with different content" in p for p in problems), problems
    # different late numbers, same count, are a different content too
    dup = snap("eu-west", 12000, 3, client_delay=1, closed_window=1)
    problems = audit(TRUTH, good_snaps() + [dup])
    assert any("eu-west window 12000: re-published" in p for p in problems), problems


def test_identical_duplicate_passes_even_with_new_emitted_at():
    snaps = good_snaps()
    assert audit(TRUTH, snaps + copy.deepcopy(snaps)) == []
    again = copy.deepcopy(snaps[1])
    again["emitted_at"] += 5000  # re-published after a crash: same numbers, later time
    assert audit(TRUTH, snaps + [again]) == []


def test_identical_duplicate_does_not_double_late_counts():
    snaps = good_snaps()
    assert audit(TRUTH, snaps + [copy.deepcopy(snaps[1])]) == []


def test_spilled_region_is_checked_by_the_identity():
    # eu-west was rate limited: 2 of window 10000's events were drained after it closed
    moved = [snap("eu-west", 10000, 3), snap("eu-west", 12000, 3, client_delay=2, closed_window=2),
             snap("us-east", 10000, 2)]
    assert audit(TRUTH, moved, {"eu-west"}) == []
    assert len(audit(TRUTH, moved)) == 2  # without the flag: window count and late both wrong
    lost = [snap("eu-west", 10000, 3), snap("eu-west", 12000, 3, client_delay=2, closed_window=1),
            snap("us-east", 10000, 2)]
    assert audit(TRUTH, lost, {"eu-west"}) == ["eu-west: counted + late closed_window = 7 != accepted on time 8"]
    over = [snap("eu-west", 10000, 6), snap("eu-west", 12000, 2, client_delay=2), snap("us-east", 10000, 2)]
    assert "eu-west window 10000: count 6 over expected 5" in audit(TRUTH, over, {"eu-west"})
    # the other regions stay exact per window
    assert audit(TRUTH, moved[:2] + [snap("us-east", 10000, 1)], {"eu-west"}) == [
        "us-east window 10000: count 1 != expected 2"]


def test_double_counts_are_counted_in_windows_and_in_the_late_bucket():
    assert over_counted(TRUTH, good_snaps() + [copy.deepcopy(good_snaps()[0])]) == 0  # re-published
    twice_late = good_snaps()
    twice_late[3] = snap("us-east", 12000, 0, closed_window=2)  # us-east's 2 events again, late
    assert over_counted(TRUTH, twice_late) == 2
    twice = good_snaps()
    twice[0] = snap("eu-west", 10000, 7)
    assert over_counted(TRUTH, twice) == 2
    # a spilled region's events counted late instead of in their window are not counted twice
    moved = [snap("eu-west", 10000, 3), snap("eu-west", 12000, 3, client_delay=2, closed_window=2),
             snap("us-east", 10000, 2)]
    assert over_counted(TRUTH, moved) == 0
    # what the service holds of earlier runs is not this run's; a later or unknown window is
    others = [snap("eu-west", 4000, 900), snap("eu-west", 20_000, 1, closed_window=1)]
    assert over_counted(TRUTH, of_this_run(TRUTH, good_snaps() + others[:1])) == 0
    assert over_counted(TRUTH, of_this_run(TRUTH, good_snaps() + others)) == 2
    assert over_counted(TRUTH, of_this_run(TRUTH, twice + others[:1])) == 2
    assert audit(TRUTH, of_this_run(TRUTH, good_snaps() + others[:1])) == []
    assert audit(TRUTH, good_snaps() + others[:1]) == ["eu-west window 4000: unexpected count 900"]


def test_wrong_late_counts_are_caught():
    snaps = good_snaps()
    snaps[1] = snap("eu-west", 12000, 3, client_delay=1)
    assert audit(TRUTH, snaps) == ["eu-west late client_delay: 1 != expected 2"]
    # a late reason the truth does not expect
    snaps = good_snaps()
    snaps[3] = snap("us-east", 12000, 0, closed_window=3)
    assert audit(TRUTH, snaps) == ["us-east late closed_window: 3 != expected 0"]
    # late events spread over several windows add up
    snaps = good_snaps()
    snaps[1] = snap("eu-west", 12000, 3, client_delay=1)
    snaps.append(snap("eu-west", 14000, 0, client_delay=1))
    assert audit(TRUTH, snaps) == []


def test_misaligned_window_bounds_are_caught():
    snaps = good_snaps()
    snaps[0]["window_end"] = 11000
    assert any("bounds" in p for p in audit(TRUTH, snaps))
