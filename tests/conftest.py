"""Fixtures that run the real thing: an embedded broker and service processes."""
from __future__ import annotations

import asyncio
import json
import os
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


@pytest.fixture
def broker():
    """A fresh embedded broker per test: topics and groups start empty."""
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
