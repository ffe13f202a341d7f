"""tools/ingest_micro.py runs the handler's per-event steps and prints a per-event cost for
each case (a small run; the numbers themselves are in docs/performance.md)."""
from __future__ import annotations

import asyncio
import re

from aiokafka import AIOKafkaProducer

from tools.bench.loadgen import bodies
from tools.ingest_micro import _Unsent, main, one_pass


class _Counting(_Unsent):
    """Counts the records of its batches before they are dropped."""

    appended = 0

    def drop(self) -> None:
        for pump in self.pumps.values():
            for batch in [pump.batch, *(b for b, _ in pump.sealed)]:
                if batch is not None:
                    self.appended += batch.record_count()
        super().drop()


def test_every_event_of_the_bodies_is_appended_to_a_batch():
    work = [b for b, _ in bodies(100, 3, 1)]

    async def go(aggregates: bool, typed: bool) -> int:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
        batcher = _Counting(producer, "clicks")
        one_pass(work, aggregates, typed, batcher)
        await asyncio.sleep(0)
        await producer.stop()
        return batcher.appended

    for aggregates in (True, False):
        for typed in (True, False):
            assert asyncio.run(go(aggregates, typed)) == 300


def test_ingest_micro_prints_each_case(capsys):
    main(["--bodies", "3", "--batch", "100", "--runs", "1"])
    lines = capsys.readouterr().out.splitlines()
    cases = [re.fullmatch(r"ingest, aggregates (on|off), typed parse (on|off) +[0-9]+\.[0-9]{3} µs/event", ln)
             for ln in lines]
    assert all(cases), lines
    assert sorted(m.groups() for m in cases if m) == [(a, t) for a in ("off", "on") for t in ("off", "on")]
