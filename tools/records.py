"""Real fetched records, for the worker's unit tests and tools/worker_micro.py: v2 record
batches built with aiokafka's builder and read back through the worker consumer's raw path,
so the objects are the ones a live fetch hands to the decoder."""
from __future__ import annotations

from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from aggregator.worker.consumer import RawTopics, _PartitionRecords

Spec = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def fetched(specs: list[Spec], base: int = 0, timestamp: int = 1_000, log_append: bool = False) -> list:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 22)
    for i, (key, value, headers) in enumerate(specs):
        b.append(i, timestamp=timestamp + i, key=key, value=value, headers=headers)
    raw = bytearray(b.build())
    raw[0:8] = base.to_bytes(8, "big")  # base offset (not covered by the CRC)
    if log_append:
        # attributes (int16 at byte 21): bit 3 = timestamp type LogAppendTime; covered by the CRC
        raw[22] |= 0x08
        raw[17:21] = calc_crc32c(bytes(raw[21:])).to_bytes(4, "big")
    tp = TopicPartition("clicks", 0)
    recs = _PartitionRecords(tp, MemoryRecords(bytes(raw)), [], base, None, RawTopics(frozenset({"clicks"})), True,
                             fetcher.READ_UNCOMMITTED)
    return recs.take_all()
