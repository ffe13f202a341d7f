"""A fresh single-node Apache Kafka (KRaft) for one benchmark run, through ``scripts/kafka.sh``
(jars from Maven Central, cached after the first run), with the face of
``aggregator.broker.EmbeddedBroker``: ``start``, ``stop``, ``url``, ``bootstrap``, ``exited``,
``stderr_tail``.  Its data lives in a temporary folder removed by ``stop``."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from aggregator.bench.common import REPO
from aggregator.broker import BrokerAddress, BrokerError, free_port


class ScriptKafka(BrokerAddress):
    def __init__(self, heap: str = "512m", base_dir: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.heap = heap
        self.base_dir = base_dir  # where its temporary data folder goes (None: the system default)
        self.dir: Path | None = None
        self.pid: int | None = None

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "scripts" / "kafka.sh"), *args, "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 600.0) -> "ScriptKafka":
        self.dir = Path(tempfile.mkdtemp(prefix="bench-kafka-", dir=self.base_dir))
        res = self._script("start", "--port", str(self.port), "--heap", self.heap, timeout=timeout)
        if res.returncode != 0 or res.stdout.strip().splitlines()[-1:] != [self.bootstrap]:
            self.stop()
            raise BrokerError(f"scripts/kafka.sh could not start Apache Kafka: {res.stderr.strip()[-2000:]}")
        self.pid = int((self.dir / "kafka.pid").read_text())
        return self

    def exited(self) -> int | None:
        """Non-None when the broker process is gone without ``stop`` (its status is not ours
        to read: kafka.sh started it)."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return -1
        return -1 if state in ("Z", "X") else None

    def stderr_tail(self, limit: int = 2000) -> str:
        log = self.dir / "kafka.log" if self.dir else None
        if log is None or not log.exists():
            return ""
        return log.read_text(errors="replace")[-limit:]

    def stop(self) -> None:
        if self.dir is None:
            return
        if self.pid is not None:
            self._script("stop", "--kill", timeout=90)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
