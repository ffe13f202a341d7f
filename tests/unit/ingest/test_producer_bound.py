"""The ingest producer's queue for a stalled broker is bounded over all partitions: the
records of requests answered 503 (the broker may still store them, so they are not taken
back) stay in the producer, outside the in-flight budget, so they need a bound of their
own.  Before, each partition could hold 32 full batches of 1 MiB: 8 regions on 4
partitions of a broker that never answers held 128 MiB."""
from __future__ import annotations

import asyncio

from aiokafka.producer.message_accumulator import BatchBuilder

from aggregator.ingest.producer import MAX_SEALED_TOTAL, BatchProducer, ProducerBusy


class _Stalled:
    """What BatchProducer uses of aiokafka's producer, for a broker that takes nothing."""

    class client:
        class cluster:
            @staticmethod
            def partitions_for_topic(topic):
                return {0, 1, 2, 3}

    @staticmethod
    def create_batch():
        return BatchBuilder(1 << 20, 0)

    @staticmethod
    async def send_batch(batch, topic, partition):
        await asyncio.Event().wait()  # never taken


def test_batches_waiting_for_a_stalled_broker_are_bounded_over_all_partitions():
    async def run() -> tuple[int, int]:
        batcher = BatchProducer(_Stalled(), "clicks")
        await batcher.ensure_metadata()
        value = b"x" * 1000
        refused = 0
        for _ in range(200):  # requests of 8 regions x 500 records (4 MB), answered 503 on a timeout
            try:
                batcher.submit({f"r{i}": [(value, [])] * 500 for i in range(8)}, 0)
            except ProducerBusy:
                refused += 1
            await asyncio.sleep(0)
        held = sum(len(p.sealed) + (p.batch is not None) for p in batcher.pumps.values())
        for p in batcher.pumps.values():
            if p.task is not None:
                p.task.cancel()
        return held, refused

    held, refused = asyncio.run(run())
    assert refused > 0
    # at most the bound, plus what one request seals after the check and an open batch a partition
    assert held <= MAX_SEALED_TOTAL + 8 + 4, held


class _OneStalled(_Stalled):
    """A broker whose leader of partition 0 takes nothing; the others take everything at once."""

    @staticmethod
    async def send_batch(batch, topic, partition):
        if partition == 0:
            await asyncio.Event().wait()
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def test_one_stalled_partition_does_not_refuse_the_healthy_ones():
    """The bound over all partitions refuses only what would add to a partition with
    batches waiting: with one partition's leader stuck, ingest goes on for the others."""

    async def run() -> tuple[list[str], int]:
        batcher = BatchProducer(_OneStalled(), "clicks", max_sealed_total=4)
        await batcher.ensure_metadata()
        stuck = next(r for r in (f"r{i}" for i in range(100)) if batcher.partition_of(r) == 0)
        healthy = next(r for r in (f"r{i}" for i in range(100)) if batcher.partition_of(r) != 0)
        value = b"x" * 1000
        refused: list[str] = []
        taken = 0
        for _ in range(60):
            for region in (stuck, healthy):
                try:
                    batcher.submit({region: [(value, [])] * 2000}, 0)  # 2 MB: sealed batches
                    taken += region == healthy
                except ProducerBusy:
                    refused.append(region)
                for _ in range(5):
                    await asyncio.sleep(0)  # the healthy partition's pump hands its batches over
        for p in batcher.pumps.values():
            if p.task is not None:
                p.task.cancel()
        return refused, taken

    refused, taken = asyncio.run(run())
    assert refused and set(refused) == {refused[0]}  # only the stalled partition's region
    assert taken == 60


def test_a_request_on_a_stalled_partition_gives_up_while_the_others_move(monkeypatch):
    """A request waits for its acknowledgements while the broker takes batches of its own
    partitions, not anyone's: with partition 0's leader stuck and other requests flowing,
    one on partition 0 is answered 503 (TimeoutError here) after INGEST_TIMEOUT_S, not never."""
    from types import SimpleNamespace

    import pytest

    from aggregator.ingest import handler
    from aggregator.metrics import Metrics

    monkeypatch.setattr(handler, "INGEST_TIMEOUT_S", 0.3)

    async def run() -> None:
        batcher = BatchProducer(_OneStalled(), "clicks")
        await batcher.ensure_metadata()
        h = handler.IngestHandler(SimpleNamespace(batcher=batcher), Metrics(), "", 1 << 20, 10)  # type: ignore[arg-type]
        stuck = next(r for r in (f"r{i}" for i in range(100)) if batcher.partition_of(r) == 0)
        healthy = next(r for r in (f"r{i}" for i in range(100)) if batcher.partition_of(r) != 0)
        waits = batcher.submit({stuck: [(b"x", [])]}, 0)

        async def others() -> None:
            while True:
                batcher.submit({healthy: [(b"y", [])]}, 0)
                await asyncio.sleep(0.02)

        flowing = asyncio.create_task(others())
        try:
            # the handler's own TimeoutError, not wait_for's: it gave up while the others moved
            with pytest.raises(TimeoutError, match="acknowledged nothing"):
                await asyncio.wait_for(h._acknowledged(waits, [stuck]), 5)
        finally:
            flowing.cancel()
            for p in batcher.pumps.values():
                if p.task is not None:
                    p.task.cancel()

    asyncio.run(run())
