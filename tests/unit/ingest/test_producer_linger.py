"""AGG_INGEST_LINGER_MS: a record batch opened while its partition's pump is idle waits
until it is that old before it goes, so that requests a few milliseconds apart share one
batch (the embedded broker's fetches cost per batch it holds: docs/performance.md).  With
0 each such request is sent at once, in its own batch."""
from __future__ import annotations

import asyncio

from aiokafka.producer.message_accumulator import BatchBuilder

from aggregator.ingest.producer import BatchProducer


class _Broker:
    """What BatchProducer uses of aiokafka's producer: real batches, acknowledged at once;
    ``sent`` holds (loop time, records) of each batch handed over."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, int]] = []

    class client:
        class cluster:
            @staticmethod
            def partitions_for_topic(topic):
                return {0}

    @staticmethod
    def create_batch():
        return BatchBuilder(1 << 20, 0)

    async def send_batch(self, batch, topic, partition):
        self.sent.append((asyncio.get_running_loop().time(), batch.record_count()))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def _turns(n: int = 5) -> None:
    """A few turns of the event loop, no time: what is sent "at once" is sent after them."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_requests_within_the_linger_share_one_batch():
    async def run() -> list[tuple[float, int]]:
        broker = _Broker()
        batcher = BatchProducer(broker, "clicks", linger_s=0.2)
        await batcher.ensure_metadata()
        t0 = asyncio.get_running_loop().time()
        waits: set = set()
        for _ in range(3):
            waits |= batcher.submit({"eu": [(b"{}", [])] * 10}, 0)
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        return [(t - t0, n) for t, n in broker.sent]

    sent = asyncio.run(run())
    assert [n for _, n in sent] == [30]
    assert sent[0][0] >= 0.2  # it waited for its age, not for a full batch


def test_without_linger_each_request_goes_at_once():
    async def run() -> None:
        broker = _Broker()
        batcher = BatchProducer(broker, "clicks", linger_s=0.0)
        await batcher.ensure_metadata()
        for k in range(1, 4):
            waits = batcher.submit({"eu": [(b"{}", [])] * 10}, 0)
            await _turns()
            # sent and acknowledged before any time passed: in its own batch, none shared
            assert [n for _, n in broker.sent] == [10] * k and all(w.done() for w in waits)

    asyncio.run(run())


def test_a_lingering_batch_is_handed_over_at_once_on_stop():
    async def run() -> None:
        broker = _Broker()
        batcher = BatchProducer(broker, "clicks", linger_s=30.0)
        await batcher.ensure_metadata()
        waits = batcher.submit({"eu": [(b"{}", [])] * 10}, 0)
        await asyncio.sleep(0.01)
        assert broker.sent == []  # lingering
        stopping = asyncio.ensure_future(batcher.hand_over(5.0))
        await _turns()
        # handed over and acknowledged within a few turns of the loop, not after the 30 s
        assert [n for _, n in broker.sent] == [10] and all(w.done() for w in waits)
        assert stopping.done()
        await stopping

    asyncio.run(run())


def test_a_full_batch_does_not_linger():
    async def run() -> list[int]:
        broker = _Broker()
        batcher = BatchProducer(broker, "clicks", linger_s=30.0)
        await batcher.ensure_metadata()
        waits = batcher.submit({"eu": [(b"x" * 1000, [])] * 10}, 0)  # lingers
        await asyncio.sleep(0.01)
        waits |= batcher.submit({"eu": [(b"x" * 1000, [])] * 1100}, 0)  # fills it past 1 MiB
        await asyncio.sleep(0.05)
        return [n for _, n in broker.sent]

    sent = asyncio.run(run())
    assert sent and sum(sent) > 1000  # the full batch went without waiting out the 30 s
