"""Records produced straight into Kafka: bad ones go to the dead-letter topic,
the worker keeps going, good ones without an ingest_ts are stamped by the worker."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, DLQ, INGEST_HEADER, SNAPSHOTS
from aggregator.core.dedupid import request_key
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, records: list[tuple]) -> None:
    """``(key, value)`` or ``(key, value, headers)`` records, in order."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value, *headers in records:
            await p.send_and_wait(CLICKS, value, key=key, headers=headers[0] if headers else None)
    finally:
        await p.stop()


def test_bad_kafka_records_go_to_dlq_and_good_ones_are_counted(broker, service_factory):
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory().start()
    bad = [
        (b"x", b"not json"),
        (b"x", b'{"no_region": 1}'),
        (b"x", b'{"region": "a/b"}'),
        (b"x", b'{"region": 42}'),
        (b"x", b'{"region": "eu", "ts": "yesterday"}'),
        (b"x", b'{"region": "eu", "ingest_ts": "soon"}'),
        (b"x", b"[1, 2, 3]"),
        (None, b"\xff\xfe\x00"),
    ]
    good = [(b"eu", orjson.dumps({"region": "EU", "user_id": "u"})) for _ in range(7)]
    good += [(b"us", orjson.dumps({"region": "us"})) for _ in range(3)]
    t0 = int(time.time() * 1000)
    # interleave: a bad record never stops the ones after it
    mixed = [r for pair in zip(good, bad + [None] * len(good), strict=False) for r in pair if r is not None]
    asyncio.run(_produce(bootstrap, mixed))
    t1 = int(time.time() * 1000)

    dlq = wait_for(lambda: (lambda recs: recs if len(recs) >= len(bad) else None)(
        read_topic(bootstrap, DLQ, idle=1.0)), 30, what="dead letters")
    assert len(dlq) == len(bad)
    reasons = [orjson.loads(v)["reason"] for _, v in dlq]
    assert all(reasons), reasons
    raws = sorted(orjson.loads(v)["raw"] for _, v in dlq)
    assert "not json" in raws

    def counted():
        snaps = [orjson.loads(v) for _, v in read_topic(bootstrap, SNAPSHOTS, idle=1.0)]
        tot: dict = {}
        for s in snaps:
            tot[s["region"]] = tot.get(s["region"], 0) + s["count"]
        return (snaps, tot) if tot.get("eu") == 7 and tot.get("us") == 3 else None

    snaps, tot = wait_for(counted, 30, what="good records counted")
    # stamped by the worker when read (the embedded broker keeps producer timestamps)
    for s in snaps:
        if s["count"]:
            assert s["window_end"] > t0 - 2000 and s["window_start"] <= t1 + 10_000
    fams = {f.name: f for f in text_string_to_metric_families(svc.metrics_text())}
    rejected = sum(s.value for s in fams["clickstream_rejected_events"].samples
                   if s.name == "clickstream_rejected_events_total")
    assert rejected == len(bad)
    assert svc.proc.poll() is None  # the worker is still running


def test_records_with_the_ingest_header_are_counted_from_key_and_header(broker, service_factory):
    """What the HTTP ingest writes is counted without parsing the value; a header with
    a key or a value that ingest would not have written falls back to the value."""
    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory().start()
    now = int(time.time() * 1000)
    H = INGEST_HEADER
    records = [
        (b"eu", b"opaque: never parsed", [(H, b"%d" % now)]),
        (b"eu", b"opaque too", [(H, b"%d,%d" % (now, now - 600_000))]),  # client ts 10 min old: late
        (b"EU", orjson.dumps({"region": "eu"}), [(H, b"%d" % now)]),       # not ingest's key: the value
        (b"eu", orjson.dumps({"region": "us"}), [(H, b"soon")]),           # not ingest's header: the value
        (b"a/b", b"not json", [(H, b"%d" % now)]),                         # neither: dead letter
        # dedup ids ingest never writes (a body index below 0 or past any body, an event_id
        # over 128 characters): the value, never a worker stopped or a bitmap of gigabytes
        (b"us", orjson.dumps({"region": "us"}), [(H, b"%d,,k%x.-1" % (now, request_key("x")))]),
        (b"us", orjson.dumps({"region": "us"}), [(H, b"%d,,k%x.99999999999" % (now, request_key("x")))]),
        (b"us", orjson.dumps({"region": "us"}), [(H, b"%d,,e%s" % (now, b"x" * 129))]),
    ]
    asyncio.run(_produce(bootstrap, records))

    def counted():
        snaps = [orjson.loads(v) for _, v in read_topic(bootstrap, SNAPSHOTS, idle=1.0)]
        tot: dict = {}
        for sn in snaps:
            c = tot.setdefault(sn["region"], [0, 0])
            c[0] += sn["count"]
            c[1] += sn["late_by_reason"]["client_delay"]
        return tot if tot.get("eu") == [2, 1] and tot.get("us") == [4, 0] else None

    tot = wait_for(counted, 30, what="header records counted")
    assert set(tot) == {"eu", "us"}, tot
    dlq = wait_for(lambda: read_topic(bootstrap, DLQ, idle=1.0) or None, 30, what="the dead letter")
    assert [orjson.loads(v)["raw"] for _, v in dlq] == ["not json"]
    assert svc.proc.poll() is None


def _consume_all(bootstrap: str, topic: str, n: int, timeout: float = 20.0) -> list:
    from aiokafka import AIOKafkaConsumer

    async def run():
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None, enable_auto_commit=False)
        await c.start()
        out: list = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < n and time.monotonic() < deadline:
                for recs in (await c.getmany(timeout_ms=1000)).values():
                    out.extend(recs)
        finally:
            await c.stop()
        return out

    return asyncio.run(run())


def test_records_without_ingest_ts_are_placed_at_log_append_time(broker, service_factory):
    """docs/contract.md §1: records produced straight to Kafka without ``ingest_ts`` are placed by the
    broker's log-append time (``clicks`` is created with LogAppendTime); where the broker
    ignores that (the embedded one), by the time the worker first reads them.  The records are
    produced with an hour-old producer timestamp while no worker runs; the worker starts
    a few windows later, so the two clocks put them in different windows."""
    from tests.integration.conftest import ON_REAL_KAFKA

    bootstrap = broker.bootstrap
    asyncio.run(ensure_topics(bootstrap, 4))
    n = 20
    old = int(time.time() * 1000) - 3_600_000
    t0 = int(time.time() * 1000)

    async def produce():
        from aiokafka import AIOKafkaProducer
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            return [await p.send_and_wait(CLICKS, orjson.dumps({"region": "lat", "user_id": f"u{i}"}),
                                          key=b"lat", timestamp_ms=old) for i in range(n)]
        finally:
            await p.stop()

    acks = asyncio.run(produce())
    t1 = int(time.time() * 1000)
    recs = _consume_all(bootstrap, CLICKS, n)
    assert len(recs) == n
    log_append = all(r.timestamp_type == 1 for r in recs)
    print(f"timestamp_type seen by consumers: {sorted({r.timestamp_type for r in recs})}")
    if ON_REAL_KAFKA:
        assert log_append, [(r.timestamp_type, r.timestamp) for r in recs]
    if log_append:
        # the broker stamped them: its clock, not the producer's
        assert all(t0 - 1000 <= r.timestamp <= t1 + 1000 for r in recs), [r.timestamp for r in recs]
        assert all(a.timestamp_type == 1 for a in acks)
    time.sleep(4.0)  # > window (2 s) + grace (1 s): the read time falls in a later window
    started = int(time.time() * 1000)
    svc = service_factory("lat").start()

    def counted():
        snaps = [s for s in svc.snapshots() if s["region"] == "lat"]
        return snaps if sum(s["count"] for s in snaps) == n else None

    snaps = wait_for(counted, 40, what="the records counted")
    windows = sorted(s["window_start"] for s in snaps if s["count"])
    if log_append:
        # in the windows of their append time, before the worker even started
        assert all(t0 - t0 % 2000 <= ws <= t1 for ws in windows), (t0, t1, windows)
        assert windows[-1] + 2000 <= started
    else:
        assert all(ws + 2000 > started for ws in windows), (started, windows)
    assert all(s["late"] == 0 for s in snaps)


def test_the_region_cap_holds_per_worker_over_all_its_partitions(broker, service_factory):
    """Fault 11: with AGG_MAX_REGIONS=5, regions produced straight to Kafka over the four
    partitions of one worker name at most 5 regions (the cap was per partition: 11 were
    named); the rest are __other__, and nothing is lost."""
    from aggregator.core.repartition import home

    bootstrap = broker.url.split("://")[1]
    asyncio.run(ensure_topics(bootstrap, 4))
    svc = service_factory("cap", AGG_MAX_REGIONS="5").start()
    regions = [f"r{i}" for i in range(11)]
    assert len({home(r, 4) for r in regions}) >= 3  # over several partitions: a cap per partition named all
    records = [(r.encode(), orjson.dumps({"region": r})) for _ in range(20) for r in regions]
    asyncio.run(_produce(bootstrap, records))

    def counted():
        # one final snapshot per (region, window): __other__ too (its events go to its home)
        cells: dict[tuple[str, int], int] = {}
        for s in svc.snapshots():
            key = (s["region"], s["window_start"])
            assert cells.get(key, s["count"]) == s["count"], f"two snapshots of {key}: {svc.snapshots()}"
            cells[key] = s["count"]
        totals: dict[str, int] = {}
        for (region, _), n in cells.items():
            totals[region] = totals.get(region, 0) + n
        return totals if sum(totals.values()) == len(records) else None

    totals = wait_for(counted, 60, what=f"{len(records)} events counted")
    named = {r for r, n in totals.items() if r != "__other__" and n}
    assert len(named) <= 5 and totals.get("__other__", 0) == 20 * (11 - len(named)), totals
    series = {s.labels["region"] for f in text_string_to_metric_families(svc.metrics_text())
              if f.name == "clickstream_events" for s in f.samples}
    assert series and len(series - {"__other__"}) <= 5, series  # metric labels follow the cap
