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
from aggregator.worker.consumer import note_read
from aggregator.worker.partitions import Partitions
from aggregator.worker.service import WorkerService
from tests.unit.worker.records import fetched, recovered
from tests.unit.worker.test_source_check import Log, counted, deliver, feed, kafka


def _worker(tmp_path, sub: str = "spill", stored=lambda p: None) -> WorkerService:
    settings = load(env={"AGG_SPILL_DIR": str(tmp_path / sub), "AGG_PARTITIONS": "1"})
    w = WorkerService(settings, Metrics(), [])
    w.kafka = kafka(w, topics=Topics(""))
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


def _rebuilding(w: WorkerService) -> None:
    """The partition's spill files are lost (another host had it): its backlog is to be
    re-spilled from a replay of the source log (spill.ledger.rebuild)."""
    p = w._open(0)
    p.spill.ledger.regions["hot"] = [50, 0, 0]
    p.spill.ledger.rebuild["hot"] = 50


def test_a_new_log_replayed_for_a_lost_spill_is_found_at_the_record_before(tmp_path):
    _, state = _counted_1200_with_a_clock_step_back(tmp_path)
    new = Log(int(time.time() * 1000) - 30_000)  # created again, refilled past 1200
    new.append(1500)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    _rebuilding(w)
    assert feed(w, new, 0, 600) == 1199  # not taken for the same log, rebuild or not
    assert feed(w, new, 1199) == 0
    for start in (0, 600, 1200):
        assert feed(w, new, start, start + 300 if start == 1200 else start + 600) is None
    assert counted(w) == 1500 and w.restarts == [0] and w.partitions.get(0).book.log_epoch == 1


def test_a_replay_for_a_lost_spill_goes_on_from_its_start_once_proven(tmp_path):
    log, state = _counted_1200_with_a_clock_step_back(tmp_path)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    _rebuilding(w)
    log.append(100)
    assert feed(w, log, 0, 600) == 1199
    assert feed(w, log, 1199) == 0  # the same record: the replay the spill needs, from its start
    p = w.partitions.get(0)
    assert p.source_checked and w.restarts == []
    assert feed(w, log, 0, 600) is None and feed(w, log, 600, 1200) is None  # re-spilled, not counted
    assert counted(w) == 0
    assert feed(w, log, 1200) is None
    assert counted(w) == 100 and w.restarts == [] and p.book.next_offset == 1300


# ----------------------------------------------------------------------- offsets lost
def _counted_600(tmp_path) -> tuple[Log, bytes]:
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    assert feed(w, log, 0) is None and counted(w) == 600
    return log, w.partitions.get(0).state_value()


def _reopened(tmp_path, caplog, n: int) -> tuple[Log, WorkerService]:
    """600 counted; ``n`` more appended while the worker was down; a new worker on its state."""
    log, state = _counted_600(tmp_path)
    log.append(n, gap_ms=1000)
    w = _worker(tmp_path, "spill2", recovered(0, state))
    caplog.set_level(logging.INFO)
    w.end = log.end
    return log, w


def test_offsets_deleted_by_retention_are_said_lost_and_counted(tmp_path, caplog):
    log, w = _reopened(tmp_path, caplog, 1000)  # retention deleted the log up to 1100
    # the committed offset 600 out of range: the consumer resets to the log's start, 1100
    assert deliver(w, log.read(1100)) == 600  # its position jumped over 600: read from there
    assert counted(w) == 0 and not _loud(caplog)
    assert deliver(w, log.read(1100)) is None  # sought to 600, reset to 1100 again: gone
    assert counted(w) == 500 and w.partitions.get(0).book.next_offset == 1600
    loud = _loud(caplog)
    assert len(loud) == 1 and "partition 0 of clicks: offsets 600..1099" in loud[0] and "lost" in loud[0]
    assert _lost(w) == 500


def _value_batch(w: WorkerService, offset: int, stamp: int, n: int = 10) -> list:
    w.end = offset + n
    return fetched([(None, orjson.dumps({"region": "r"}), [])] * n, base=offset, timestamp=stamp, log_append=True)


def _counting(tmp_path, caplog) -> tuple[Log, WorkerService]:
    """A worker that counted 600 records and counts on."""
    w = _worker(tmp_path)
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    assert feed(w, log, 0) is None and counted(w) == 600
    caplog.set_level(logging.INFO)
    return log, w


def test_a_gap_of_transaction_markers_is_not_a_loss(tmp_path, caplog):
    log, w = _counting(tmp_path, caplog)
    stamp = log.stamp + 1
    # the consumer read on from 600: a commit marker there, then records
    assert deliver(w, _value_batch(w, 601, stamp), at=600) is None
    assert counted(w) == 10
    # two markers (two transactions ended together), an aborted transaction's batch: read, no record
    assert deliver(w, _value_batch(w, 620, stamp), at=611) is None
    # a fetch of markers only hands nothing over; the next one reads on past them
    note_read(w.reads.state, 630, [], 633)
    assert deliver(w, _value_batch(w, 633, stamp), at=633) is None
    assert counted(w) == 20 and w.partitions.get(0).book.next_offset == 643
    assert not _loud(caplog) and _lost(w) is None


def test_a_single_offset_skipped_by_a_reset_is_said_lost(tmp_path, caplog):
    # ingest's producer is idempotent, not transactional: a gap of one offset is no marker
    # unless the consumer read it (retention deleted a one-record segment; a reset to 601)
    log, w = _reopened(tmp_path, caplog, 100)
    assert deliver(w, log.read(601)) == 600
    assert deliver(w, log.read(601)) is None  # sought to 600, reset to 601 again
    assert counted(w) == 99 and _lost(w) == 1
    loud = _loud(caplog)
    assert len(loud) == 1 and "offsets 600..600" in loud[0]


def test_a_single_offset_skipped_by_a_seek_is_read_again(tmp_path, caplog):
    # the position moved past the state's offset (a seek not the worker's): what is still
    # there is read from the state's offset, nothing lost
    log, w = _reopened(tmp_path, caplog, 100)
    assert deliver(w, log.read(601)) == 600
    assert deliver(w, log.read(600)) == 599  # the first batch since opened: the record before first
    assert deliver(w, log.read(599)) is None
    assert counted(w) == 100 and _lost(w) is None and not _loud(caplog)


def test_a_re_read_holding_only_the_record_before_is_no_loss(tmp_path, caplog):
    # after a pause, the batch past a marker waits for 599 to be read again; the re-read
    # stops at 599 (a segment ends there): the markers between are read all the same
    log, w = _counting(tmp_path, caplog)
    stamp = log.stamp + 5_000  # appended well after: a pause
    for _ in range(3):
        assert deliver(w, _value_batch(w, 603, stamp), at=600) == 599
        assert feed(w, log, 599, 600) is None  # 599 alone
    assert counted(w) == 0
    assert deliver(w, _value_batch(w, 603, stamp), at=600) is None
    assert counted(w) == 10 and _lost(w) is None
    assert all("lost" not in m for m in _loud(caplog))


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
