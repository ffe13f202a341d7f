"""The worker's side of a partition of ``clicks`` that starts over (docs/contract.md §4
"When `clicks` starts over"): ``sourcecheck.check_source`` and ``WorkerService._forward`` run on a
real partition state (book, spill on disk, ledger) with the Kafka side replaced by what
they ask of it.  The new log gets the next log epoch, which its forwarded records carry;
the spill's old backlog stays to be drained but holds no commit of the new log back; and
both are in the state written, so a crash before the next restart check finds them."""
from __future__ import annotations

from types import SimpleNamespace

import orjson

from aggregator.core.contract import SOURCE_HEADER
from aggregator.core.ratelimit import RateLimits
from aggregator.core.repartition import home, parse_source_header
from aggregator.metrics import Metrics
from aggregator.worker.partitions import BookSettings, Partitions
from aggregator.worker.service import WorkerService
from aggregator.worker.sourcecheck import check_source
from tests.unit.worker.records import fetched

N = 2
REGION_HERE = next(f"r{i}" for i in range(100) if home(f"r{i}", N) == 0)
REGION_AWAY = next(f"r{i}" for i in range(100) if home(f"r{i}", N) == 1)


def _worker(log_end: int) -> SimpleNamespace:
    """What ``check_source`` and ``_forward`` use of the service."""
    restarted: list[int] = []
    kafka = SimpleNamespace(read_to=lambda partition, n: n,
                            highwater=lambda partition, topic=None: log_end, log_restarted=restarted.append)
    return SimpleNamespace(kafka=kafka, metrics=Metrics(), restarted=restarted,
                           decoder=SimpleNamespace(homes={}, partitions=N), checkpointer=SimpleNamespace(forward=[]))


def _spilled_partition(tmp_path) -> tuple:
    parts = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, N), tmp_path, lambda p: None, Metrics())
    p = parts.open(0)
    led = p.spill.ledger
    # offsets 100..104 of the first log: two counted, three over the rate and spilled
    events = [(REGION_HERE, 1_000 + i, None) for i in range(5)]
    split = led.split(events, list(range(100, 105)), RateLimits(0, {REGION_HERE: 2}), now=0.0)
    p.spill.write(split)
    p.book.apply(split.events, 105, 1_000)
    p.source_ts = 9_104  # the broker timestamp of offset 104
    assert p.commit_offset() == 102  # the oldest undrained spilled event
    return parts, p


def test_a_restart_gives_the_next_epoch_and_frees_commits_from_the_old_spill(tmp_path):
    parts, p = _spilled_partition(tmp_path)
    w = _worker(log_end=3)
    new_log = fetched([(REGION_HERE.encode(), orjson.dumps({"region": REGION_HERE}), [])] * 3, base=0,
                      timestamp=50_000)
    assert check_source(p, new_log, 105, w.kafka, w.metrics) == 0  # type: ignore[arg-type]
    assert w.restarted == [0] and p.book.next_offset == 0 and p.book.log_epoch == 1 and not p.commit_ok
    # the three spilled events are still to be drained, but their offsets are of the old log
    assert p.spill.ledger.backlog(REGION_HERE) == 3 and p.commit_offset() == 0
    p.book.apply([], 3, 2_000)
    assert p.commit_offset() == 3
    assert p.spill.drain(RateLimits(0), now=1.0, unlimited=True) == [(REGION_HERE, 1_000 + i, None)
                                                                     for i in (2, 3, 4)]

    # the state written after it holds the epoch and the fence
    stored = orjson.loads(p.state_value())
    assert stored["log_epoch"] == 1 and stored["spill"][REGION_HERE] == [3, 3, -1]  # drained: fence gone
    again = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, N), tmp_path / "b",
                       lambda q: (stored, None), Metrics()).open(0)
    assert again.book.log_epoch == 1 and again.book.next_offset == 3


def test_a_state_written_before_the_old_backlog_drained_keeps_it_fenced(tmp_path):
    parts, p = _spilled_partition(tmp_path)
    w = _worker(log_end=3)
    new_log = fetched([(REGION_HERE.encode(), orjson.dumps({"region": REGION_HERE}), [])] * 3, base=0,
                      timestamp=50_000)
    check_source(p, new_log, 105, w.kafka, w.metrics)  # type: ignore[arg-type]
    p.book.apply([], 3, 2_000)
    stored = orjson.loads(p.state_value())
    assert stored["spill"][REGION_HERE] == [3, 0, -1, 3]  # spilled, drained, low: none, fence
    parts.forget(0)
    # recovered on the same disk (a crash): the backlog is there, and still holds nothing back
    again = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, N), tmp_path,
                       lambda q: (stored, None), Metrics()).open(0)
    assert again.spill.ledger.backlog(REGION_HERE) == 3 and again.commit_offset() == 3
    assert len(again.spill.drain(RateLimits(0), now=1.0, unlimited=True)) == 3


def test_the_same_log_replayed_is_not_a_restart(tmp_path):
    _, p = _spilled_partition(tmp_path)
    w = _worker(log_end=105)
    replay = fetched([(REGION_HERE.encode(), orjson.dumps({"region": REGION_HERE}), [])] * 5, base=100,
                     timestamp=9_100)  # offset 104 stamped 9_104, as the state says
    assert check_source(p, replay, 105, w.kafka, w.metrics) == 105  # type: ignore[arg-type]
    assert p.book.log_epoch == 0 and p.commit_offset() == 102 and w.restarted == []


def test_forwards_carry_the_sources_log_epoch():
    w = _worker(log_end=0)
    foreign = [(REGION_AWAY, 1_000, None, 7, None, None)]
    WorkerService._forward(w, 0, foreign, 0)  # type: ignore[arg-type]
    WorkerService._forward(w, 0, foreign, 2)  # type: ignore[arg-type]
    (h0, *_), (h2, *_) = w.checkpointer.forward
    assert h0 == h2 == 1
    sources = [dict(f[3])[SOURCE_HEADER] for f in w.checkpointer.forward]
    assert sources == [b"0,7", b"0,7,2"] and parse_source_header(sources[1]) == (0, 7, 2)
