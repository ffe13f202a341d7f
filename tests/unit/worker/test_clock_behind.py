"""A worker clock behind the records' stamps (docs/contract.md §1): every event is
``future_ts`` as before, and the worker says so once, sets its gauge and is not ready
until a batch at the end of its partition is stamped within AGG_MAX_AHEAD_SECONDS again.
A real ``WorkerService`` fed real fetched records, on the harness of test_source_check.py."""
from __future__ import annotations

import logging
import time

from aggregator.worker.clock import SKEW_SPAN_MS, ClockSkew
from tests.unit.worker.test_source_check import Log, counted, feed
from tests.unit.worker.test_source_gaps import _loud, _worker


def test_a_worker_clock_behind_the_stamps_is_said_once_and_makes_it_not_ready(tmp_path, caplog, monkeypatch):
    w = _worker(tmp_path)
    real = time.time
    log = Log(int(real() * 1000) - 1000)  # the broker's clock is right: stamped just now
    log.append(300)
    log.append(300)
    monkeypatch.setattr(time, "time", lambda: real() - 10.0)  # the worker's clock stepped 10 s back
    caplog.set_level(logging.INFO)
    assert feed(w, log, 0, 300) is None
    assert w.clock_skew.behind() is None  # one batch: maybe one producer's clock
    assert feed(w, log, 300) is None
    # which events are future_ts is unchanged: all of them
    assert counted(w) == 0 and len(w.checkpointer.dead) == 600
    loud = _loud(caplog)
    assert len(loud) == 1 and "clock is" in loud[0] and "behind the records' stamps" in loud[0]
    reason = w.clock_skew.behind()
    assert reason is not None and "future_ts" in reason
    assert 8_000 < w.clock_skew.behind_ms < 12_000
    w.kafka.refused = lambda: None
    w.kafka.recovered = lambda: True
    w.started = True
    assert w.not_ready() == reason  # /readyz
    w.metrics.clock_ahead(w.clock_skew.ahead_ms, w.clock_skew.behind_ms)  # as the tick does
    assert 8 < w.metrics.registry.get_sample_value("clickstream_worker_clock_behind_seconds") < 12
    log.append(10)
    assert feed(w, log, 600) is None  # still behind: nothing more said
    assert len(_loud(caplog)) == 1
    monkeypatch.setattr(time, "time", real)  # the clock set right: a live batch within the tolerance
    log.stamp = int(real() * 1000)
    log.append(10)
    assert feed(w, log, 610) == 609  # appended 10 s after the last: the record before is read again
    assert feed(w, log, 609) is None
    assert counted(w) == 10 and w.clock_skew.behind() is None and w.not_ready() is None
    loud = _loud(caplog)
    assert len(loud) == 2 and "no longer behind" in loud[1]


def test_the_clock_is_behind_from_the_second_batch_in_a_row_and_until_a_live_batch_agrees():
    skew = ClockSkew(5_000)
    now = 1_700_000_000_000
    assert not skew.stamped(now, now + 10_000, None, live=False)  # one batch: one producer's clock, maybe
    assert not skew.stamped(now, now + 1_000, None, live=False)  # within the tolerance: the run ends
    assert not skew.stamped(now, now + 10_000, None, live=False)
    assert skew.stamped(now + 5, None, now + 9_005, live=False)  # an event's ingest time counts as well
    assert skew.behind_ms == 9_000 and skew.ahead_ms == 0
    assert not skew.stamped(now + 10, now - 60_000, None, live=False)  # old records prove nothing
    assert skew.behind_ms == 9_000
    assert skew.stamped(now + 20, now + 20, None, live=True)  # a fresh record, in agreement
    assert skew.behind_ms == 0 and skew.behind() is None
    # again behind; then only partitions behind their ends are read, none stamped ahead
    skew.stamped(now + 100, now + 10_100, None, live=False)
    assert skew.stamped(now + 200, now + 10_200, None, live=False)
    assert not skew.stamped(now + 1_000, now - 5_000, None, live=False)
    assert skew.stamped(now + 200 + SKEW_SPAN_MS, now, None, live=False)  # none ahead for a span
    assert skew.behind_ms == 0
    assert not skew.stamped(now, None, None, live=True)  # no stamp: nothing
