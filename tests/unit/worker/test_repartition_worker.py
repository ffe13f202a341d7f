"""The worker's side of repartitioning (core.repartition): the decoder sets foreign
events aside with the same rule as ``core.repartition.split``, reads forwarded records
(dropping repeats), the checkpoint sends forwards before any state header and holds the
state when they fail, and a stored state counted with another partition count refuses."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.contract import AGG_HEADER, CLICKS_REPARTITION, DLQ, OTHER_REGION, STATE_CHANGELOG, ingest_header
from aggregator.core.dedupid import event_key
from aggregator.core.regioncap import RegionCap
from aggregator.core.repartition import forward_record, home, split
from aggregator.core.windows import STATE_FORMAT, WindowBook
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer
from aggregator.worker.decoder import RecordDecoder
from aggregator.worker.partitions import (
    BookSettings,
    PartitionCountChanged,
    Partitions,
    StateFormatUnknown,
)
from tests.unit.worker.records import fetched
from tests.unit.worker.test_checkpoint import RecordingProducer

NOW = 5_000_000
MAX_TS = NOW + 5_000
REGIONS = [f"region-{i}" for i in range(40)]


def _mixed(n_records: int = 200) -> list:
    specs = []
    for i in range(n_records):
        region = REGIONS[i * 7 % len(REGIONS)]
        if i % 3:
            specs.append((region.encode(), b"", ingest_header(1_000 + i, None if i % 2 else 900 + i)))
        else:  # another producer: keyless JSON
            specs.append((None, orjson.dumps({"region": region.upper(), "ingest_ts": 1_000 + i}), []))
    return fetched(specs, base=100)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_the_decoder_splits_like_core_split(n):
    recs = _mixed()
    everything = RecordDecoder(1).decode(recs, NOW, 0, True, None, MAX_TS)
    for partition in range(n):
        decoder = RecordDecoder(n)
        foreign: list = []
        events, offsets, *_ = decoder.decode(recs, NOW, partition, True, None, MAX_TS, foreign)
        here, away = split(everything.events, everything.offsets, partition, n)
        assert events == here and foreign == away
        assert offsets == [o for e, o in zip(everything.events, everything.offsets, strict=True)
                           if home(e[0], n) == partition]
        assert all(decoder.homes[e[0]] == partition for e in events)


def test_without_a_forward_list_or_with_one_partition_nothing_is_set_aside():
    recs = _mixed(30)
    assert len(RecordDecoder(4).decode(recs, NOW, 0, False, None, MAX_TS).events) == 30
    foreign: list = []
    assert len(RecordDecoder(1).decode(recs, NOW, 0, False, None, MAX_TS, foreign).events) == 30
    assert foreign == []


def test_a_foreign_event_far_ahead_is_forwarded_the_home_makes_it_future_ts():
    n = 4
    region = next(r for r in REGIONS if home(r, n) != 0)
    recs = fetched([(region.encode(), b"", ingest_header(NOW + 86_400_000, None))], base=7)
    foreign: list = []
    dead: list = []
    out = RecordDecoder(n).decode(recs, NOW, 0, False, dead, MAX_TS, foreign)
    assert out.events == [] and out.future == {} and dead == []
    assert foreign == [(region, NOW + 86_400_000, None, 7, None, None)]
    fwd = fetched([forward_record(0, foreign[0])], base=0)
    (events, _, rejected, future, *_), repeats = RecordDecoder(n).decode_forwarded(fwd, home(region, n), {}, dead,
                                                                               MAX_TS)
    assert events == [] and future == {region: 1} and repeats == 0
    assert orjson.loads(dead[0][1])["partition"] == 0 and orjson.loads(dead[0][1])["offset"] == 7  # in clicks


def test_event_ids_of_regions_the_workers_cap_puts_under_other_stay_apart_at_its_home():
    """Records produced straight to Kafka with the same ``event_id`` in regions over the
    worker's cap: forwarded to ``__other__``'s home as two events, not one and a repeat."""
    n = 4
    cap = RegionCap(1, 60_000)
    specs = [(None, orjson.dumps({"region": r, "ingest_ts": 1_000, "event_id": "1"}), []) for r in ("a", "b", "c")]
    foreign: list = []
    src = (home("__other__", n) + 1) % n  # read where __other__ is not at home
    RecordDecoder(n, cap).decode(fetched(specs), NOW, src, False, None, MAX_TS, foreign)
    other = [f for f in foreign if f[0] == "__other__"]
    assert len(other) == 2
    fwd = fetched([forward_record(0, f) for f in other], base=0)
    (events, _, _, _, ids, _), _ = RecordDecoder(n, RegionCap(1, 60_000)).decode_forwarded(
        fwd, home("__other__", n), {}, None, MAX_TS)
    assert [e[0] for e in events] == ["__other__", "__other__"]
    assert ids == ["b\n1", "c\n1"]


@pytest.mark.parametrize("eid", ["", "x", "a,b\nc"])
@pytest.mark.parametrize("capped", [False, True])
def test_a_forwarded_event_id_is_counted_at_the_home_under_its_id(eid, capped):
    """Any ``event_id`` the arrival partition accepts -- the empty one too, once dead-lettered
    ``undecodable`` at the home (its id field ``e`` or ``r<region>\n`` was refused) -- is
    counted at the home under the same dedup id, alone or under ``__other__``."""
    n = 4
    regions = ["zz", "eu"] if capped else ["eu"]  # capped: eu is over a cap of 1, counted as __other__
    region = OTHER_REGION if capped else "eu"
    src = (home(region, n) + 1) % n
    specs = [(None, orjson.dumps({"region": r, "ingest_ts": 1_000, "event_id": eid}), []) for r in regions]
    foreign: list = []
    cap = RegionCap(1, 60_000) if capped else None
    RecordDecoder(n, cap).decode(fetched(specs), NOW, src, False, None, MAX_TS, foreign)
    fwd = [f for f in foreign if f[0] == region]
    assert len(fwd) == 1
    dead: list = []
    (events, _, rejected, _, ids, _), _ = RecordDecoder(n).decode_forwarded(
        fetched([forward_record(src, fwd[0])]), home(region, n), {}, dead, MAX_TS)
    assert rejected == {} and dead == []
    assert events == [(region, 1_000, None)] and ids == [event_key("eu", eid)]


def test_a_forwarded_event_with_a_malformed_agg_header_is_counted_its_aggregates_not():
    """Found by a review: contract §4 says an event whose clickstream-agg header is not as
    ingest writes it is still counted (its aggregates nothing).  At its home it was; read
    where it is not at home, it was forwarded as it came and the home dead-lettered it
    ``undecodable``, one count short."""
    n = 4
    region = "eu"
    src = (home(region, n) + 1) % n
    headers = [*ingest_header(1_000, None), (AGG_HEADER, b"-1,,")]
    foreign: list = []
    RecordDecoder(n, aggregates=True).decode(fetched([(region.encode(), b"", headers)]), NOW, src, False, None,
                                             MAX_TS, foreign)
    assert len(foreign) == 1
    dead: list = []
    decoder = RecordDecoder(n, aggregates=True)
    (events, _, rejected, _, _, aggs), _ = decoder.decode_forwarded(fetched([forward_record(src, foreign[0])]),
                                                                    home(region, n), {}, dead, MAX_TS)
    assert rejected == {} and dead == [] and events == [(region, 1_000, None)]
    book = WindowBook(60_000, 5_000, 60_000, 60_000, 10, WindowAggregates())
    book.apply(events, 1, 1_000, aggs)
    assert book.aggs is not None
    book.aggs.take_records(0)
    assert book.aggs.malformed == 1


def test_forwarded_records_are_read_repeats_dropped_bad_ones_dead_lettered():
    specs = [forward_record(1, ("eu", 10, None, 5, None, None)), forward_record(2, ("us", 11, 3, 9, None, None)),
             forward_record(1, ("eu", 12, None, 6, None, None)),
             # source 1 again
             forward_record(1, ("eu", 10, None, 5, None, None)), forward_record(1, ("eu", 12, None, 6, None, None)),
             forward_record(1, ("eu", 13, None, 7, None, None)),
             (b"eu", b"{}", []),  # not written by a worker
             (b"EU", b"", forward_record(1, ("eu", 14, None, 8, None, None))[2])]  # key not a normalised region
    applied: dict[int, int] = {}
    dead: list = []
    (events, _, rejected, *_), repeats = RecordDecoder(3).decode_forwarded(fetched(specs), 0, applied, dead, MAX_TS)
    assert events == [("eu", 10, None), ("us", 11, 3), ("eu", 12, None), ("eu", 13, None)]
    assert repeats == 2 and applied == {1: 7, 2: 9}
    assert rejected == {"undecodable": 1, "bad_region": 1} and len(dead) == 2


def test_forwarded_records_of_a_source_whose_log_started_over_are_counted_once():
    # source 1 forwarded offsets 5, 6 of its first log; its log started over (epoch 1) and
    # it forwards offsets 0, 1 of the new one, then after a crash 1 again, and 2
    specs = [forward_record(1, ("eu", 10, None, 5, None, None)), forward_record(1, ("eu", 11, None, 6, None, None)),
             forward_record(1, ("eu", 20, None, 0, None, None), 1), forward_record(1, ("eu", 21, None, 1, None, None), 1),
             forward_record(1, ("eu", 21, None, 1, None, None), 1),  # repeat
             forward_record(1, ("eu", 12, None, 7, None, None)),  # of the old log: stale
             forward_record(1, ("eu", 22, None, 2, None, None), 1),
             forward_record(2, ("us", 30, None, 3, None, None))]
    applied: dict[int, int] = {}
    epochs: dict[int, int] = {}
    (events, *_), repeats = RecordDecoder(3).decode_forwarded(fetched(specs), 0, applied, None, MAX_TS, epochs)
    assert events == [("eu", 10, None), ("eu", 11, None), ("eu", 20, None), ("eu", 21, None), ("eu", 22, None),
                      ("us", 30, None)]
    assert repeats == 2 and applied == {1: 2, 2: 3} and epochs == {1: 1}
    # the marks as the book stores them: read again after a crash, all of it is a repeat
    (events, *_), repeats = RecordDecoder(3).decode_forwarded(fetched(specs), 0, applied, None, MAX_TS, epochs)
    assert events == [] and repeats == len(specs)


def test_a_forwarded_record_of_the_earlier_header_format_is_epoch_0():
    key, value, headers = forward_record(1, ("eu", 10, None, 5, None, None))
    assert headers[1][1] == b"1,5"
    applied, epochs = {1: 4}, {}
    (events, *_), _ = RecordDecoder(3).decode_forwarded(fetched([(key, value, headers)]), 0, applied, None,
                                                         MAX_TS, epochs)
    assert events == [("eu", 10, None)] and applied == {1: 5} and epochs == {}


def _setup(tmp_path, partitions=4):
    log: list = []
    producer = RecordingProducer(log)
    m = Metrics()
    cp = Checkpointer(lambda: producer, lambda p, recs: log.append(("confirmed", p)),
                      lambda p, o: log.append(("safe", p, o)), m, [],
                      lambda p, o: log.append(("safe-forwarded", p, o)))
    parts = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, partitions), tmp_path, lambda p: None, m)
    return cp, parts, log, producer


def test_forwards_go_out_before_the_state_header_and_forwarded_offsets_are_marked_safe(tmp_path):
    cp, parts, log, _ = _setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 10, 1_000)
    p.book.repart_next = 4
    key, value, headers = forward_record(0, ("us", 1_000, None, 3, None, None))
    cp.forward.append((2, key, value, headers))
    asyncio.run(cp.checkpoint([p]))
    sends = [e for e in log if e[0] == "send"]
    kinds = [e[1] for e in sends]
    first_header = max(i for i, e in enumerate(sends) if e[1] == STATE_CHANGELOG)
    assert kinds.index(CLICKS_REPARTITION) < first_header
    assert log.index(("flush",)) < log.index(sends[first_header])  # acknowledged before the header
    assert ("safe", 0, 10) in log and ("safe-forwarded", 0, 4) in log and cp.forward == []


def test_a_refused_forward_holds_every_state_and_is_sent_again(tmp_path):
    cp, parts, log, producer = _setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 10, 1_000)
    cp.forward.append((2, *forward_record(0, ("us", 1_000, None, 3, None, None))))
    producer.refused.add(CLICKS_REPARTITION)
    asyncio.run(cp.checkpoint([p]))
    assert not [e for e in log if e[0] in ("safe", "confirmed")] and cp.failing
    assert len(cp.forward) == 1 and p.book.dirty  # the source's offset is not committed
    producer.refused.clear()
    log.clear()
    asyncio.run(cp.checkpoint([p]))
    assert [e[1] for e in log if e[0] == "send"].count(CLICKS_REPARTITION) == 1 and ("safe", 0, 10) in log
    assert DLQ not in [e[1] for e in log if e[0] == "send"]


def test_a_forward_overtaken_by_a_later_one_to_its_home_is_said_counted_and_not_sent_again(tmp_path, caplog):
    cp, parts, log, producer = _setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 10, 1_000)
    lanes = [(0, 2, 3), (1, 2, 5), (0, 2, 4), (0, 3, 6)]  # (source partition, home, source offset), in send order
    sent = [(home_p, *forward_record(src, ("us", 1_000 + off, None, off, None, None))) for src, home_p, off in lanes]
    cp.forward.extend(sent)
    # the broker refuses 0 -> 2 at offset 3 and takes 0 -> 2 at offset 4: the home's mark passes 3
    producer.refused_values |= {sent[0][2], sent[3][2]}
    asyncio.run(cp.checkpoint([p]))
    assert cp.failing and not [e for e in log if e[0] in ("safe", "confirmed")]
    assert parts.metrics.registry.get_sample_value("clickstream_forwards_lost_total") == 1
    assert [r.levelname for r in caplog.records if "forwarded to clicks-repartition" in r.getMessage()] == ["ERROR"]
    assert cp.forward == sent[1:]  # 0 -> 3 at offset 6 was not overtaken: sent again, in order
    producer.refused_values.clear()
    log.clear()
    asyncio.run(cp.checkpoint([p]))
    assert [e[3] for e in log if e[0] == "send" and e[1] == CLICKS_REPARTITION] == [f[2] for f in sent[1:]]
    assert ("safe", 0, 10) in log
    assert parts.metrics.registry.get_sample_value("clickstream_forwards_lost_total") == 1


def test_a_state_with_open_windows_under_another_partition_count_refuses(tmp_path):
    _, parts, _, _ = _setup(tmp_path, partitions=4)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    assert p.book.to_dict()["partitions"] == 4
    stored = orjson.loads(p.state_value())
    grown = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, 6), tmp_path / "b",
                       lambda q: (stored, None), Metrics())
    with pytest.raises(PartitionCountChanged, match="4 partitions, now it has 6"):
        grown.open(0)
    # nothing open (every window published): the new count is adopted
    stored.update(counts={}, late={})
    assert grown.open(0).book.partitions == 6


def test_a_state_taken_over_under_a_new_partition_count_leaves_moved_regions_to_their_home(tmp_path):
    """Found by a review: a state with every window published took the new count but kept the
    regions whose home moved, and published zero-count final snapshots of them for up to
    AGG_REGION_IDLE_SECONDS beside their new home's real ones (two per (region, window))."""
    moved = next(r for r in REGIONS if home(r, 2) == 0 and home(r, 4) != 0)
    stays = next(r for r in REGIONS if home(r, 2) == 0 and home(r, 4) == 0)
    _, parts, _, _ = _setup(tmp_path, partitions=2)
    p = parts.open(0)
    p.book.apply([(moved, 1_000, None), (stays, 1_500, None)], 2, 1_000)
    p.book.advance_to(2_200)  # the window closes: published
    p.book.published(len(p.book.outbox))
    assert not p.book.holds_open_data() and set(p.book.last_seen) == {moved, stays}
    stored = orjson.loads(p.state_value())
    grown = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, 4), tmp_path / "b",
                       lambda q: (stored, None), Metrics())
    book = grown.open(0).book
    assert book.partitions == 4 and set(book.last_seen) == {stays} and set(book.first_seen) == {stays}
    book.advance_to(10_000)
    assert book.outbox and {s["region"] for s in book.outbox} == {stays}  # the moved one: its new home's
    # spilled events of a region whose home moved would be counted here when drained: refused
    stored["spill"] = {moved: [5, 0, 3]}
    spilled = Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, 4), tmp_path / "c",
                         lambda q: (stored, None), Metrics())
    with pytest.raises(PartitionCountChanged, match="or spilled events counted when clicks had 2 partitions"):
        spilled.open(0)
    stored["spill"] = {stays: [5, 0, 3]}  # its home stays: drained here as before
    assert Partitions(BookSettings(1000, 100, 60_000, 60_000, 10, 4), tmp_path / "d",
                      lambda q: (stored, None), Metrics()).open(0).spill.ledger.backlogged() == [stays]


def test_a_state_in_a_format_this_version_does_not_read_refuses(tmp_path):
    _, parts, _, _ = _setup(tmp_path)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None)], 1, 1_000)
    stored = orjson.loads(p.state_value())
    assert stored["v"] == STATE_FORMAT  # what this version writes
    for v, ok in ((STATE_FORMAT, True), (None, False), (STATE_FORMAT + 1, False), ("1", False), (0, False)):
        state = {**stored, "v": v}
        again = Partitions(parts.books, tmp_path / f"b{v}", lambda q, s=state: (s, None), Metrics())
        if ok:
            assert again.open(0).book.next_offset == 1
        else:
            with pytest.raises(StateFormatUnknown, match=f"format {v!r}, and this version"):
                again.open(0)
    del stored["v"]  # a state written before the field: this version's format
    assert Partitions(parts.books, tmp_path / "old", lambda q: (stored, None), Metrics()).open(0).book.next_offset == 1


def test_a_refused_state_is_said_once_kept_out_of_counting_and_named_by_readyz(tmp_path, caplog):
    from types import SimpleNamespace

    from aggregator.config_load import load
    from aggregator.worker.service import WorkerService

    w = WorkerService(load(env={"AGG_SPILL_DIR": str(tmp_path / "spill"), "AGG_PARTITIONS": "2"}), Metrics(), [])
    _, parts, _, _ = _setup(tmp_path)
    state = {**orjson.loads(parts.open(0).state_value()), "v": STATE_FORMAT + 1}
    m = Metrics()
    w.partitions = Partitions(w.partitions.books, tmp_path / "w", lambda q: (state, None) if q == 1 else None, m)
    paused: list = []
    w.app = SimpleNamespace(consumer=SimpleNamespace(pause_partitions=paused.extend), rebalancing=False)
    w.kafka = SimpleNamespace(read_to=lambda partition, n: n,
                              assigned=lambda: {0, 1}, recovered=lambda: True, highwater=lambda *a: None,
                              refused=lambda: None)
    w.started = True
    assert w.not_ready() is None
    batch = fetched([(b"eu", orjson.dumps({"region": "eu"}), [])], base=0)
    for _ in range(2):  # fetched again after a rebalance: refused again, said once
        assert w.on_batch(SimpleNamespace(topic="clicks", partition=1), batch) == 0
    assert [(tp.topic, tp.partition) for tp in paused] == [("clicks", 1), ("clicks-repartition", 1)] * 2
    assert 1 not in w.partitions
    assert (w.not_ready() or "").startswith("partition 1: its window state is in format 2")
    assert [r.levelname for r in caplog.records if "format 2" in r.getMessage()] == ["ERROR"]
    w._sync_assignment()  # the tick's look at the assignment does not open it again (nor fail)
    assert 1 not in w.partitions
    assert 0 in w.partitions
    assert w.on_batch(SimpleNamespace(topic="clicks", partition=0), batch) is None  # the other one counts
    w.partitions.report()
    assert m.registry.get_sample_value("clickstream_refused_partitions") == 1
    assert m.registry.get_sample_value("clickstream_assigned_partitions") == 1
    w.partitions.keep_only({0})  # moved to another worker: its refusal is that one's to say
    assert w.not_ready() is None
    w.partitions.report()
    assert m.registry.get_sample_value("clickstream_refused_partitions") == 0


def test_book_state_keeps_the_repartition_fields(tmp_path):
    _, parts, _, _ = _setup(tmp_path)
    book = parts.books.new_book()
    book.forwarded = {1: 7, 3: 2}
    book.forwarded_epochs = {3: 2}
    book.repart_next = 12
    book.partitions = 4
    book.log_epoch = 1
    again = parts.books.new_book()
    again.load(orjson.loads(orjson.dumps(book.to_dict())))
    assert (again.forwarded, again.forwarded_epochs, again.repart_next, again.partitions, again.log_epoch) == (
        {1: 7, 3: 2}, {3: 2}, 12, 4, 1)
    # a state of the earlier format (no epochs): every epoch is 0, and 0s are not written
    stored = book.to_dict()
    del stored["forwarded_epochs"], stored["log_epoch"]
    again.load(orjson.loads(orjson.dumps(stored)))
    assert (again.forwarded_epochs, again.log_epoch) == ({}, 0)
    assert "forwarded_epochs" not in again.to_dict() and "log_epoch" not in again.to_dict()
