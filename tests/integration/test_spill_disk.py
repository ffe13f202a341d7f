"""A spill disk that fills up while the service runs (issue 15, fault 7; docs/contract.md
§6), on a real full disk: a 256 KiB tmpfs as ``AGG_SPILL_DIR``, most of it taken by a
filler file.  Before, the first spill write that hit ENOSPC raised out of the batch
handler and the whole process exited, ingest with it.  Now the batch that needs the disk
is held (nothing of it applied or committed) and its partition is not fetched, ``/readyz``
is 503 saying why, the error is counted, and a region on another partition keeps being
counted and published; once the filler is deleted the held batch is applied by itself and
every accepted event is in the published snapshots exactly once (count + late)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import orjson
import pytest
from aiokafka.partitioner import murmur2

from aggregator.core.contract import SNAPSHOTS
from tests.conftest import small_tmpfs, wait_for
from tests.integration.conftest import BROKER_INDEPENDENT, read_topic
from tools.harness import http

pytestmark = [BROKER_INDEPENDENT, pytest.mark.integration]

PARTITIONS = 4
HOT_RATE = 100  # events/s: the hot region's limit, so its excess is spilled
FREE_BYTES = 40 * 1024  # what the filler leaves: less than one held batch needs


def partition_of(region: str) -> int:
    """The partition the ingest's producer (aiokafka's default partitioner) picks."""
    return (murmur2(region.encode()) & 0x7FFFFFFF) % PARTITIONS


def two_regions() -> tuple[str, str]:
    hot = "hot"
    cold = next(f"cold{i}" for i in range(100) if partition_of(f"cold{i}") != partition_of(hot))
    return hot, cold


def fill_leaving(disk: Path, free: int) -> Path:
    """A filler file taking all of ``disk`` but ``free`` bytes."""
    path = disk / "filler"
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    os.truncate(path, max(0, os.path.getsize(path) - free))
    return path


def metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def published(bootstrap: str) -> dict[tuple[str, int], dict]:
    """Final snapshots on click-snapshots by (region, window); a window published twice
    must be published with identical content."""
    out: dict[tuple[str, int], dict] = {}
    for _, value in read_topic(bootstrap, SNAPSHOTS, idle=1.0):
        s = orjson.loads(value)
        key = (s["region"], s["window_start"])
        if key in out:
            prev = {k: v for k, v in out[key].items() if k != "emitted_at"}
            assert prev == {k: v for k, v in s.items() if k != "emitted_at"}, (out[key], s)
        out[key] = s
    return out


def totals(snaps: dict[tuple[str, int], dict]) -> dict[str, int]:
    t: dict[str, int] = {}
    for (region, _), s in snaps.items():
        t[region] = t.get(region, 0) + s["count"] + s["late"]
    return t


def hot_and_cold(service_factory, disk: Path, hot: str, cold: str) -> tuple:
    """A service spilling on ``disk`` what ``hot`` sends over HOT_RATE; the events accepted
    per region; and a POST of ``n`` events of a region that must be accepted whole."""
    svc = service_factory("svc", AGG_SPILL_DIR=str(disk), AGG_RATE_LIMITS=f"{hot}={HOT_RATE}",
                          AGG_PARTITIONS=str(PARTITIONS)).start()
    accepted = {hot: 0, cold: 0}

    def post(region: str, n: int) -> None:
        status, _, body = svc.post([{"region": region, "user_id": f"u{i}"} for i in range(n)])
        assert status == 200 and body["accepted"] == n, body
        accepted[region] += n

    return svc, accepted, post


def all_published(bootstrap: str, accepted: dict[str, int], svc) -> None:
    """Until every accepted event is in the published snapshots, once (count + late)."""
    try:
        wait_for(lambda: totals(published(bootstrap)) == accepted, 90, interval=2.0,
                 what="every accepted event published")
    except AssertionError:
        raise AssertionError(f"published {totals(published(bootstrap))}, accepted {accepted}\n{svc.tail()}") from None


def test_a_full_spill_disk_holds_what_needs_it_counts_the_rest_and_recovers_exactly(broker, service_factory,
                                                                                   tmp_path):
    hot, cold = two_regions()
    bootstrap = broker.url.split("://")[1]
    with small_tmpfs(tmp_path / "spill") as disk:
        svc, accepted, post = hot_and_cold(service_factory, disk, hot, cold)

        post(cold, 10)
        post(hot, 50)  # under its rate: no spill yet
        filler = fill_leaving(disk, FREE_BYTES)
        post(hot, 3000)  # ~2900 over the rate: ~120 KB of spill records, more than is free

        def refused() -> dict | None:
            status, _, raw = http("GET", svc.url + "/readyz")
            body = json.loads(raw)
            return body if status == 503 and "spill disk full" in body.get("reason", "") else None

        body = wait_for(refused, 20, what="/readyz 503 saying the spill disk is full")
        assert "[Errno 28] No space left on device" in body["reason"], body
        svc.check_alive()  # before: the process exited here
        assert metric(svc.metrics_text(), "clickstream_spill_disk_errors_total", 'op="write"') >= 1
        wait_for(lambda: metric(svc.metrics_text(), "clickstream_spill_held_partitions") == 1, 10,
                 what="one partition held (gauges are set at the next tick)")
        assert metric(svc.metrics_text(), "clickstream_backpressure") == 1
        assert "spill disk full" in svc.tail(20_000)

        # the cold region's partition does not need the disk: counted and published on time
        post(cold, 25)
        post(hot, 200)  # waits in Kafka behind the held batch

        def cold_published() -> bool:
            return totals(published(bootstrap)).get(cold, 0) == accepted[cold]

        wait_for(cold_published, 30, interval=1.0, what="every cold event published while the disk is full")
        assert refused() is not None  # still held: nothing frees the space by itself here
        assert totals(published(bootstrap)).get(hot, 0) <= 50 + HOT_RATE

        filler.unlink()  # space returns

        def recovered() -> bool:
            return http("GET", svc.url + "/readyz")[0] == 200

        wait_for(recovered, 20, what="/readyz 200 once the disk has room again")
        log = svc.tail(200_000)
        assert log.count("spill disk full") == 1, log[-3000:]  # one line when it starts, not one per batch
        assert "spill disk works again" in log

        all_published(bootstrap, accepted, svc)
        text = svc.metrics_text()
        assert metric(text, "clickstream_spill_held_partitions") == 0
        assert metric(text, "clickstream_backpressure") == 0
        assert metric(text, "clickstream_spill_backlog_events") == 0
        svc.check_alive()
        svc.kill()  # before the tmpfs goes


def test_a_spill_the_full_disk_cannot_reconcile_at_start_waits_and_recovers_exactly(broker, service_factory,
                                                                                    tmp_path):
    """A worker killed with a spill on disk restarts while the disk is full, and its recovery
    must write (a torn tail is saved to quarantine before the segment is cut).  Before, that
    OSError left ``Partitions.open``: the batch handler raised and the process exited (or,
    opened by a tick, no partition was written or published again, /readyz 200).  Now that
    partition waits, unfetched, with /readyz 503 saying why; the others are counted; once
    the disk has room it is opened and every accepted event is published exactly once."""
    hot, cold = two_regions()
    bootstrap = broker.url.split("://")[1]
    with small_tmpfs(tmp_path / "spill") as disk:
        svc, accepted, post = hot_and_cold(service_factory, disk, hot, cold)

        post(cold, 10)
        post(hot, 1000)  # ~900 over the rate: spilled, drained at 100/s
        wait_for(lambda: metric(svc.metrics_text(), "clickstream_spill_backlog_events") > 300, 20,
                 what="a spill backlog")
        time.sleep(1.5)  # a state written with it (AGG_STATE_FLUSH_SECONDS: 0.5); either way it is recovered
        svc.kill()
        segments = sorted(disk.glob(f"p{partition_of(hot)}/regions/*/*.seg"))
        assert segments, sorted(disk.rglob("*"))
        with open(segments[-1], "ab") as f:  # what a write cut short by the kill leaves
            f.write(b"\x00\x00\x01\x00torn")
        filler = fill_leaving(disk, 0)

        svc.start(wait_ready=None)

        def refused() -> dict | None:
            svc.check_alive()
            try:
                status, _, raw = http("GET", svc.url + "/readyz")
            except OSError:
                return None
            body = json.loads(raw)
            return body if status == 503 and "spill disk full" in body.get("reason", "") else None

        body = wait_for(refused, 60, what="/readyz 503 saying the spill disk is full")
        assert "spill open" in body["reason"], body
        post(cold, 25)
        wait_for(lambda: totals(published(bootstrap)).get(cold, 0) == accepted[cold], 30, interval=1.0,
                 what="every cold event published while the hot partition waits")
        svc.check_alive()  # before: the process exited
        assert refused() is not None
        assert metric(svc.metrics_text(), "clickstream_spill_disk_errors_total", 'op="open"') == 1

        filler.unlink()
        wait_for(lambda: http("GET", svc.url + "/readyz")[0] == 200, 20, what="/readyz 200 once the disk has room")
        post(hot, 20)

        all_published(bootstrap, accepted, svc)
        assert "spill disk works again" in svc.tail(200_000)
        svc.check_alive()
        svc.kill()  # before the tmpfs goes
