"""The checkpoint protocol's order: state written, confirmed by a flush, then offsets
marked safe and snapshots published (then confirmed again), and only then taken out
of the outbox.  The producer here records calls; the real one runs in the
integration tests (crash, scale, broker outage)."""
from __future__ import annotations

import asyncio
import logging

import orjson

from aggregator.core.contract import DLQ, SNAPSHOTS, STATE_CHANGELOG
from aggregator.core.statechunks import decode_state, encode_chunks
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer
from aggregator.worker.partitions import BookSettings, Partitions

BOOKS = BookSettings(window_ms=1000, grace_ms=100, late_after_ms=60_000, idle_ms=60_000, max_regions=10)


class RecordingProducer:
    """Records sends and flushes; ``refuse(topic)`` makes the broker refuse that topic's
    records (their futures fail at the next flush), as Kafka does for a record over the
    topic's max.message.bytes (the real refusal runs in tests/integration/test_state_writes.py)."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.refused: set[str] = set()
        self.refused_values: set[bytes] = set()  # single records refused (the rest of the topic taken)
        self.pending: list = []

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.log.append(("send", topic, key, value))
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((topic, value, fut))
        return fut

    async def flush(self):
        self.log.append(("flush",))
        for topic, value, fut in self.pending:
            if topic in self.refused or value in self.refused_values:
                fut.set_exception(RuntimeError(f"MessageSizeTooLargeError on {topic}"))
            else:
                fut.set_result(None)
        self.pending = []


def setup(tmp_path):
    log: list = []
    producer = RecordingProducer(log)
    seen: list = []
    m = Metrics()

    def bad_sink(snaps):
        raise RuntimeError("a broken view")

    cp = Checkpointer(lambda: producer, lambda p, recs: log.append(("confirmed", p, len(recs))),
                      lambda p, o: log.append(("safe", p, o)), m, [bad_sink, seen.extend])
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    cp.test_producer = producer
    return cp, parts, log, seen, m


def state_of(log: list, partition: int) -> dict:
    """The state the changelog sends of ``log`` hold for ``partition`` (the last header's)."""
    state, _ = decode_state(partition, *_changelog(log, partition))
    return state


def _changelog(log: list, partition: int = 0) -> tuple:
    """(``partition``'s header value, a chunk lookup) of what the changelog sends of ``log``
    leave (the latest per key; None: deleted)."""
    data = {orjson.loads(e[2]): None if e[3] is None else orjson.loads(e[3])
            for e in log if e[0] == "send" and e[1] == STATE_CHANGELOG}
    return data.get(partition), data.get


def _refusing(tmp_path, topic: str) -> tuple:
    """A partition with a window closed (eu: 1 event in [1000, 2000)), the broker refusing ``topic``."""
    cp, parts, log, seen, m = setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)
    cp.test_producer.refused.add(topic)
    return cp, p, log, seen, m


def test_order_of_a_checkpoint(tmp_path):
    cp, parts, log, seen, m = setup(tmp_path)
    a, quiet = parts.open(0), parts.open(1)
    a.book.apply([("eu", 1_000, None), ("us", 1_100, None), ("eu", 2_500, None)], 3, 2_500)
    quiet.book.dirty = False
    cp.dead.append((b"x", b'{"reason": "bad_region"}'))
    outbox = list(a.book.outbox)
    assert [s["region"] for s in outbox] == ["eu", "us"]
    chunks, header = encode_chunks(0, a.state_value(), 0)
    asyncio.run(cp.checkpoint([a, quiet]))
    assert log == [
        *[("send", STATE_CHANGELOG, k, v) for k, v in chunks],  # only the changed partition
        ("send", DLQ, b"x", b'{"reason": "bad_region"}'),
        ("flush",),                           # its chunks confirmed before
        ("send", STATE_CHANGELOG, *header),   # the header that names them,
        ("flush",),                           # state durable before anything depends on it:
        ("confirmed", 0, len(chunks) + 1),
        ("safe", 0, 3),                       # the offset it holds may be committed,
        ("send", SNAPSHOTS, b"eu", orjson.dumps(outbox[0])),  # its snapshots go out
        ("send", SNAPSHOTS, b"us", orjson.dumps(outbox[1])),
        ("flush",),
    ]
    assert state_of(log, 0)["next_offset"] == 3 and a.state_slot == 0
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


def test_a_refused_state_write_commits_nothing_publishes_nothing_and_is_retried(tmp_path):
    cp, p, log, seen, m = _refusing(tmp_path, STATE_CHANGELOG)
    asyncio.run(cp.checkpoint([p]))
    assert not [e for e in log if e[0] in ("safe", "confirmed") or e[1:2] == (SNAPSHOTS,)]
    assert [e for e in log if e[0] == "send"] == [e for e in log if e[0] == "send" and e[1] == STATE_CHANGELOG]
    assert len([e for e in log if e[0] == "send"]) == 1  # the chunk only: no header for a slot not written
    assert seen == [] and p.book.dirty and p.state_slot is None and len(p.book.outbox) == 1
    assert cp.failing and "MessageSizeTooLarge" in cp.failing
    assert m.registry.get_sample_value("clickstream_state_write_failures_total") == 1
    asyncio.run(cp.checkpoint([p]))  # still refused: counted again, still nothing out
    assert m.registry.get_sample_value("clickstream_state_write_failures_total") == 2 and seen == []

    cp.test_producer.refused.clear()  # the broker takes it again
    log.clear()
    asyncio.run(cp.checkpoint([p]))
    assert cp.failing is None and p.state_slot == 0
    assert ("safe", 0, 2) in log and [(s["region"], s["count"]) for s in seen] == [("eu", 1)]
    assert state_of(log, 0)["next_offset"] == 2


def test_a_new_state_goes_to_the_other_slot(tmp_path):
    cp, parts, log, _, _ = setup(tmp_path)
    p = parts.open(0)
    slots = []
    for i in range(3):
        p.book.apply([("eu", 1_000 + i, None)], i + 1, 1_000 + i)
        log.clear()
        asyncio.run(cp.checkpoint([p]))
        keys = [orjson.loads(e[2]) for e in log if e[0] == "send" and e[1] == STATE_CHANGELOG]
        slots.append((p.state_slot, keys))
    assert slots == [(0, ["0/0/0", 0]), (1, ["0/1/0", 0]), (0, ["0/0/0", 0])]


def test_refused_dead_letters_hold_every_commit_and_are_sent_again(tmp_path):
    cp, parts, log, _, m = setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    cp.dead.append((b"x", b'{"reason": "bad_region"}'))
    cp.test_producer.refused.add(DLQ)
    asyncio.run(cp.checkpoint([p]))
    assert not [e for e in log if e[0] == "safe"] and cp.dead == [(b"x", b'{"reason": "bad_region"}')]
    assert p.book.dirty and cp.failing
    cp.test_producer.refused.clear()
    asyncio.run(cp.checkpoint([p]))
    assert ("safe", 0, 1) in log and cp.dead == [] and cp.failing is None


def test_refused_snapshots_stay_in_the_outbox_and_are_sent_again(tmp_path):
    cp, p, log, seen, m = _refusing(tmp_path, SNAPSHOTS)
    asyncio.run(cp.checkpoint([p]))
    assert ("safe", 0, 2) in log and p.state_slot == 0  # the state itself is durable
    assert [(s["region"], s["count"]) for s in p.book.outbox] == [("eu", 1)] and seen == []
    assert p.book.dirty  # written again (with its outbox) at the next checkpoint
    assert cp.failing and "snapshot" in cp.failing and "MessageSizeTooLarge" in cp.failing
    assert m.registry.get_sample_value("clickstream_snapshot_publish_failures_total") == 1
    assert not m.registry.get_sample_value("clickstream_snapshots_published_total")
    asyncio.run(cp.checkpoint([p]))  # still refused
    assert len(p.book.outbox) == 1 and state_of(log, 0)["outbox"] == p.book.outbox
    assert m.registry.get_sample_value("clickstream_snapshot_publish_failures_total") == 2

    cp.test_producer.refused.clear()
    log.clear()
    asyncio.run(cp.checkpoint([p]))
    sent = [orjson.loads(e[3]) for e in log if e[0] == "send" and e[1] == SNAPSHOTS]
    assert [(s["region"], s["window_start"], s["count"]) for s in sent] == [("eu", 1000, 1)]
    assert seen == sent and p.book.outbox == [] and cp.failing is None
    assert m.registry.get_sample_value("clickstream_snapshots_published_total") == 1


def test_a_snapshot_send_that_raises_leaves_every_durable_state_taken(tmp_path):
    """A send raising at once (aiokafka's metadata timeout) after the headers are durable:
    every partition's new slot is taken, so its next state goes to the other slot (writing
    into the slot a durable header names would leave a state that cannot be read after a
    crash before the next header)."""
    cp, parts, log, seen, _ = setup(tmp_path)
    producer = cp.test_producer
    send = producer.send

    async def raising(topic, key, value, partition, timestamp, headers):
        if topic == SNAPSHOTS:
            raise RuntimeError("KafkaTimeoutError: no metadata for click-snapshots")
        return await send(topic, key, value, partition, timestamp, headers)

    producer.send = raising
    a, b = parts.open(0), parts.open(1)
    a.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)  # closes a window: snapshots
    b.book.apply([("us", 1_000, None)], 1, 1_000)
    asyncio.run(cp.checkpoint([a, b]))
    assert a.state_slot == 0 and b.state_slot == 0
    assert ("safe", 0, 2) in log and ("safe", 1, 1) in log
    assert len(a.book.outbox) == 1 and a.book.dirty and not b.book.dirty and seen == []
    assert cp.failing and "KafkaTimeoutError" in cp.failing


def test_a_header_not_acknowledged_but_stored_never_has_its_chunks_overwritten(tmp_path):
    """A header write that times out may be stored all the same.  The next state must then
    go to a slot neither that header nor the one before names: written into either, a
    crash before its own header leaves the latest stored header naming chunks that no
    longer match it (a worker that cannot start)."""
    cp, parts, log, _, _ = setup(tmp_path)
    producer = cp.test_producer
    flush = producer.flush
    ambiguous = {"on": False}

    async def flaky_flush():
        if ambiguous["on"]:  # the broker stores the header, but its answer is lost: a timeout
            for topic, _, fut in producer.pending:
                if not fut.done():
                    fut.set_exception(TimeoutError("request timed out"))
            producer.pending = []
            log.append(("flush",))
            return
        await flush()

    producer.flush = flaky_flush
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    asyncio.run(cp.checkpoint([p]))  # slot 0, acknowledged
    assert p.state_slot == 0

    p.book.apply([("eu", 1_100, None)], 2, 1_100)
    w_chunks_ok = producer.send

    async def send(topic, key, value, partition, timestamp, headers):
        fut = await w_chunks_ok(topic, key, value, partition, timestamp, headers)
        if topic == STATE_CHANGELOG and orjson.loads(key) == 0:  # the header: stored, answer lost
            ambiguous["on"] = True
        return fut

    producer.send = send
    asyncio.run(cp.checkpoint([p]))  # chunks of slot 1 acknowledged; its header stored, not acknowledged
    ambiguous["on"] = False
    producer.send = w_chunks_ok
    assert p.state_slot == 0 and p.book.dirty and cp.failing
    stored, slot = decode_state(0, *_changelog(log))
    assert slot == 1 and stored["next_offset"] == 2  # it was stored: recovery would read it

    # the next state: its chunks, then a crash before its header
    p.book.apply([("eu", 1_200, None)], 3, 1_200)
    from aggregator.worker.checkpoint import _Write
    p.book.dirty = False
    w = _Write(p)
    assert w.slot == 2  # neither 0 (the last acknowledged) nor 1 (stored, maybe)
    for key, value in w.chunks:
        log.append(("send", STATE_CHANGELOG, key, value))
    state, slot = decode_state(0, *_changelog(log))  # recovery after the crash: whole
    assert slot == 1 and state["next_offset"] == 2

    # and once a header is acknowledged again, slots 0 and 1 take turns as before
    p.book.dirty = True
    asyncio.run(cp.checkpoint([p]))
    assert p.state_slot == 2 and not p.maybe_slots and cp.failing is None
    p.book.apply([("eu", 1_300, None)], 4, 1_300)
    asyncio.run(cp.checkpoint([p]))
    assert p.state_slot == 0



def test_a_failure_whose_partition_is_gone_no_longer_holds_the_worker(tmp_path):
    """A refused write of a partition revoked since: no remaining book is dirty and nothing
    else waits, so the next full checkpoint says writes pass (the worker holds fetching
    while ``failing`` is set: else it would hold for good).  A revoke's checkpoint of
    other partitions does not clear a failure of those it does not cover."""
    cp, parts, log, _, _ = setup(tmp_path)
    a, b = parts.open(0), parts.open(1)
    a.book.apply([("eu", 1_000, None)], 1, 1_000)
    b.book.dirty = False
    cp.test_producer.refused.add(STATE_CHANGELOG)
    asyncio.run(cp.checkpoint([a, b]))
    assert cp.failing and a.book.dirty
    cp.test_producer.refused.clear()
    b.book.apply([("us", 1_000, None)], 1, 1_000)
    asyncio.run(cp.checkpoint([b], every=False))  # a revoke of b alone: a still waits
    assert cp.failing and a.book.dirty
    parts.forget(0)  # a revoked (its refused state is its next owner's business)
    asyncio.run(cp.checkpoint(list(parts)))
    assert cp.failing is None


def test_slots_taken_after_headers_not_acknowledged_are_deleted_once_no_header_names_them(tmp_path):
    """Each header not acknowledged in a row takes one more slot (above); their chunks are
    deleted (tombstones) once an acknowledged header makes sure no stored one names them,
    so a storm of timeouts does not leave a state's worth of chunks per timeout for good."""
    cp, parts, log, _, _ = setup(tmp_path)
    producer = cp.test_producer
    flush, send = producer.flush, producer.send
    mode = {"lose_header_answers": False, "header_sent": False}

    async def flaky_send(topic, key, value, partition, timestamp, headers):
        fut = await send(topic, key, value, partition, timestamp, headers)
        if mode["lose_header_answers"] and topic == STATE_CHANGELOG and orjson.loads(key) == 0:
            mode["header_sent"] = True
        return fut

    async def flaky_flush():
        if mode["header_sent"]:  # stored, but the answer is lost
            for _, _, fut in producer.pending:
                fut.set_exception(TimeoutError("request timed out"))
            producer.pending = []
            mode["header_sent"] = False
            return
        await flush()

    producer.send, producer.flush = flaky_send, flaky_flush
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    asyncio.run(cp.checkpoint([p]))
    assert p.state_slot == 0
    mode["lose_header_answers"] = True
    p.book.apply([("eu", 1_050, None)], 2, 1_050)
    for _ in range(3):
        asyncio.run(cp.checkpoint([p]))  # slots 1, 2, 3: headers maybe stored
    assert p.maybe_slots == {1, 2, 3}
    mode["lose_header_answers"] = False
    asyncio.run(cp.checkpoint([p]))
    assert p.state_slot == 4 and cp.failing is None
    for i in range(2):  # slots 0 and 1 again; 2, 3 and 4 deleted when no header can name them
        p.book.apply([("eu", 1_100 + i, None)], 3 + i, 1_100 + i)
        asyncio.run(cp.checkpoint([p]))
    assert p.state_slot == 1 and p.extra_slots == {}
    latest = {orjson.loads(e[2]): e[3] for e in log if e[0] == "send" and e[1] == STATE_CHANGELOG}
    for slot in (2, 3, 4):
        assert latest[f"0/{slot}/0"] is None  # tombstoned
    state, slot = decode_state(0, *_changelog(log))
    assert slot == 1 and state["next_offset"] == 4


def test_a_fenced_checkpoint_writes_nothing_and_writes_it_all_once_the_fence_lifts(tmp_path, caplog):
    """While the group may have given this worker's partitions to another (``fence``: no
    heartbeat answered for half the session, or dropped), nothing goes out: no state (it
    would overwrite the new owner's), no dead letter, no snapshot; the books stay dirty and
    the outbox whole.  Once the fence lifts, the same checkpoint goes out in full."""
    cp, parts, log, seen, m = setup(tmp_path)
    why: list[str | None] = ["no heartbeat answered for 3.3 s, over half AGG_SESSION_TIMEOUT (6 s)"]
    level = [logging.WARNING]
    cp.fence = lambda: None if why[0] is None else (level[0], why[0])
    a = parts.open(0)
    a.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)
    cp.dead.append((b"x", b'{"reason": "bad_region"}'))
    outbox = list(a.book.outbox)
    for _ in range(2):
        asyncio.run(cp.checkpoint([a]))
    assert log == [] and seen == [] and a.book.dirty and a.book.outbox == outbox and cp.dead
    assert cp.held() == why[0] and cp.fenced == why[0]
    assert m.registry.get_sample_value("clickstream_worker_fenced_total") == 1  # once a hold, not a tick
    assert [r.levelname for r in caplog.records if "held" in r.getMessage()] == ["WARNING"]
    why[0] = None
    asyncio.run(cp.checkpoint([a]))
    assert ("safe", 0, 2) in log and seen == outbox and cp.held() is None
    assert state_of(log, 0)["next_offset"] == 2
    why[0], level[0] = "the group dropped this worker (AGG_SESSION_TIMEOUT passed without a heartbeat): it rejoins", logging.ERROR
    a.book.apply([("eu", 3_000, None)], 3, 3_000)
    asyncio.run(cp.checkpoint([a]))
    assert [r.levelname for r in caplog.records if "held" in r.getMessage()] == ["WARNING", "ERROR"]
    assert state_of(log, 0)["next_offset"] == 2  # nothing more written


def test_aggregates_records_of_a_state_restored_with_aggregates_off_are_deleted(tmp_path):
    """Found by a review: with AGG_AGGREGATES turned off across a restart, the aggregates
    records of the windows open in the restored state were never deleted (the book has no
    aggregates log to name them), so they stayed in the changelog for good.  The next state
    names them as gone, and once it is durable the write after it deletes them."""
    from aggregator.core.contract import agg_header_value
    from aggregator.core.sketches import SketchParams
    from tests.unit.worker.records import recovered

    on = BookSettings(1000, 100, 60_000, 60_000, 10, sketches=SketchParams())
    p = Partitions(on, tmp_path / "a", lambda p: None, Metrics()).open(0)
    t = 1_800_000_000_000
    p.book.apply([("eu", t, None)], 1, t, [agg_header_value(1, None, None)])  # its window stays open
    records, aggs = p.book.aggs.take_records(0)
    assert records and aggs.index
    keys = {orjson.dumps(k) for k, _ in records}
    log: list = []
    producer = RecordingProducer(log)
    cp = Checkpointer(lambda: producer, lambda part, recs: None, lambda part, o: None, Metrics(), [])
    off = Partitions(BOOKS, tmp_path / "b", recovered(0, p.state_value(None, aggs)), Metrics())
    q = off.open(0)
    assert q.book.aggs is None and q.aggs_left is not None
    q.book.apply([("eu", t + 10, None)], 2, t + 10)
    asyncio.run(cp.checkpoint([q]))
    assert state_of(log, 0)["aggs_gone"] == [[b, n] for b, n in sorted(aggs.index.items())]
    assert not keys & {e[2] for e in log if e[0] == "send" and e[3] is None}  # named, not yet deleted
    q.book.apply([("eu", t + 20, None)], 3, t + 20)
    asyncio.run(cp.checkpoint([q]))
    deleted = {e[2] for e in log if e[0] == "send" and e[1] == STATE_CHANGELOG and e[3] is None}
    assert keys <= deleted
    assert "aggs_gone" not in state_of(log, 0)  # gone for good: the next state names nothing


def test_a_fence_that_comes_while_the_chunks_are_written_holds_the_header(tmp_path):
    """Found by a review: the fence was looked at once, before the chunks; a flush that took
    longer than the session (a stalled broker, a stopped process) still sent the header, the
    offsets and the snapshots after the group had moved on.  It is looked at again before
    the headers: the chunks went to a slot no header names, the rest waits."""
    cp, parts, log, seen, m = setup(tmp_path)
    producer = cp.test_producer
    said: list = [None]
    cp.fence = lambda: said[0]
    flush = producer.flush

    async def slow_flush():  # the group drops the worker while its chunks are flushed
        said[0] = (logging.ERROR, "the group dropped this worker (AGG_SESSION_TIMEOUT passed without a heartbeat)")
        await flush()

    producer.flush = slow_flush
    a = parts.open(0)
    a.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)
    outbox = list(a.book.outbox)
    asyncio.run(cp.checkpoint([a]))
    assert log and all(e[0] == "flush" or (e[1] == STATE_CHANGELOG and e[2] != b"0") for e in log)  # chunks only
    assert not any(e[0] in ("safe", "confirmed") for e in log) and seen == []
    assert a.book.dirty and a.book.outbox == outbox and a.state_slot is None
    producer.flush = flush
    said[0] = None
    asyncio.run(cp.checkpoint([a]))
    assert ("safe", 0, 2) in log and seen == outbox and state_of(log, 0)["next_offset"] == 2
