"""Fixtures that run the real thing: a broker and service processes.

The broker is the embedded one, fresh per test, unless ``AGG_TEST_BROKER=kafka``
(bootstrap in ``AGG_TEST_KAFKA``, default 127.0.0.1:19092; several, blank-separated,
one per pytest-xdist worker; ``make test-kafka`` starts two) or
``AGG_TEST_BROKER=kafka://host:port``: then the tests of a worker share
that real Kafka, and each starts from a clean one: every non-internal topic and
every consumer group is deleted before it.  Every test under tests/integration/ is
marked ``integration`` (tests/conftest.py)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aggregator.broker import EmbeddedBroker
from tools.harness import ServiceProc


def real_kafka_bootstrap() -> str | None:
    """host:port of the real Kafka the tests should use, or None for the embedded broker."""
    spec = os.environ.get("AGG_TEST_BROKER", "").strip()
    if not spec or spec == "embedded":
        return None
    if spec == "kafka":
        # several Kafkas (blank-separated): each pytest-xdist worker takes its own, so tests
        # that empty their Kafka never meet one another
        kafkas = os.environ.get("AGG_TEST_KAFKA", "127.0.0.1:19092").split()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        return kafkas[int(worker.removeprefix("gw") or 0) % len(kafkas)]
    return spec.split("://", 1)[-1]


ON_REAL_KAFKA = real_kafka_bootstrap() is not None
# for a module whose tests do not depend on which broker runs (the CLI's refusals, the
# image's entry command, dashboards on Prometheus, ingest memory, the spill disk):
# `make test` runs them on the embedded broker, `make test-kafka` would only repeat them
BROKER_INDEPENDENT = pytest.mark.skipif(ON_REAL_KAFKA, reason="does not depend on the broker: make test runs it "
                                        "on the embedded one; make test-kafka would only repeat it")


class KafkaBroker:
    """A real Kafka shared by the tests; the same face as EmbeddedBroker (``url``, ``host``,
    ``port``, ``bootstrap``), but it is not this test's to stop."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.host, port = bootstrap.split(",")[0].rsplit(":", 1)
        self.port = int(port)

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def stop(self) -> None:
        raise RuntimeError("the shared real Kafka cannot be stopped by one test: "
                           "use the stoppable_broker fixture")

    def reset(self, timeout: float = 60.0) -> None:
        """Delete every consumer group and every non-internal topic, and wait until gone."""
        asyncio.run(reset_kafka(self.bootstrap, timeout))


async def reset_kafka(bootstrap: str, timeout: float = 60.0) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.admin import DeleteGroupsRequest

    deadline = time.monotonic() + timeout
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        # groups: one left by a SIGKILLed worker is "not empty" until its session times out
        groups: list[str] = []
        while True:
            groups = [g[0] for g in await admin.list_consumer_groups()]
            if not groups:
                break
            node = admin._client.get_random_node()
            resp = await admin._send_request(DeleteGroupsRequest(groups), node)
            left = [(g, code) for g, code in resp.results if code not in (0, 69)]  # 69: no such group
            if not left:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot delete consumer groups {left} on {bootstrap}")
            await asyncio.sleep(0.5)
        while True:
            topics = [t for t in await admin.list_topics() if not t.startswith("__")]
            if not topics:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot delete topics {topics} on {bootstrap}")
            try:
                await admin.delete_topics(topics, timeout_ms=10000)
            except Exception:  # noqa: BLE001 - already being deleted: look again
                pass
            await asyncio.sleep(0.3)
    finally:
        await admin.close()


@pytest.fixture
def broker():
    """A fresh embedded broker per test, or the shared real Kafka emptied for this test:
    either way topics and groups start empty."""
    bootstrap = real_kafka_bootstrap()
    if bootstrap is not None:
        b = KafkaBroker(bootstrap)
        b.reset()
        yield b
        return
    b = EmbeddedBroker().start()
    yield b
    b.stop()


@pytest.fixture
def stoppable_broker(tmp_path):
    """A broker of this test's own, which it may stop: a fresh embedded one, or under
    make test-kafka a fresh Apache Kafka (scripts/kafka.sh) with its data in tmp_path."""
    if ON_REAL_KAFKA:
        from tools.kafka import ScriptKafka
        b = ScriptKafka(base_dir=str(tmp_path)).start()
    else:
        b = EmbeddedBroker().start()
    yield b
    b.stop()


class Service(ServiceProc):
    """``python -m aggregator run`` as a child process (tools/harness.py), with short windows
    for the tests: ``Service(broker_url, data_dir, **env).start()`` returns once ready."""

    DEFAULTS = {"AGG_WINDOW_SECONDS": "2", "AGG_GRACE_SECONDS": "1", "AGG_PARTITIONS": "4",
                "AGG_LOG_LEVEL": "INFO", "AGG_SESSION_TIMEOUT": "6"}
    READY_POLL = 0.2

    def __init__(self, broker_url: str, data_dir: Path, **env: str) -> None:
        super().__init__(broker_url, data_dir, env)


@pytest.fixture
def service_factory(broker, tmp_path):
    started: list[Service] = []

    def make(name: str = "svc", **env: str) -> Service:
        svc = Service(broker.url, tmp_path / name, **env)
        started.append(svc)
        return svc

    yield make
    if ON_REAL_KAFKA:
        # a shared Kafka: leave the group cleanly, so the next test can delete it at once
        for svc in started:
            if svc.proc and svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGTERM)
        for svc in started:
            if svc.proc:
                try:
                    svc.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
    for svc in started:
        svc.kill()


def read_topic(bootstrap: str, topic: str, idle: float = 2.0) -> list[tuple[bytes, bytes]]:
    """Every record of ``topic`` (key, value), read until idle."""
    from aiokafka import AIOKafkaConsumer

    async def run():
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None, enable_auto_commit=False)
        await c.start()
        out = []
        try:
            while True:
                batch = await c.getmany(timeout_ms=int(idle * 1000))
                if not batch:
                    break
                for recs in batch.values():
                    out.extend((r.key, r.value) for r in recs)
        finally:
            await c.stop()
        return out

    return asyncio.run(run())
