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
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
# each field of KafkaSecurity and the setting it comes from (aggregator.config, AGG_<NAME>)
SETTINGS = {"protocol": "kafka_security_protocol", "sasl_mechanism": "kafka_sasl_mechanism",
            "sasl_username": "kafka_sasl_username", "sasl_password": "kafka_sasl_password",
            "ssl_cafile": "kafka_ssl_cafile", "ssl_certfile": "kafka_ssl_certfile",
            "ssl_keyfile": "kafka_ssl_keyfile", "ssl_key_password": "kafka_ssl_key_password",
            **{f"oauth_{n}": f"kafka_sasl_oauthbearer_{n}"
               for n in ("token_endpoint_url", "client_id", "client_secret", "scope", "token_file", "extensions")}}
OAUTH = {name: "AGG_" + setting.upper() for name, setting in SETTINGS.items() if name.startswith("oauth_")}


class KafkaLoginError(BrokerError):
    """The broker refused this process's TLS handshake or SASL login: retrying will not help."""


class TokenUnavailable(KafkaLoginError):
    """No OAUTHBEARER token yet: the token endpoint cannot be reached, timed out or answered
    429 or 5xx.  One-shot commands end on it like on a refusal; ``ensure_topics`` (`run`)
    asks again until AGG_BROKER_WAIT_SECONDS is over, as for a broker not up yet."""


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
    # OAUTHBEARER (aggregator.broker.oauth): a token endpoint (client credentials) or a token file
    oauth_token_endpoint_url: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = field(default="", repr=False)
    oauth_scope: str = ""
    oauth_token_file: str = ""
    oauth_extensions: str = ""  # key=value,... sent with the token (Confluent Cloud's logicalCluster, ...)

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
    def uses_oauth(self) -> bool:
        return self.uses_sasl and self.sasl_mechanism == "OAUTHBEARER"

    @property
    def token_provider(self) -> Any:
        """The process's one ``AbstractTokenProvider`` for these OAUTHBEARER settings (None
        without OAUTHBEARER)."""
        if not self.uses_oauth:
            return None
        from aggregator.broker.oauth import provider

        return provider(self.oauth_token_endpoint_url, self.oauth_client_id, self.oauth_client_secret,
                        self.oauth_scope, self.oauth_token_file, self.oauth_extensions)

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
        if self.uses_oauth:
            out.extend(_oauth_problems(self))
        elif self.uses_sasl:
            if not self.sasl_username:
                out.append(f"AGG_KAFKA_SASL_USERNAME is needed with AGG_KAFKA_SECURITY_PROTOCOL={self.protocol}")
            if not self.sasl_password:
                out.append(f"AGG_KAFKA_SASL_PASSWORD (or AGG_KAFKA_SASL_PASSWORD_FILE) is needed with "
                           f"AGG_KAFKA_SECURITY_PROTOCOL={self.protocol}")
        elif self.sasl_username or self.sasl_password:
            out.append(f"AGG_KAFKA_SASL_USERNAME/PASSWORD are set but AGG_KAFKA_SECURITY_PROTOCOL is "
                       f"{self.protocol}: set it to SASL_SSL (or SASL_PLAINTEXT) to use them")
        if not self.uses_oauth and any(getattr(self, name) for name in OAUTH):
            named = ", ".join(env for name, env in OAUTH.items() if getattr(self, name))
            out.append(f"{named} set but AGG_KAFKA_SASL_MECHANISM is {self.sasl_mechanism} and "
                       f"AGG_KAFKA_SECURITY_PROTOCOL {self.protocol}: they need OAUTHBEARER over SASL_SSL "
                       "(or SASL_PLAINTEXT)")
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
        if self.uses_oauth:
            kw.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=self.token_provider)
        elif self.uses_sasl:
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
        if self.uses_oauth:
            creds = faust.OAuthCredentials(oauth_cb=self.token_provider, ssl_context=self.ssl_context)
        elif self.uses_sasl:
            # an ssl_context makes Faust's SASLCredentials SASL_SSL, none SASL_PLAINTEXT
            creds = faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                          mechanism=self.sasl_mechanism, ssl_context=self.ssl_context)
        else:
            creds = faust.SSLCredentials(self.ssl_context)
        return {"broker_credentials": creds}

    def describe(self) -> str:
        """For messages: ``SASL_SSL, SCRAM-SHA-512 as "user"`` (never the password)."""
        if self.uses_oauth:
            source = (f"the token in {self.oauth_token_file}" if self.oauth_token_file else
                      f'client "{self.oauth_client_id}" of {self.oauth_token_endpoint_url}')
            return f"{self.protocol}, OAUTHBEARER with {source}"
        if self.uses_sasl:
            return f'{self.protocol}, {self.sasl_mechanism} as "{self.sasl_username}"'
        return self.protocol


PLAINTEXT = KafkaSecurity()


def _oauth_problems(sec: KafkaSecurity) -> list[str]:
    """OAUTHBEARER: exactly one token source, complete; no PLAIN/SCRAM user or password."""
    out = []
    if sec.sasl_username or sec.sasl_password:
        out.append("AGG_KAFKA_SASL_USERNAME/PASSWORD are for PLAIN and SCRAM, not OAUTHBEARER: unset them "
                   "(OAUTHBEARER logs in with AGG_KAFKA_SASL_OAUTHBEARER_*)")
    from aggregator.broker.oauth import parse_extensions

    try:
        parse_extensions(sec.oauth_extensions)
    except ValueError as exc:
        out.append(f"{OAUTH['oauth_extensions']}: {exc}")
    endpoint = [env for name, env in OAUTH.items()
                if name not in ("oauth_token_file", "oauth_extensions") and getattr(sec, name)]
    if sec.oauth_token_file and endpoint:
        out.append(f"AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE and {', '.join(endpoint)}: give one token source, "
                   "the token file or the token endpoint, not both")
    elif sec.oauth_token_file:
        pass
    elif not endpoint:
        out.append("AGG_KAFKA_SASL_MECHANISM=OAUTHBEARER needs a token source: AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_"
                   "ENDPOINT_URL with _CLIENT_ID and _CLIENT_SECRET, or AGG_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE")
    else:
        url = sec.oauth_token_endpoint_url
        if not url:
            out.append(f"{OAUTH['oauth_token_endpoint_url']} is needed with {', '.join(endpoint)}")
        elif not _http_url(url):
            out.append(f"{OAUTH['oauth_token_endpoint_url']}: expected an http:// or https:// URL, got {url!r}")
        for name in ("oauth_client_id", "oauth_client_secret"):
            if not getattr(sec, name):
                more = " (or AGG_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE)" if name == "oauth_client_secret" else ""
                out.append(f"{OAUTH[name]}{more} is needed with {OAUTH['oauth_token_endpoint_url']}")
    return out


def _http_url(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


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

    if security.uses_oauth:
        await _check_token(security, timeout_s)
    for address in bootstrap.split(","):
        host, _, port = address.strip().split("://", 1)[-1].rpartition(":")
        where = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), request_timeout_ms=int(timeout_s * 1000),
                            **security.aiokafka_kwargs()), timeout_s)
        except (SaslAuthenticationFailed, IllegalSaslStateError) as exc:
            if security.uses_oauth:
                raise KafkaLoginError(f"Kafka at {where} refused the OAUTHBEARER token ({security.describe()}; "
                                      f"broker said: {_said(exc)}): check the token's subject, scope and "
                                      "expiry against the broker's OAuth settings") from None
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


async def _check_token(security: KafkaSecurity, timeout_s: float) -> None:
    """A token from the OAUTHBEARER source (then kept for the clients): the token endpoint's
    refusal, a missing or empty token file end the start in one line (``KafkaLoginError``);
    an endpoint not answering or failing (429, 5xx) is ``TokenUnavailable``."""
    from aggregator.broker.oauth import OAuthTokenError

    try:
        await asyncio.wait_for(security.token_provider.token(), timeout_s + 5)
    except OAuthTokenError as exc:
        raise (TokenUnavailable if exc.passing else KafkaLoginError)(str(exc)) from None
    except TimeoutError:
        raise TokenUnavailable(f"no OAUTHBEARER token within {timeout_s + 5:g} s from "
                               f"{security.oauth_token_endpoint_url or security.oauth_token_file}") from None


def _said(exc: BaseException) -> str:
    """The broker's message without aiokafka's ``[Error 58] Name:`` prefix."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("[Error") and ": " in text else text
