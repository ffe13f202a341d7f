"""A worker clock behind the records' stamps (docs/contract.md §1): every event is
``future_ts`` as before, and the worker says so once, sets its gauge and is not ready
until a batch at the end of its partition is stamped within AGG_MAX_AHEAD_SECONDS again.
A real ``WorkerService`` fed real fetched records, on the harness of test_source_check.py."""
from __future__ import annotations

import asyncio
import logging
import time

import orjson

from aggregator.core.contract import ingest_header
from aggregator.worker.clock import SKEW_SPAN_MS, ClockSkew
from tests.unit.worker.records import fetched
from tests.unit.worker.test_source_check import TP0, Log, counted, feed
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
    assert not skew.stamped(now, now + 10_000, live=False)  # one batch: one producer's clock, maybe
    assert not skew.stamped(now, now + 1_000, live=True)  # a live batch within the tolerance: the run ends
    assert not skew.stamped(now, now + 10_000, live=False)
    assert skew.stamped(now + 5, now + 9_005, live=False)
    assert skew.behind_ms == 9_000 and skew.ahead_ms == 0
    assert not skew.stamped(now + 10, now - 60_000, live=False)  # old records prove nothing
    assert skew.behind_ms == 9_000
    assert skew.stamped(now + 20, now + 20, live=True)  # a fresh record, in agreement
    assert skew.behind_ms == 0 and skew.behind() is None
    assert not skew.stamped(now, None, live=True)  # no event of its own: nothing


def test_a_partition_replaying_a_backlog_beside_live_ones_hides_no_clock_behind():
    # the worker's clock stepped 60 s back; one partition reads live records (all future_ts),
    # another, just assigned, replays records ten minutes old, its batches between theirs
    skew = ClockSkew(5_000)
    now = 1_700_000_000_000
    told = []
    for _ in range(3):
        now += 100
        told.append(skew.stamped(now, now + 60_000, live=True))
        told.append(skew.stamped(now, now - 540_000, live=False))  # within the tolerance, but behind its end
    assert told == [False, False, True, False, False, False]  # from the second batch over it: said once
    assert 59_000 < skew.behind_ms <= 60_000
    assert skew.stamped(now + 100, now + 100, live=True)  # a live batch within the tolerance ends it
    assert skew.behind_ms == 0 and skew.over == 0


def test_a_clock_behind_ends_a_span_after_the_last_batch_over_the_tolerance_with_no_batch_at_all():
    skew = ClockSkew(5_000)
    now = 1_700_000_000_000
    skew.stamped(now, now + 10_000, live=False)
    assert skew.stamped(now + 100, now + 10_100, live=False)
    assert not skew.expire(now + 100 + SKEW_SPAN_MS - 1)  # (asked every tick)
    assert skew.behind_ms == 10_000
    assert skew.expire(now + 100 + SKEW_SPAN_MS)
    assert skew.behind_ms == 0 and skew.behind() is None and not skew.expire(now + 2 * SKEW_SPAN_MS)


def test_a_broker_clock_ahead_is_not_this_worker_behind(tmp_path, caplog):
    """The partition's leader stamps LogAppendTime a minute ahead; ingest's header stamps
    the events right: none is future_ts, so the worker's clock is not behind (it is ready)."""
    w = _worker(tmp_path)
    caplog.set_level(logging.INFO)
    now = int(time.time() * 1000)
    value, end = orjson.dumps({"region": "r"}), 0
    for _ in range(4):
        batch = fetched([(b"r", value, ingest_header(now, None))] * 100, base=end, timestamp=now + 60_000,
                        log_append=True)
        end += 100
        w.end = end
        assert w.on_batch(TP0, batch) is None
    assert counted(w) == 400 and not w.checkpointer.dead  # none is future_ts
    assert w.clock_skew.behind_ms == 0 and w.clock_skew.behind() is None
    assert not [m for m in _loud(caplog) if "behind" in m]


def test_a_worker_whose_clock_was_set_right_is_ready_again_without_a_record(tmp_path, caplog, monkeypatch):
    w = _worker(tmp_path)
    real = time.time
    log = Log(int(real() * 1000) - 1000)
    log.append(300)
    log.append(300)
    monkeypatch.setattr(time, "time", lambda: real() - 10.0)  # the worker's clock stepped 10 s back
    caplog.set_level(logging.INFO)
    assert feed(w, log, 0, 300) is None and feed(w, log, 300) is None
    w.kafka.refused = lambda: None
    w.kafka.recovered = lambda: True
    w.started = True
    assert w.not_ready() is not None and "behind" in w.not_ready()
    monkeypatch.setattr(time, "time", real)  # set right; and no record comes

    async def checkpoint(*_):  # this harness has no producer: the state writes are not what this tests
        pass

    monkeypatch.setattr(w.checkpointer, "checkpoint", checkpoint)
    asyncio.run(w.tick(only=[]))  # a tick (of no partition: their fetch positions are not faked here)
    assert w.not_ready() is not None  # within a span of the last batch ahead: still behind
    monkeypatch.setattr(time, "time", lambda: real() + SKEW_SPAN_MS / 1000)
    asyncio.run(w.tick(only=[]))
    assert w.not_ready() is None and w.clock_skew.behind_ms == 0
    assert w.metrics.registry.get_sample_value("clickstream_worker_clock_behind_seconds") == 0
    loud = _loud(caplog)
    assert len(loud) == 2 and "no longer behind" in loud[1]


def test_events_forwarded_ahead_of_the_clock_count_toward_a_clock_behind(tmp_path, caplog):
    """Events whose region's home is another partition are judged future_ts at their home,
    from ``clicks-repartition``: batches of them count as well."""
    from faust.types import TP

    from aggregator.core.contract import CLICKS_REPARTITION
    from aggregator.core.repartition import forward_record
    from tests.unit.worker.test_forwarded_batches import COLD, HOME
    from tests.unit.worker.test_forwarded_batches import _worker as _two_partitions

    w = _two_partitions(tmp_path)
    caplog.set_level(logging.INFO)
    ahead = int(time.time() * 1000) + 60_000  # stamped by a clock a minute ahead of this worker's
    for offset in range(2):
        batch = fetched([forward_record(1, (COLD, ahead, None, offset, None, None))], base=offset, timestamp=ahead)
        assert w.on_batch(TP(CLICKS_REPARTITION, HOME), batch) is None
    assert len(w.checkpointer.dead) == 2  # both future_ts
    assert 55_000 < w.clock_skew.behind_ms <= 60_000
    assert [m for m in _loud(caplog) if "behind the records' stamps" in m]
