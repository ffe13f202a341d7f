"""The snapshot view behind ``GET /v1/snapshots``, fed from ``click-snapshots``.

A worker used to list only what it had published itself since it started: after a
restart the windows published just before the crash were gone from the view, and with
several workers each listed only its own partitions' regions.  ``SnapshotHistory`` reads
the tail of ``click-snapshots`` at start (at most the store's size of the newest
records) and then follows it, so every worker lists the recent snapshots of every
region, across restarts.  What this process publishes is also added directly (no wait
for the round trip); the store lists identical re-publications once.  A record that is
not a snapshot (not JSON, or not a snapshot's shape) is skipped, with one warning per
fetched batch: it never reaches the store, where it would break the view.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import orjson

from aggregator.background import BackgroundService
from aggregator.broker.admin import partition_counts
from aggregator.broker.security import PLAINTEXT, KafkaSecurity
from aggregator.core.contract import SNAPSHOTS, Snapshot
from aggregator.core.snapshots import SnapshotStore, snapshot_problem

log = logging.getLogger("aggregator.worker")
RETRY_S = 1.0


class SnapshotHistory(BackgroundService):
    def __init__(self, bootstrap: str, store: SnapshotStore, security: KafkaSecurity = PLAINTEXT,
                 topic: str = SNAPSHOTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bootstrap = bootstrap
        self.topic = topic  # ``click-snapshots``, AGG_TOPIC_PREFIX before it
        self.security = security
        self.store = store
        self.loaded = False  # the tail that existed at start has been read
        self.skipped = 0  # records of click-snapshots that were not snapshots

    async def background(self) -> None:
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - broker away: the view waits, the rest goes on
                log.warning("snapshot history: cannot read %s (%r); retrying", self.topic, exc)
            await asyncio.sleep(RETRY_S)

    async def _read(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", **self.security.aiokafka_kwargs())
        await consumer.start()
        try:
            n = (await partition_counts(self.bootstrap, [self.topic], security=self.security)).get(self.topic)
            if not n:
                raise RuntimeError(f"{self.topic} has no partitions yet")
            tps = [TopicPartition(self.topic, p) for p in range(n)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            keep = max(1, (self.store.items.maxlen or 1) // len(tps))
            for tp in tps:
                consumer.seek(tp, max(begins[tp], ends[tp] - keep))
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for tp, recs in batch.items():
                    snaps, bad = parse_snapshots(recs)
                    if bad:
                        self.skipped += len(bad)
                        log.warning("snapshot history: %d record(s) of %s partition %d skipped: not snapshots "
                                    "(offset %d: %s)", len(bad), self.topic, tp.partition, *bad[0])
                    self.store.add(snaps)
                if not self.loaded and await self._caught_up(consumer, ends):
                    self.loaded = True
                    log.info("snapshot history: %d recent snapshots loaded from %s", len(self.store.items),
                             self.topic)
        finally:
            await consumer.stop()

    @staticmethod
    async def _caught_up(consumer: Any, ends: dict[Any, int]) -> bool:
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True


def parse_snapshots(recs: Iterable[Any]) -> tuple[list[Snapshot], list[tuple[int, str]]]:
    """The snapshots among the records ``recs`` of ``click-snapshots`` (``.value``,
    ``.offset``), and (offset, why) of each that is not one: not JSON, or not a snapshot's
    shape (core.snapshots.snapshot_problem), which the store and its queries would fail on."""
    snaps: list[Snapshot] = []
    bad: list[tuple[int, str]] = []
    for rec in recs:
        try:
            s = orjson.loads(rec.value)
        except (orjson.JSONDecodeError, TypeError):
            bad.append((rec.offset, "not JSON"))
            continue
        problem = snapshot_problem(s)
        if problem is None:
            snaps.append(s)
        else:
            bad.append((rec.offset, problem))
    return snaps, bad
