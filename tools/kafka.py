"""A single-node Apache Kafka (KRaft) of its own, through ``scripts/kafka.sh`` (jars from Maven
Central, cached after the first run), with the face of ``aggregator.broker.EmbeddedBroker``:
``start``, ``stop``, ``url``, ``bootstrap``, ``exited``, ``stderr_tail``; and ``kill``.  Used by
the benchmark (a fresh one per run, its data in a temporary folder removed by ``stop``) and by
tests that stop a broker (``data_dir``: kept, so a restart finds its records again).

``make_test_ca`` writes a throwaway CA and a broker certificate for 127.0.0.1 (openssl CLI);
``ScriptKafka(sasl=SaslSsl(certs, {"user": "password"}))`` adds a SASL_SSL listener
(``sasl_bootstrap``) with SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN for those users, and
(``oauthbearer=True``) OAUTHBEARER with Kafka's unsecured validator (unsigned JWTs)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.broker import BrokerAddress, BrokerError, free_port
from tools.harness import REPO


@dataclass(frozen=True)
class ThrowawayCA:
    """PEM files made by ``make_test_ca``: ``ca`` (the CA certificate, for clients'
    AGG_KAFKA_SSL_CAFILE) and ``dir`` (for ``scripts/kafka.sh --sasl-ssl``)."""

    dir: Path
    ca: Path
    broker: Path  # the broker's key, then its certificate


def make_test_ca(directory: Path, days: int = 2) -> ThrowawayCA:
    """A throwaway CA and a broker certificate signed by it, valid for 127.0.0.1 and
    localhost (EC P-256: quick to make), with the openssl command line tool."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()[-500:]}")

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
            "-subj", "/CN=aggregator throwaway test CA")
    openssl("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.crt", "-days", str(days), "-extfile", "san.ext")
    # Kafka's PEM key store: the (PKCS#8, unencrypted) key, then the certificate chain
    (d / "broker.pem").write_text((d / "broker.key").read_text() + (d / "broker.crt").read_text()
                                  + (d / "ca.pem").read_text())
    return ThrowawayCA(dir=d, ca=d / "ca.pem", broker=d / "broker.pem")


@dataclass(frozen=True)
class SaslSsl:
    """A SASL_SSL listener for ``ScriptKafka``: certificates from ``make_test_ca`` and the
    SASL users (name -> password)."""

    ca: ThrowawayCA
    users: dict[str, str] = field(default_factory=dict)
    # non-empty: the authorizer is on, these users (and the PLAINTEXT listener) are super
    # users, the others may do what an ACL allows
    super_users: tuple[str, ...] = ()
    # OAUTHBEARER too, with Kafka's unsecured validator: any unsigned JWT with a sub and an exp;
    # reauth_ms > 0: a session ends then or when its token expires (connections.max.reauth.ms)
    oauthbearer: bool = False
    reauth_ms: int = 0


class ScriptKafka(BrokerAddress):
    def __init__(self, heap: str = "512m", base_dir: str | None = None, data_dir: Path | None = None,
                 sasl: SaslSsl | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.sasl = sasl
        self.sasl_port = free_port(self.host) if sasl is not None else None
        self.heap = heap
        self.base_dir = base_dir  # where its temporary data folder goes (None: the system default)
        self.keep = data_dir is not None  # a given folder outlives stop(); a temporary one does not
        self.dir: Path | None = Path(data_dir) if data_dir is not None else None
        self.pid: int | None = None

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return kafka_sh(*args, "--dir", str(self.dir), timeout=timeout)

    def start(self, timeout: float = 120.0) -> ScriptKafka:
        """Start it (the jars must be assembled already: ``kafka_sh("fetch")``); on any
        failure nothing is left running (and a temporary data folder is removed).  Again after
        ``kill``: the same port and data."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="bench-kafka-", dir=self.base_dir))
        self.dir.mkdir(parents=True, exist_ok=True)
        sasl: list[str] = []
        if self.sasl is not None:
            sasl = ["--sasl-ssl", str(self.sasl.ca.dir), "--sasl-port", str(self.sasl_port)]
            for name, password in self.sasl.users.items():
                sasl += ["--sasl-user", f"{name}:{password}"]
            for name in self.sasl.super_users:
                sasl += ["--acl-super", name]
            if self.sasl.oauthbearer:
                sasl += ["--oauthbearer", "--reauth-ms", str(self.sasl.reauth_ms)]
        try:
            res = self._script("start", "--port", str(self.port), "--heap", self.heap, "--timeout",
                               str(int(timeout)), *sasl, timeout=timeout + 30)
            if res.returncode != 0 or res.stdout.strip().splitlines()[-1:] != [self.bootstrap]:
                raise BrokerError(f"scripts/kafka.sh could not start Apache Kafka: {res.stderr.strip()[-2000:]}")
            self.pid = int((self.dir / "kafka.pid").read_text())
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def sasl_bootstrap(self) -> str:
        """host:port of the SASL_SSL listener."""
        if self.sasl_port is None:
            raise ValueError("this broker has no SASL_SSL listener (ScriptKafka(sasl=...))")
        return f"{self.host}:{self.sasl_port}"

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

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL the broker process (no controlled shutdown, no flush) and wait until it is gone."""
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.exited() is None:
            if time.monotonic() > deadline:
                raise BrokerError(f"Kafka (pid {self.pid}) still alive {timeout}s after SIGKILL")
            time.sleep(0.05)

    def stderr_tail(self, limit: int = 2000) -> str:
        log = self.dir / "kafka.log" if self.dir else None
        if log is None or not log.exists():
            return ""
        return log.read_text(errors="replace")[-limit:]

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if self.pid is not None or (self.dir / "kafka.pid").exists():
                self._script("stop", "--kill", timeout=90)
        finally:
            self.pid = None
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None


def kafka_sh(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``scripts/kafka.sh ARGS`` (e.g. ``fetch``: assemble the jars once)."""
    return subprocess.run(["bash", str(REPO / "scripts" / "kafka.sh"), *args], capture_output=True, text=True,
                          timeout=timeout)


def kafka_usable() -> str:
    """'' when scripts/kafka.sh can run Apache Kafka here (Java, and the jars assembled now
    or before), else why not."""
    if shutil.which("java") is None:
        return "no java (17+) on PATH"
    try:
        res = kafka_sh("fetch")
    except subprocess.TimeoutExpired:
        return "assembling the Kafka jars took over 30 min"
    return "" if res.returncode == 0 else (res.stderr.strip().splitlines() or ["kafka.sh fetch failed"])[-1]
