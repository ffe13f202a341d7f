"""SIGKILL of the worker mid-stream: counts exact, aggregates within their bounds, and
every re-published snapshot identical (issue 18).

The stream (2000 events/s over six regions of very different sizes, 2 s windows) goes
straight to ``clicks`` in both forms the worker reads, mixed in the same cells: half as a
program producing to Kafka writes it (a JSON value the worker parses), half as the HTTP
ingest writes it, built by ingest's own code (``ingest.records.Records`` with
``AggHeaders``: key = region, the ``clickstream-ingest`` and ``clickstream-agg`` headers,
from which the worker counts without reading the value).  So the truth of every
(region, window) is known exactly; it is kept by the generator's own ``gen.truth.Truth``.
The big cells have far more than 128 distinct URLs (the Misra-Gries path of ``top_urls``;
three leading URLs far ahead of the rest, some spelled in ways that normalise alike) and
more than 256 distinct users (the HyperLogLog path of ``unique_users``); the small ones
stay below both (the exact paths).  Some events lack a user, a URL or a client ``ts``;
1 % are late (``client_delay``).

The worker is SIGKILLed twice while records keep arriving.  The first kill is aimed at a
re-publication, with no hook in the service: as soon as a new window's snapshots appear in
``click-snapshots`` the worker is stopped (SIGSTOP) and, once the changelog and
``click-snapshots`` stand still, killed only if a partition's latest durable state still
holds in its outbox snapshots already published (they stay there until the next
checkpoint writes the state without them, AGG_STATE_FLUSH_SECONDS later); else it goes on
(SIGCONT) until the next window's.  The restarted worker recovers that state, so it must
publish those snapshots again: the test asserts it did (in every run measured the first
look found such a state).  The second kill lands wherever the stream is.  Every snapshot
ever published is then checked by ``aggregator audit``'s rules (gen/audit.py: counts and
late events exact, unique users exact up to 256 and within the HLL bound beyond, top URLs
within the Misra-Gries bound with the unambiguous top 3 first in order, delay quantiles
within 1 %), a re-published snapshot must equal the first byte for byte, and the test
asserts that both sketches' big and exact paths were exercised, the big ones in the
windows open at each kill.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import orjson
import pytest

from aggregator.broker import ensure_topics, partition_counts
from aggregator.core.contract import CLICKS, SNAPSHOTS, STATE_CHANGELOG
from aggregator.core.statechunks import decode_state
from aggregator.gen.audit import audit
from aggregator.gen.truth import Truth
from aggregator.ingest.body import Event
from aggregator.ingest.records import AggHeaders, Records
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGIONS = ["eu-west", "us-east", "ap-south", "sa-east", "af-south", "me-central"]
W_MS = 2000
AIM_WITHIN = 20.0  # s: the first kill waits this long at most for a moment that re-publishes
USERS = 3000
# the leading URLs, each in spellings that normalise alike, and their shares of the events
LEADERS = [(0.25, ["/p/0", "/p/0?ref=ad", "/p/0#top"]),
           (0.12, ["https://Shop.Example.com/p/1", "https://shop.example.com:443/p/1?x=1"]),
           (0.06, ["/p/2"])]
TAIL_URLS = 600  # the rest: over 128 distinct URLs in every cell of a few hundred events


def event_parts(rng: random.Random, now: int) -> tuple[str | None, str | None, int | None, bool]:
    """(user_id, url, client ts, late) of one event."""
    user = None if rng.random() < 0.03 else "u%d" % rng.randrange(USERS)
    x = rng.random()
    url: str | None = None
    for share, spellings in LEADERS:
        if x < share:
            url = rng.choice(spellings)
            break
        x -= share
    else:
        if x > 0.03:
            url = "/t/%d" % rng.randrange(TAIL_URLS)
        elif x > 0.01:
            url = "?utm=x"  # normalises to nothing: not counted
    late = rng.random() < 0.01
    cts = None if rng.random() < 0.03 else now - (400_000 if late else rng.randrange(50, 3000))
    return user, url, cts, late and cts is not None


async def produce(bootstrap: str, until: threading.Event, rate: int, truth: Truth, seed: int) -> int:
    """Records straight to ``clicks`` until ``until`` is set, half as JSON values, half as
    ingest writes them; ``truth`` gets every event."""
    from aiokafka import AIOKafkaProducer

    rng = random.Random(seed)
    agg = AggHeaders()  # as an ingest with the default AGG_URL_KEEP_QUERY builds its headers
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await p.start()
    n = 0
    try:
        while not until.is_set():
            now = int(time.time() * 1000)
            futs = []
            counted: list[str] = []
            parts: list[tuple[str | None, str | None, int | None]] = []
            ingest: dict[str, list[Event]] = {}
            for _ in range(rate // 10):
                r = REGIONS[min(int(rng.expovariate(0.7)), len(REGIONS) - 1)]
                user, url, cts, late = event_parts(rng, now)
                if late:
                    truth.add_late(r, "client_delay")
                else:
                    counted.append(r)
                    parts.append((user, url, cts))
                if rng.random() < 0.5:
                    ingest.setdefault(r, []).append(Event(region=r, user_id=user, url=url, ts=cts, ingest_ts=now))
                    continue
                ev = {"region": r, "ingest_ts": now, **({"user_id": user} if user is not None else {}),
                      **({"url": url} if url is not None else {}), **({"ts": cts} if cts is not None else {})}
                futs.append(await p.send(CLICKS, orjson.dumps(ev), key=r.encode()))
            truth.add(counted, now, parts)
            records = Records(now, None, agg)
            for r, events in ingest.items():
                for value, headers in records.of(events):
                    futs.append(await p.send(CLICKS, value, key=r.encode(), headers=headers, timestamp_ms=now))
            await asyncio.gather(*futs)
            n += len(futs)
            await asyncio.sleep(0.1)
    finally:
        await p.stop()
    return n


class Watcher:
    """Reads the changelog and ``click-snapshots`` as they grow: the latest durable state of
    every partition (what a restarted worker recovers) and the snapshots published."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.stored: dict[object, object] = {}  # changelog key -> latest value (None: deleted)
        self.headers: set[int] = set()  # partitions with a state header
        self.published: set[tuple[str, int]] = set()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                  auto_offset_reset="earliest")
        counts = await partition_counts(self.bootstrap, [STATE_CHANGELOG, SNAPSHOTS])
        assert counts.keys() == {STATE_CHANGELOG, SNAPSHOTS}, counts  # the worker is up: it made them
        await self.c.start()
        self.tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
        self.c.assign(self.tps)

    async def stop(self) -> None:
        await self.c.stop()

    async def settle(self, timeout: float = 5.0) -> dict:
        """The end offsets once they stand still for 0.3 s (the stopped worker's last sends in)."""
        ends = await self.c.end_offsets(self.tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            again = await self.c.end_offsets(self.tps)
            if again == ends:
                return ends
            ends = again
        raise AssertionError(f"the changelog and snapshots still grow {timeout} s after the worker stopped")

    async def read_to(self, ends: dict, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while [tp for tp in self.tps if await self.c.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"the changelog and snapshots not read to {ends} in {timeout} s"
            await self.poll(500)

    async def poll(self, timeout_ms: int) -> None:
        for tp, recs in (await self.c.getmany(timeout_ms=timeout_ms)).items():
            for rec in recs:
                if tp.topic == SNAPSHOTS:
                    s = orjson.loads(rec.value)
                    self.published.add((s["region"], s["window_start"]))
                    continue
                key = orjson.loads(rec.key)
                self.stored[key] = None if rec.value is None else orjson.loads(rec.value)
                if isinstance(key, int):
                    self.headers.add(key)

    async def new_snapshot(self, timeout: float) -> None:
        """Until a snapshot of a window not published before is read (or ``timeout`` s)."""
        seen, deadline = len(self.published), time.monotonic() + timeout
        while len(self.published) == seen and time.monotonic() < deadline:
            await self.poll(100)

    def republishing(self) -> set[tuple[str, int]]:
        """Snapshots already published that a durable state's outbox still holds."""
        out = set()
        for p in self.headers:
            decoded = decode_state(p, self.stored.get(p), self.stored.get)
            if decoded is not None:
                out |= {(s["region"], s["window_start"]) for s in decoded[0].get("outbox", ())} & self.published
        return out


async def stop_when_republishing(bootstrap: str, pid: int, within: float, looks: list[float]) -> set[tuple[str, int]]:
    """Stop the worker (SIGSTOP, its process group) at a moment when a SIGKILL makes it
    publish snapshots again, and return those.  Such a moment follows the publication of a
    window's snapshots, until the next checkpoint writes the state without them
    (AGG_STATE_FLUSH_SECONDS, 2 s here): so it is stopped and looked at as soon as a new
    window's snapshots are read, and goes on until the next if there is none.  After
    ``within`` s without such a moment it is left stopped anyway (empty set).  The worker
    is stopped on return: the caller kills it.  ``looks`` gets how long each look stopped
    it (s)."""
    w = Watcher(bootstrap)
    await w.start()
    try:
        deadline = time.monotonic() + within
        await w.read_to(await w.c.end_offsets(w.tps))  # what is there already
        await w.new_snapshot(2.5)
        while True:
            os.killpg(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await w.read_to(await w.settle())
                armed = w.republishing()
            except BaseException:
                os.killpg(pid, signal.SIGCONT)
                raise
            looks.append(time.monotonic() - t0)
            if armed or time.monotonic() > deadline:
                return armed
            os.killpg(pid, signal.SIGCONT)
            await w.new_snapshot(2.5)
    finally:
        await w.stop()


def test_sigkill_mid_stream_leaves_counts_exact(broker, service_factory):
    """Ingest-written and directly produced records, aggregates on: after two SIGKILLs every
    count is exact, every aggregate within its bound, and the snapshots the first kill left
    in a durable outbox are re-published, identical."""
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    # checkpoints 2 s apart (0.5 s by default): a window's published snapshots stay in the
    # durable outbox about 2 s, long enough to be caught on a slow machine
    svc = service_factory("worker", AGG_AGGREGATES="true", AGG_STATE_FLUSH_SECONDS="2").start()
    truth = Truth(W_MS, aggregates=True)
    kills: list[int] = []
    aimed: set[tuple[str, int]] = set()
    looks: list[float] = []
    failed: list[BaseException] = []
    done = threading.Event()

    def killer():
        try:
            time.sleep(3.0)
            aimed.update(asyncio.run(stop_when_republishing(bootstrap, svc.proc.pid, AIM_WITHIN, looks)))
            for wait in (None, 3.0):
                if wait is not None:
                    time.sleep(wait)
                kills.append(int(time.time() * 1000))
                svc.kill()
                svc.start()
            time.sleep(3.0)  # the stream goes on past the second restart
        except BaseException as exc:  # noqa: BLE001 - said in the test's thread
            failed.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=killer)
    t.start()
    total = asyncio.run(produce(bootstrap, done, 2000, truth, seed=7))
    t.join()
    assert not failed, failed
    assert len(kills) == 2 and total >= 10000  # a stream across both kills (fewer rounds on a busy machine)
    want = truth.to_json()
    expected = {(r, int(w)) for r, per in want["counts"].items() for w in per}

    def closed():
        snaps = [orjson.loads(v) for _, v in read_topic(bootstrap, SNAPSHOTS, idle=1.0)]
        got = {(s["region"], s["window_start"]) for s in snaps}
        return snaps if expected <= got else None

    def late_published(snaps) -> dict:
        """client_delay late events per region, in the first snapshot of each (region, window)."""
        firsts: dict = {}
        for s in snaps:
            firsts.setdefault((s["region"], s["window_start"]), s)
        out: dict = {}
        for s in firsts.values():
            if s["late_by_reason"]["client_delay"]:
                out.setdefault(s["region"], {"client_delay": 0})["client_delay"] += s["late_by_reason"]["client_delay"]
        return out

    published = wait_for(closed, 60, what="all windows closed after the restarts")
    # late events attach to the window open at stream time when they are processed: the last
    # may be one after the truth's last window, closed a window later by the wall clock once
    # traffic has stopped; then every late event is published, none lost and none twice
    deadline = time.monotonic() + 30
    while late_published(published) != want["late"] and time.monotonic() < deadline:
        time.sleep(0.5)
        published = closed() or published
    problems = audit(want, published, top_n=10)
    assert not problems, problems[:20]
    first: dict = {}
    again: dict = {}
    for s in published:
        k = (s["region"], s["window_start"])
        if k in first:
            assert first[k] == s, f"re-published with different content: {first[k]} vs {s}"
            again[k] = again.get(k, 0) + 1
        first[k] = s
    for s in first.values():
        assert s["late_by_reason"]["closed_window"] == 0, s  # backlog lands in its own windows
    assert sum(n for per in want["counts"].values() for n in per.values()) \
        + sum(per["client_delay"] for per in want["late"].values()) == total
    assert len({ws for _, ws in expected}) >= 6
    # what was exercised: both paths of both sketches, the big ones in the windows open at a kill
    cells = [(r, int(w), c) for r, per in want["aggregates"].items() for w, c in per.items()]
    big_urls = [(r, w) for r, w, c in cells if c["url_distinct"] > 128]
    big_users = [(r, w) for r, w, c in cells if c["unique_users"] > 256]
    small = [(r, w) for r, w, c in cells if c["url_distinct"] <= 128 and c["unique_users"] <= 256 and c["url_events"]]
    killed_in = {k - k % W_MS for k in kills}
    assert len(big_urls) >= 6 and len(big_users) >= 6 and small, (len(big_urls), len(big_users), len(small))
    assert {w for _, w in big_urls} >= killed_in and {w for _, w in big_users} >= killed_in, (big_urls, kills)
    print(f"\ncrash test: {total} events, {len(cells)} cells ({len(big_urls)} over 128 URLs, {len(big_users)} over "
          f"256 users, {len(small)} exact in both); {sum(again.values())} snapshots re-published, "
          f"{len(aimed)} by the aimed kill, after {len(looks)} looks of {max(looks, default=0):.2f} s at most")
    # the aimed kill: armed at once in every run measured (one look, also beside a CPU hog)
    assert aimed, (f"in {len(looks)} looks over {AIM_WITHIN:.0f} s no durable state held a published snapshot when the worker "
                   "was stopped: a window's snapshots should stay in the state's outbox until the next checkpoint")
    assert aimed <= again.keys(), ("a durable outbox held these published snapshots at the kill, but they were "
                                   f"not published again: {sorted(aimed - again.keys())}")
    # the restarted worker says it recovered its partitions' window state from the changelog
    text = svc.metrics_text()
    recovered = [ln for ln in text.splitlines() if ln.startswith("clickstream_state_recovered_partitions_total ")]
    assert recovered and float(recovered[0].split()[1]) >= 1, recovered
    assert "clickstream_assigned_partitions 4.0" in text
