"""Group commit of ingest records into Kafka record batches, one pump per partition.

Concurrent ``POST /v1/events`` requests append their records (synchronously, no await per
record) to the open record batch of each partition they touch and wait for that batch's
delivery future.  A pump task per partition hands the open batch to aiokafka
(``send_batch``) as soon as aiokafka can take another batch for the partition; records
arriving meanwhile go into the next open batch.  So under load one produce request carries
the records of every request that arrived during the previous round trip, instead of one
batch per request and partition (aiokafka keeps at most one pending batch per partition,
so per-request batches queue behind each other, one round trip each).  A batch opened while
the pump is idle waits until it is ``linger_s`` old (AGG_INGEST_LINGER_MS) before it goes, so
that requests a few milliseconds apart share it: the embedded broker's fetches cost a little
per record batch it holds (docs/performance.md).  On Kafka it only adds latency: 0 by default.

aiokafka's ``DefaultPartitioner`` picks the partition of each region (murmur2 of the key,
like the Java client), computed once per region: the same region lands in the same
partition as it would from any other producer with default settings.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import DefaultPartitioner

from aggregator.background import BackgroundService
from aggregator.core.contract import CLICKS

log = logging.getLogger("aggregator.ingest")
_PARTITIONER = DefaultPartitioner()
RETRY_S = 1.0  # between attempts to reach the broker
# full batches (1 MiB each at most) waiting for a stalled broker, over all partitions: the
# records of requests already answered 503 stay in them (they may still be stored), outside
# the in-flight budget, so they have a bound of their own
MAX_SEALED_TOTAL = 64
STOP_HAND_OVER_S = 5.0  # on stop, how long the pumps may take to hand their batches over


def ingest_producer(bootstrap: str, idempotent: bool = False, **client: Any) -> AIOKafkaProducer:
    """The producer behind ``POST /v1/events``: acks from every in-sync replica before a
    request is answered 200, batches up to 1 MiB, a 5 s request timeout (then 503).
    ``idempotent``: Kafka's idempotent producer (producer id and sequence numbers), so
    that the client library's own retries of a batch store it once; Tansu, the embedded
    broker, refuses it (InitProducerId), and there a batch retried after a lost answer can
    be stored twice, which the worker drops for events with a dedup id (core.dedup).
    ``client``: more aiokafka settings (TLS/SASL: ``KafkaSecurity.aiokafka_kwargs()``)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20,
                            request_timeout_ms=5000, enable_idempotence=idempotent, **client)


class ProducerBusy(Exception):
    """Too many batches wait for the broker: refuse new records instead of queueing them."""


class _Pump:
    __slots__ = ("producer", "topic", "partition", "batch", "done", "sealed", "task", "max_sealed", "sent",
                 "linger_s", "opened", "nap")

    def __init__(self, producer: Any, topic: str, partition: int, max_sealed: int, linger_s: float = 0.0) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.batch: Any = None              # open BatchBuilder, being filled
        self.done: asyncio.Future | None = None  # resolved when the open batch is delivered
        self.sealed: collections.deque = collections.deque()  # full batches waiting: (batch, done)
        self.task: asyncio.Task | None = None
        self.max_sealed = max_sealed
        self.sent = 0  # batches aiokafka has taken (it takes one when the previous one is delivered)
        self.linger_s = linger_s
        self.opened = 0.0  # loop time the open batch got its first record
        self.nap: asyncio.Future | None = None  # while the open batch lingers: resolved to end it early

    def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self.batch = self.producer.create_batch()
        self.done = loop.create_future()
        self.opened = loop.time()

    def append(self, key: bytes, values: Iterable[tuple[bytes, list]], timestamp: int, waits: set) -> None:
        if self.batch is None:
            self._open()
        append = self.batch.append
        for value, headers in values:
            if append(timestamp=timestamp, key=key, value=value, headers=headers) is None:
                # full: queue it for the pump, go on in a new batch
                waits.add(self.done)
                self.sealed.append((self.batch, self.done))
                if self.nap is not None:  # a full batch goes at once
                    _wake(self.nap)
                self._open()
                append = self.batch.append
                if append(timestamp=timestamp, key=key, value=value, headers=headers) is None:
                    raise ValueError("a record is larger than the producer's batch size")
        waits.add(self.done)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                if self.sealed:
                    batch, done = self.sealed.popleft()
                elif self.batch is not None:
                    # lingers only when young: one opened while a batch was in flight has
                    # waited its round trip, and a full one is sealed (above) at once
                    loop = asyncio.get_running_loop()
                    wait = self.opened + self.linger_s - loop.time()
                    if wait > 0:
                        nap = self.nap = loop.create_future()
                        timer = loop.call_later(wait, _wake, nap)
                        try:
                            await nap
                        finally:
                            timer.cancel()
                            self.nap = None
                        continue
                    batch, done = self.batch, self.done
                    self.batch = self.done = None
                else:
                    return
                batch.close()
                try:
                    # waits (bounded by the producer's request timeout) until aiokafka can
                    # take another batch for this partition; meanwhile records gather in
                    # the next open batch
                    delivery = await self.producer.send_batch(batch, self.topic, partition=self.partition)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    _settle(done, exc)
                    continue
                self.sent += 1
                delivery.add_done_callback(lambda f, done=done: _settle(done, f))
        finally:
            self.task = None

    def stop_lingering(self) -> None:
        self.linger_s = 0.0
        if self.nap is not None:
            _wake(self.nap)

    @property
    def busy(self) -> bool:
        return len(self.sealed) >= self.max_sealed


def _wake(nap: asyncio.Future) -> None:
    if not nap.done():
        nap.set_result(None)


def _settle(done: asyncio.Future, outcome: Any) -> None:
    if done.done():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    elif outcome.cancelled():
        done.set_exception(asyncio.CancelledError())
    elif outcome.exception() is not None:
        done.set_exception(outcome.exception())
    else:
        done.set_result(None)
        return
    # the requests that waited may have timed out already: mark the exception as retrieved
    # so asyncio does not log "exception was never retrieved" for it
    done.exception()


class BatchProducer:
    """Routes records of a topic to per-partition pumps; see the module doc."""

    def __init__(self, producer: Any, topic: str, max_sealed: int = 32, max_sealed_total: int = MAX_SEALED_TOTAL,
                 linger_s: float = 0.0) -> None:
        self.producer = producer
        self.linger_s = linger_s
        self.topic = topic
        self.max_sealed = max_sealed  # full batches waiting, per partition
        self.max_sealed_total = max_sealed_total  # and over all partitions
        self.parts: list[int] = []
        self.route: dict[str, tuple[bytes, _Pump]] = {}  # region -> (key, pump of its partition)
        self.pumps: dict[int, _Pump] = {}

    def _partitions(self) -> list[int] | None:
        parts = self.producer.client.cluster.partitions_for_topic(self.topic)
        if not parts:
            return None
        if len(parts) != len(self.parts):
            self.parts = sorted(parts)
            self.route.clear()  # partition count changed: look every region up again
        return self.parts

    def has_metadata(self) -> bool:
        """The partitions of the topic are known (refreshes the cached list; no await)."""
        return self._partitions() is not None

    async def ensure_metadata(self) -> None:
        if self._partitions() is None:
            await self.producer.partitions_for(self.topic)
            if self._partitions() is None:
                raise RuntimeError(f"no partitions known for {self.topic}")

    def _route(self, region: str) -> tuple[bytes, _Pump]:
        key = region.encode()
        partition = _PARTITIONER(key, self.parts, self.parts)
        pump = self.pumps.get(partition)
        if pump is None:
            pump = self.pumps[partition] = _Pump(self.producer, self.topic, partition, self.max_sealed, self.linger_s)
        route = self.route[region] = (key, pump)
        return route

    def forget(self, regions: Iterable[str]) -> None:
        """Regions ingest no longer lets through (idle at its cap): their routes go, so the
        routes follow the regions let through, not every region ever seen."""
        for region in regions:
            self.route.pop(region, None)

    def progress(self, partitions: Collection[int]) -> int:
        """Batches of ``partitions`` handed to the broker so far: a request that waits for
        room or for its acknowledgements gives up only when this (of its own partitions)
        has not moved for a while."""
        return sum(p.sent for n, p in self.pumps.items() if n in partitions)

    def partition_of(self, region: str) -> int:
        return (self.route.get(region) or self._route(region))[1].partition

    def submit(self, by_region: Mapping[str, Iterable[tuple[bytes, list]]], timestamp: int) -> set[asyncio.Future]:
        """Append every region's ``(value, headers)`` (an iterable, consumed once, after the
        busy check) (already ``ensure_metadata``); returns the delivery
        futures to wait for.  Raises ``ProducerBusy`` before appending anything when a
        partition has too many batches waiting."""
        route = self.route
        routes = [(route.get(region) or self._route(region), values) for region, values in by_region.items()]
        for (_, pump), _ in routes:
            if pump.busy:
                raise ProducerBusy(f"partition {pump.partition} has {len(pump.sealed)} batches waiting")
        # over all partitions too, but only a request that would add to a partition with
        # batches waiting already: one stalled partition must not refuse the healthy ones
        if any(pump.sealed for (_, pump), _ in routes):
            waiting = sum(len(p.sealed) for p in self.pumps.values())  # a few partitions: once a request
            if waiting >= self.max_sealed_total:
                raise ProducerBusy(f"{waiting} batches wait for the broker")
        waits: set[asyncio.Future] = set()
        for (key, pump), values in routes:
            pump.append(key, values, timestamp, waits)
        return waits

    async def hand_over(self, within_s: float) -> None:
        """Stop lingering and wait (up to ``within_s``) until every pump has handed its
        batches to aiokafka, whose ``stop`` then sends them."""
        self.linger_s = 0.0
        for pump in self.pumps.values():
            pump.stop_lingering()
        tasks = [p.task for p in self.pumps.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=within_s)


class IngestProducer(BackgroundService):
    """The producer behind ``POST /v1/events`` as a service: it connects in the background
    (the broker may come up after us; until then ``ready`` is False and requests get
    503) and, on stop, sends what is still batched."""

    def __init__(self, bootstrap: str, client: dict[str, Any] | None = None, idempotent: bool = False,
                 linger_s: float = 0.0, on_idempotence: Callable[[bool], None] = lambda on: None,
                 topic: str = CLICKS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bootstrap = bootstrap
        self.topic = topic  # ``clicks``, AGG_TOPIC_PREFIX before it
        self.linger_s = linger_s
        self.client = client or {}  # more aiokafka settings (TLS/SASL)
        self.idempotent = idempotent
        self.on_idempotence = on_idempotence  # told whether records go out idempotent (a gauge)
        # made in on_start: aiokafka's producer binds to the running event loop
        self.producer: AIOKafkaProducer | None = None
        self.batcher: BatchProducer | None = None
        self.ready = False
        self.refused: str | None = None  # why the broker refuses ingest's writes (its ACLs), for /readyz

    def refusing(self, exc: BaseException) -> str | None:
        """The reason to answer, when ``exc`` (a request's records not acknowledged) is an
        authorization error the broker would answer again: said in one error line when it
        starts, and by /readyz until a batch is acknowledged again; None for another error."""
        if not isinstance(exc, (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)):
            return None
        reason = (f"the broker refuses ingest's writes to {self.topic} ({type(exc).__name__}): grant this "
                  f"principal Write on topic {self.topic} (README, ACLs)")
        if self.refused is None:
            log.error("ingest: %s; requests are answered 503 and /readyz says so until it may", reason)
        self.refused = reason
        return reason

    def acknowledged(self) -> None:
        """A request's records were acknowledged: the broker takes ingest's writes."""
        if self.refused is not None:
            self.refused = None
            log.warning("ingest: the broker takes ingest's writes to %s again", self.topic)

    async def on_start(self) -> None:
        self.producer = ingest_producer(self.bootstrap, self.idempotent, **self.client)
        self.batcher = BatchProducer(self.producer, self.topic, linger_s=self.linger_s)
        await super().on_start()

    async def background(self) -> None:
        """Connect, retrying every RETRY_S, until the broker knows ``clicks``."""
        assert self.producer is not None
        self.on_idempotence(self.idempotent)
        while True:
            try:
                try:
                    await self.producer.start()
                except BrokerResponseError as exc:
                    # the broker's answer to a producer id request (start asks for one): an error
                    # it would answer again (authorisation, a version it lacks) -- go on without
                    if not (self.idempotent and not exc.retriable):
                        raise
                    log.error("ingest: the broker refused Kafka's idempotent producer (%r): producing without "
                              "it, so a batch the client library retries after a lost answer can be stored twice "
                              "(events with an Idempotency-Key or event_id are still counted once); "
                              "clickstream_ingest_idempotent_producer is 0", exc)
                    await self._without_idempotence()
                    continue
                if await self.producer.partitions_for(self.topic):
                    self.ready = True
                    log.info("ingest ready: producing to %s", self.topic)
                    return
            except (KafkaConnectionError, TimeoutError) as exc:
                log.warning("ingest: broker not reachable yet (%r); retrying", exc)
            except Exception as exc:  # noqa: BLE001 - any other failure (clicks not created yet ...): not ready yet
                log.warning("ingest: broker not ready yet (%r); retrying", exc)
            await asyncio.sleep(RETRY_S)

    async def _without_idempotence(self) -> None:
        assert self.producer is not None
        try:
            await self.producer.stop()
        except Exception:  # noqa: BLE001 - it never started: nothing to stop
            pass
        self.idempotent = False
        self.on_idempotence(False)
        self.producer = ingest_producer(self.bootstrap, False, **self.client)
        self.batcher = BatchProducer(self.producer, self.topic, linger_s=self.linger_s)

    async def on_stop(self) -> None:
        log.info("ingest: stopping (sending what is still batched)")
        self.ready = False
        await super().on_stop()  # no connect attempt overlaps the stop below
        if self.batcher is not None:
            await self.batcher.hand_over(STOP_HAND_OVER_S)
        if self.producer is not None:
            await self.producer.stop()  # sends what is still batched
