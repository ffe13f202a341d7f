"""Faults refused or handled at start (issue 15): a second process on the same state
directory is refused in one line and the first keeps counting; a ``clicks`` with another
partition count than AGG_PARTITIONS is used as it is; a state changelog whose count differs
from ``clicks`` is refused in one line."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from aggregator.broker import EmbeddedBroker, ensure_topics, free_port
from aggregator.core.contract import CLICKS, STATE_CHANGELOG
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA, Service
from tools.harness import http

pytestmark = pytest.mark.integration


def _exits(svc, within: float = 30.0) -> int:
    svc.start(wait_ready=None)
    deadline = time.monotonic() + within
    while svc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert svc.proc.poll() is not None, f"still running after {within}s:\n{svc.tail()}"
    return svc.proc.returncode


def _errors(svc) -> list[str]:
    return [line for line in svc.tail().splitlines() if line.startswith("error:")]


def _count(svc, events: list[dict]) -> int:
    status, _, body = svc.post(events)
    assert status == 200, body
    return body["accepted"]


def test_a_second_process_on_the_same_state_dir_is_refused_and_the_first_goes_on(service_factory):
    first = service_factory("first", AGG_RATE_LIMITS="hot=50").start()
    n = _count(first, [{"region": "hot"}] * 200 + [{"region": "cold"}] * 20)  # "hot" spills to disk
    second = service_factory("second", AGG_DATA_DIR=str(first.data_dir))
    assert _exits(second) == 2
    errors = _errors(second)
    assert len(errors) == 1 and "in use by another aggregator process" in errors[0], second.tail()
    assert "Traceback" not in second.tail()
    n += _count(first, [{"region": "cold"}] * 30)

    def all_counted():  # spilled events drained after their window closed are late (closed_window)
        snaps = first.snapshots()
        return snaps if sum(s["count"] + s["late"] for s in snaps) == n else None

    snaps = wait_for(all_counted, 60, what=f"{n} events counted (or late) by the first process")
    assert {s["region"] for s in snaps if s["count"]} == {"hot", "cold"}


def test_clicks_with_more_partitions_than_agg_partitions_is_used_as_it_is(broker, service_factory):
    asyncio.run(ensure_topics(broker.bootstrap, 6))  # made by someone else, with 6
    svc = service_factory("six", AGG_PARTITIONS="4").start()
    assert "clicks has 6 partitions (AGG_PARTITIONS is 4): using 6" in svc.tail()
    regions = [f"r{i}" for i in range(24)]  # keys that spread over all 6 partitions
    n = _count(svc, [{"region": r} for r in regions for _ in range(5)])

    def all_counted():
        snaps = svc.snapshots()
        return snaps if sum(s["count"] for s in snaps) == n else None

    snaps = wait_for(all_counted, 60, what=f"{n} events counted")
    assert {s["region"] for s in snaps if s["count"]} == set(regions)


def test_a_state_changelog_with_another_partition_count_is_refused(broker, service_factory):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def make_topics():
        await ensure_topics(broker.bootstrap, 4)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(STATE_CHANGELOG, 2, 1)])
        finally:
            await admin.close()

    asyncio.run(make_topics())
    svc = service_factory("mismatch")
    assert _exits(svc) == 2
    errors = _errors(svc)
    assert len(errors) == 1, svc.tail()
    assert f"{STATE_CHANGELOG} has 2 partitions but {CLICKS} has 4" in errors[0]
    assert "Traceback" not in svc.tail()


def _probe(svc, path: str) -> tuple[int, dict] | None:
    try:
        status, _, body = http("GET", svc.url + path, timeout=2)
    except OSError:
        return None  # nothing listens (yet)
    return status, json.loads(body)


@pytest.mark.skipif(ON_REAL_KAFKA, reason="its own embedded broker: the same under make test-kafka")
def test_while_run_waits_for_its_broker_the_probes_are_answered_then_the_service_takes_the_port(tmp_path):
    """Before, nothing listened until the broker had answered (up to AGG_BROKER_WAIT_SECONDS):
    a liveness probe could not tell waiting from hanging, /readyz could not say why."""
    port = free_port()
    svc = Service(f"kafka://127.0.0.1:{port}", tmp_path / "svc", AGG_BROKER_WAIT_SECONDS="60")
    broker = EmbeddedBroker(port)
    try:
        svc.start(wait_ready=None)
        assert wait_for(lambda: _probe(svc, "/healthz"), 20, what="/healthz while waiting") == (200, {"status": "alive"})
        status, body = _probe(svc, "/readyz")
        assert status == 503 and body["reason"].startswith("starting: waiting for the broker and its topics"), body
        status, _, raw = http("POST", svc.url + "/v1/events", b'[{"region": "eu"}]',
                              {"Content-Type": "application/json"})
        assert status == 503 and "not ready: starting" in json.loads(raw)["error"]
        broker.start()  # the broker comes: the service's own server takes over the port
        svc.wait_ready(60)
        assert _count(svc, [{"region": "eu"}] * 7) == 7
        assert wait_for(lambda: sum(s["count"] for s in svc.snapshots() if s["region"] == "eu") == 7 or None, 30,
                        what="the 7 events counted")
        assert "HTTP on" in svc.tail() and "Traceback" not in svc.tail()
    finally:
        svc.kill()
        broker.stop()


@pytest.mark.skipif(ON_REAL_KAFKA, reason="no broker at all: the same under make test-kafka")
def test_a_broker_that_never_answers_still_ends_run_in_one_line_after_the_probes(tmp_path):
    svc = Service(f"kafka://127.0.0.1:{free_port()}", tmp_path / "svc", AGG_BROKER_WAIT_SECONDS="4")
    try:
        svc.start(wait_ready=None)
        assert wait_for(lambda: _probe(svc, "/readyz"), 10, what="/readyz while waiting")[0] == 503
        assert svc.proc.wait(20) == 2
        errors = _errors(svc)
        assert len(errors) == 1 and "no Kafka broker answered" in errors[0], svc.tail()
        assert _probe(svc, "/healthz") is None  # the port is free again
    finally:
        svc.kill()
