"""Synthetic click-stream over HTTP, with exact ground truth.

Each ingest answer carries the request's ``ingest_ts``; with it the
generator knows the window of every accepted event and keeps the ground truth
(gen/truth.py): expected counts per (region, window), written as JSON, and
(issue 18) the exact aggregates of each such cell: distinct users, URL counts by
normalised URL and client-delay quantiles.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import secrets
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Coroutine
from itertools import accumulate
from typing import Any

import aiohttp
import orjson

from aggregator.broker.security import PLAINTEXT, KafkaSecurity, check_login
from aggregator.core.contract import CLICKS
from aggregator.gen.truth import Parts, Truth


def region_names(n: int) -> list[str]:
    base = ["eu-west", "eu-north", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south",
            "me-central", "ca-central", "eu-south", "ap-north"]
    return [base[i] if i < len(base) else f"region-{i}" for i in range(n)]


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


def user_pool(index: int) -> int:
    """How many distinct users the region at ``index`` draws from: every other region a
    small audience (200: its cells stay below the sketch's exact threshold of 256 users,
    whatever the rate), the others 1,000,000 (about as many users as events: a busy cell
    goes past it and is counted by the HyperLogLog)."""
    return 1_000_000 if index % 2 == 0 else 200


PAGES = 1000        # distinct pages, visited Zipf-like (exponent URL_SKEW): a clear top 3
URL_SKEW = 1.2
NO_TS, NO_USER, NO_URL = 0.03, 0.03, 0.03  # fractions of good events without that field


class EventSource:
    """The synthetic stream, a pure function of the seed: the same seed gives the same
    sequence of records (regions, users, urls, bad and delayed records); only the
    client ``ts`` depends on the wall clock, and the event ids on ``run``.

    Users: ``u<n>`` from the region's pool (``user_pool``).  URLs: ``/p/<k>`` with page
    ``k`` Zipf-like over PAGES, written in a few forms that normalise to the same URL (a
    query string, a fragment, an absolute ``https://Shop.Example.com`` form) so the
    counts depend on the normalisation.  A few percent of events lack ``ts``, ``user_id``
    or ``url``.  ``last_parts``: (user_id, url, ts) of each record of the last batch."""

    def __init__(self, seed: int, regions: int, skew: float = 1.1, bad_fraction: float = 0.0,
                 delayed_fraction: float = 0.0, late_after_ms: int = 300_000,
                 hot_region: str = "", burst_multiplier: float = 1.0, clock_skew_ms: int = 0,
                 reuse_fraction: float = 0.0, reuse_within_ms: int = 300_000, run: str = "") -> None:
        self.seed = seed
        # ids are ``<run><seed>-<n>``: a run id (``generate`` makes one) keeps a second run of
        # the same seed from repeating the first one's ids, which a service drops within its horizon
        self.id_prefix = f"{run}{seed}-"
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
        # a fraction of events repeat the (region, event_id) of a recent accepted one: a
        # duplicate the service drops (docs/contract.md §3, Retries); last_dups: their indices
        self.reuse_fraction = reuse_fraction
        # (region, event_id, when it was sent): only ids sent within reuse_within_ms are repeated,
        # so each repeat lands within the service's dedup horizon (half of AGG_DEDUP_SECONDS)
        self.reuse_within_ms = reuse_within_ms
        self.pool: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=10_000)
        self.sent_ms = 0  # the time of the last batch made (when its accepted events were sent)
        self.last_dups: set[int] = set()
        self.last_parts: list[Parts] = []
        self.user_pools = {n: user_pool(i) for i, n in enumerate(self.names)}
        self.page_cum = list(accumulate(1.0 / (k + 1) ** URL_SKEW for k in range(PAGES)))

    def page_url(self) -> str:
        rng = self.rng
        k = bisect_right(self.page_cum, rng.random() * self.page_cum[-1])
        form = rng.randrange(8)
        if form == 0:
            return f"/p/{k}?ref={rng.randrange(50)}"
        if form == 1:
            return f"https://Shop.Example.com:443/p/{k}#top"
        return f"https://shop.example.com/p/{k}" if form == 2 else f"/p/{k}"

    def accepted(self, lines: list[bytes], regs: list[str | None], rejected: set[int]) -> None:
        """Events of an answered request that were accepted: ids that may be repeated later."""
        if self.reuse_fraction:
            for i, (line, r) in enumerate(zip(lines, regs, strict=True)):
                if r is not None and i not in rejected:
                    self.pool.append((r, orjson.loads(line)["event_id"], self.sent_ms))

    def batch(self, n: int, now_ms: int, burst: bool = False
              ) -> tuple[list[bytes], list[str | None], list[int]]:
        """``n`` NDJSON lines, the region of each (None: malformed) and its client ``ts``
        (the producer's clock, skewed by ``clock_skew_ms``; for the few records sent
        without one, the one it would have had: ``last_parts`` has what was sent)."""
        weights = self.burst_weights if burst else self.weights
        rng = self.rng
        lines: list[bytes] = []
        regs: list[str | None] = []
        delayed: list[int] = []
        self.last_dups = set()
        parts: list[Parts] = []
        self.last_parts = parts
        self.sent_ms = now_ms
        pool = self.pool
        while pool and pool[0][2] < now_ms - self.reuse_within_ms:
            pool.popleft()  # too old to be a repeat the service drops
        for i in range(n):
            self.n += 1
            if pool and rng.random() < self.reuse_fraction:
                r, eid, _ = pool[rng.randrange(len(pool))]
                lines.append(orjson.dumps({"region": r, "event_id": eid, "user_id": "dup"}))
                regs.append(r)
                delayed.append(now_ms)
                parts.append(("dup", None, None))
                self.last_dups.add(i)
                continue
            if rng.random() < self.bad_fraction:
                lines.append(orjson.dumps({"region": "bad region/" + str(rng.randrange(9)),
                                           "event_id": f"{self.id_prefix}{self.n}"}))
                regs.append(None)
                delayed.append(0)
                parts.append((None, None, None))
                continue
            r = rng.choices(self.names, weights)[0]
            d = rng.random() < self.delayed_fraction
            ts = now_ms + self.clock_skew_ms - (self.late_after_ms + 60_000 if d else rng.randrange(0, 2000))
            ev: dict[str, Any] = {"region": r, "event_id": f"{self.id_prefix}{self.n}"}
            user = url = None
            if rng.random() >= NO_USER:
                user = ev["user_id"] = f"u{rng.randrange(self.user_pools[r])}"
            if rng.random() >= NO_URL:
                url = ev["url"] = self.page_url()
            cts: int | None = ts
            if rng.random() < NO_TS and not d:
                cts = None
            else:
                ev["ts"] = ts
            lines.append(orjson.dumps(ev))
            regs.append(r)
            delayed.append(ts)  # the ts it was given, sent or not (last_parts says)
            parts.append((user, url, cts))
        return lines, regs, delayed


async def generate(url: str, rate: float, count: int, regions: int, seed: int, batch: int,
                   window_ms: int, skew: float = 1.1, bad_fraction: float = 0.0,
                   delayed_fraction: float = 0.0, late_after_ms: int = 300_000,
                   token: str = "", concurrency: int = 4, progress: bool = True,
                   progress_interval: float = 5.0, kafka: str = "", hot_region: str = "",
                   burst_multiplier: float = 1.0, burst_start: float = 0.0, burst_duration: float = 0.0,
                   clock_skew_ms: int = 0, security: KafkaSecurity = PLAINTEXT,
                   retry_fraction: float = 0.0, aggregates: bool = True, url_keep_query: bool = False,
                   reuse_within_ms: int = 300_000, topic: str = CLICKS) -> Truth:
    """Send ``count`` events at ``rate``/s over HTTP to ``url`` (or, with ``kafka`` a
    bootstrap address, produce them straight to ``topic``, the service's ``clicks``, with
    value = event plus ``ingest_ts`` = now ms, with TLS/SASL as ``security`` says) and return
    the exact ground truth.  A refused Kafka login raises ``KafkaLoginError`` before anything
    is sent.

    Every request carries an ``Idempotency-Key``, so a retry after a 503 or a broken
    connection counts once.  ``url`` may list several ingest processes (comma-separated):
    requests go round-robin.  ``retry_fraction``: that fraction of accepted bodies is sent
    again with the same key (half at once, half after up to 2 s; to another process when
    there are several), and that fraction of events (over HTTP or Kafka) repeats the
    ``event_id`` of one accepted within ``reuse_within_ms`` (half the service's
    AGG_DEDUP_SECONDS: a repeat it drops); the truth counts each event once.

    ``aggregates``: the truth also holds the exact aggregates of every cell (``Truth``),
    URLs normalised as the service does with ``url_keep_query`` (AGG_URL_KEEP_QUERY).

    Event ids and keys carry a random run id: two runs of one seed within the service's
    dedup horizon are two sets of events, not one sent twice."""
    run = secrets.token_hex(4) + "-"
    source = EventSource(seed, regions, skew=skew, bad_fraction=bad_fraction,
                         delayed_fraction=delayed_fraction, late_after_ms=late_after_ms,
                         hot_region=hot_region, burst_multiplier=burst_multiplier,
                         clock_skew_ms=clock_skew_ms, reuse_fraction=retry_fraction, reuse_within_ms=reuse_within_ms,
                         run=run)
    urls = [u.rstrip("/") for u in url.split(",") if u.strip()]
    retry_rng = random.Random(seed ^ 0x5EED)
    requests = 0
    retries: set[asyncio.Task[None]] = set()
    truth = Truth(window_ms, aggregates=aggregates, url_keep_query=url_keep_query)
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

    async def send(session: aiohttp.ClientSession, target: str, body: bytes, key: str) -> dict[str, Any]:
        """POST until answered 200 (a 503 or a broken connection: again, with the same key)."""
        h = dict(headers, **{"Idempotency-Key": key})
        for _attempt in range(20):
            try:
                async with session.post(target + "/v1/events", data=body, headers=h) as resp:
                    if resp.status == 503:
                        await asyncio.sleep(0.5)
                        continue
                    resp.raise_for_status()
                    ans: dict[str, Any] = await resp.json()
                    return ans
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.5)
        raise RuntimeError("ingest kept failing; giving up")

    async def resend(session: aiohttp.ClientSession, target: str, body: bytes, key: str, first: dict[str, Any],
                     delay: float) -> None:
        await asyncio.sleep(delay)
        ans = await send(session, target, body, key)
        truth.retried_bodies += 1
        truth.retried_events += first["accepted"]
        if (ans["accepted"], ans["rejected"]) != (first["accepted"], first["rejected"]):
            truth.retry_mismatches += 1

    async def post(session: aiohttp.ClientSession, lines: list[bytes], regs: list[str | None],
                   delayed: list[int], dups: set[int], parts: list[Parts]) -> None:
        nonlocal requests
        n_req = requests
        requests += 1
        target = urls[n_req % len(urls)]
        key = f"gen-{run}{seed}-{n_req}"
        body = b"\n".join(lines)
        ans = await send(session, target, body, key)
        bad = {e["index"] for e in ans["errors"]}
        truth.accepted += ans["accepted"]
        truth.rejected += ans["rejected"]
        if retry_fraction and retry_rng.random() < retry_fraction:
            other = urls[(n_req + 1) % len(urls)]
            t = asyncio.create_task(resend(session, other, body, key, ans, retry_rng.choice((0.0, 2.0 * retry_rng.random()))))
            retries.add(t)
            t.add_done_callback(retries.discard)
        ok_regions = []
        ok_parts = []
        for i, r in enumerate(regs):
            if i in dups:
                truth.reused_ids += 1
                continue
            if i in bad or r is None:
                continue
            cts = parts[i][2]
            if cts is not None and is_late(cts, ans["ingest_ts"]):
                truth.add_late(r, "client_delay")
            else:
                ok_regions.append(r)
                ok_parts.append(parts[i])
        truth.add(ok_regions, ans["ingest_ts"], ok_parts)
        source.accepted(lines, regs, bad | dups)

    async def produce(producer: Any, lines: list[bytes], regs: list[str | None],
                      delayed: list[int], dups: set[int], parts: list[Parts]) -> None:
        ingest_ts = int(time.time() * 1000)  # one per batch, like an HTTP request
        futs = []
        for line, r in zip(lines, regs, strict=True):
            d = orjson.loads(line)
            d["ingest_ts"] = ingest_ts
            key = (r if r is not None else str(d.get("region", ""))).encode()
            futs.append(await producer.send(topic, orjson.dumps(d), key=key))
        await asyncio.gather(*futs)  # acknowledged by the broker
        ok_regions = []
        ok_parts = []
        for i, r in enumerate(regs):
            if r is None:
                truth.rejected += 1  # the worker sends it to clicks-dlq
                continue
            truth.accepted += 1
            if i in dups:
                truth.reused_ids += 1
                continue
            cts = parts[i][2]
            if cts is not None and is_late(cts, ingest_ts):
                truth.add_late(r, "client_delay")
            else:
                ok_regions.append(r)
                ok_parts.append(parts[i])
        truth.add(ok_regions, ingest_ts, ok_parts)
        source.accepted(lines, regs, dups)

    sink: Callable[[list[bytes], list[str | None], list[int], set[int], list[Parts]], Coroutine[Any, Any, None]]
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
            # the batch's repeats and parts now: the next batch() may run before the task does
            dups, parts = source.last_dups, source.last_parts
            await sem.acquire()
            t = asyncio.create_task(sink(lines, regs, delayed, dups, parts))
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
        if retries:
            await asyncio.gather(*retries)
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
