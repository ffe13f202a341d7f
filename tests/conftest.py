"""Fixtures that run the real thing: a broker and service processes.

The broker is the embedded one, fresh per test, unless ``AGG_TEST_BROKER=kafka``
(bootstrap in ``AGG_TEST_KAFKA``, default 127.0.0.1:19092; ``make test-kafka``
starts one) or ``AGG_TEST_BROKER=kafka://host:port``: then every test shares
that real Kafka, and starts from a clean one: every non-internal topic and
every consumer group is deleted before it."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from aggregator.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parent.parent


def real_kafka_bootstrap() -> str | None:
    """host:port of the real Kafka the tests should use, or None for the embedded broker."""
    spec = os.environ.get("AGG_TEST_BROKER", "").strip()
    if not spec or spec == "embedded":
        return None
    if spec == "kafka":
        return os.environ.get("AGG_TEST_KAFKA", "127.0.0.1:19092")
    return spec.split("://", 1)[-1]


ON_REAL_KAFKA = real_kafka_bootstrap() is not None


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


def require_tool(name: str, install_hint: str) -> str:
    """Path of a tool that .ci/run installs: missing, it fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing in CI ({install_hint})")
        pytest.skip(f"{name} not installed ({install_hint})")
    return path


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


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 15.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Service:
    """``python -m aggregator run`` as a child process."""

    def __init__(self, broker_url: str, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = dict(os.environ)
        self.env.update({
            "AGG_BROKER": broker_url, "AGG_WEB_PORT": str(self.port), "AGG_DATA_DIR": str(data_dir),
            "AGG_WINDOW_SECONDS": "2", "AGG_GRACE_SECONDS": "1", "AGG_PARTITIONS": "4",
            "AGG_LOG_LEVEL": "INFO", "AGG_SESSION_TIMEOUT": "6",
        })
        self.env.update({k.upper(): str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "service.log"

    def start(self, wait_ready: float = 60.0) -> "Service":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "aggregator", "run"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _, _ = http("GET", self.url + "/readyz", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready in {wait_ready}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def post(self, events, content_type: str = "application/json", headers: dict | None = None):
        body = events if isinstance(events, bytes) else orjson.dumps(events)
        h = {"Content-Type": content_type}
        h.update(headers or {})
        status, hdrs, raw = http("POST", self.url + "/v1/events", body, h)
        return status, hdrs, (json.loads(raw) if raw else None)

    def snapshots(self) -> list[dict]:
        status, _, raw = http("GET", self.url + "/v1/snapshots")
        assert status == 200
        return json.loads(raw)["snapshots"]

    def metrics_text(self) -> str:
        status, _, raw = http("GET", self.url + "/metrics")
        assert status == 200
        return raw.decode()


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


def wait_for(pred, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
