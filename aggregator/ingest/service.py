"""``aggregator run --role ingest``: the HTTP ingest on its own, without the worker.

``aggregator run`` (role ``all``) serves ingest and runs the worker in one process, one
interpreter lock for both.  Under heavy HTTP load, run ingest processes apart (as many as
the load needs, behind a load balancer) and workers with ``--role worker`` (as many as
``clicks`` has partitions): Kafka sits between them, nothing else is shared.

This process serves ``POST /v1/events``, ``/metrics`` (its own ingest figures:
``clickstream_events_ingested_total``, ``clickstream_rejected_events_total``, the ingest
stage), ``/healthz`` and ``/readyz`` (ready once the broker has told it the partitions of
``clicks``).  ``/v1/snapshots`` is empty here: snapshots come from the workers.  SIGTERM:
stop listening, finish the requests in flight, flush the producer, exit.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from aggregator.core.contract import CLICKS
from aggregator.config import Settings
from aggregator.metrics import Metrics
from aggregator.ingest.producer import ingest_producer
from aggregator.core.snapshots import SnapshotStore
from aggregator.web.server import WebService

log = logging.getLogger("aggregator.ingest")
RETRY_S = 1.0


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    producer = ingest_producer(settings.bootstrap())
    state = {"ready": False}
    web = WebService(settings, Metrics(), SnapshotStore(maxlen=1), lambda: state["ready"], producer)
    await web.start()
    try:
        while not stop.is_set():  # the broker may come up after us: keep trying, /readyz says 503
            try:
                await producer.start()
                if await producer.partitions_for(CLICKS):
                    break
            except Exception as exc:  # noqa: BLE001
                log.warning("ingest: broker not reachable yet (%r); retrying", exc)
            try:
                await asyncio.wait_for(stop.wait(), RETRY_S)
            except asyncio.TimeoutError:
                pass
        state["ready"] = not stop.is_set()
        if state["ready"]:
            log.info("ingest ready: producing to %s on %s", CLICKS, settings.broker)
        await stop.wait()
        log.info("ingest: stopping (finishing requests in flight)")
    finally:
        state["ready"] = False
        await web.stop()        # stops listening, waits for the handlers in flight
        await producer.stop()   # sends what is still batched
