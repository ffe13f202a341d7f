"""What a worker does when a partition's log does not continue its state as it should
(docs/contract.md §4): a replay that stops short of the record before the state's offset
(its broker stamps are not monotonic: never taken for a new log), and offsets the log no
longer holds (retention, an offset reset: lost, and said).  A real ``WorkerService`` fed
real fetched records, on the harness of test_source_check.py."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import orjson

from aggregator.config_load import load
from aggregator.core.sourcelog import LOG_APPEND_TIME, restarted, unproven
from aggregator.core.topics import Topics
from aggregator.metrics import Metrics
from aggregator.worker.partitions import Partitions
from aggregator.worker.service import WorkerService
from tests.unit.worker.records import fetched, recovered
from tests.unit.worker.test_source_check import TP0, Log, counted, feed


def _worker(tmp_path, sub: str = "spill", stored=lambda p: None) -> WorkerService:
    settings = load(env={"AGG_SPILL_DIR": str(tmp_path / sub), "AGG_PARTITIONS": "1"})
    w = WorkerService(settings, Metrics(), [])
    w.end = 0
    w.restarts = []
    w.kafka = SimpleNamespace(read_to=lambda partition, n: n, highwater=lambda partition, topic=None: w.end, assigned=lambda: {0},
                              log_restarted=w.restarts.append, topics=Topics(""))
    w.partitions = Partitions(w.partitions.books, tmp_path / sub, stored, Metrics())
    return w


def _lost(w: WorkerService, topic: str = "clicks") -> float | None:
    return w.metrics.registry.get_sample_value("clickstream_source_offsets_lost_total", {"topic": topic})


def _loud(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ replay, not restart
@dataclass
class R:
    offset: int
    timestamp: int
    timestamp_type: int = LOG_APPEND_TIME


def test_a_replay_that_does_not_reach_the_record_before_is_never_judged_by_its_stamps():
    # one log: leader A stamps 0..9999, then leader B, its clock 2 s behind, 10000..19999
    t = 1_700_000_000_000
    log = [R(o, t + o // 10) for o in range(10_000)] + [R(o, t - 1000 + (o - 10_000) // 10)
                                                       for o in range(10_000, 20_000)]
    state = (20_000, log[19_999].timestamp)
    replay = log[9_000:12_000]  # stamped after the state's last record, and the same log
    assert restarted(0, *state, replay, 20_000) is None
    assert unproven(*state, replay, 20_000)  # the record at 19999, read again, tells
    assert not unproven(*state, log[18_000:], 20_000)  # it holds it: judged as it is
    assert not unproven(*state, replay, 15_000)  # the log ends below: a restart (restarted says so)
    assert restarted(0, *state, replay, 15_000) is not None


def _counted_1200_with_a_clock_step_back(tmp_path) -> tuple[Log, bytes]:
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    log.append(600, gap_ms=-2000)  # the leader moved to a broker whose clock is 2 s behind
    assert feed(w, log, 0, 600) is None
    assert feed(w, log, 600) is None
    assert counted(w) == 1200
    return log, w.partitions.get(0).state_value()


def test_a_replay_of_the_same_log_after_a_clock_step_back_is_not_counted_twice(tmp_path, caplog):
    log, state = _counted_1200_with_a_clock_step_back(tmp_path)
    # SIGKILL; the group's committed offset (0) is more than a fetch below the state's (1200)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    caplog.set_level(logging.INFO)
    log.append(100)
    assert feed(w, log, 0, 600) == 1199  # not judged by its stamps: read again from the record before
    assert counted(w) == 0
    assert feed(w, log, 1199) is None  # the record the state kept: the same log, counted on from 1200
    p = w.partitions.get(0)
    assert counted(w) == 100 and w.restarts == [] and p.book.log_epoch == 0 and p.book.next_offset == 1300
    assert p.source_checked and not _loud(caplog)


def test_a_replay_whose_seek_back_was_lost_is_checked_where_it_reaches_the_record_before(tmp_path):
    log, state = _counted_1200_with_a_clock_step_back(tmp_path)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    assert feed(w, log, 0, 600) == 1199
    assert feed(w, log, 600) is None  # the replay goes on (the seek lost): it holds 1199
    assert counted(w) == 0 and w.restarts == []


def test_a_new_log_as_long_as_the_old_one_is_still_found_at_the_record_before(tmp_path):
    _, state = _counted_1200_with_a_clock_step_back(tmp_path)
    new = Log(int(time.time() * 1000) - 30_000)  # created again, refilled past 1200
    new.append(1500)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    assert feed(w, new, 0, 600) == 1199
    assert feed(w, new, 1199) == 0  # another record at 1199: read from the start
    assert feed(w, new, 0) is None
    assert counted(w) == 1500 and w.restarts == [0] and w.partitions.get(0).book.log_epoch == 1


# ----------------------------------------------------------------------- offsets lost
def _counted_600(tmp_path) -> tuple[Log, bytes]:
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    assert feed(w, log, 0) is None and counted(w) == 600
    return log, w.partitions.get(0).state_value()


def test_offsets_deleted_by_retention_are_said_lost_and_counted(tmp_path, caplog):
    log, state = _counted_600(tmp_path)
    log.append(1000, gap_ms=1000)  # the worker down; retention deletes the log up to 1100
    w = _worker(tmp_path, "spill2", recovered(0, state))
    caplog.set_level(logging.INFO)
    w.end = log.end
    # the committed offset 600 out of range: the consumer resets to the log's start, 1100;
    # each re-read of 599 is reset there again
    for _ in range(3):
        assert w.on_batch(TP0, log.read(1100)) == 599
        assert counted(w) == 0 and not _loud(caplog)
    assert w.on_batch(TP0, log.read(1100)) is None
    assert counted(w) == 500 and w.partitions.get(0).book.next_offset == 1600
    loud = _loud(caplog)
    assert len(loud) == 1 and "partition 0 of clicks: offsets 600..1099" in loud[0] and "lost" in loud[0]
    assert _lost(w) == 500


def test_a_gap_of_transaction_markers_is_not_a_loss(tmp_path, caplog):
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    assert feed(w, log, 0) is None and counted(w) == 600
    caplog.set_level(logging.INFO)
    value = orjson.dumps({"region": "r"})
    stamp = log.stamp + 1

    def at(offset: int, n: int = 10) -> list:
        w.end = offset + n
        return fetched([(None, value, [])] * n, base=offset, timestamp=stamp, log_append=True)

    before = at(601)
    assert w.on_batch(TP0, before) is None  # a commit marker at 600: one offset, no record
    assert counted(w) == 10
    # two markers (two transactions ended together): the record before them is read again
    assert w.on_batch(TP0, at(613)) == 610
    assert w.on_batch(TP0, before[-1:] + at(613)) is None  # it is there: nothing deleted
    assert counted(w) == 10 and w.partitions.get(0).book.next_offset == 623
    assert not _loud(caplog) and _lost(w) is None


def test_offsets_of_clicks_repartition_skipped_are_said_lost(tmp_path, caplog):
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(10)
    assert feed(w, log, 0) is None
    p = w.partitions.get(0)
    p.book.repart_next = 40
    caplog.set_level(logging.INFO)
    forwarded = SimpleNamespace(topic=w.repart_topic, partition=0)
    value = orjson.dumps({"region": "r"})
    assert w.on_batch(forwarded, fetched([(None, value, [])] * 5, base=40, timestamp=log.stamp)) is None
    assert not _loud(caplog) and p.book.repart_next == 45
    assert w.on_batch(forwarded, fetched([(None, value, [])] * 5, base=70, timestamp=log.stamp)) is None
    loud = _loud(caplog)
    assert len(loud) == 1 and "partition 0 of clicks-repartition: offsets 45..69" in loud[0]
    assert _lost(w, "clicks-repartition") == 25 and p.book.repart_next == 75
