"""core.repartition: the home of a region is the partition Kafka's default partitioner
(and so the HTTP ingest) gives it, and forwarding with the watermark filter gives a
single partition's totals, whatever partitions the records arrived on, whatever
prefix of forwards a crash repeats and however often a source partition's log starts
over (its log epoch)."""
from __future__ import annotations

import random

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core.contract import INGEST_HEADER, SOURCE_HEADER, parse_ingest_header
from aggregator.core.dedupid import parse_id_field, request_key
from aggregator.core.repartition import (
    Watermarks,
    forward_record,
    home,
    murmur2,
    overtaken,
    parse_source_header,
    split,
)
from aggregator.core.windows import WindowBook


def test_murmur2_is_kafkas():
    rnd = random.Random(7)
    for _ in range(2000):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 70)))
        assert murmur2(data) == aiokafka_murmur2(data) & 0xFFFFFFFF
    # the Java client's values (org.apache.kafka.common.utils.UtilsTest#testMurmur2)
    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF
    assert murmur2(b"abc") == 479470107


def test_home_is_the_partition_the_default_partitioner_gives_the_region():
    for n in (1, 2, 3, 4, 7, 12):
        parts = list(range(n))
        for region in ("eu", "us-east", "ap-south-1", "x", "a.b_c-d", "z" * 64):
            assert home(region, n) == DefaultPartitioner()(region.encode(), parts, parts)


def test_split_keeps_order_and_offsets():
    events = [("eu", 1, None), ("us", 2, 5), ("eu", 3, None), ("ap", 4, None)]
    n = 4
    here, away = split(events, [10, 11, 12, 13], home("eu", n), n)
    assert here == [e for e in events if home(e[0], n) == home("eu", n)]
    assert [f[3] for f in away] == [o for e, o in zip(events, [10, 11, 12, 13], strict=True)
                                    if home(e[0], n) != home("eu", n)]


def test_a_forwarded_record_carries_region_times_and_source():
    key, value, headers = forward_record(3, ("eu-west", 1_700_000_000_123, 1_699_999_999_000, 42, None, None))
    assert key == b"eu-west"
    assert headers[0][0] == INGEST_HEADER and parse_ingest_header(headers[0][1]) == (1_700_000_000_123,
                                                                                      1_699_999_999_000, None)
    assert headers[1][0] == SOURCE_HEADER and headers[1][1] == b"3,42"  # epoch 0: as before epochs
    assert parse_source_header(headers[1][1]) == (3, 42, 0)
    # after the source's log started over twice, the header carries its epoch
    _, _, headers = forward_record(3, ("eu", 5, None, 7, None, None), 2)
    assert headers[1][1] == b"3,7,2" and parse_source_header(headers[1][1]) == (3, 7, 2)
    assert value == b'{"region":"eu-west","ingest_ts":1700000000123,"ts":1699999999000}'
    _, value, headers = forward_record(0, ("eu", 5, None, 0, None, None))
    assert value == b'{"region":"eu","ingest_ts":5}' and headers[0][1] == b"5"
    # the dedup id travels with it (core.dedup)
    did = (request_key("k"), 3)
    _, _, headers = forward_record(0, ("eu", 5, None, 0, did, None))
    assert parse_id_field(parse_ingest_header(headers[0][1])[2], "eu") == did


def test_watermarks_drop_a_repeated_prefix_per_source():
    w = Watermarks()
    first = [(0, 0, 10, ("a", 1, None)), (1, 0, 5, ("b", 2, None)), (0, 0, 11, ("a", 3, None))]
    assert w.take(first) == [("a", 1, None), ("b", 2, None), ("a", 3, None)]
    # source 0 crashed after forwarding 10, 11 and forwards 10, 11, 12 again
    again = [(0, 0, 10, ("a", 1, None)), (0, 0, 11, ("a", 3, None)), (0, 0, 12, ("a", 4, None)),
             (1, 0, 6, ("b", 5, None))]
    assert w.take(again) == [("a", 4, None), ("b", 5, None)]
    assert w.applied == {0: 12, 1: 6} and w.epochs == {}


def test_watermarks_start_a_source_again_when_its_log_started_over():
    w = Watermarks({0: 599, 1: 40})
    # source 0's log started over (epoch 1): its offsets start again from 0, none is a repeat
    new = [(0, 1, 0, ("a", 1, None)), (0, 1, 1, ("a", 2, None)), (1, 0, 41, ("b", 3, None))]
    assert w.take(new) == [("a", 1, None), ("a", 2, None), ("b", 3, None)]
    assert w.applied == {0: 1, 1: 41} and w.epochs == {0: 1}
    # a repeat of the new log's forwards (the source crashed) is dropped, and so is any
    # forward of the old log (epoch 0) still arriving: that log is gone, and was applied
    late = [(0, 0, 600, ("a", 9, None)), (0, 1, 1, ("a", 2, None)), (0, 1, 2, ("a", 4, None))]
    assert w.take(late) == [("a", 4, None)]
    # started over again: epoch 2
    assert w.take([(0, 2, 0, ("a", 5, None))]) == [("a", 5, None)]
    assert w.applied == {0: 0, 1: 41} and w.epochs == {0: 2}


# ---------------------------------------------------------------- property
W, BIG = 1000, 10**9
T0 = 1_700_000_000_000
GRACE = 10 * W  # events are in T0 + [0, 5 W): nothing closes before the end
REGIONS = [f"r{i}" for i in range(9)]


def _book() -> WindowBook:
    return WindowBook(W, GRACE, BIG, W, 1000)


def _stored(book: WindowBook) -> dict:
    """The book's state as written and read back (to_dict shares the live dicts)."""
    return orjson.loads(orjson.dumps(book.to_dict()))


class _Source:
    """One partition of ``clicks`` with its worker: reads, splits, forwards at checkpoints,
    and can crash (back to its last durable state, re-reading what came after).  Its log
    can start over (``logs``: the partition's log, then the one after each restart); the
    worker finds that out on its next read (core.sourcelog, modelled by the log the book
    counts) and counts the new log from 0 under the next log epoch, as ``_check_source``."""

    def __init__(self, p: int, n: int, logs: list[list]) -> None:
        self.p, self.n, self.logs = p, n, logs
        self.gen = 0  # the log the partition has now
        self.book = _book()
        self.book_gen = 0  # the log the book counts
        self.durable = (_stored(self.book), 0)
        self.pending: list = []  # (foreign event, log epoch) read since the last checkpoint
        self.published: list = []

    @property
    def records(self) -> list:
        return self.logs[self.gen]

    def read(self, k: int) -> None:
        if self.book_gen != self.gen:  # the log started over
            self.book.next_offset = 0
            self.book.log_epoch += 1
            self.book_gen = self.gen
        start = self.book.next_offset
        batch = self.records[start:start + k]
        if not batch:
            return
        here, away = split(list(batch), list(range(start, start + len(batch))), self.p, self.n)
        self.book.apply(here, start + len(batch), 0)
        self.pending += [(f, self.book.log_epoch) for f in away]

    def read_forwarded(self, topic: list, k: int) -> None:
        start = self.book.repart_next
        batch = topic[start:start + k]
        if not batch:
            return
        events = Watermarks(self.book.forwarded, self.book.forwarded_epochs).take(batch)
        self.book.apply(events, self.book.next_offset, 0)
        self.book.repart_next = start + len(batch)

    def checkpoint(self, topics: list[list], crash_before_state: bool) -> None:
        for (region, its, cts, offset, *_), epoch in self.pending:  # forwards first, acknowledged
            topics[home(region, self.n)].append((self.p, epoch, offset, (region, its, cts)))
        self.pending = []
        if crash_before_state:
            return self.crash()
        self.durable = (_stored(self.book), self.book_gen)
        self.published += self.book.outbox
        self.book.published(len(self.book.outbox))

    def crash(self) -> None:
        self.book = _book()
        self.book.load(self.durable[0])
        self.book_gen = self.durable[1]
        self.pending = []

    def restart(self) -> None:
        """The log starts over (the topic created again), once all of the current one is
        counted in durable state: what is not is lost with the log, whatever the worker does
        (and two restarts with no state written in between are not covered: contract §4)."""
        state, gen = self.durable
        if (self.gen + 1 < len(self.logs) and not self.pending and self.book_gen == self.gen == gen
                and state["next_offset"] == self.book.next_offset == len(self.records)):
            self.gen += 1


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5), data=st.data())
def test_forwarding_over_n_partitions_gives_the_single_partition_totals(n, data):
    m = data.draw(st.integers(1, 120))
    events = [(data.draw(st.sampled_from(REGIONS)), data.draw(st.integers(T0, T0 + 5 * W)), None) for _ in range(m)]
    arrival = [data.draw(st.integers(0, n - 1)) for _ in range(m)]  # any partitioner at all
    logs_of = [data.draw(st.integers(0, 2)) for _ in range(m)]  # which log of its partition (restarts)

    reference = _book()
    reference.apply(events, m, 0)
    reference.advance_to(T0 + BIG)
    expected = {(s["region"], s["window_start"]): s["count"] for s in reference.outbox if s["count"]}

    logs: list[list[list]] = [[[], [], []] for _ in range(n)]
    for e, p, g in zip(events, arrival, logs_of, strict=True):
        logs[p][g].append(e)
    sources = [_Source(p, n, logs[p]) for p in range(n)]
    topics: list[list] = [[] for _ in range(n)]
    for _ in range(data.draw(st.integers(0, 60))):
        s = sources[data.draw(st.integers(0, n - 1))]
        action = data.draw(st.sampled_from(["read", "read", "forwarded", "checkpoint", "crash", "lost",
                                            "restart"]))
        if action == "read":
            s.read(data.draw(st.integers(1, 10)))
        elif action == "forwarded":
            s.read_forwarded(topics[s.p], data.draw(st.integers(1, 10)))
        elif action == "checkpoint":
            s.checkpoint(topics, crash_before_state=False)
        elif action == "crash":
            s.crash()
        elif action == "restart":
            s.restart()
        else:  # forwards acknowledged, then a crash before the state was written
            s.checkpoint(topics, crash_before_state=True)
    # run to the end: everything read, forwarded and applied, then every window closes
    for _ in range(6):
        for s in sources:
            s.read(len(s.records))
            s.checkpoint(topics, crash_before_state=False)
            s.restart()
        for s in sources:
            s.read_forwarded(topics[s.p], len(topics[s.p]))
            s.checkpoint(topics, crash_before_state=False)
    assert all(s.gen == 2 and s.book_gen == 2 for s in sources)
    for s in sources:
        s.book.advance_to(T0 + BIG)
        s.checkpoint(topics, crash_before_state=False)

    seen: dict[tuple[str, int], set[int]] = {}
    for s in sources:
        for snap in s.published:
            assert home(snap["region"], n) == s.p  # only a region's home publishes it
            seen.setdefault((snap["region"], snap["window_start"]), set()).add(snap["count"])
    assert all(len(counts) == 1 for counts in seen.values())  # one final count per (region, window)
    got = {k: c for k, (c,) in ((k, tuple(v)) for k, v in seen.items()) if c}
    assert got == expected


def test_an_event_forwarded_with_the_decoders_parts_carries_the_agg_header_of_their_tuple():
    """A record produced straight to Kafka is forwarded with its ``Parts`` (user hash, URL
    entry) written as the agg header ingest would write; so is its spill record."""
    from aggregator.core.contract import AGG_HEADER, agg_header_value
    from aggregator.core.sketches import Parts, UrlEntry
    from aggregator.spill.ledger import spill_agg

    for parts in (Parts(7, UrlEntry(9, "/a")), Parts(7, None), Parts(None, UrlEntry(9, "/a"))):
        _, _, headers = forward_record(0, ("eu", 5, None, 0, None, parts))
        assert headers[-1] == (AGG_HEADER, agg_header_value(*parts.as_tuple()))
        assert spill_agg(parts) == agg_header_value(*parts.as_tuple()).decode("latin-1")


@pytest.mark.parametrize(("acks", "lost"), [
    ([True, True, True, True], []),
    ([False, False, False, False], []),  # none taken: all sent again, in order
    ([False, True, True, True], [0]),  # 0 -> 2 refused, a later 0 -> 2 taken
    ([True, False, True, True], []),  # 1 -> 2 refused: only 0 -> 2 taken after it (another source's mark)
    ([False, False, True, True], [0]),  # 1 -> 2 at index 1 still has no later 1 -> 2 taken
    ([True, True, False, True], []),  # 0 -> 3 taken after 0 -> 2 refused: another home
])
def test_overtaken_forwards_are_those_a_later_one_of_their_lane_passed(acks, lost):
    sent = [(2, 0), (2, 1), (3, 0), (2, 0)]  # (home, source partition)
    assert overtaken(sent + [(2, 1)], acks + [False]) == lost
    assert overtaken(sent + [(2, 1)], acks + [True]) == sorted(lost + ([] if acks[1] else [1]))


def test_every_forward_a_later_one_passed_is_overtaken_and_only_those():
    assert overtaken([(2, 0)] * 3, [False, False, True]) == [0, 1]
    assert overtaken([(2, 0)] * 3, [False, True, False]) == [0]  # the last is sent again, after the taken one
