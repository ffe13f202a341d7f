"""Partitions lost, not revoked: when a heartbeat finds that the consumer group no longer
knows this worker (its session expired while it stalled), aiokafka resets the member's
generation and then calls the revoke callback with the partitions it held.  They may be
another worker's already, which has recovered their state and counts on: a state written
for them now would become the changelog's latest and overwrite the new owner's (offsets
between the two then never counted).  So a lost partition is given up unwritten, and no
tick writes while the member is lost."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from aggregator.core.contract import CLICKS
from aggregator.metrics import Metrics
from aggregator.worker.faust_app import FaustApp
from aggregator.worker.partitions import BookSettings, Partitions
from aggregator.worker.service import WorkerService

BOOKS = BookSettings(window_ms=1000, grace_ms=100, late_after_ms=60_000, idle_ms=60_000, max_regions=10)


def _worker(tmp_path, lost: bool) -> SimpleNamespace:
    parts = Partitions(BOOKS, tmp_path, lambda p: None, Metrics())
    parts.open(0).book.apply([("eu", 1_000, None)], 1, 1_000)
    ticks: list = []

    async def tick(only=None):
        ticks.append(only)

    return SimpleNamespace(metrics=Metrics(), kafka=SimpleNamespace(member_lost=lambda: lost), partitions=parts,
                           checkpointer=SimpleNamespace(lock=asyncio.Lock()), tick=tick, ticks=ticks)


def test_lost_partitions_are_given_up_without_writing_their_state(tmp_path):
    w = _worker(tmp_path, lost=True)
    asyncio.run(WorkerService._on_revoked(w, None, {TP(CLICKS, 0)}))  # type: ignore[arg-type]
    assert w.ticks == [] and 0 not in w.partitions


def test_revoked_partitions_of_a_member_are_written_then_given_up(tmp_path):
    w = _worker(tmp_path, lost=False)
    asyncio.run(WorkerService._on_revoked(w, None, {TP(CLICKS, 0)}))  # type: ignore[arg-type]
    assert w.ticks == [[0]] and 0 not in w.partitions


def _app_with(coordinator: object) -> FaustApp:
    app = object.__new__(FaustApp)
    consumer = SimpleNamespace(_coordinator=coordinator)
    app.app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_ensure_consumer=lambda: consumer)))
    return app


def test_member_lost_is_aiokafkas_reset_generation():
    # aiokafka's GroupCoordinator.reset_generation: generation -1, member id ""
    assert _app_with(SimpleNamespace(generation=-1, member_id="")).member_lost()
    assert not _app_with(SimpleNamespace(generation=7, member_id="w-1")).member_lost()
    assert not _app_with(None).member_lost()  # not started yet

    def no_consumer():
        raise RuntimeError("no consumer")

    app = object.__new__(FaustApp)
    app.app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_ensure_consumer=no_consumer)))
    assert not app.member_lost()
