"""The worker's consumer takes a raw topic's fetched records a whole record batch at a
time (worker/consumer.py); it must give what aiokafka's record-by-record path gives."""
from __future__ import annotations

import aiokafka.errors as Errors
import pytest
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from aggregator.worker.consumer import RawTopics, _PartitionRecords

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


def _records(data: bytes, fetch_offset: int, raw: bool) -> _PartitionRecords:
    deser = RawTopics(frozenset({"clicks"})) if raw else None
    return _PartitionRecords(TP, MemoryRecords(data), [], fetch_offset, None, deser, True, fetcher.READ_UNCOMMITTED)


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


def test_take_all_refuses_a_corrupt_batch():
    data = _fetch([(0, 5), (5, 5)], corrupt=1)
    with pytest.raises(Errors.CorruptRecordException):
        _records(data, 0, raw=True).take_all()


def test_other_topics_keep_consumer_records():
    deser = RawTopics(frozenset({"clicks"}))
    other = _PartitionRecords(TopicPartition("changelog", 0), MemoryRecords(_fetch([(0, 3)])), [], 0, None, deser,
                              True, fetcher.READ_UNCOMMITTED)
    assert not other.raw
    recs = list(other)
    assert [type(r).__name__ for r in recs] == ["ConsumerRecord"] * 3
    assert [r.value for r in recs] == [b'{"region":"eu","n":%d}' % i for i in range(3)]  # identity "deserializer"
