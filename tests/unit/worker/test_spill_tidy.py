"""The spill in the worker's hands: what a partition leaves on disk when it is revoked (or
a previous run left) counts against AGG_SPILL_MAX_BYTES and is deleted once an assignment this
worker received since gives the partition elsewhere (never before its first assignment);
regions drained and quiet are forgotten; the spill gauges sum the regions one label stands
for (docs/contract.md §6)."""
from __future__ import annotations

import errno
import logging
import os

import orjson
from faust.types import TP

from aggregator.core.ratelimit import RateLimits
from aggregator.metrics import Metrics
from aggregator.spill.tidy import spill_bytes_on_disk
from aggregator.worker.partitions import LEFT_LABEL, BookSettings, Partitions
from tests.unit.worker.records import recovered

BOOKS = BookSettings(window_ms=60_000, grace_ms=1000, late_after_ms=600_000, idle_ms=3_600_000, max_regions=10)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def spill(parts: Partitions, partition: int, n: int = 50):
    """Open ``partition`` and spill all but the first of ``n`` events of eu."""
    p = parts.open(partition)
    offsets = list(range(n))
    split = p.spill.ledger.split([("eu", 1_000 + o, None) for o in offsets], offsets, RateLimits(0, {"eu": 1}),
                                 now=0.0)
    assert p.spill.write(split) == n - 1
    p.book.apply(split.events, n, 1_000 + n)
    return p


def test_a_revoked_partitions_spill_counts_until_it_is_assigned_elsewhere_then_goes(tmp_path):
    # found by a review (review_spill/stale_disk.py): a revoked partition's spill stayed on
    # disk but left the budget, and was never deleted: as hot partitions moved around, the
    # disk filled to several times AGG_SPILL_MAX_BYTES
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda n: None, m)
    p = spill(parts, 0)
    owned = parts.spill_bytes()
    value = p.state_value()  # its last state names this spill directory
    parts.forget(0)  # revoked
    assert parts.spill_bytes() >= owned > 0
    parts.report()
    assert sample(m, "clickstream_spill_bytes", region=LEFT_LABEL) == parts.spill_bytes()
    # nothing of it drains here: bytes only (contract §5), no backlog series
    assert sample(m, "clickstream_spill_backlog_events", region=LEFT_LABEL) is None
    parts.keep_only({1})  # the consumer's assignment in the rebalance: no assignment received since
    assert parts.spill_bytes() >= owned
    parts.left.received({0, 1})  # assigned here again (not opened yet): kept
    parts.keep_only({0, 1})
    assert parts.spill_bytes() >= owned
    parts.left.received({1})  # the next rebalance gives partition 0 to another worker
    parts.keep_only({1})
    assert parts.spill_bytes() == 0
    assert sorted(os.listdir(tmp_path / "p0")) == ["disk-id", "gone"]  # its records went, its id stays
    assert os.listdir(tmp_path / "p0" / "gone") == []
    parts.report()
    assert sample(m, "clickstream_spill_bytes", region=LEFT_LABEL) is None
    # back here with the state naming this directory (the next owner wrote none): its backlog
    # is re-read from clicks, and nothing past it was committed
    back = Partitions(BOOKS, tmp_path, recovered(0, value), Metrics()).open(0)
    assert back.spill.disk == p.spill.disk
    assert back.spill.ledger.rebuild == {"eu": 49} and back.commit_offset() == 1


def test_a_spill_an_earlier_run_left_is_counted_from_the_start_and_once_when_opened(tmp_path):
    was = spill(Partitions(BOOKS, tmp_path, lambda n: None, Metrics()), 3)
    value = was.state_value()
    was.spill.close()
    (tmp_path / "p3" / "gone" / "regions.0").mkdir(parents=True)  # a deletion a crash cut short
    (tmp_path / "p3" / "gone" / "regions.0" / "x").write_bytes(b"x" * 100)
    restarted = Partitions(BOOKS, tmp_path, recovered(3, value), Metrics())
    assert restarted.spill_bytes() > 0
    assert not (tmp_path / "p3" / "gone").exists()
    p = restarted.open(3)  # assigned here again: its store counts it, not twice
    assert restarted.spill_bytes() == p.spill.total_bytes() > 0


def test_a_left_spill_the_disk_will_not_delete_is_said_once_and_still_counted(tmp_path, monkeypatch, caplog):
    parts = Partitions(BOOKS, tmp_path, lambda n: None, Metrics())
    spill(parts, 0)
    parts.forget(0)
    left = parts.spill_bytes()

    def rename(src: str, dst: str) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("aggregator.spill.tidy.os.rename", rename)
    parts.left.received({1})  # partition 0 is another worker's
    with caplog.at_level(logging.ERROR, "aggregator.spill"):
        parts.keep_only(set())
        parts.keep_only(set())
    assert [r.getMessage() for r in caplog.records] == [
        "spill p0: cannot delete the spill this worker left on disk (the partition is assigned elsewhere): "
        "[Errno 30] Read-only file system; it counts against AGG_SPILL_MAX_BYTES"]
    assert parts.spill_bytes() == left
    monkeypatch.undo()
    parts.keep_only(set())
    assert parts.spill_bytes() == 0 and not parts.left.stuck


async def test_spills_on_disk_at_start_stay_until_an_assignment_received_gives_them_elsewhere(tmp_path):
    # found by a review: the ticks deleted every left spill not in the consumer's assignment,
    # which is empty until this worker joined its group: at start (and after a subscription
    # change) every spill on disk went, those of partitions assigned back moments later too
    from types import SimpleNamespace

    from aggregator.config_load import load
    from aggregator.worker.service import WorkerService

    w = WorkerService(load(env={"AGG_SPILL_DIR": str(tmp_path / "spill"), "AGG_PARTITIONS": "3"}), Metrics(), [])
    root = w.s.spill_path
    values = {}
    for n in (0, 1):  # what the previous run left: two spills, and states naming them
        was = spill(Partitions(BOOKS, root, lambda n: None, Metrics()), n)
        values[n] = was.state_value()
        was.spill.close()
    before = {n: spill_bytes_on_disk(root, n) for n in (0, 1)}
    stored = {n: recovered(n, v) for n, v in values.items()}
    w.partitions = Partitions(BOOKS, root, lambda n: stored[n](n) if n in stored else None, Metrics())
    assignment: set[int] = set()
    w.kafka = SimpleNamespace(assigned=lambda: set(assignment), recovered=lambda: True, refused=lambda: None)
    w.started = True
    assert not w.app.rebalancing  # Faust's, until its first rebalance starts
    for _ in range(3):  # ticks before the consumer joined: its assignment is empty
        w._sync_assignment()
    assert {n: spill_bytes_on_disk(root, n) for n in (0, 1)} == before
    assert w.partitions.spill_bytes() == sum(before.values())
    assignment.update({1, 2})  # the group's assignment reaches this worker (Faust's signal)
    await w.app.on_partitions_assigned.send({TP(w.clicks_topic, 1), TP(w.clicks_topic, 2),
                                             TP(w.repart_topic, 1), TP(w.repart_topic, 2)})
    w._sync_assignment()
    assert spill_bytes_on_disk(root, 0) == 0  # another worker's now: deleted
    assert spill_bytes_on_disk(root, 1) == before[1]  # back here: kept, and taken by its book
    p = w.partitions.get(1)
    assert p is not None and p.spill.ledger.rebuild == {} and p.spill.backlog_by_region()["eu"][0] == 49
    assert w.partitions.spill_bytes() == p.spill.total_bytes() > 0


def test_a_left_spill_waits_for_an_assignment_received_after_it_left(tmp_path):
    parts = Partitions(BOOKS, tmp_path, lambda n: None, Metrics())
    parts.left.received({0})
    spill(parts, 0)
    parts.forget(0)  # revoked: the last assignment received still gave it here
    left = parts.spill_bytes()
    parts.keep_only(set())  # a tick between the revoke and the assignment (or an empty one)
    assert parts.spill_bytes() == left > 0
    parts.left.received({0})  # given back: kept
    parts.keep_only(set())
    assert parts.spill_bytes() == left
    # an assignment without a partition of clicks: the group's leader did not see clicks in its
    # metadata (deleted and created again, a moment after a restart): it says nothing of where
    # partition 0 went (found by `make test-kafka`: the spill went, and with it events the
    # re-created log no longer had)
    parts.left.received(set())
    parts.keep_only(set())
    assert parts.spill_bytes() == left
    parts.left.received({1})
    parts.keep_only({1})
    assert parts.spill_bytes() == 0
    # a book a late batch re-created after the assignment that took it away: its spill goes at once
    spill(parts, 0)
    parts.keep_only({1})
    assert parts.spill_bytes() > 0  # (dropped after the deletion: at the next tick)
    parts.keep_only({1})
    assert parts.spill_bytes() == 0


def test_the_spill_gauges_sum_every_region_a_label_stands_for(tmp_path):
    # found by a review (review_spill/other_gauge.py): the gauges were set once per region
    # under its label, so the regions shown as __other__ overwrote each other's backlog
    m = Metrics()
    parts = Partitions(BookSettings(60_000, 1000, 600_000, 3_600_000, max_regions=2), tmp_path, lambda n: None, m)
    p = parts.open(0)
    p.book.last_seen.update({"a": 1, "b": 1})  # the book's cap is full: other regions are __other__
    for region, n in (("__other__", 5), ("c", 3), ("d", 0)):
        offsets = list(range(n + 1))
        split = p.spill.ledger.split([(region, 1_000, None)] * (n + 1), offsets, RateLimits(0, {region: 1}), 0.0)
        if split is not None:
            p.spill.write(split)
    parts.report()
    assert sample(m, "clickstream_spill_backlog_events", region="__other__") == 8
    assert sample(m, "clickstream_spill_bytes", region="__other__") == p.spill.total_bytes() > 0
    assert sample(m, "pipeline_stage_in_pending", stage="spill") == 8


def test_regions_drained_and_quiet_are_forgotten_at_the_sweeps_of_the_tick_report(tmp_path):
    # found by a review (review_spill/region_churn.py): 200 region names over a worker's life
    # kept 200 ledger entries (in every state written), 200 directories, and spill gauges
    # re-created at every tick after the idle sweep had dropped them
    from aggregator.spill.tidy import SWEEP_S
    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda n: None, m)
    p = parts.open(0)
    regions = [f"r{k}" for k in range(20)]
    for k, region in enumerate(regions):
        offsets = list(range(10 * k, 10 * k + 10))
        p.spill.write(p.spill.ledger.split([(region, 1_000, None)] * 10, offsets, RateLimits(0, {region: 1}), 0.0))
    p.spill.drain(RateLimits(0), 0.0, unlimited=True)
    p.spill.acked()
    for _ in range(2):  # drained at one sweep, still quiet at the next
        parts.swept -= SWEEP_S
        parts.report()
    assert p.spill.ledger.regions == {} and p.spill.store.regions() == []
    assert orjson.loads(p.state_value())["spill"] == {"": [9, 9, -1]}
    assert os.listdir(tmp_path / "p0" / "regions") == []
    m.regions_gone(regions)  # the idle sweep of the metrics
    parts.report()
    assert all(sample(m, "clickstream_spill_backlog_events", region=r) is None for r in regions)


def test_a_spill_left_behind_counts_in_the_hold_until_it_is_deleted(tmp_path):
    """The spill a revoked partition left counts against AGG_SPILL_MAX_BYTES for the hold
    too (not only in the gauge): a worker that spills on another partition pauses while the
    two together are over the budget, and resumes once the left spill is deleted."""
    from aggregator.worker.throttle import Throttle

    m = Metrics()
    parts = Partitions(BOOKS, tmp_path, lambda n: None, m)
    spill(parts, 0)
    parts.forget(0)  # revoked: its spill stays on disk
    left = parts.left_bytes()
    assert left > 0
    p1 = parts.open(1)
    throttle = Throttle(RateLimits(0, {"eu": 1}), left + 1, m)  # the left spill alone fits
    throttle.limit(p1, [("eu", 1_000 + i, None) for i in range(10)], list(range(10)), parts)
    assert p1.spill.held_bytes() < left + 1 <= p1.spill.held_bytes() + left
    assert throttle.hold  # owned and left spill together are over the budget
    parts.left.received({1})  # an assignment gives partition 0 elsewhere
    parts.keep_only({1})
    assert parts.left_bytes() == 0
    throttle.report(parts)
    assert not throttle.hold
