"""Child processes for the tests and the tools: ``python -m aggregator run`` with its
``AGG_*`` environment, readiness, stopping, and a small HTTP client.

Standard library and orjson only (no pytest, no aggregator import): ``tests/`` and
``tools/bench`` both start the service through ``ServiceProc``; each sets its own defaults
by subclassing (``DEFAULTS``, ``READY_POLL``, ``TMP_PREFIX``)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")


NOISE = "No event received for active tp"  # Faust's recovery, every 5 s per partition while stalled


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 15.0) -> tuple[int, dict, bytes]:
    """(status, headers, body); an HTTP error status is an answer, not an exception
    (connection errors are: OSError)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    """``pred()``'s first truthy value, polled every ``interval`` s; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_group(proc: subprocess.Popen, wait: float) -> None:
    """SIGTERM a child started in its own session, SIGKILL its group if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class ServiceProc:
    """``python -m aggregator run`` as a child process in a session of its own (so ``kill``
    takes its whole group), run from the repository root, its output appended to
    ``data_dir/service.log``.

    Environment: this process's, then ``AGG_BROKER``, ``AGG_WEB_PORT`` (a free port, fixed
    for the object's life: a restart answers on the same URL) and ``AGG_DATA_DIR``, then
    ``DEFAULTS``, then ``env`` (keys upper-cased, values str()).  Without ``data_dir`` a
    temporary folder (``TMP_PREFIX``) is made at ``start`` and removed by ``stop``; a given
    one is kept."""

    DEFAULTS: Mapping[str, str] = {"AGG_LOG_LEVEL": "INFO", "AGG_PARTITIONS": "4"}
    READY_POLL = 0.1      # seconds between /readyz polls
    STOP_WAIT = 20.0      # seconds from SIGTERM to SIGKILL in stop()
    TMP_PREFIX = "svc-"

    def __init__(self, broker_url: str, data_dir: str | os.PathLike | None = None,
                 env: Mapping[str, object] | None = None) -> None:
        self.broker_url = broker_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.own_dir = data_dir is None
        self.data_dir: Path | None = None if data_dir is None else Path(data_dir)
        self.extra_env = {k.upper(): str(v) for k, v in (env or {}).items()}
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0   # time.perf_counter() just before the last start

    @property
    def log_path(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / "service.log"

    def start(self, wait_ready: float | None = 60.0) -> ServiceProc:
        """Start it (again after ``kill``/``stop``: same port and, if kept, the same data);
        then wait up to ``wait_ready`` s for /readyz (None: return at once)."""
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=self.TMP_PREFIX))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({"AGG_BROKER": self.broker_url, "AGG_WEB_PORT": str(self.port),
                         "AGG_DATA_DIR": str(self.data_dir)})
        self.env.update(self.DEFAULTS)
        self.env.update(self.extra_env)
        self.started_at = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "aggregator", "run"], env=self.env, cwd=str(REPO),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait_ready is not None:
            self.wait_ready(wait_ready)
        return self

    def wait_ready(self, timeout: float = 60.0) -> ServiceProc:
        """Until /readyz answers 200; RuntimeError with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if http("GET", self.url + "/readyz", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(self.READY_POLL)
        raise RuntimeError(f"service not ready in {timeout}s:\n{self.tail()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        """The last ``n`` bytes of its log, without Faust's stalled-recovery warnings (four
        lines every 5 s per changelog partition, which would hide everything else of a failed
        test's log): how many were left out, and the last of them, are said at the end."""
        try:
            lines = self.log_path.read_bytes().decode(errors="replace").splitlines(keepends=True)
        except (OSError, AttributeError):
            return ""
        noise = [line for line in lines if NOISE in line]
        kept = "".join(line for line in lines if NOISE not in line)[-n:]
        return kept + (f"({len(noise)} lines of {NOISE!r} left out; the last:)\n{noise[-1]}" if noise else "")

    def kill(self) -> None:
        """SIGKILL its process group (no shutdown at all) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (the service shuts down cleanly), SIGKILL the group after ``STOP_WAIT`` s;
        a temporary data folder is removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    # ---------------------------------------------------------------- its HTTP API
    def post(self, events: Any, content_type: str = "application/json",
             headers: dict | None = None) -> tuple[int, dict, Any]:
        """POST /v1/events: (status, headers, the JSON answer or None)."""
        body = events if isinstance(events, bytes) else orjson.dumps(events)
        h = {"Content-Type": content_type}
        h.update(headers or {})
        status, hdrs, raw = http("POST", self.url + "/v1/events", body, h)
        return status, hdrs, (json.loads(raw) if raw else None)

    def snapshots(self) -> list[dict]:
        """Every snapshot the service lists, page by page (the audit's own reader)."""
        from aggregator.gen.cli import fetch_snapshots

        return list(fetch_snapshots(self.url))

    def metrics_text(self) -> str:
        status, _, raw = http("GET", self.url + "/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {raw[:500]!r}")
        return raw.decode()

    def metric(self, series: str, default: float | None = None) -> float:
        """The value of one series of ``/metrics``, as exposed (``name`` or ``name{labels}``);
        ``default`` when it is not there (None: an AssertionError)."""
        for line in self.metrics_text().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        if default is None:
            raise AssertionError(f"{series} is not in /metrics")
        return default
