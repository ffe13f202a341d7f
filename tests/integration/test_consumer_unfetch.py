"""Records the worker's consumer fetched but did not hand over (a rebalance stopped the flow
under the fetch, or the partition was paused since) are fetched again, unless something
moved the partition's position since the fetch, such as Faust's recovery seeking a
changelog (worker/consumer.py ``unfetch``).  Faust drops them.  A changelog fetched and
dropped that way under a recovery left it waiting forever for records already read past:
the survivor of a worker SIGKILLed during a rebalance never counted again.

A real consumer on the suite's broker: aiokafka's positions and seeks are what is tested."""
from __future__ import annotations

import asyncio

import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS as TOPIC
from aggregator.worker.consumer import _NeverEmpty, positions, unfetch

pytestmark = pytest.mark.integration


async def _run(bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    tp = TopicPartition(TOPIC, 0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(TOPIC, b"%d" % i, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])

        async def fetch() -> list[int]:
            got = await consumer.getmany(tp, timeout_ms=10_000)
            return [r.offset for r in got.get(tp, [])]

        first = await fetch()
        assert first and first[0] == 0
        left = positions(consumer, [tp])
        assert left == {tp: first[-1] + 1}

        # nothing moved it since: the same records come again
        assert unfetch(consumer, left, {tp: first[0]}) == [tp]
        assert positions(consumer, [tp]) == {tp: 0}
        assert (await fetch())[: len(first)] == first

        # a seek since the fetch (Faust's recovery) stands
        left = positions(consumer, [tp])
        consumer.seek(tp, 7)
        assert unfetch(consumer, left, {tp: 0}) == []
        assert positions(consumer, [tp]) == {tp: 7}
        assert (await fetch())[0] == 7

        # Faust's set of active partitions emptied by a rebalance under a fetch in flight:
        # given as it is, aiokafka hands out every partition's records; through the view, none
        consumer.seek(tp, 0)
        fetcher = consumer._fetcher
        for _ in range(200):  # until the fetcher holds records of the partition (10 s at most)
            if tp in fetcher._records:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the fetcher held no records of the partition after 10 s")
        assert await fetcher.fetched_records(_NeverEmpty(set()), timeout=0.5) == {}
        assert positions(consumer, [tp]) == {tp: 0}
        assert (await fetcher.fetched_records(set(), timeout=0.5))[tp][0].offset == 0

        # a partition no longer assigned has no position: nothing to seek
        left = positions(consumer, [tp])
        consumer.assign([TopicPartition(TOPIC, 1)])
        assert positions(consumer, [tp]) == {tp: None}
        assert unfetch(consumer, left, {tp: 0}) == []
    finally:
        await consumer.stop()


def test_records_not_handed_over_are_fetched_again_unless_a_seek_came_since(broker):
    asyncio.run(ensure_topics(broker.bootstrap, 2))
    asyncio.run(_run(broker.bootstrap))


async def _seek_in_thread(bootstrap: str) -> None:
    import threading

    import faust

    from aggregator.config import Settings
    from aggregator.worker.consumer import BatchConsumer
    from aggregator.worker.faust_app import FaustApp

    consumer = FaustApp(Settings(broker=f"kafka://{bootstrap}")).app.consumer
    assert isinstance(consumer, BatchConsumer)
    thread = consumer._thread
    await thread.start()
    try:
        aio = thread._ensure_consumer()
        tp = faust.types.TP(TOPIC, 0)
        await thread.call_thread(aio.assign, [tp])
        seeks: list[tuple[int, object, int]] = []
        real_seek = aio.seek

        def seek(p: object, offset: int) -> None:  # the real seek, noting the thread it ran in
            seeks.append((threading.get_ident(), p, offset))
            real_seek(p, offset)

        aio.seek = seek
        await consumer.seek_quietly(tp, 3)
        assert seeks == [(thread._thread.ident, tp, 3)]  # the consumer's thread, not this one
        assert thread._thread.ident != threading.get_ident()
        assert positions(aio, [tp]) == {tp: 3}
        assert consumer._read_offset[tp] == 3  # Faust's own bookkeeping, as its seek keeps it
        # a partition not assigned: refused in the consumer's thread, quietly
        await consumer.seek_quietly(faust.types.TP(TOPIC, 1), 5)
        assert len(seeks) == 2 and positions(aio, [tp]) == {tp: 3}
    finally:
        await thread.stop()


def test_the_workers_own_seeks_run_in_the_consumers_thread(broker):
    """Re-reads and batch re-fetches seek through ``seek_quietly``: aiokafka's seek drops the
    fetcher's records and wakes its waiter, state of the consumer's thread, and a seek from
    the main thread could fall between ``unfetch``'s look at a position and its seek."""
    asyncio.run(ensure_topics(broker.bootstrap, 2))
    asyncio.run(_seek_in_thread(broker.bootstrap))
