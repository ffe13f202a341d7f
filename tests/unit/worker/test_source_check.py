"""The worker's check of a partition's log before it counts a batch that continues its
state after a pause (docs/contract.md §4 "When `clicks` starts over"): a real
``WorkerService`` fed real fetched records (broker-stamped), with the Kafka side replaced
by what ``on_batch`` asks of it (the end offset, the assignment).  What ``on_batch``
returns is the offset the consumer fetches the partition again from.

The integration test (test_log_restart.py, on Kafka) shows the whole; these pin the
cases a broker makes rare: a re-read that ends at the record before (a fetch stops at a
segment's end), a record before that is gone (retention), and a log cut short whose
kept part spans more than one batch."""
from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest

from aggregator.config_load import load
from aggregator.metrics import Metrics
from aggregator.worker.consumer import note_read, read_from
from aggregator.worker.partitions import Partitions
from aggregator.worker.service import WorkerService
from tests.unit.worker.records import fetched

TP0 = SimpleNamespace(topic="clicks", partition=0)


class Reads:
    """The consumer's account of what it read (``consumer.note_read``) over the fetches a test
    hands over, kept where aiokafka keeps it: the partition's state."""

    def __init__(self) -> None:
        self.state = SimpleNamespace()
        assignment = SimpleNamespace(state_value=lambda tp: self.state)
        self.consumer = SimpleNamespace(_subscription=SimpleNamespace(subscription=SimpleNamespace(
            assignment=assignment)))

    def read_from(self, partition: int) -> tuple[int, int | None] | None:
        return read_from(self.consumer, TP0)


def kafka(w: WorkerService, **more: object) -> SimpleNamespace:
    """What ``on_batch`` asks of the Kafka side: the end offset (``w.end``), the assignment,
    what the consumer read (``w.reads``)."""
    w.end, w.restarts, w.reads = 0, [], Reads()
    return SimpleNamespace(read_to=lambda partition, n: n, highwater=lambda partition, topic=None: w.end,
                           assigned=lambda: {0}, log_restarted=w.restarts.append, read_from=w.reads.read_from,
                           **more)


def deliver(w: WorkerService, records: list, at: int | None = None) -> int | None:
    """Hand ``records`` over as a fetch from ``at`` (transaction markers before them; by
    default their first offset), and seek where ``on_batch`` says, as the consumer does."""
    note_read(w.reads.state, records[0].offset if at is None else at, records, records[-1].offset + 1)
    again = w.on_batch(TP0, records)
    if again is not None:
        w.reads.state.sought = again  # consumer._ConsumerThread.seek_here
    return again


class Log:
    """One partition's log as the worker sees it: record batches, each stamped by the broker
    with one time (LogAppendTime)."""

    def __init__(self, stamp: int) -> None:
        self.batches: list[tuple[int, int, int]] = []  # first offset, records, stamp
        self.end = 0
        self.stamp = stamp

    def append(self, n: int, gap_ms: int = 1) -> None:
        self.stamp += gap_ms
        self.batches.append((self.end, n, self.stamp))
        self.end += n

    def read(self, start: int, end: int | None = None) -> list:
        """The records ``start``..``end - 1`` as one fetch."""
        end = self.end if end is None else end
        value = orjson.dumps({"region": "r"})
        out: list = []
        for first, n, stamp in self.batches:
            lo, hi = max(first, start), min(first + n, end)
            if lo < hi:  # a stamped batch's records all carry its newest time
                out += fetched([(None, value, [])] * (hi - lo), base=lo, timestamp=stamp - (hi - lo - 1),
                               log_append=True)
        assert [r.offset for r in out] == list(range(start, end))
        return out


@pytest.fixture
def worker(tmp_path):
    settings = load(env={"AGG_SPILL_DIR": str(tmp_path / "spill"),
                         "AGG_PARTITIONS": "1"})
    w = WorkerService(settings, Metrics(), [])
    w.kafka = kafka(w)
    w.partitions = Partitions(w.partitions.books, tmp_path / "spill", lambda p: None, Metrics())
    return w


def feed(w: WorkerService, log: Log, start: int, end: int | None = None, at: int | None = None) -> int | None:
    w.end = log.end
    return deliver(w, log.read(start, end), at)


def counted(w: WorkerService) -> int:
    return sum(w.partitions.get(0).book.take_tally().values())


def pause(w: WorkerService, ms: int = 1_000) -> None:
    """The partition had no batch of clicks for ``ms`` (as if that long ago)."""
    p = w.partitions.get(0)
    p.clicks_ms -= ms


def counted_600(w: WorkerService) -> Log:
    log = Log(int(time.time() * 1000) - 60_000)
    log.append(600)
    assert feed(w, log, 0) is None  # a fresh state: nothing to check
    assert counted(w) == 600 and w.partitions.get(0).book.next_offset == 600
    return log


def test_a_steady_stream_is_counted_without_a_check(worker):
    log = counted_600(worker)
    log.append(100)
    assert feed(worker, log, 600) is None
    assert counted(worker) == 100


def test_a_batch_after_a_pause_waits_for_the_record_before(worker):
    log = counted_600(worker)
    pause(worker)
    log.append(100)
    assert feed(worker, log, 600) == 599  # not counted: read again from 599
    assert counted(worker) == 0
    assert feed(worker, log, 599) is None  # the same record at 599: the rest is counted
    assert counted(worker) == 100 and worker.partitions.get(0).book.next_offset == 700
    assert worker.restarts == []


def test_a_re_read_that_ends_at_the_record_before_proves_nothing_of_the_next_fetch(worker):
    # the re-read of 599 was fetched before the topic was deleted and created again, and
    # handed over after (the process stopped in between): the same record at 599, but the
    # batch at 600 comes from another fetch, of the new log, and is checked again
    counted_600(worker)
    old_599 = worker.partitions.get(0).source_ts
    new = Log(int(time.time() * 1000) - 10_000)
    new.append(700)
    pause(worker)
    assert feed(worker, new, 600) == 599
    stale = fetched([(None, orjson.dumps({"region": "r"}), [])], base=599, timestamp=old_599, log_append=True)
    assert deliver(worker, stale) is None
    assert feed(worker, new, 600) == 599  # not taken on the stale word
    assert feed(worker, new, 599) == 0
    assert feed(worker, new, 0) is None
    assert counted(worker) == 700 and worker.restarts == [0]


def test_a_log_segment_ending_at_the_record_before_is_let_be_after_some_tries(worker, caplog):
    # a fetch stops at a segment's end: every re-read of 599 holds 599 alone
    log = counted_600(worker)
    log.append(100, gap_ms=5_000)  # appended well after: the stamps say a pause
    for _ in range(3):
        assert feed(worker, log, 600) == 599
        assert feed(worker, log, 599, 600) is None
    assert counted(worker) == 0
    assert feed(worker, log, 600) is None  # the fourth time: taken as the same log
    assert counted(worker) == 100
    assert "cannot be read again together with offset 600" in caplog.text


def test_a_new_log_found_at_the_record_before_is_read_from_its_start(worker):
    counted_600(worker)
    new = Log(int(time.time() * 1000) - 10_000)  # the topic created again, refilled past 600
    new.append(700)
    pause(worker)
    assert feed(worker, new, 600) == 599
    assert feed(worker, new, 599) == 0  # another record at 599: from the start
    p = worker.partitions.get(0)
    assert counted(worker) == 0 and not p.source_checked and not p.commit_ok
    assert feed(worker, new, 0, 300) is None
    assert worker.restarts == [0] and p.book.log_epoch == 1
    assert feed(worker, new, 300) is None
    assert counted(worker) == 700 and p.book.next_offset == 700 and p.source_checked


def test_a_log_cut_short_and_refilled_skips_its_kept_part_over_many_batches(worker):
    old = counted_600(worker)
    cut = Log(old.stamp)  # the broker kept 0..549, lost the rest, then took 150 new records
    cut.batches, cut.end = [(0, 550, old.stamp)], 550
    cut.append(150, gap_ms=3_000)
    pause(worker)
    assert feed(worker, cut, 600) == 599
    assert feed(worker, cut, 599) == 0
    for start in range(0, 500, 100):  # the kept part, read on and never counted again
        assert feed(worker, cut, start, start + 100) is None
    assert counted(worker) == 0 and worker.restarts == []
    assert feed(worker, cut, 500) is None  # 500..549 kept, 550..699 new
    assert counted(worker) == 150 and worker.restarts == [0]
    assert worker.partitions.get(0).book.next_offset == 700


def test_a_record_before_that_is_gone_is_let_be_after_some_tries(worker, caplog):
    log = counted_600(worker)
    pause(worker)
    log.append(100)
    # retention deleted 599: each re-read comes back at 600 (the log's start now)
    assert [feed(worker, log, 600) for _ in range(3)] == [599, 599, 599]
    assert counted(worker) == 0
    assert feed(worker, log, 600) is None
    assert counted(worker) == 100
    assert "cannot be read again together" in caplog.text


def test_a_new_log_stamped_by_a_clock_behind_is_counted_whole(worker):
    # the record at 599 stamped before the state's: the broker's clock is behind, and its
    # stamps cannot tell a part of the old log kept: nothing of the new log is read past
    old = counted_600(worker)
    behind = Log(old.stamp - 2_000)  # within the grace: its events still find their windows open
    behind.append(300)
    behind.append(400)
    pause(worker)
    assert feed(worker, behind, 600) == 599
    assert feed(worker, behind, 599) == 0
    assert feed(worker, behind, 0, 300) is None
    assert feed(worker, behind, 300) is None
    assert counted(worker) == 700 and worker.restarts == [0]


def test_a_batch_past_the_offset_before_the_new_log_is_read_from_its_start_is_sent_back(worker):
    counted_600(worker)
    new = Log(int(time.time() * 1000) - 10_000)
    new.append(900)
    pause(worker)
    assert feed(worker, new, 600) == 599
    assert feed(worker, new, 599, 700) == 0
    # the seek to 0 was lost: the consumer goes on after the re-read
    assert feed(worker, new, 700) == 0
    assert counted(worker) == 0
    assert feed(worker, new, 0) is None
    assert counted(worker) == 900 and worker.restarts == [0]
