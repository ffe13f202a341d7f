"""Records produced straight into Kafka: bad ones go to the dead-letter topic,
the worker keeps going, good ones without an ingest_ts are stamped by the worker."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import CLICKS, DLQ, SNAPSHOTS, ensure_topics
from tests.conftest import read_topic, wait_for

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, records: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value in records:
            await p.send_and_wait(CLICKS, value, key=key)
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
    mixed = [r for pair in zip(good, bad + [None] * len(good)) for r in pair if r is not None]
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
