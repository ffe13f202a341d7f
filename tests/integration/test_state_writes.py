"""Window state the broker refuses (issue 15, fault 6), on real Kafka: the changelog topic's
``max.message.bytes`` is cut to 2000 bytes while a worker counts 5000 regions in one
partition over several windows.  Before, Faust only logged the failed changelog sends and
offsets were committed anyway (a crash then lost the windows), and one state record of
that many regions was over Kafka's 1 MiB limit.  Now: nothing is committed or published
while the writes fail, ``/readyz`` is 503 saying why, the failures are counted; once the
topic takes records again the state (several MB, in chunks under 512 KiB) is written, and
every window is published with its exact count, also after a SIGKILL."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from aggregator.core.contract import SNAPSHOTS, STATE_CHANGELOG
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA, read_topic
from tools.harness import http

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not ON_REAL_KAFKA, reason="alters a topic's config: real Kafka "
                                 "(make test-kafka); the embedded broker has no AlterConfigs")]
REGIONS = [f"r{i:04d}" for i in range(5000)]
ROUNDS = 3


def set_max_message_bytes(bootstrap: str, topic: str, value: int) -> None:
    """The changelog's max.message.bytes.  AlterConfigs (not the incremental one) replaces a
    topic's whole config: its compaction is given again, or the topic becomes a deleting one,
    which a worker's next start refuses (broker/topiccheck.py)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                      configs={"max.message.bytes": str(value),
                                                               "cleanup.policy": "compact"})])
        finally:
            await admin.close()

    asyncio.run(run())


def failures(svc) -> float:
    return svc.metric("clickstream_state_write_failures_total")


def test_refused_state_writes_hold_commits_and_5000_regions_fit_in_bounded_records(broker, service_factory):
    # idle after 1 s: no zero-count snapshots of 5000 regions crowd the recent view
    env = {"AGG_PARTITIONS": "1", "AGG_MAX_REGIONS": "6000", "AGG_REGION_IDLE_SECONDS": "1"}
    svc = service_factory("w", **env).start()
    assert svc.post([{"region": "warmup"}])[0] == 200
    wait_for(lambda: any(s["region"] == "warmup" and s["count"] for s in svc.snapshots()), 30,
             what="the first window published")

    set_max_message_bytes(broker.bootstrap, STATE_CHANGELOG, 2000)
    for _ in range(ROUNDS):  # three 2 s windows of 5000 regions: the outbox grows, nothing goes out
        status, _, body = svc.post([{"region": r} for r in REGIONS])
        assert status == 200 and body["accepted"] == len(REGIONS)
        time.sleep(2.5)

    def refused():
        status, _, raw = http("GET", svc.url + "/readyz")
        return raw if status == 503 and b"window state writes failing" in raw else None

    wait_for(refused, 20, what="/readyz 503 with the reason")
    assert failures(svc) > 0
    # it fetches nothing meanwhile (what it fetched would pile up until the writes pass)
    wait_for(lambda: svc.metric("clickstream_backpressure") == 1, 10, what="backpressure while writes fail")
    assert not [s for s in svc.snapshots() if s["region"] in ("r0000", "r4999") and s["count"]]

    set_max_message_bytes(broker.bootstrap, STATE_CHANGELOG, 1_048_588)  # Kafka's default again

    def all_published(s):
        def check():
            counts: dict[str, int] = {}
            for snap in s.snapshots():
                counts[snap["region"]] = counts.get(snap["region"], 0) + snap["count"]
            return counts if all(counts.get(r) == ROUNDS for r in REGIONS) else None
        return check

    counts = wait_for(all_published(svc), 90, what="every region's windows published")
    assert sum(counts[r] for r in REGIONS) == ROUNDS * len(REGIONS)
    wait_for(lambda: http("GET", svc.url + "/readyz")[0] == 200, 20, what="/readyz 200 again")
    wait_for(lambda: svc.metric("clickstream_backpressure") == 0, 10, what="fetching again")

    # the state records on the changelog: the largest is under the bound, and the
    # state (several MB) survives a SIGKILL: nothing is published twice with other counts
    sizes = [len(k or b"") + len(v or b"") for k, v in read_topic(broker.bootstrap, STATE_CHANGELOG, idle=1.0)]
    assert max(sizes) <= 512 * 1024 and sum(sizes) > 1_048_588
    svc.kill()
    svc.start()
    wait_for(lambda: http("GET", svc.url + "/readyz")[0] == 200, 60, what="ready after the SIGKILL")
    published: dict[tuple[str, int], set[int]] = {}
    for _, v in read_topic(broker.bootstrap, SNAPSHOTS, idle=2.0):
        s = orjson.loads(v)
        published.setdefault((s["region"], s["window_start"]), set()).add(s["count"])
    assert all(len(c) == 1 for c in published.values()), "a window re-published with another count"
    assert sum(next(iter(published[k])) for k in published if k[0] in set(REGIONS)) == ROUNDS * len(REGIONS)
