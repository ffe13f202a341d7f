"""Settings: every ``AGG_*`` variable, with a matching ``--flag`` (docs/contract.md §7)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from aggregator.broker.security import KafkaSecurity


@dataclass
class Settings:
    broker: str = field(default="", metadata={"help": "external Kafka, kafka://host:9092[,host2:9092]; empty: embedded broker"})
    broker_port: int = field(default=0, metadata={"help": "port of the embedded broker (0: a free port)"})
    web_host: str = field(default="127.0.0.1", metadata={"help": "HTTP listen address"})
    web_port: int = field(default=8080, metadata={"help": "HTTP listen port"})
    partitions: int = field(default=4, metadata={"help": "partitions of `clicks` when the service creates it"})
    data_dir: str = field(default="./var", metadata={"help": "local state directory"})
    window_seconds: float = field(default=60.0, metadata={"help": "tumbling window length"})
    grace_seconds: float = field(default=5.0, metadata={"help": "grace after a window end before it closes"})
    late_after_seconds: float = field(default=300.0, metadata={"help": "client ts older than this vs ingest time is late"})
    max_ahead_seconds: float = field(default=5.0, metadata={"help": "ingest times further ahead of the worker's clock "
                                                                   "are late (future_ts) and never move stream time"})
    region_idle_seconds: float = field(default=3600.0, metadata={"help": "regions seen within this get zero-count snapshots"})
    max_regions: int = field(default=1000, metadata={"help": "region cardinality cap; beyond it: __other__"})
    ingest_token: str = field(default="", metadata={"help": "bearer token required by POST /v1/events"})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "request body limit, after decompression too"})
    rate_limit: float = field(default=0.0, metadata={"help": "default per-region events/s (0: unlimited)"})
    rate_limits: str = field(default="", metadata={"help": "per-region rates, e.g. eu=5000,us-east=20000"})
    spill_dir: str = field(default="", metadata={"help": "spill directory (default DATA_DIR/spill)"})
    spill_max_bytes: int = field(default=1 << 30, metadata={"help": "spill size at which consumption slows"})
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    session_timeout: float = field(default=6.0, metadata={"help": "consumer group session timeout, seconds"})
    state_flush_seconds: float = field(default=0.5, metadata={"help": "how often window state is written to its changelog"})
    role: str = field(default="all", metadata={"help": "what `run` serves: all (HTTP ingest and the worker), "
                                                       "ingest (HTTP ingest only), worker (the worker only)"})
    kafka_security_protocol: str = field(default="PLAINTEXT", metadata={
        "help": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (every Kafka client of the process)"})
    kafka_sasl_mechanism: str = field(default="PLAIN", metadata={"help": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"})
    kafka_sasl_username: str = field(default="", metadata={"help": "SASL user name (Confluent Cloud: the API key)"})
    kafka_sasl_password: str = field(default="", metadata={"help": "SASL password (or AGG_KAFKA_SASL_PASSWORD_FILE)"})
    kafka_ssl_cafile: str = field(default="", metadata={"help": "CA certificates (PEM) that signed the broker's; "
                                                                 "empty: the system's trust store"})
    kafka_ssl_certfile: str = field(default="", metadata={"help": "client certificate (PEM), for mutual TLS"})
    kafka_ssl_keyfile: str = field(default="", metadata={"help": "client private key (PEM), for mutual TLS"})
    kafka_ssl_key_password: str = field(default="", metadata={"help": "password of the client key "
                                                                       "(or AGG_KAFKA_SSL_KEY_PASSWORD_FILE)"})
    topic_replication_factor: int = field(default=1, metadata={"help": "replication factor of the topics the "
                                                                        "service creates (managed Kafka: 3)"})
    topic_min_insync_replicas: int = field(default=0, metadata={"help": "min.insync.replicas of the topics the "
                                                                         "service creates (0: the broker's default)"})

    @property
    def window_ms(self) -> int:
        return int(self.window_seconds * 1000)

    @property
    def grace_ms(self) -> int:
        return int(self.grace_seconds * 1000)

    @property
    def late_after_ms(self) -> int:
        return int(self.late_after_seconds * 1000)

    @property
    def max_ahead_ms(self) -> int:
        return int(self.max_ahead_seconds * 1000)

    @property
    def idle_ms(self) -> int:
        return int(self.region_idle_seconds * 1000)

    @property
    def spill_path(self) -> Path:
        return Path(self.spill_dir) if self.spill_dir else Path(self.data_dir) / "spill"

    def bootstrap(self) -> str:
        """``host:port[,host:port]`` for aiokafka from ``kafka://...``."""
        return ",".join(h.split("://", 1)[-1] for h in self.broker.split(","))

    def faust_broker(self) -> list[str]:
        return [h if "://" in h else f"kafka://{h}" for h in self.broker.split(",")]

    def kafka_security(self) -> KafkaSecurity:
        """TLS and SASL of every Kafka client; bad settings exit with one line per problem."""
        try:
            return KafkaSecurity(
                protocol=self.kafka_security_protocol, sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_username=self.kafka_sasl_username, sasl_password=self.kafka_sasl_password,
                ssl_cafile=self.kafka_ssl_cafile, ssl_certfile=self.kafka_ssl_certfile,
                ssl_keyfile=self.kafka_ssl_keyfile, ssl_key_password=self.kafka_ssl_key_password)
        except ValueError as exc:
            raise SystemExit("\n".join(f"error: {line}" for line in str(exc).splitlines())) from None


ROLES = ("all", "ingest", "worker")
SECRET_FILES = ("kafka_sasl_password", "kafka_ssl_key_password")  # also read from AGG_<NAME>_FILE


def _env_name(name: str) -> str:
    return "AGG_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"{f.metadata.get('help', '')} [{_env_name(f.name)}]")


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults, overridden by ``AGG_*`` variables, overridden by flags."""
    env = os.environ if env is None else env
    s = Settings()
    for f in fields(Settings):
        raw = None
        if args is not None and getattr(args, f.name, None) is not None:
            raw = getattr(args, f.name)
        elif _env_name(f.name) in env:
            raw = env[_env_name(f.name)]
        elif f.name in SECRET_FILES and _env_name(f.name) + "_FILE" in env:
            raw = _read_secret(_env_name(f.name) + "_FILE", env[_env_name(f.name) + "_FILE"])
        if raw is None:
            continue
        typ = type(getattr(s, f.name))
        try:
            setattr(s, f.name, typ(raw))
        except ValueError:
            raise SystemExit(f"error: {_env_name(f.name)} / --{f.name.replace('_', '-')}: "
                             f"expected {typ.__name__}, got {raw!r}") from None
    if s.role not in ROLES:
        raise SystemExit(f"error: AGG_ROLE / --role: expected one of {', '.join(ROLES)}, got {s.role!r}")
    if s.topic_replication_factor < 1 or s.topic_min_insync_replicas < 0:
        raise SystemExit("error: AGG_TOPIC_REPLICATION_FACTOR must be >= 1 and AGG_TOPIC_MIN_INSYNC_REPLICAS >= 0")
    s.kafka_security()  # exits on bad Kafka security settings
    return s


def _read_secret(name: str, path: str) -> str:
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SystemExit(f"error: {name}: cannot read {path}: {exc.strerror}") from None
