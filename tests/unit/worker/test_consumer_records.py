"""The worker's consumer takes a raw topic's fetched records a whole record batch at a
time (worker/consumer.py); it must give what aiokafka's record-by-record path gives."""
from __future__ import annotations

import aiokafka.errors as Errors
import pytest
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from aggregator.worker import consumer
from aggregator.worker.consumer import RawTopics, _MemoryRecords, _PartitionRecords

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
