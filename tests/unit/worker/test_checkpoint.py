"""The checkpoint protocol's order: state written, confirmed by a flush, then offsets
marked safe and snapshots published (then confirmed again), and only then taken out
of the outbox.  The producer here records calls; the real one runs in the
integration tests (crash, scale, broker outage)."""
from __future__ import annotations

import asyncio

import orjson

from aggregator.core.contract import DLQ, SNAPSHOTS
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer
from aggregator.worker.partitions import BookSettings, Partitions

BOOKS = BookSettings(window_ms=1000, grace_ms=100, late_after_ms=60_000, idle_ms=60_000, max_regions=10)


class RecordingProducer:
    def __init__(self, log: list) -> None:
        self.log = log

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.log.append(("send", topic, key, value))

    async def flush(self):
        self.log.append(("flush",))


def setup(tmp_path):
    log: list = []
    producer = RecordingProducer(log)
    seen: list = []
    m = Metrics()

    def bad_sink(snaps):
        raise RuntimeError("a broken view")

    cp = Checkpointer(lambda: producer, lambda p, v: log.append(("state", p, orjson.loads(v)["next_offset"])),
                      lambda p, o: log.append(("safe", p, o)), m, [bad_sink, seen.extend])
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    return cp, parts, log, seen, m


def test_order_of_a_checkpoint(tmp_path):
    cp, parts, log, seen, m = setup(tmp_path)
    a, quiet = parts.open(0), parts.open(1)
    a.book.apply([("eu", 1_000, None), ("us", 1_100, None), ("eu", 2_500, None)], 3, 2_500)
    quiet.book.dirty = False
    cp.dead.append((b"x", b'{"reason": "bad_region"}'))
    outbox = list(a.book.outbox)
    assert [s["region"] for s in outbox] == ["eu", "us"]
    asyncio.run(cp.checkpoint([a, quiet]))
    assert log == [
        ("state", 0, 3),                      # only the changed partition
        ("send", DLQ, b"x", b'{"reason": "bad_region"}'),
        ("flush",),                           # state durable before anything depends on it:
        ("send", SNAPSHOTS, b"eu", orjson.dumps(outbox[0])),  # its snapshots go out,
        ("send", SNAPSHOTS, b"us", orjson.dumps(outbox[1])),
        ("safe", 0, 3),                       # the offset it holds may be committed
        ("flush",),
    ]
    assert seen == outbox  # a failing sink does not stop the others
    assert a.book.outbox == [] and a.book.dirty  # the trimmed outbox is written next time
    assert cp.dead == []
    assert m.registry.get_sample_value("clickstream_snapshots_published_total") == 2


def test_nothing_changed_nothing_sent(tmp_path):
    cp, parts, log, seen, _ = setup(tmp_path)
    p = parts.open(0)
    p.book.dirty = False
    asyncio.run(cp.checkpoint([p]))
    assert log == [] and seen == []


def test_snapshots_closed_after_the_state_was_written_wait_for_the_next_checkpoint(tmp_path):
    cp, parts, log, seen, _ = setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    asyncio.run(cp.checkpoint([p]))
    assert seen == [] and ("safe", 0, 1) in log
    p.book.apply([("eu", 2_500, None)], 2, 2_500)  # closes [1000, 2000)
    asyncio.run(cp.checkpoint([p]))
    assert [(s["region"], s["window_start"], s["count"]) for s in seen] == [("eu", 1000, 1)]
