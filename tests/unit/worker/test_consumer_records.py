"""The worker's consumer takes a raw topic's fetched records a whole record batch at a
time (worker/consumer.py); it must give what aiokafka's record-by-record path gives."""
from __future__ import annotations

from types import SimpleNamespace

import aiokafka.errors as Errors
import google_crc32c
import pytest
from aiokafka.consumer import fetcher
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from aggregator.worker import consumer
from aggregator.worker.clock import advance_target
from aggregator.worker.consumer import RawTopics, _FetchResult, _MemoryRecords, _PartitionRecords, read_to

TP = TopicPartition("clicks", 0)


def _fetch(batches: list[tuple[int, int]], corrupt: int | None = None) -> bytes:
    """Concatenated v2 record batches, each ``(base offset, record count)``."""
    out = b""
    for k, (base, n) in enumerate(batches):
        b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                      producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for i in range(n):
            b.append(i, timestamp=1000 + i, key=b"eu", value=b'{"region":"eu","n":%d}' % (base + i),
                     headers=[("h", b"%d" % i)] if i % 2 else [])
        raw = bytearray(b.build())
        raw[0:8] = base.to_bytes(8, "big")  # base offset (not covered by the CRC)
        if k == corrupt:
            raw[-3] ^= 0xFF
        out += bytes(raw)
    return out


def _records(data: bytes, fetch_offset: int, raw: bool, kind: type = _MemoryRecords) -> _PartitionRecords:
    """``kind``: the fetcher's (``_MemoryRecords``, which keeps the bytes for the CRC check in
    hardware) or aiokafka's own (``MemoryRecords``: aiokafka checks the CRC)."""
    deser = RawTopics(frozenset({"clicks"})) if raw else None
    return _PartitionRecords(TP, kind(data), [], fetch_offset, None, deser, True, fetcher.READ_UNCOMMITTED)


@pytest.mark.parametrize("fetch_offset", [100, 103, 110, 111, 131, 139])
def test_take_all_is_the_record_by_record_path(fetch_offset):
    # a fetch answer starts with the record batch that holds the fetch offset
    batches = [(b, n) for b, n in [(100, 10), (110, 1), (111, 25), (136, 4)] if b + n > fetch_offset]
    data = _fetch(batches)
    slow = _records(data, fetch_offset, raw=False)
    expected = list(slow)
    fast = _records(data, fetch_offset, raw=True)
    assert fast.raw and not slow.raw
    got = fast.take_all()
    assert [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in got] == \
        [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in expected]
    assert [r.offset for r in got] == list(range(fetch_offset, 140))
    assert fast.next_fetch_offset == slow.next_fetch_offset == 140


def test_the_fetcher_keeps_the_bytes_and_the_check_is_in_hardware():
    assert fetcher.MemoryRecords is _MemoryRecords
    assert consumer._crc32c is not None  # google-crc32c's compiled module (a dependency)
    data = _fetch([(0, 5)])
    assert _MemoryRecords(data).raw is data


@pytest.mark.parametrize("kind", [_MemoryRecords, MemoryRecords])
@pytest.mark.parametrize("corrupt", [0, 1, 2])
def test_take_all_refuses_a_corrupt_batch(kind, corrupt):
    data = _fetch([(0, 5), (5, 1), (6, 5)], corrupt=corrupt)
    with pytest.raises(Errors.CorruptRecordException):
        _records(data, 0, raw=True, kind=kind).take_all()
    assert [r.offset for r in _records(_fetch([(0, 5), (5, 1), (6, 5)]), 0, raw=True, kind=kind).take_all()] == \
        list(range(11))


@pytest.mark.parametrize("flip", [17, 20, 21, 40])
def test_a_batch_with_its_crc_or_attributes_changed_is_refused(flip):
    # bytes 17-20 are the CRC itself; from 21 (the attributes) on, what it covers
    data = bytearray(_fetch([(0, 3)]))
    data[flip] ^= 0x01
    with pytest.raises(Errors.CorruptRecordException):
        _records(bytes(data), 0, raw=True).take_all()


def test_a_truncated_last_batch_is_left_for_the_next_fetch():
    # a fetch answer may end inside a batch (the broker cuts at the size asked for)
    data = _fetch([(0, 4), (4, 6)])
    cut = data[:-7]
    recs = _records(cut, 0, raw=True)
    assert [r.offset for r in recs.take_all()] == [0, 1, 2, 3]
    assert recs.next_fetch_offset == 4


def test_other_topics_keep_consumer_records():
    deser = RawTopics(frozenset({"clicks"}))
    other = _PartitionRecords(TopicPartition("changelog", 0), MemoryRecords(_fetch([(0, 3)])), [], 0, None, deser,
                              True, fetcher.READ_UNCOMMITTED)
    assert not other.raw
    recs = list(other)
    assert [type(r).__name__ for r in recs] == ["ConsumerRecord"] * 3
    assert [r.value for r in recs] == [b'{"region":"eu","n":%d}' % i for i in range(3)]  # identity "deserializer"


# ---------------------------------------------------------------- transactions (read committed)
PID_A, PID_B = 7, 9  # two transactional producers (Kafka Connect's exactly-once source, Flink's sink)


def _txn_batch(base: int, n: int, producer_id: int = -1, transactional: bool = False,
               marker: int | None = None) -> bytes:
    """A v2 record batch at ``base``: ``n`` records of ``producer_id`` (-1: a producer that is
    not idempotent, as ingest's is not transactional), or with ``marker`` (0 abort, 1 commit)
    the control batch a transaction's end writes, built as the broker builds it."""
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=int(transactional or marker is not None),
                                  producer_id=producer_id, producer_epoch=0 if producer_id >= 0 else -1,
                                  base_sequence=0 if producer_id >= 0 else -1, batch_size=1 << 20)
    if marker is not None:
        b.append(0, timestamp=2000, key=(0).to_bytes(2, "big") + marker.to_bytes(2, "big"),
                 value=(0).to_bytes(2, "big") + (5).to_bytes(4, "big"), headers=[])
    else:
        for i in range(n):
            b.append(i, timestamp=1000 + i, key=b"eu", value=b'{"region":"eu","n":%d}' % (base + i), headers=[])
    raw = bytearray(b.build())
    raw[0:8] = base.to_bytes(8, "big")
    if marker is not None:  # the control flag (attributes bit 5), and the CRC-32C over the attributes on
        raw[22] |= 0x20
        raw[17:21] = google_crc32c.value(bytes(raw[21:])).to_bytes(4, "big")
    return bytes(raw)


# offsets 0-2 ingest's; 3-4 A's, aborted (marker 5); 6-7 B's, committed (marker 8); 9-10 ingest's;
# 11-12 A's retry, committed (13); 14-15 B's (16-17) and A's (18) interleaved, B aborts (19), A commits (20)
TXN_LOG = [(0, 3, -1, False, None), (3, 2, PID_A, True, None), (5, 0, PID_A, True, 0),
           (6, 2, PID_B, True, None), (8, 0, PID_B, True, 1), (9, 2, -1, False, None),
           (11, 2, PID_A, True, None), (13, 0, PID_A, True, 1),
           (14, 2, PID_B, True, None), (16, 2, PID_B, True, None), (18, 1, PID_A, True, None),
           (19, 0, PID_B, True, 0), (20, 0, PID_A, True, 1)]
TXN_ABORTED = [(PID_A, 3, 5), (PID_B, 14, 19)]  # aborted transactions: producer, first offset, its marker's
COMMITTED = [0, 1, 2, 6, 7, 9, 10, 11, 12, 18]


def _txn_records(fetch_offset: int, raw: bool, isolation: int = fetcher.READ_COMMITTED) -> _PartitionRecords:
    data = b"".join(_txn_batch(*b) for b in TXN_LOG if b[0] + max(b[1], 1) > fetch_offset)
    deser = RawTopics(frozenset({"clicks"})) if raw else None
    aborted = [(pid, first) for pid, first, end in TXN_ABORTED if end >= fetch_offset]  # as the broker answers
    return _PartitionRecords(TP, _MemoryRecords(data), aborted, fetch_offset, None, deser, True, isolation)


@pytest.mark.parametrize("fetch_offset", [0, 3, 6, 9, 14, 17])
def test_take_all_skips_aborted_transactions_as_aiokafka_does(fetch_offset):
    slow = _txn_records(fetch_offset, raw=False)
    expected = [r.offset for r in slow]
    fast = _txn_records(fetch_offset, raw=True)
    assert fast.raw  # read committed, the raw topics keep the fast path
    got = fast.take_all()
    assert [r.offset for r in got] == expected == [o for o in COMMITTED if o >= fetch_offset]
    assert fast.next_fetch_offset == slow.next_fetch_offset == 21  # past the last marker


def test_read_uncommitted_would_count_the_aborted_records():
    got = [r.offset for r in _txn_records(0, raw=True, isolation=fetcher.READ_UNCOMMITTED).take_all()]
    assert set(got) - set(COMMITTED) == {3, 4, 14, 15, 16, 17}


def test_a_fetch_of_markers_only_hands_nothing_and_moves_past_them():
    data = _txn_batch(3, 2, PID_A, True) + _txn_batch(5, 0, PID_A, True, marker=0) + \
        _txn_batch(6, 0, PID_B, True, marker=1)
    recs = _PartitionRecords(TP, _MemoryRecords(data), [(PID_A, 3)], 3, None, RawTopics(frozenset({"clicks"})),
                             True, fetcher.READ_COMMITTED)
    assert recs.take_all() == [] and recs.next_fetch_offset == 7


async def test_read_to_is_the_position_past_markers_once_the_records_handed_over_are_applied():
    """A log ending in a commit marker: the worker's state applies records up to 13 (the
    marker's offset), the consumer's position is 14, the end offset 14.  Caught up (the
    clock may close the quiet partition's last window) once the state has applied all it
    was handed, not before."""
    subscription = SubscriptionState()
    subscription.assign_from_user({TP})
    assignment = subscription.subscription.assignment
    state = assignment.state_value(TP)
    state.seek(9)
    consumer = SimpleNamespace(_subscription=subscription)
    data = b"".join(_txn_batch(*b) for b in TXN_LOG if 9 <= b[0] < 14)
    recs = _PartitionRecords(TP, _MemoryRecords(data), [], 9, None, RawTopics(frozenset({"clicks"})), True,
                             fetcher.READ_COMMITTED)
    got = _FetchResult(TP, assignment=assignment, partition_records=recs, backoff=0).getall()
    assert [r.offset for r in got] == [9, 10, 11, 12] and state.position == 14
    now = 1_000_000
    end = 14
    # fetched, not applied yet (the state at 9): not caught up
    assert read_to(consumer, TP, 9) == 9
    assert advance_target(now, now - 10_000, end, now, read_to(consumer, TP, 9), True) is None
    # applied (the state at 13): caught up, though no record is at 13
    assert read_to(consumer, TP, 13) == 14
    assert advance_target(now, now - 10_000, end, now, read_to(consumer, TP, 13), True) is not None
    # a fetch of an aborted transaction (14-15, marker 16) hands nothing: still caught up at 17
    data = _txn_batch(14, 2, PID_B, True) + _txn_batch(16, 0, PID_B, True, marker=0)
    recs = _PartitionRecords(TP, _MemoryRecords(data), [(PID_B, 14)], 14, None, RawTopics(frozenset({"clicks"})),
                             True, fetcher.READ_COMMITTED)
    assert _FetchResult(TP, assignment=assignment, partition_records=recs, backoff=0).getall() == []
    assert state.position == 17 and read_to(consumer, TP, 13) == 17
    # a seek back (a re-read, a log that started over) below the records handed over: the state's offset
    state.seek(12)
    assert read_to(consumer, TP, 13) == 13
    assert read_to(consumer, TopicPartition("clicks", 5), 4) == 4  # not assigned


def _getall(assignment, data: bytes, fetch_offset: int, aborted: list | None = None) -> list[int]:
    recs = _PartitionRecords(TP, _MemoryRecords(data), aborted or [], fetch_offset, None,
                             RawTopics(frozenset({"clicks"})), True, fetcher.READ_COMMITTED)
    return [r.offset for r in _FetchResult(TP, assignment=assignment, partition_records=recs, backoff=0).getall()]


async def test_read_from_says_what_was_read_before_a_batch_and_what_moved_the_position():
    """The exact rule for a batch past the state's offset (worker.sourcecheck._gap): the
    offsets the consumer read before it without a record (markers, aborted batches) are
    explained; a position moved by an offset reset, after the worker's seek or not, is told."""
    subscription = SubscriptionState()
    subscription.assign_from_user({TP})
    assignment = subscription.subscription.assignment
    state = assignment.state_value(TP)
    kafka = SimpleNamespace(_subscription=subscription, seek=subscription.seek)
    thread = SimpleNamespace(_ensure_consumer=lambda: kafka)
    state.seek(9)
    assert consumer.read_from(kafka, TP) is None  # nothing handed over yet
    assert _getall(assignment, b"".join(_txn_batch(*b) for b in TXN_LOG if 9 <= b[0] < 14), 9) == [9, 10, 11, 12]
    assert consumer.read_from(kafka, TP) == (9, None)
    # read on: B's aborted batches 14-17, then A's 18: the offsets 13..17 were read, no record
    data = b"".join(_txn_batch(*b) for b in TXN_LOG if b[0] >= 14)
    assert _getall(assignment, data, 14, [(PID_B, 14)]) == [18] and state.position == 21
    assert consumer.read_from(kafka, TP) == (13, None)
    # a fetch of markers only, then records: read on over it
    assert _getall(assignment, _txn_batch(21, 0, PID_A, True, marker=1), 21) == []
    assert _getall(assignment, _txn_batch(22, 3), 22) == [22, 23, 24]
    assert consumer.read_from(kafka, TP) == (19, None)
    # an offset reset (out of range) moves the position: nothing before it was read
    state.await_reset(1)
    state.reset_to(40)
    assert _getall(assignment, _txn_batch(40, 3), 40) == [40, 41, 42]
    assert consumer.read_from(kafka, TP) == (40, None)
    # the batch sent back to its first record (unfetch, a batch not counted): read as before
    kafka.seek(TP, 40)
    assert _getall(assignment, _txn_batch(40, 3), 40) == [40, 41, 42]
    assert consumer.read_from(kafka, TP) == (40, None)
    # the worker's seek to 25, and the reset again: the read after that seek jumped
    await consumer._ConsumerThread.seek_here(thread, TP, 25)
    state.await_reset(1)
    state.reset_to(40)
    assert _getall(assignment, _txn_batch(40, 3), 40) == [40, 41, 42]
    assert consumer.read_from(kafka, TP) == (40, 25)
    # the worker's seek that takes: read from there
    await consumer._ConsumerThread.seek_here(thread, TP, 30)
    assert _getall(assignment, _txn_batch(30, 0, PID_A, True, marker=1) + _txn_batch(31, 2), 30) == [31, 32]
    assert consumer.read_from(kafka, TP) == (30, 30)
