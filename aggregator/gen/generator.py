"""Synthetic click-stream over HTTP, with exact ground truth.

Each ingest answer carries the request's ``ingest_ts``; with it the
generator knows the window of every accepted event and writes expected
counts per (region, window) as JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import orjson

from aggregator.broker.security import PLAINTEXT, KafkaSecurity, check_login
from aggregator.core.contract import CLICKS
from aggregator.gen.audit import TruthJSON


def region_names(n: int) -> list[str]:
    base = ["eu-west", "eu-north", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south",
            "me-central", "ca-central", "eu-south", "ap-north"]
    return [base[i] if i < len(base) else f"region-{i}" for i in range(n)]


class Truth:
    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.counts: dict[str, dict[str, int]] = {}   # region -> window_start -> n
        self.late: dict[str, dict[str, int]] = {}     # region -> reason -> n
        self.accepted = 0
        self.rejected = 0
        self.sent = 0
        self.elapsed_s = 0.0
        self.target_rate = 0.0

    def add(self, regions: list[str], ingest_ts: int) -> None:
        ws = str(ingest_ts - ingest_ts % self.window_ms)
        for r in regions:
            per = self.counts.setdefault(r, {})
            per[ws] = per.get(ws, 0) + 1

    def add_late(self, region: str, reason: str) -> None:
        per = self.late.setdefault(region, {})
        per[reason] = per.get(reason, 0) + 1

    def to_json(self) -> TruthJSON:
        return {"window_ms": self.window_ms, "accepted": self.accepted, "rejected": self.rejected,
                "sent": self.sent, "elapsed_s": round(self.elapsed_s, 3),
                "achieved_rate": round(self.achieved_rate, 1), "target_rate": self.target_rate,
                "counts": self.counts, "late": self.late}

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def rate_summary(sent: int, elapsed_s: float, target_rate: float) -> list[str]:
    """The final summary lines; says plainly when the target rate was not sustained
    (achieved below 90% of the target)."""
    achieved = sent / elapsed_s if elapsed_s > 0 else 0.0
    target = f" (target {target_rate:.0f}/s)" if target_rate > 0 else " (target: as fast as possible)"
    lines = [f"gen: achieved {achieved:.0f}/s over {elapsed_s:.1f}s{target}"]
    if target_rate > 0 and achieved < 0.9 * target_rate:
        lines.append(f"gen: WARNING: could not sustain target rate: achieved {achieved:.0f}/s "
                     f"of {target_rate:.0f}/s")
    return lines


class EventSource:
    """The synthetic stream, a pure function of the seed: the same seed gives the same
    sequence of records (regions, users, urls, bad and delayed records); only the
    client ``ts`` depends on the wall clock."""

    def __init__(self, seed: int, regions: int, skew: float = 1.1, bad_fraction: float = 0.0,
                 delayed_fraction: float = 0.0, late_after_ms: int = 300_000,
                 hot_region: str = "", burst_multiplier: float = 1.0, clock_skew_ms: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = region_names(regions)
        if hot_region and hot_region not in self.names:
            self.names.append(hot_region)
        self.weights = [1.0 / (i + 1) ** skew for i in range(len(self.names))]
        # during a burst the hot region sends burst_multiplier times its normal share
        self.burst_weights = [w * burst_multiplier if n == hot_region else w
                              for n, w in zip(self.names, self.weights, strict=True)]
        self.burst_rate_factor = sum(self.burst_weights) / sum(self.weights)
        self.clock_skew_ms = clock_skew_ms
        self.bad_fraction = bad_fraction
        self.delayed_fraction = delayed_fraction
        self.late_after_ms = late_after_ms
        self.n = 0

    def batch(self, n: int, now_ms: int, burst: bool = False
              ) -> tuple[list[bytes], list[str | None], list[int]]:
        """``n`` NDJSON lines, the region of each (None: malformed) and its client ``ts``
        (the producer's clock, skewed by ``clock_skew_ms``)."""
        weights = self.burst_weights if burst else self.weights
        rng = self.rng
        lines: list[bytes] = []
        regs: list[str | None] = []
        delayed: list[int] = []
        for _ in range(n):
            self.n += 1
            if rng.random() < self.bad_fraction:
                lines.append(orjson.dumps({"region": "bad region/" + str(rng.randrange(9)),
                                           "event_id": f"{self.seed}-{self.n}"}))
                regs.append(None)
                delayed.append(0)
                continue
            r = rng.choices(self.names, weights)[0]
            d = rng.random() < self.delayed_fraction
            ts = now_ms + self.clock_skew_ms - (self.late_after_ms + 60_000 if d else rng.randrange(0, 2000))
            lines.append(orjson.dumps({"region": r, "event_id": f"{self.seed}-{self.n}",
                                       "user_id": f"u{rng.randrange(10**6)}",
                                       "url": f"/p/{rng.randrange(1000)}", "ts": ts}))
            regs.append(r)
            delayed.append(ts)
        return lines, regs, delayed


async def generate(url: str, rate: float, count: int, regions: int, seed: int, batch: int,
                   window_ms: int, skew: float = 1.1, bad_fraction: float = 0.0,
                   delayed_fraction: float = 0.0, late_after_ms: int = 300_000,
                   token: str = "", concurrency: int = 4, progress: bool = True,
                   progress_interval: float = 5.0, kafka: str = "", hot_region: str = "",
                   burst_multiplier: float = 1.0, burst_start: float = 0.0, burst_duration: float = 0.0,
                   clock_skew_ms: int = 0, security: KafkaSecurity = PLAINTEXT) -> Truth:
    """Send ``count`` events at ``rate``/s over HTTP to ``url`` (or, with ``kafka`` a
    bootstrap address, produce them straight to topic ``clicks`` with value = event plus
    ``ingest_ts`` = now ms, with TLS/SASL as ``security`` says) and return the exact ground
    truth.  A refused Kafka login raises ``KafkaLoginError`` before anything is sent."""
    source = EventSource(seed, regions, skew=skew, bad_fraction=bad_fraction,
                         delayed_fraction=delayed_fraction, late_after_ms=late_after_ms,
                         hot_region=hot_region, burst_multiplier=burst_multiplier,
                         clock_skew_ms=clock_skew_ms)
    truth = Truth(window_ms)
    truth.target_rate = rate
    headers = {"Content-Type": "application/x-ndjson"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    sent = 0
    last_report = start

    def is_late(cts: int, ingest_ts: int) -> bool:
        return ingest_ts - cts > late_after_ms

    async def post(session: aiohttp.ClientSession, lines: list[bytes], regs: list[str | None],
                   delayed: list[int]) -> None:
        body = b"\n".join(lines)
        for _attempt in range(20):
            try:
                async with session.post(url + "/v1/events", data=body, headers=headers) as resp:
                    if resp.status == 503:
                        await asyncio.sleep(0.5)
                        continue
                    resp.raise_for_status()
                    ans = await resp.json()
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.5)
        else:
            raise RuntimeError("ingest kept failing; giving up")
        bad = {e["index"] for e in ans["errors"]}
        truth.accepted += ans["accepted"]
        truth.rejected += ans["rejected"]
        ok_regions = []
        for i, r in enumerate(regs):
            if i in bad or r is None:
                continue
            if is_late(delayed[i], ans["ingest_ts"]):
                truth.add_late(r, "client_delay")
            else:
                ok_regions.append(r)
        truth.add(ok_regions, ans["ingest_ts"])

    async def produce(producer: Any, lines: list[bytes], regs: list[str | None],
                      delayed: list[int]) -> None:
        ingest_ts = int(time.time() * 1000)  # one per batch, like an HTTP request
        futs = []
        for line, r in zip(lines, regs, strict=True):
            d = orjson.loads(line)
            d["ingest_ts"] = ingest_ts
            key = (r if r is not None else str(d.get("region", ""))).encode()
            futs.append(await producer.send(CLICKS, orjson.dumps(d), key=key))
        await asyncio.gather(*futs)  # acknowledged by the broker
        ok_regions = []
        for r, d in zip(regs, delayed, strict=True):
            if r is None:
                truth.rejected += 1  # the worker sends it to clicks-dlq
                continue
            truth.accepted += 1
            if is_late(d, ingest_ts):
                truth.add_late(r, "client_delay")
            else:
                ok_regions.append(r)
        truth.add(ok_regions, ingest_ts)

    sink: Callable[[list[bytes], list[str | None], list[int]], Coroutine[Any, Any, None]]
    async with contextlib.AsyncExitStack() as stack:
        if kafka:
            from aiokafka import AIOKafkaProducer

            bootstrap = ",".join(h.split("://", 1)[-1] for h in kafka.split(","))
            await check_login(bootstrap, security)
            # no idempotence: the embedded broker does not grant producer ids
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                        **security.aiokafka_kwargs())
            stack.push_async_callback(producer.stop)
            await producer.start()
            sink = lambda *a: produce(producer, *a)  # noqa: E731
        else:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            sink = lambda *a: post(session, *a)  # noqa: E731
        tasks: set[asyncio.Task[None]] = set()
        next_at = start
        while sent < count:
            n = min(batch, count - sent)
            elapsed = time.monotonic() - start
            burst = burst_duration > 0 and burst_start <= elapsed < burst_start + burst_duration
            lines, regs, delayed = source.batch(n, int(time.time() * 1000), burst=burst)
            await sem.acquire()
            t = asyncio.create_task(sink(lines, regs, delayed))
            t.add_done_callback(lambda _t: sem.release())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            sent += n
            if rate > 0:  # the hot region's burst adds to the base rate
                next_at += n / (rate * (source.burst_rate_factor if burst else 1.0))
            delay = next_at - time.monotonic() if rate > 0 else 0
            if delay > 0:
                await asyncio.sleep(delay)
            if progress and time.monotonic() - last_report >= progress_interval:
                last_report = time.monotonic()
                el = last_report - start
                print(f"gen: sent {sent} events in {el:.0f}s ({sent / el:.0f}/s achieved, target {rate:.0f}/s)",
                      file=sys.stderr, flush=True)
        if tasks:
            await asyncio.gather(*tasks)
    el = max(1e-9, time.monotonic() - start)
    truth.sent = sent
    truth.elapsed_s = el
    if progress:
        late = sum(n for per in truth.late.values() for n in per.values())
        print(f"gen: done: {sent} sent, {truth.accepted} accepted, {truth.rejected} rejected, "
              f"{late} client-delayed, in {el:.1f}s", file=sys.stderr, flush=True)
        for line in rate_summary(sent, el, rate):
            print(line, file=sys.stderr, flush=True)
    return truth
