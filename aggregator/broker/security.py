"""How every Kafka client of the process authenticates: TLS and SASL (docs/contract.md §7).

One ``KafkaSecurity`` (from ``Settings.kafka_security()``) is handed to every client: the
Faust app (consumer, producer, changelog topics) through ``faust_settings()``, and every
aiokafka client (ingest producer, admin, snapshot history, ``gen --kafka``, ``audit
--kafka``) through ``aiokafka_kwargs()``.  PLAINTEXT gives no settings at all, so a
plain broker sees exactly the clients it saw before.

``check_login`` opens one connection and tells a refused login or an untrusted
certificate apart from a broker that is not up yet: the first two are reported in one
line at start instead of being retried forever.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.broker.embedded import BrokerError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaLoginError(BrokerError):
    """The broker refused this process's TLS handshake or SASL login: retrying will not help."""


@dataclass(frozen=True)
class KafkaSecurity:
    """Validated at construction (``ValueError``, one line per problem, naming the
    ``AGG_*`` settings); the TLS context is built once, here, so a missing or unreadable
    file or a wrong key password is reported before anything starts."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_key_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", self.protocol.strip().upper())
        object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.strip().upper())
        problems = self._problems()
        if problems:
            raise ValueError("\n".join(problems))
        context: ssl.SSLContext | None = None
        if self.uses_tls:
            try:
                context = _ssl_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password)
            except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; both named for the reader
                raise ValueError(f"AGG_KAFKA_SSL_*: cannot load the TLS files: {exc}") from None
        object.__setattr__(self, "_ssl_context", context)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The one TLS context every client shares (None without TLS)."""
        ctx: ssl.SSLContext | None = self.__dict__["_ssl_context"]
        return ctx

    def _problems(self) -> list[str]:
        out: list[str] = []
        if self.protocol not in PROTOCOLS:
            out.append(f"AGG_KAFKA_SECURITY_PROTOCOL: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
            return out
        if self.sasl_mechanism not in MECHANISMS:
            out.append(f"AGG_KAFKA_SASL_MECHANISM: expected one of {', '.join(MECHANISMS)}, "
                       f"got {self.sasl_mechanism!r}")
        if self.uses_sasl:
            if not self.sasl_username:
                out.append(f"AGG_KAFKA_SASL_USERNAME is needed with AGG_KAFKA_SECURITY_PROTOCOL={self.protocol}")
            if not self.sasl_password:
                out.append(f"AGG_KAFKA_SASL_PASSWORD (or AGG_KAFKA_SASL_PASSWORD_FILE) is needed with "
                           f"AGG_KAFKA_SECURITY_PROTOCOL={self.protocol}")
        elif self.sasl_username or self.sasl_password:
            out.append(f"AGG_KAFKA_SASL_USERNAME/PASSWORD are set but AGG_KAFKA_SECURITY_PROTOCOL is "
                       f"{self.protocol}: set it to SASL_SSL (or SASL_PLAINTEXT) to use them")
        files = {"AGG_KAFKA_SSL_CAFILE": self.ssl_cafile, "AGG_KAFKA_SSL_CERTFILE": self.ssl_certfile,
                 "AGG_KAFKA_SSL_KEYFILE": self.ssl_keyfile}
        if self.uses_tls:
            for name, path in files.items():
                if path and not Path(path).is_file():
                    out.append(f"{name}: no such file {path}")
            if self.ssl_keyfile and not self.ssl_certfile:
                out.append("AGG_KAFKA_SSL_KEYFILE is set without AGG_KAFKA_SSL_CERTFILE (the client certificate)")
        else:
            given = [name for name, path in files.items() if path]
            if self.ssl_key_password:
                given.append("AGG_KAFKA_SSL_KEY_PASSWORD")
            if given:
                out.append(f"{', '.join(given)} set but AGG_KAFKA_SECURITY_PROTOCOL is {self.protocol}: "
                           "set it to SSL or SASL_SSL to use TLS")
        return out

    # ---------------------------------------------------------------- clients
    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin); empty
        for PLAINTEXT."""
        if self.protocol == "PLAINTEXT":
            return {}
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            kw["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        return kw

    def faust_settings(self) -> dict[str, Any]:
        """Settings for ``faust.App``: ``broker_credentials`` (Faust hands them to its
        consumer, producer and topic creation); empty for PLAINTEXT."""
        if self.protocol == "PLAINTEXT":
            return {}
        import faust  # here: the ingest role runs without Faust

        creds: Any
        if self.uses_sasl:
            # an ssl_context makes Faust's SASLCredentials SASL_SSL, none SASL_PLAINTEXT
            creds = faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                          mechanism=self.sasl_mechanism, ssl_context=self.ssl_context)
        else:
            creds = faust.SSLCredentials(self.ssl_context)
        return {"broker_credentials": creds}

    def describe(self) -> str:
        """For messages: ``SASL_SSL, SCRAM-SHA-512 as "user"`` (never the password)."""
        if self.uses_sasl:
            return f'{self.protocol}, {self.sasl_mechanism} as "{self.sasl_username}"'
        return self.protocol


PLAINTEXT = KafkaSecurity()


@functools.lru_cache(maxsize=4)
def _ssl_context(cafile: str, certfile: str, keyfile: str, key_password: str) -> ssl.SSLContext:
    """One TLS context per set of files, however many clients and ``KafkaSecurity`` objects
    (``Settings.kafka_security()`` makes a new one per call) use it."""
    from aiokafka.helpers import create_ssl_context

    # no CA file: the system's trust store (what managed Kafka services need)
    return create_ssl_context(cafile=cafile or None, certfile=certfile or None, keyfile=keyfile or None,
                              password=key_password or None)


async def check_login(bootstrap: str, security: KafkaSecurity, timeout_s: float = 10.0) -> None:
    """Open one connection to each bootstrap address in turn (TLS handshake, SASL login)
    until one succeeds.  Raises ``KafkaLoginError`` (one line) when a broker refused the
    login or its certificate was not trusted; a broker that cannot be reached is left to
    the callers' own retries (returns)."""
    if security.protocol == "PLAINTEXT":
        return
    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        IllegalSaslStateError,
        KafkaConnectionError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    for address in bootstrap.split(","):
        host, _, port = address.strip().split("://", 1)[-1].rpartition(":")
        where = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), request_timeout_ms=int(timeout_s * 1000),
                            **security.aiokafka_kwargs()), timeout_s)
        except (SaslAuthenticationFailed, IllegalSaslStateError) as exc:
            raise KafkaLoginError(
                f'Kafka at {where} refused the SASL login for user "{security.sasl_username}" '
                f"({security.sasl_mechanism}): check AGG_KAFKA_SASL_USERNAME / AGG_KAFKA_SASL_PASSWORD "
                f"(broker said: {_said(exc)})") from None
        except UnsupportedSaslMechanismError as exc:
            raise KafkaLoginError(f"Kafka at {where} does not accept AGG_KAFKA_SASL_MECHANISM="
                                  f"{security.sasl_mechanism} ({_said(exc)})") from None
        except ssl.SSLCertVerificationError as exc:
            raise KafkaLoginError(
                f"Kafka at {where}: its TLS certificate is not trusted ({exc.verify_message}): check "
                "AGG_KAFKA_SSL_CAFILE (the CA that signed the broker's certificate; unset: the system's "
                "trust store)") from None
        except ssl.SSLError as exc:
            raise KafkaLoginError(f"Kafka at {where}: the TLS handshake failed ({exc.reason or exc}): is "
                                  f"this a TLS listener (AGG_KAFKA_SECURITY_PROTOCOL={security.protocol})?") from None
        except (OSError, KafkaConnectionError, TimeoutError):
            continue  # not up (yet), or not listening: the caller's retries and messages
        conn.close()
        return


def _said(exc: BaseException) -> str:
    """The broker's message without aiokafka's ``[Error 58] Name:`` prefix."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("[Error") and ": " in text else text
