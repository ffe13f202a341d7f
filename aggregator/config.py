"""Settings: every ``AGG_*`` variable, with a matching ``--flag`` (docs/contract.md §7).

One pydantic-settings model with its checks, and the helpers that name a setting (its
variable, its flag), describe it and show its default.  ``config_load.load()`` reads it,
highest first, from the command's flags, the ``AGG_*`` environment (secrets also from
``AGG_<NAME>_FILE``), an optional TOML file and the defaults; every problem becomes one
line naming the variable and the flag (``SettingsError.lines``).

``Settings(...)`` with keyword arguments validates those and takes defaults for the rest
(it reads no environment), like the dataclass it replaced."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from aggregator.broker.security import SETTINGS as SECURITY_SETTINGS
from aggregator.broker.security import KafkaSecurity
from aggregator.core.dedupid import MAX_KEY_INDEX
from aggregator.core.events import REGION_MAX_CHARS, REGION_RE
from aggregator.core.ratelimit import parse_rate_limits
from aggregator.core.sketches import SketchParams
from aggregator.core.topics import MAX_PREFIX_CHARS, Topics, prefix_problem

ENV_PREFIX = "AGG_"
CONFIG_ENV = "AGG_CONFIG"
ROLES = ("all", "ingest", "worker")
EMBEDDED_LINGER_MS = 10.0  # AGG_INGEST_LINGER_MS of -1 with the embedded broker (docs/performance.md)
KAFKA_PARTITIONS = 4  # AGG_PARTITIONS's default
EMBEDDED_PARTITIONS = 1  # AGG_PARTITIONS on the embedded broker unless it is set (docs/performance.md)
# Kafka's own ceilings: CreateTopics carries a topic's partition count as an int32 and its
# replication factor as an int16; above them the request cannot even be encoded
KAFKA_MAX_PARTITIONS = 2**31 - 1
KAFKA_MAX_REPLICATION_FACTOR = 2**15 - 1
# Upper bounds of the durations, beyond what a deployment needs (their descriptions say them):
# without them a huge value passed and then broke every state write (its milliseconds beyond
# 64 bits) or left a wait that never ends
HOUR, DAY = 3600.0, 86400.0
MAX_HORIZON_SECONDS = 30 * DAY  # AGG_LATE_AFTER_SECONDS, AGG_REGION_IDLE_SECONDS
MAX_DEDUP_SECONDS = 7 * DAY  # the ids are kept as long: memory (AGG_DEDUP_MAX_IDS) and recovery time
MAX_FLUSH_SECONDS = 60.0  # a quiet window closes up to one flush tick late; offsets are committed as often
# The durations the service counts in milliseconds: each must be a whole number of them (0.0001
# became 0 ms, 1.0009 s windows ran 1000 ms long while the gauge said 1.0009)
IN_MS = ("window_seconds", "grace_seconds", "late_after_seconds", "max_ahead_seconds", "dedup_seconds",
         "region_idle_seconds")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")



class SettingsError(Exception):
    """Bad settings: one line per problem, each naming the variable and the flag."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# ----------------------------------------------------------------- value checks
def _choice(options: tuple[str, ...], upper: bool) -> BeforeValidator:
    """Case-insensitive choice, stored in the case of ``options``."""
    def check(v: object) -> object:
        if not isinstance(v, str):
            return v
        norm = v.strip().upper() if upper else v.strip().lower()
        if norm not in options:
            raise ValueError(f"expected one of {', '.join(options)} (got {v!r})")
        return norm
    return BeforeValidator(check)


def _rate_limits(v: object) -> object:
    """``eu=5000,us-east=20000`` (environment, flag or TOML string) or a TOML table."""
    if isinstance(v, str):
        rates = parse_rate_limits(v)  # ValueError says which item is wrong
    elif isinstance(v, Mapping):
        rates = {}
        for region, rate in v.items():
            if isinstance(rate, bool) or not isinstance(rate, int | float):
                raise ValueError(f"rate {rate!r} for region {region!r} is not a number")
            rates[str(region).strip().lower()] = float(rate)
    else:
        raise ValueError("expected region=rate,... (e.g. eu=5000,us-east=20000)")
    for region, rate in rates.items():
        if not (region.isascii() and REGION_RE.match(region)):  # the rule of an event's region (core.events)
            raise ValueError(f"region {region!r} can never occur: a region is 1-{REGION_MAX_CHARS} characters "
                             "of [a-z0-9._-]")
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate for region {region!r} must be a number >= 0 (got {rate:g})")
    return rates


def parse_broker(value: str) -> list[tuple[str, int]]:
    """``kafka://host:port`` or ``host:port``, comma-separated, as (host, port) pairs;
    ValueError naming the first bad entry."""
    out: list[tuple[str, int]] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            raise ValueError("an empty entry in the comma-separated list")
        rest = entry
        if "://" in entry:
            scheme, rest = entry.split("://", 1)
            if scheme.lower() != "kafka":
                raise ValueError(f"{entry!r}: the only scheme is kafka:// (or none: host:port)")
        host, sep, port_s = rest.rpartition(":")
        host = host.strip("[]")  # [::1]:9092
        if not sep or not host or "/" in rest or not port_s.isdigit():
            raise ValueError(f"{entry!r} is not host:port or kafka://host:port")
        port = int(port_s)
        if not 1 <= port <= 65535:
            raise ValueError(f"{entry!r}: port must be 1..65535")
        out.append((host, port))
    return out


def _readable(path: str) -> str:
    if path and not (Path(path).is_file() and os.access(path, os.R_OK)):
        raise ValueError(f"no readable file {path!r}")
    return path


Port = Annotated[int, Field(ge=0, le=65535)]
RateLimits = Annotated[dict[str, float], NoDecode, BeforeValidator(_rate_limits)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _choice(LOG_LEVELS, upper=True)]
Role = Annotated[Literal["all", "ingest", "worker"], _choice(ROLES, upper=False)]
Protocol = Annotated[Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], _choice(SECURITY_PROTOCOLS, upper=True)]
Mechanism = Annotated[Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"], _choice(SASL_MECHANISMS, upper=True)]


def _secret(description: str, default: str | None = "") -> Any:
    """A secret string: also from ``AGG_<NAME>_FILE``; never shown (repr, errors, help)."""
    return Field(default=default, description=description, repr=False, json_schema_extra={"secret": True})


def _token(v: object) -> object:
    """AGG_INGEST_TOKEN: unset (None, the default) is no token; a token that is set (variable,
    its _FILE, flag or TOML) must be one a request can send, as aiohttp strips the outer
    whitespace of a header's value and refuses control characters in it."""
    if v is None:
        return ""
    if isinstance(v, str):
        if not v:
            raise ValueError("set but empty, which would turn authentication off: give a token, or unset it "
                             "(and AGG_INGEST_TOKEN_FILE) for none")
        if v.strip() != v or not v.isprintable():
            raise ValueError("begins or ends with whitespace or holds a control character (a token file may "
                             "end in one newline, no more): no request's Authorization header can match it")
    return v


Token = Annotated[str, BeforeValidator(_token)]


# The sources of the Settings being built: set by config_load.load() for the time it
# builds one (None: the keywords and the defaults only).
LOAD_SOURCES: ContextVar[Any] = ContextVar("settings_sources", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True,
                                      validate_assignment=True, allow_inf_nan=False, case_sensitive=False)

    broker: str = Field("", description="external Kafka, kafka://host:9092[,host2:9092]; empty: embedded broker")
    broker_port: Port = Field(0, description="port of the embedded broker (0: a free port)")
    broker_wait_seconds: float = Field(10.0, ge=0.1, le=HOUR, description="how long `run` waits at start for the "
                                       "broker to answer before it gives up (0.1..3600)")
    web_host: str = Field("127.0.0.1", min_length=1, description="HTTP listen address")
    web_port: Port = Field(8080, description="HTTP listen port")
    partitions: int = Field(KAFKA_PARTITIONS, ge=1, le=KAFKA_MAX_PARTITIONS, description="partitions of `clicks` when "
                            "the service creates it (1..2147483647, Kafka's limit); unless set, 1 on the embedded "
                            "broker, whose fetches cost per batch it holds (a request's events make a batch in each "
                            "partition they go to)")
    data_dir: str = Field("./var", min_length=1, description="local state directory")
    window_seconds: float = Field(60.0, ge=1, le=DAY, description="tumbling window length (1..86400, "
                                  "in whole ms)")
    grace_seconds: float = Field(5.0, ge=0, le=DAY, description="grace after a window end before it closes "
                                 "(0..86400, in whole ms)")
    late_after_seconds: float = Field(300.0, gt=0, le=MAX_HORIZON_SECONDS, description="client ts older than this "
                                      "vs ingest time is late (0.001..2592000: 30 days, in whole ms)")
    max_ahead_seconds: float = Field(5.0, gt=0, le=DAY, description="ingest times further ahead of the worker's "
                                     "clock are late (future_ts) and never move stream time (0.001..86400, in whole ms)")
    dedup_seconds: float = Field(600.0, ge=0, le=MAX_DEDUP_SECONDS, description="an Idempotency-Key retry or a "
                                 "repeated event_id within this of the first is counted once (0: no dedup; else "
                                 "0.001..604800: 7 days, in whole ms)")
    dedup_max_ids: int = Field(1_000_000, ge=1, description="event ids one partition remembers for dedup at most "
                               "(about 250 bytes each; a request key counts by its memory, ~2.3 for one event); "
                               "beyond, the oldest are forgotten before the horizon, in clickstream_dedup_evicted_total")
    aggregates: bool = Field(True, description="unique users, top URLs and client-delay quantiles per region "
                             "and window in every snapshot (false: counts only; ingest and workers must agree)")
    top_urls: int = Field(10, ge=1, le=20, description="URLs in a snapshot's top_urls at most")
    unique_users_precision: int = Field(12, ge=10, le=16, description="HyperLogLog precision of unique_users "
                                        "beyond 256 users: 2^p one-byte registers, standard error ~1.04/sqrt(2^p)")
    url_keep_query: bool = Field(False, description="count URLs with their query string (default: scheme, host "
                                 "and path only)")
    region_idle_seconds: float = Field(3600.0, gt=0, le=MAX_HORIZON_SECONDS, description="regions seen within this "
                                       "get zero-count snapshots (0.001..2592000: 30 days, in whole ms)")
    max_regions: int = Field(1000, ge=1, description="region cardinality cap; beyond it: __other__")
    ingest_token: Token = _secret("bearer token required by POST /v1/events (unset: none; set, it must not be "
                                  "empty nor begin or end with whitespace)", default=None)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, le=MAX_KEY_INDEX, description="request body limit, after "
                                "decompression too (16 MiB at most: an event's index in its body is a dedup id)")
    ingest_max_inflight_bytes: int = Field(32 * 1024 * 1024, ge=1, description="bytes of request bodies ingest "
                                           "works on at once (after decompression); beyond: 503 + Retry-After at "
                                           "once; at least AGG_MAX_BODY_BYTES")
    ingest_linger_ms: float = Field(-1.0, ge=-1, le=1000, description="a partition's record batch that ingest "
                                    "opens while none is in flight waits this long for more requests' records "
                                    "before it is sent (0..1000: fewer, larger batches; 0: at once); -1: 10 with the "
                                    "embedded broker, whose fetches cost per batch it holds, 0 with Kafka")
    http_header_timeout_seconds: float = Field(10.0, ge=0.1, le=HOUR, description="a connection must send a "
                                               "request's headers (and, idle, its next request) within this, else "
                                               "it is closed (0.1..3600)")
    http_body_timeout_seconds: float = Field(30.0, ge=0.1, le=HOUR, description="a POST /v1/events body must "
                                             "arrive within this, else 408 and the connection is closed (0.1..3600)")
    http_max_connections: int = Field(1000, ge=1, description="open HTTP connections at most; one more is "
                                      "answered 503 + Retry-After and closed")
    rate_limit: float = Field(0.0, ge=0, description="default per-region events/s (0: unlimited)")
    rate_limits: RateLimits = Field(default_factory=dict, description="per-region rates, e.g. eu=5000,us-east=20000 "
                                                                      "(0: unlimited for that region)")
    spill_dir: str = Field("", description="spill directory (default DATA_DIR/spill)")
    spill_max_bytes: int = Field(1 << 30, ge=0, description="spill size at which consumption slows (0: never)")
    log_level: LogLevel = Field("INFO", description="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    session_timeout: float = Field(6.0, ge=6, le=90, description="consumer group session timeout, seconds, "
                                   "6..90: Kafka refuses less than its group.min.session.timeout.ms (6 s by "
                                   "default), and Faust more than its 90 s broker request timeout")
    stuck_rebalance_seconds: float = Field(600.0, ge=0, le=DAY, description="a rebalance (with its changelog "
                                           "recovery) that has made no progress for this long makes /healthz answer "
                                           "503, so that a liveness check restarts the worker (0: never; else "
                                           "1..86400)")
    state_flush_seconds: float = Field(0.5, ge=0.01, le=MAX_FLUSH_SECONDS, description="how often window state is "
                                       "written to its changelog (0.01..60)")
    role: Role = Field("all", description="what `run` serves: all (HTTP ingest and the worker), "
                                          "ingest (HTTP ingest only), worker (the worker only)")
    kafka_security_protocol: Protocol = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: Mechanism = Field("PLAIN", description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER")
    kafka_sasl_username: str = Field("", description="SASL user (needed by the SASL_* protocols but with OAUTHBEARER)")
    kafka_sasl_password: str = _secret("SASL password (needed by the SASL_* protocols but with OAUTHBEARER)")
    # OAUTHBEARER (aggregator/broker/oauth.py): a token endpoint (client credentials) or a token file, one of them
    kafka_sasl_oauthbearer_token_endpoint_url: str = Field("", description="OAUTHBEARER: OAuth 2 token endpoint URL")
    kafka_sasl_oauthbearer_client_id: str = Field("", description="OAUTHBEARER: client id at the token endpoint")
    kafka_sasl_oauthbearer_client_secret: str = _secret("OAUTHBEARER: client secret at the token endpoint")
    kafka_sasl_oauthbearer_scope: str = Field("", description="OAUTHBEARER: scope asked of the token endpoint (empty: none)")
    kafka_sasl_oauthbearer_token_file: str = Field("", description="OAUTHBEARER: file of the token, read again when it changes")
    kafka_sasl_oauthbearer_extensions: str = Field("", description="OAUTHBEARER: SASL extensions sent with each token: k=v,...")
    kafka_ssl_cafile: str = Field("", description="CA bundle (PEM) that signed the brokers' certificates "
                                                  "(empty: the system's)")
    kafka_ssl_certfile: str = Field("", description="client certificate (PEM), with --kafka-ssl-keyfile")
    kafka_ssl_keyfile: str = Field("", description="client private key (PEM), with --kafka-ssl-certfile")
    kafka_ssl_key_password: str = _secret("password of the client private key")
    topic_replication_factor: int = Field(1, ge=1, le=KAFKA_MAX_REPLICATION_FACTOR, description="replication factor of "
                                          "the topics the service creates (1..32767, Kafka's limit)")
    topic_min_insync_replicas: int = Field(0, ge=0, description="min.insync.replicas of the topics the service "
                                                                "creates (0: the broker's default)")
    topic_prefix: str = Field("", description="prepended to the name of every topic the service uses and of its "
                              "consumer group: team-a. gives team-a.clicks, ..., group team-a.clickstream-aggregator "
                              f"(empty: the names unprefixed); characters of [a-zA-Z0-9._-], at most {MAX_PREFIX_CHARS}")

    # --------------------------------------------------------------- validators
    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        v = v.strip()
        if v:
            parse_broker(v)
        return v

    @field_validator(*IN_MS)
    @classmethod
    def _whole_ms(cls, v: float) -> float:
        ms = v * 1000  # within the bounds (checked first): exact to far below a millisecond
        if abs(ms - round(ms)) > 1e-6:
            raise ValueError("must be a whole number of milliseconds (0.001 s steps): the service counts in them")
        return v

    @field_validator("stuck_rebalance_seconds")
    @classmethod
    def _stuck(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("must be 0 (never) or >= 1: /healthz would fail a worker at every rebalance")
        return v

    @field_validator("ingest_max_inflight_bytes")
    @classmethod
    def _inflight(cls, v: int, info: ValidationInfo) -> int:
        body = info.data.get("max_body_bytes")
        if body is not None and v < body:
            raise ValueError(f"must be >= AGG_MAX_BODY_BYTES ({body}), or no body of that size is ever taken "
                             f"(got {v})")
        return v

    @field_validator("ingest_linger_ms")
    @classmethod
    def _linger(cls, v: float) -> float:
        if v < 0 and v != -1:
            raise ValueError(f"must be -1 (10 with the embedded broker, 0 with Kafka) or 0..1000 ms (got {v:g})")
        return v

    @field_validator("topic_min_insync_replicas")
    @classmethod
    def _min_isr(cls, v: int, info: ValidationInfo) -> int:
        rf = info.data.get("topic_replication_factor")
        if rf is not None and v > rf:
            raise ValueError(f"must be <= AGG_TOPIC_REPLICATION_FACTOR ({rf}): a topic with fewer replicas than "
                             f"its min.insync.replicas acknowledges no write (got {v})")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        problem = prefix_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _sasl(cls, v: str, info: ValidationInfo) -> str:
        protocol = info.data.get("kafka_security_protocol", "")
        if protocol.startswith("SASL_") and not v and info.data.get("kafka_sasl_mechanism") != "OAUTHBEARER":
            raise ValueError(f"required with AGG_KAFKA_SECURITY_PROTOCOL={protocol}")
        return v

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile")
    @classmethod
    def _file(cls, v: str, info: ValidationInfo) -> str:
        return _readable(v)

    @field_validator("kafka_ssl_keyfile")
    @classmethod
    def _keyfile(cls, v: str, info: ValidationInfo) -> str:
        cert = info.data.get("kafka_ssl_certfile")
        if cert is not None and bool(cert) != bool(v):
            raise ValueError("AGG_KAFKA_SSL_CERTFILE and AGG_KAFKA_SSL_KEYFILE go together: set both or neither")
        return _readable(v)

    # --------------------------------------------------------------- derived
    SECRETS: ClassVar[frozenset[str]] = frozenset({"ingest_token", "kafka_sasl_password", "kafka_ssl_key_password",
                                                   "kafka_sasl_oauthbearer_client_secret"})

    @property
    def window_ms(self) -> int:
        return round(self.window_seconds * 1000)

    @property
    def grace_ms(self) -> int:
        return round(self.grace_seconds * 1000)

    @property
    def late_after_ms(self) -> int:
        return round(self.late_after_seconds * 1000)

    @property
    def dedup_ms(self) -> int:
        return round(self.dedup_seconds * 1000)

    @property
    def max_ahead_ms(self) -> int:
        return round(self.max_ahead_seconds * 1000)

    @property
    def idle_ms(self) -> int:
        return round(self.region_idle_seconds * 1000)

    @property
    def spill_path(self) -> Path:
        return Path(self.spill_dir) if self.spill_dir else Path(self.data_dir) / "spill"

    def for_embedded_broker(self) -> None:
        """The defaults that differ on the embedded broker: AGG_PARTITIONS, unless it is set."""
        if "partitions" not in self.model_fields_set:
            self.partitions = EMBEDDED_PARTITIONS

    def linger_s(self, embedded: bool) -> float:
        """AGG_INGEST_LINGER_MS in seconds, its -1 resolved for the broker in use."""
        ms = self.ingest_linger_ms
        return (EMBEDDED_LINGER_MS if embedded else 0.0) / 1000 if ms < 0 else ms / 1000

    def bootstrap(self) -> str:
        """``host:port[,host:port]`` for aiokafka from ``kafka://...``."""
        return ",".join(h.strip().split("://", 1)[-1] for h in self.broker.split(","))

    def faust_broker(self) -> list[str]:
        return [h if "://" in h else f"kafka://{h}" for h in (e.strip() for e in self.broker.split(","))]

    @property
    def topics(self) -> Topics:
        """The topic names and consumer group, AGG_TOPIC_PREFIX before each (core.topics)."""
        return Topics(self.topic_prefix)

    def sketch_params(self) -> SketchParams:
        """The parameters of the per-window aggregates (core.sketches)."""
        return SketchParams(hll_p=self.unique_users_precision)

    def kafka_security(self) -> KafkaSecurity:
        """TLS and SASL of every Kafka client (aggregator.broker.security); SettingsError with
        one line per problem (the model has checked most of them already)."""
        try:
            return KafkaSecurity(**{name: getattr(self, setting) for name, setting in SECURITY_SETTINGS.items()})
        except ValueError as exc:
            raise SettingsError(str(exc).splitlines()) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """``Settings(**kw)``: the keywords and the defaults only; ``config_load.load()``
        adds the rest."""
        sources = LOAD_SOURCES.get()
        return (init_settings,) if sources is None else sources(settings_cls, init_settings)


FIELDS: tuple[str, ...] = tuple(Settings.model_fields)


def describe(name: str) -> str:
    return Settings.model_fields[name].description or ""


def default_text(name: str) -> str:
    """The default as a user writes it (help, README)."""
    f = Settings.model_fields[name]
    value = f.get_default(call_default_factory=True)
    if name == "rate_limits" or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
