"""Issue #3: broker down -> ingest answers 503 promptly; after the broker is back,
every record that was acknowledged is counted.

Needs a real Kafka (the embedded broker keeps everything in memory, so a
restarted one has lost every record): the test starts a Kafka of its own on a
free port and data directory with scripts/kafka.sh (so the shared one of the
other tests is left alone), SIGKILLs the broker process mid-stream and starts
it again on the same data.
"""
from __future__ import annotations

import time

import orjson
import pytest

from aggregator.core.contract import SNAPSHOTS
from tests.conftest import http, wait_for
from tests.integration.conftest import ON_REAL_KAFKA, read_topic
from tools.kafka import ScriptKafka

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not ON_REAL_KAFKA, reason="needs real Kafka (AGG_TEST_BROKER=kafka, make test-kafka)"),
]

W_MS = 2000
REGIONS = ["out-a", "out-b", "out-c"]


@pytest.fixture
def own_kafka(tmp_path):
    k = ScriptKafka(data_dir=tmp_path / "kafka")
    k.start()
    yield k
    k.stop()


def test_broker_down_503_then_every_acknowledged_record_counted(own_kafka, tmp_path):
    from tests.integration.conftest import Service

    svc = Service(own_kafka.url, tmp_path / "svc")
    try:
        svc.start(wait_ready=90)
        acked: dict[str, int] = {}
        windows: set[tuple[str, int]] = set()
        seq = 0

        failed: list[tuple[list, str]] = []  # rounds answered 503: part of them may be stored

        def post_round(again: tuple[list, str] | None = None) -> tuple[int, dict, dict]:
            nonlocal seq
            if again is None:
                events = []
                for i, r in enumerate(REGIONS):
                    events += [{"region": r, "event_id": f"e{seq}-{r}-{j}"} for j in range(i + 1)]
                events.append({"region": "bad region"})
                key = f"round-{seq}"
                seq += 1
            else:
                events, key = again
            status, hdrs, ans = svc.post(events, headers={"Idempotency-Key": key})
            if status != 200:
                failed.append((events, key))
            if status == 200:
                assert ans["accepted"] == len(events) - 1 and ans["rejected"] == 1, ans
                ws = ans["ingest_ts"] - ans["ingest_ts"] % W_MS
                for i, r in enumerate(REGIONS):
                    acked[r] = acked.get(r, 0) + i + 1
                    windows.add((r, ws))
            return status, hdrs, ans

        # 1. traffic with the broker up
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            status, _, ans = post_round()
            assert status == 200, ans
            time.sleep(0.1)
        before = dict(acked)

        # 2. the broker dies: 503 with Retry-After, promptly, and nothing acknowledged
        own_kafka.kill()
        t0 = time.monotonic()
        status, hdrs, ans = post_round()
        took = time.monotonic() - t0
        print(f"first request after the kill: {status} after {took:.1f}s")
        assert status == 503, ans
        assert int(hdrs["Retry-After"]) > 0 and "broker" in ans["error"]
        assert took < 12.5, took
        t0 = time.monotonic()
        status, hdrs, ans = post_round()
        print(f"second request while down: {status} after {time.monotonic() - t0:.1f}s")
        assert status == 503 and "Retry-After" in hdrs
        assert http("GET", svc.url + "/healthz")[0] == 200
        assert acked == before

        # 3. the broker is back on the same data: ingest recovers by itself, more traffic
        t0 = time.monotonic()
        own_kafka.start()
        print(f"broker restarted in {time.monotonic() - t0:.1f}s")
        t_back = time.monotonic()
        wait_for(lambda: post_round()[0] == 200, 60, interval=0.5, what="ingest to accept again")
        print(f"ingest accepted again {time.monotonic() - t_back:.1f}s after the restart")
        # the rounds answered 503 are sent again, with their keys: what the first attempt stored
        # (the idempotent producer delivers it once the broker is back) is counted once
        retry, failed[:] = list(failed), []
        for events, key in retry:
            assert post_round((events, key))[0] == 200
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            status, _, ans = post_round()
            assert status == 200, ans
            time.sleep(0.1)
        assert all(acked[r] > before[r] for r in REGIONS)

        # 4. every acknowledged record is counted: in its window, or (when its window had
        #    already closed at stream time before it was read) in the late bucket
        def all_closed():
            snaps = [s for s in svc.snapshots() if s["region"] in REGIONS]
            got = {(s["region"], s["window_start"]) for s in snaps}
            return snaps if windows <= got else None

        snaps = wait_for(all_closed, 90, what="snapshots of every window with acknowledged records")
        time.sleep(3 * W_MS / 1000)  # the window open when the last records were read closes too
        snaps = [s for s in svc.snapshots() if s["region"] in REGIONS]
        seen: dict[tuple[str, int], dict] = {}
        for s in snaps:
            k = (s["region"], s["window_start"])
            assert k not in seen, f"published twice: {seen[k]} and {s}"
            seen[k] = s
        counted = {r: sum(s["count"] for s in snaps if s["region"] == r) for r in REGIONS}
        late = {r: sum(s["late"] for s in snaps if s["region"] == r) for r in REGIONS}
        print(f"acknowledged {acked}, counted in windows {counted}, late {late}")
        assert {r: counted[r] + late[r] for r in REGIONS} == acked
        # on the topic a snapshot may be re-published after the rebalance, only identically
        on_topic: dict[tuple[str, int], dict] = {}
        for _, v in read_topic(own_kafka.bootstrap, SNAPSHOTS, idle=1.0):
            s = orjson.loads(v)
            k = (s["region"], s["window_start"])
            if k in on_topic:
                assert {**on_topic[k], "emitted_at": 0} == {**s, "emitted_at": 0}, (on_topic[k], s)
            on_topic[k] = s
        for k, s in seen.items():
            assert {**on_topic[k], "emitted_at": 0} == {**s, "emitted_at": 0}
        assert svc.proc.poll() is None
    finally:
        svc.kill()
