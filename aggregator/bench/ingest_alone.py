"""The HTTP ingest routes alone, without the worker: ``WebService`` with an aiokafka
producer configured like the one ``aggregator run`` gives it (aggregator/worker/app.py).

    python -m aggregator.bench.ingest_alone kafka://127.0.0.1:9092 8080

``aggregator run`` serves ingest and runs the worker in one process (one GIL, one event
loop); this isolates what the ingest path itself can do on this machine.
"""
from __future__ import annotations

import asyncio
import sys

from aiokafka import AIOKafkaProducer

from aggregator.config import Settings
from aggregator.web.metrics import Metrics
from aggregator.web.server import SnapshotStore, WebService


async def serve(broker: str, port: int) -> None:
    s = Settings(broker=broker, web_port=port)
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap(), acks="all", linger_ms=5, max_batch_size=1 << 20,
                                request_timeout_ms=5000, enable_idempotence=False)
    await producer.start()
    web = WebService(s, Metrics(), SnapshotStore(), lambda: True, producer)
    await web.start()
    try:
        await asyncio.Event().wait()
    finally:
        await web.stop()
        await producer.stop()


if __name__ == "__main__":
    try:
        asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
