"""Retry-safe ingest (docs/contract.md §3, "Retries"): a body retried with its
``Idempotency-Key`` and an ``event_id`` sent again are counted once — after a client
timeout, after a 503 that stored part of the first attempt (the broker stalled with
SIGSTOP), through a second ingest process, across a SIGKILL of the worker between
attempt and retry (once after its checkpoint wrote the key, once before any checkpoint,
so the restart learns the key again from the records it replays), and after a rebalance
moved the region's partition to another worker process — and every final count is exact."""
from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.repartition import home
from aggregator.core.topics import DEFAULT
from tests.conftest import wait_for
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration


def _body(region: str, n: int, bad: int = 0, ids: str | None = None) -> bytes:
    """``n`` events of ``region`` (with ``event_id``s ``<ids>-<i>`` when given) and ``bad``
    invalid ones among them."""
    events: list[dict] = []
    for i in range(n):
        ev: dict = {"region": region, "user_id": f"u{i}"}
        if ids is not None:
            ev["event_id"] = f"{ids}-{i}"
        events.append(ev)
    for i in range(bad):
        events.insert(i * 3, {"region": "not a region!"})
    return orjson.dumps(events)


def _post(url: str, body: bytes, key: str | None, timeout: float = 30.0,
          gzip_mtime: int | None = None) -> tuple[int, dict | None]:
    """POST ``body`` (gzip-compressed with ``gzip_mtime`` in its header when given)."""
    headers = {"Content-Type": "application/json"}
    if gzip_mtime is not None:
        body = gzip.compress(body, mtime=gzip_mtime)
        headers["Content-Encoding"] = "gzip"
    if key is not None:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(url + "/v1/events", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _send_and_hang_up(url: str, body: bytes, key: str) -> None:
    """POST ``body`` whole, then close the connection without reading the answer."""
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body)) + body)


def _counted(svc, regions: dict[str, int], timeout: float = 40.0, late: bool = False) -> dict[str, int]:
    """Wait until the final snapshots of ``regions`` add up to at least the expected counts
    and stay put for two windows; -> the counts (asserted equal by the caller).  ``late``:
    events in the late bucket as ``closed_window`` are added to the counts."""
    def totals() -> dict[str, int]:
        out = dict.fromkeys(regions, 0)
        for s in svc.snapshots():
            if s["region"] in out:
                out[s["region"]] += s["count"] + (s["late_by_reason"]["closed_window"] if late else 0)
        return out

    wait_for(lambda: all(totals()[r] >= n for r, n in regions.items()), timeout, what=f"counts {regions}")
    time.sleep(4.5)  # two more windows (2 s) close: a late duplicate would show
    return totals()


def _duplicates(svc) -> dict[tuple[str, str], float]:
    out = {}
    for line in svc.metrics_text().splitlines():
        if line.startswith("clickstream_duplicate_events_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["region"].strip('"'), labels["source"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def _committed(bootstrap: str) -> dict[int, int]:
    """The consumer group's committed offset of each partition of ``clicks`` (-1: none)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.structs import TopicPartition

    async def run() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:  # the partitions named: the embedded broker does not answer "all of the group's"
            got = await admin.list_consumer_group_offsets(
                DEFAULT.app_id, partitions=[TopicPartition(DEFAULT.clicks, i) for i in range(4)])
        finally:
            await admin.close()
        return {tp.partition: meta.offset for tp, meta in got.items()}

    return asyncio.run(run())


def test_retries_and_repeated_event_ids_count_once(broker, service_factory):
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    svc = service_factory("a").start()
    second = service_factory("ingest2", AGG_ROLE="ingest").start()
    # 1. a retried body: the same answer, counted once (with invalid events in it)
    body = _body("retry", 300, bad=7)
    first = _post(svc.url, body, "body-1")
    again = _post(svc.url, body, "body-1")
    assert first[0] == again[0] == 200
    assert (first[1]["accepted"], first[1]["rejected"]) == (again[1]["accepted"], again[1]["rejected"]) == (300, 7)
    # 2. a client that gave up waiting (its timeout) after sending the whole body, and retried:
    # the first attempt is stored all the same (its handler runs to the end), the retry's
    # events are repeats
    body = _body("timeout", 500)
    _send_and_hang_up(svc.url, body, "body-2")
    assert _post(svc.url, body, "body-2")[0] == 200
    # 3. the retry goes to another ingest process
    body = _body("other", 200)
    assert _post(svc.url, body, "body-3")[0] == 200
    assert _post(second.url, body, "body-3")[0] == 200
    # 4. event ids repeated across requests (no key), and the same ids in another region
    assert _post(svc.url, _body("ids", 100, ids="e"), None)[0] == 200
    assert _post(second.url, _body("ids", 150, ids="e"), None)[0] == 200  # 100 repeats + 50 new
    assert _post(svc.url, _body("ids-b", 100, ids="e"), None)[0] == 200  # other region: all new
    # 5. a key that is not one is refused, nothing of its body stored
    assert _post(svc.url, _body("retry", 5), "two words")[0] == 400
    assert _post(svc.url, _body("retry", 5), "k" * 256)[0] == 400
    # 6. a different key is a different request
    assert _post(svc.url, _body("retry", 10), "body-4")[0] == 200
    # 7. two clients that chose the same key for bodies of their own: two requests, both counted
    assert _post(svc.url, _body("shared", 40), "batch-1")[0] == 200
    assert _post(second.url, orjson.dumps([{"region": "shared", "user_id": "x"}] * 25), "batch-1")[0] == 200
    # 8. a retry compressed again (other gzip bytes, the same body): counted once
    body = _body("gz", 60)
    assert gzip.compress(body, mtime=1) != gzip.compress(body, mtime=2)
    assert _post(svc.url, body, "body-5", gzip_mtime=1)[0] == 200
    assert _post(second.url, body, "body-5", gzip_mtime=2)[0] == 200
    expected = {"retry": 310, "timeout": 500, "other": 200, "ids": 150, "ids-b": 100, "shared": 65, "gz": 60}
    assert _counted(svc, expected) == expected
    dups = _duplicates(svc)
    assert dups[("retry", "idempotency_key")] == 300
    assert dups[("timeout", "idempotency_key")] == 500
    assert dups[("other", "idempotency_key")] == 200
    assert dups[("ids", "event_id")] == 100
    assert ("ids-b", "event_id") not in dups
    assert ("shared", "idempotency_key") not in dups
    assert dups[("gz", "idempotency_key")] == 60


def test_the_same_event_ids_of_regions_beyond_the_cap_stay_apart(broker, service_factory):
    """Events of regions over AGG_MAX_REGIONS are counted under ``__other__``; their event ids
    keep the region they came with, so ``b``'s and ``c``'s id ``e-0`` are two events."""
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    svc = service_factory("capped", AGG_MAX_REGIONS="1").start()
    assert _post(svc.url, _body("a", 10, ids="e"), None)[0] == 200  # takes the one place
    for region in ("b", "c", "b"):  # the second b: 10 repeats
        assert _post(svc.url, _body(region, 10, ids="e"), None)[0] == 200
    expected = {"a": 10, "__other__": 20}
    assert _counted(svc, expected) == expected
    assert _duplicates(svc)[("__other__", "event_id")] == 10


def test_a_worker_killed_between_attempt_and_retry_counts_once(broker, service_factory):
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    svc = service_factory("k").start()
    body = _body("killed", 400)
    assert _post(svc.url, body, "kill-1")[0] == 200
    wait_for(lambda: "clickstream_dedup_ids{kind=\"idempotency_key\"} 1.0" in svc.metrics_text(), 20,
             what="the key remembered")
    time.sleep(1.5)  # a checkpoint (AGG_STATE_FLUSH_SECONDS) writes it
    svc.kill()
    svc.start()
    assert _post(svc.url, body, "kill-1")[0] == 200
    assert _post(svc.url, _body("killed", 30, ids="after"), None)[0] == 200
    assert _counted(svc, {"killed": 430}) == {"killed": 430}
    assert _duplicates(svc)[("killed", "idempotency_key")] == 400


def test_a_worker_killed_before_its_checkpoint_learns_the_key_again_from_the_replay(broker, service_factory):
    """The first attempt is counted in memory only: with AGG_STATE_FLUSH_SECONDS=60 no flush
    tick comes between counting and the SIGKILL, so neither the window state (with the key)
    nor an offset is written — checked, not hoped.  The restarted worker reads the attempt's
    records again from the start of the partition and must learn the key from them: the
    retry is a repeat."""
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    svc = service_factory("replay", AGG_STATE_FLUSH_SECONDS="60").start()
    body = _body("replayed", 400)
    assert _post(svc.url, body, "replay-1")[0] == 200
    wait_for(lambda: svc.metric('pipeline_stage_processed_total{stage="window"}', 0.0) == 400, 20,
             what="the attempt counted into a window")
    # the tally of counted events is reported by the flush tick that checkpoints: none yet
    assert 'clickstream_events_total{region="replayed"}' not in svc.metrics_text()
    svc.kill()
    assert set(_committed(broker.bootstrap).values()) == {-1}  # no offset committed...
    assert read_topic(broker.bootstrap, DEFAULT.state_changelog, idle=1.0) == []  # ...nor a state written
    del svc.extra_env["AGG_STATE_FLUSH_SECONDS"]  # the usual ticks again: windows close in time
    svc.start()
    assert _post(svc.url, body, "replay-1")[0] == 200
    assert _post(svc.url, _body("replayed", 30, ids="after"), None)[0] == 200
    assert _counted(svc, {"replayed": 430}) == {"replayed": 430}
    assert _duplicates(svc)[("replayed", "idempotency_key")] == 400
    # the restarted worker read the first attempt again (a record per event), then the retry and the 30
    assert svc.metric('pipeline_stage_processed_total{stage="decode"}', 0.0) == 830


def _assigned(svc) -> float:
    return svc.metric("clickstream_assigned_partitions", 0.0)


def test_a_retry_after_a_rebalance_moved_the_partition_counts_once(broker, service_factory):
    """Worker A, alone in the group, counts the first attempts and checkpoints them (the
    group's offsets committed past them); worker B joins the group (taking some
    partitions), then A stops (SIGTERM), so B owns every partition; the retries go to B's
    HTTP and B counts none of them.  One region per partition: the partitions B took when
    it joined and those it took when A left are all covered."""
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    regions: dict[int, str] = {}
    for i in range(200):
        regions.setdefault(home(f"moved-{i}", 4), f"moved-{i}")
    assert len(regions) == 4
    sizes = {r: 100 + 20 * p for p, r in regions.items()}  # a size per region: no mix-up unseen
    bodies = {r: _body(r, n) for r, n in sizes.items()}
    a = service_factory("ra").start()
    wait_for(lambda: _assigned(a) == 4, 30, what="A with every partition")
    for r, body in bodies.items():
        assert _post(a.url, body, f"move-{r}")[0] == 200
    # A's checkpoint wrote each partition's state (with its key) before it committed past the
    # attempt (a record per event, a region alone on its partition)
    ends = {p: sizes[r] for p, r in regions.items()}
    wait_for(lambda: _committed(broker.bootstrap) == ends, 30, what=f"offsets {ends} committed")
    b = service_factory("rb").start()
    # both hold some: partitions moved when B joined, and others move when A leaves
    wait_for(lambda: _assigned(b) > 0 and _assigned(a) > 0 and _assigned(a) + _assigned(b) == 4, 40,
             what="B with some partitions, A with the others")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(25) == 0
    wait_for(lambda: _assigned(b) == 4, 40, what="B with every partition")
    b.wait_ready(30)
    for r, body in bodies.items():
        status, answer = _post(b.url, body, f"move-{r}")
        assert status == 200 and answer["accepted"] == sizes[r]
        assert _post(b.url, _body(r, 10, ids=f"{r}-after"), None)[0] == 200
    expected = {r: n + 10 for r, n in sizes.items()}
    assert _counted(b, expected) == expected
    dups = _duplicates(b)  # B dropped every retried event: it had each partition's key
    assert {r: dups.get((r, "idempotency_key")) for r in sizes} == sizes
    assert b.metric("clickstream_state_recovered_partitions_total", 0.0) >= 4  # A's states, from the changelog


def test_a_retry_after_a_503_that_stored_part_of_the_body_counts_once(stoppable_broker, tmp_path):
    """The broker stalls (SIGSTOP) while a big body is being produced: ingest answers 503
    after its timeout with part of the body already stored; the broker comes back and the
    client retries with the same key: every event counted exactly once.

    Records of the first attempt that the broker appends only when it comes back carry the
    first attempt's ingest time: if their windows closed meanwhile (a loaded machine is slow
    enough) they are late (``closed_window``) and the retry's copies are repeats, so each
    event is counted once in a window or in the late bucket (docs/contract.md §3)."""
    from tests.integration.conftest import Service

    b = stoppable_broker
    asyncio.run(ensure_topics(b.bootstrap, 4))
    svc = Service(b.url, tmp_path / "s").start()
    try:
        pid = b.proc.pid if getattr(b, "proc", None) is not None else b.pid
        n = 150_000  # about 6 MB: ingest takes most of a second to produce it
        regions = [f"stall-{i}" for i in range(4)]
        events = [{"region": regions[i % 4], "user_id": f"u{i}"} for i in range(n)]
        body = orjson.dumps(events)
        answers: list = []
        t = threading.Thread(target=lambda: answers.append(_post(svc.url, body, "stall-1", timeout=60)))
        t.start()
        time.sleep(0.15)  # part of the body is produced...
        os.kill(pid, signal.SIGSTOP)  # ...then the broker stalls
        try:
            t.join(30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert answers and answers[0][0] == 503, answers[:1]  # the stall came mid-body
        # a retry waits while the broker takes its partitions' batches (contract §3): on Apache
        # Kafka catching up after the stall that took over 30 s on a loaded machine
        retries, deadline = 0, time.monotonic() + 240
        while True:
            retries += 1
            status, ans = _post(svc.url, body, "stall-1", timeout=120)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status == 200 and ans["accepted"] == n
        expected = dict.fromkeys(regions, n // 4)
        assert _counted(svc, expected, timeout=60, late=True) == expected
        # the retries found what the attempts before had stored (or the broker stored after
        # the stall): at most a body's worth each (a loaded machine answers several 503)
        assert 0 < sum(v for (r, src), v in _duplicates(svc).items() if r in regions) <= n * retries
    finally:
        svc.kill()


def test_gen_retry_fraction_across_two_ingest_processes_audits_exactly(broker, service_factory, tmp_path):
    """``aggregator gen --retry-fraction``: bodies sent again (to the other ingest process,
    at once or later) and event ids repeated; ``aggregator audit`` finds every count exact
    and reports the duplicates it was sent, and the service's own count of them."""
    import json
    import subprocess
    import sys

    asyncio.run(ensure_topics(broker.bootstrap, 4))
    svc = service_factory("g").start()
    second = service_factory("g2", AGG_ROLE="ingest").start()
    truth_path = tmp_path / "truth.json"
    res = subprocess.run([sys.executable, "-m", "aggregator", "gen", "--url", f"{svc.url},{second.url}",
                          "--rate", "600", "--count", "3000", "--batch", "50", "--regions", "5", "--seed", "11",
                          "--window-seconds", "2", "--bad-fraction", "0.02", "--retry-fraction", "0.3",
                          "--truth", str(truth_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    truth = json.loads(truth_path.read_text())
    dup = truth["duplicates"]
    assert dup["retried_bodies"] > 5 and dup["reused_ids"] > 100 and dup["retry_answer_mismatches"] == 0
    time.sleep(5)  # the last windows close
    res = subprocess.run([sys.executable, "-m", "aggregator", "audit", "--truth", str(truth_path), "--url", svc.url,
                          "--wait", "20"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "double counts: 0 (must be 0)" in res.stdout
    dups = _duplicates(svc)
    by_id = sum(n for (_, source), n in dups.items() if source == "event_id")
    assert by_id >= dup["reused_ids"]
    # the audit shows the service's own count beside the generator's (the generator's events
    # all carry an event_id, which wins over the key: every repeat is one by event_id)
    assert f"the service at {svc.url} dropped {sum(dups.values()):.0f} events as repeats ({by_id:.0f} by event_id;" \
        in res.stdout, res.stdout[-1500:]


def test_one_event_requests_with_a_key_each_stay_within_the_dedup_cap(broker, service_factory):
    """Found by a review: request keys never counted toward AGG_DEDUP_MAX_IDS, so a client
    sending one event per request with a key each (a beacon per click) grew the worker's
    dedup memory for the whole horizon.  Keys count by their memory now: the oldest are
    forgotten beyond the cap (the newest tenth of the horizon kept), reported as evicted,
    and a retry of a recent one is still a repeat; every count exact."""
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    # a horizon of 20 s: tenths of 2 s; a cap of 50 ids' worth: about 21 one-event keys
    svc = service_factory("beacons", AGG_DEDUP_SECONDS="20", AGG_DEDUP_MAX_IDS="50").start()
    body = _body("beacon", 1)
    sent = 0
    until = time.monotonic() + 8
    while time.monotonic() < until:
        assert _post(svc.url, body, f"click-{sent}")[0] == 200
        sent += 1
        time.sleep(0.02)
    assert _post(svc.url, body, f"click-{sent - 1}")[0] == 200  # a retry of the last click
    assert _counted(svc, {"beacon": sent}) == {"beacon": sent}
    assert _duplicates(svc)[("beacon", "idempotency_key")] == 1
    evicted = svc.metric("clickstream_dedup_evicted_total", 0.0)
    keys = svc.metric('clickstream_dedup_ids{kind="idempotency_key"}', 0.0)
    assert evicted > 0 and 0 < keys < sent / 2, (sent, evicted, keys)
    assert "dedup event ids and request keys forgotten before AGG_DEDUP_SECONDS" in svc.log_path.read_text()
