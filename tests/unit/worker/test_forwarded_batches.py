"""Batches of ``clicks-repartition`` in ``WorkerService.on_batch`` (a real worker, the Kafka
side replaced by what it asks): while a batch of ``clicks`` partition p waits for a
refusing spill disk, what is forwarded to p waits too (contract §6, "applied exactly as it
would have been"), and forwarded records are not records read from ``clicks`` (§5)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
from faust.types import TP

from aggregator.config_load import load
from aggregator.core.contract import CLICKS, CLICKS_REPARTITION
from aggregator.core.repartition import forward_record, home
from aggregator.metrics import Metrics
from aggregator.spill.partition import SpillDiskError
from aggregator.worker.partitions import Partitions
from aggregator.worker.service import WorkerService
from tests.unit.worker.records import fetched

N = 2
HOME = 0
HOT = next(f"hot{i}" for i in range(100) if home(f"hot{i}", N) == HOME)
COLD = next(f"cold{i}" for i in range(100) if home(f"cold{i}", N) == HOME)
T = 1_000_000  # ingest times of the clicks batch: window [1_000_000, 1_002_000)


class Consumer:
    """What the worker asks of Faust's consumer: pausing and resuming partitions."""

    def __init__(self) -> None:
        self.paused: set[TP] = set()

    def pause_partitions(self, tps: object) -> None:
        self.paused.update(tps)  # type: ignore[arg-type]

    def resume_partitions(self, tps: object) -> None:
        self.paused.difference_update(tps)  # type: ignore[arg-type]


def _worker(tmp_path, metrics: Metrics | None = None) -> WorkerService:
    settings = load(env={"AGG_SPILL_DIR": str(tmp_path / "spill"), "AGG_PARTITIONS": str(N),
                         "AGG_WINDOW_SECONDS": "2", "AGG_GRACE_SECONDS": "1", "AGG_RATE_LIMITS": f"{HOT}=1",
                         "AGG_MAX_AHEAD_SECONDS": "5"})
    m = metrics or Metrics()
    w = WorkerService(settings, m, [])
    w.kafka = SimpleNamespace(read_to=lambda partition, n: n,
                              highwater=lambda partition, topic=None: None, assigned=lambda: {HOME},
                              log_restarted=lambda tp: None)  # type: ignore[assignment]
    w.app = SimpleNamespace(consumer=Consumer(), rebalancing=False)  # type: ignore[assignment]
    w.partitions = Partitions(w.partitions.books, tmp_path / "spill", lambda p: None, m)
    return w


def _clicks() -> list:
    return fetched([(None, orjson.dumps({"region": r, "ingest_ts": T + i}), [])
                    for i, r in enumerate([HOT] * 5 + [COLD] * 5)], base=0, timestamp=T)


def _forwarded() -> list:
    """An event of COLD read on partition 1 of clicks, 10 s later (the next windows)."""
    return fetched([forward_record(1, (COLD, T + 10_000, None, 0, None, None))], base=0, timestamp=T + 10_000)


def _windows(w: WorkerService) -> list:
    p = w.partitions.get(HOME)
    p.book.apply([(COLD, T + 60_000, None)], p.book.next_offset, int(time.time() * 1000))  # close everything
    return [(s["window_start"], s["count"], s["late"]) for s in p.book.outbox
            if s["region"] == COLD and (s["count"] or s["late"])]


def test_forwarded_batches_wait_behind_a_batch_held_for_the_spill_disk(tmp_path):
    fine = _worker(tmp_path / "fine")
    assert fine.on_batch(TP(CLICKS, HOME), _clicks()) is None
    assert fine.on_batch(TP(CLICKS_REPARTITION, HOME), _forwarded()) is None
    expected = _windows(fine)
    assert expected == [(T, 5, 0), (T + 10_000, 1, 0)]

    w = _worker(tmp_path / "refusing")
    p = w.partitions.open(HOME)
    write = p.spill.write

    def refuse(split: object) -> int:
        raise SpillDiskError("write", HOME, HOT, OSError(28, "No space left on device"))

    p.spill.write = refuse  # type: ignore[method-assign]
    assert w.on_batch(TP(CLICKS, HOME), _clicks()) is None
    assert w.throttle.held_here(p)
    both = {TP(CLICKS, HOME), TP(CLICKS_REPARTITION, HOME)}
    assert w.app.consumer.paused == both
    # forwarded to the held partition meanwhile: given back, to be fetched again from its first offset
    assert w.on_batch(TP(CLICKS_REPARTITION, HOME), _forwarded()) == 0
    assert p.book.repart_next == 0 and not p.book.forwarded
    p.spill.write = write  # type: ignore[method-assign]  # the disk takes writes again
    w._retry_held([p], int(time.time() * 1000))  # the next tick
    assert not w.throttle.held_here(p) and not w.app.consumer.paused
    assert w.on_batch(TP(CLICKS_REPARTITION, HOME), _forwarded()) is None  # fetched again
    assert _windows(w) == expected  # no closed_window late events


def _sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_forwarded_records_are_not_counted_as_records_read_from_clicks(tmp_path, caplog):
    m = Metrics()
    w = _worker(tmp_path, m)
    caplog.set_level("INFO", "aggregator.worker")
    assert w.on_batch(TP(CLICKS_REPARTITION, HOME), _forwarded()) is None
    assert _sample(m, "pipeline_stage_processed_total", stage="decode") == 0  # read from clicks: none
    assert _sample(m, "pipeline_stage_processed_total", stage="window") == 1
    assert not any("repeat" in r.getMessage() for r in caplog.records)
    # the same record again (its source forwarded it again after a crash): dropped, and said
    again = fetched([forward_record(1, (COLD, T + 10_000, None, 0, None, None))], base=1)
    assert w.on_batch(TP(CLICKS_REPARTITION, HOME), again) is None
    assert _sample(m, "pipeline_stage_processed_total", stage="decode") == 0
    assert _sample(m, "pipeline_stage_processed_total", stage="window") == 1
    assert [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()] == [
        "partition 0: 1 forwarded records dropped as repeats (their source offsets applied before)"]
    # a record no worker wrote: rejected by reason, not a decode error of clicks
    assert w.on_batch(TP(CLICKS_REPARTITION, HOME), fetched([(b"x", b"{}", [])], base=2)) is None
    assert _sample(m, "clickstream_rejected_events_total", reason="undecodable") == 1
    assert _sample(m, "pipeline_stage_errors_total", stage="decode") == 0
