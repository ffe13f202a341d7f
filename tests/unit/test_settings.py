"""The settings model (aggregator/config.py) and its loading (aggregator/config_load.py):
ranges, choices, syntax, sources and their precedence, secrets.  Each problem is one line
naming the variable and the flag."""
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from aggregator import config
from aggregator.config import Settings, SettingsError
from aggregator.config_load import load
from tools.harness import REPO


def problems(env=None, flags=None, config_file=None, only=None, strict_env=False) -> list[str]:
    with pytest.raises(SettingsError) as err:
        load(flags, env=env or {}, config_file=config_file, only=only, strict_env=strict_env)
    return err.value.lines


def test_defaults_and_derived_values_are_the_old_ones():
    s = load(env={})
    assert (s.window_ms, s.grace_ms, s.late_after_ms, s.max_ahead_ms, s.idle_ms) == (60_000, 5000, 300_000, 5000,
                                                                                    3_600_000)
    assert s.broker == "" and s.web_port == 8080 and s.partitions == 4 and s.role == "all"
    assert s.log_level == "INFO" and s.rate_limits == {} and s.max_body_bytes == 8 * 1024 * 1024
    assert str(s.spill_path) == "var/spill"
    assert s.kafka_security_protocol == "PLAINTEXT" and s.topic_replication_factor == 1
    assert s.topic_min_insync_replicas == 0


@pytest.mark.parametrize(("env", "line"), [
    ({"AGG_WINDOW_SECONDS": "-1"}, "AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got -1)"),
    ({"AGG_WINDOW_SECONDS": "0"}, "AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got 0)"),
    ({"AGG_WINDOW_SECONDS": "nan"}, "AGG_WINDOW_SECONDS / --window-seconds: expected a finite number (got nan)"),
    ({"AGG_GRACE_SECONDS": "-0.5"}, "AGG_GRACE_SECONDS / --grace-seconds: must be >= 0 (got -0.5)"),
    ({"AGG_SESSION_TIMEOUT": "0"}, "AGG_SESSION_TIMEOUT / --session-timeout: must be >= 6 (got 0)"),
    # Kafka's group.min.session.timeout.ms (6 s) and Faust's broker request timeout (90 s):
    # outside them the worker started and then failed
    ({"AGG_SESSION_TIMEOUT": "5.5"}, "AGG_SESSION_TIMEOUT / --session-timeout: must be >= 6 (got 5.5)"),
    ({"AGG_SESSION_TIMEOUT": "91"}, "AGG_SESSION_TIMEOUT / --session-timeout: must be <= 90 (got 91)"),
    ({"AGG_TOPIC_REPLICATION_FACTOR": "3", "AGG_TOPIC_MIN_INSYNC_REPLICAS": "5"},
     "AGG_TOPIC_MIN_INSYNC_REPLICAS / --topic-min-insync-replicas: must be <= AGG_TOPIC_REPLICATION_FACTOR (3): "
     "a topic with fewer replicas than its min.insync.replicas acknowledges no write (got 5)"),
    ({"AGG_RATE_LIMITS": "eu=5,bad!region=5"},
     "AGG_RATE_LIMITS / --rate-limits: region 'bad!region' can never occur: a region is 1-64 characters of "
     "[a-z0-9._-] (got eu=5,bad!region=5)"),
    ({"AGG_RATE_LIMITS": "m\u00fcnchen=5"},
     "AGG_RATE_LIMITS / --rate-limits: region 'm\u00fcnchen' can never occur: a region is 1-64 characters of "
     "[a-z0-9._-] (got m\u00fcnchen=5)"),
    ({"AGG_WEB_PORT": "70000"}, "AGG_WEB_PORT / --web-port: must be a port number, 0..65535 (got 70000)"),
    ({"AGG_PARTITIONS": "x"}, "AGG_PARTITIONS / --partitions: expected a whole number (got x)"),
    ({"AGG_PARTITIONS": "0"}, "AGG_PARTITIONS / --partitions: must be >= 1 (got 0)"),
    ({"AGG_RATE_LIMIT": "-3"}, "AGG_RATE_LIMIT / --rate-limit: must be >= 0 (got -3)"),
    ({"AGG_LOG_LEVEL": "loud"},
     "AGG_LOG_LEVEL / --log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got 'loud')"),
    ({"AGG_ROLE": "boss"}, "AGG_ROLE / --role: expected one of all, ingest, worker (got 'boss')"),
    ({"AGG_RATE_LIMITS": "garbage"}, "AGG_RATE_LIMITS / --rate-limits: item 'garbage' is not of the form "
                                     "region=rate (e.g. 'eu=5000,us-east=20000')"),
    ({"AGG_RATE_LIMITS": "eu=-5"}, "AGG_RATE_LIMITS / --rate-limits: rate for region 'eu' must be a number >= 0 "
                                   "(got -5)"),
    ({"AGG_BROKER": "nonsense"}, "AGG_BROKER / --broker: 'nonsense' is not host:port or kafka://host:port"),
    ({"AGG_BROKER": "kafka://k1:9092,k2:99999"}, "AGG_BROKER / --broker: 'k2:99999': port must be 1..65535 "
                                                 "(got kafka://k1:9092,k2:99999)"),
    ({"AGG_BROKER": "http://k1:9092"},
     "AGG_BROKER / --broker: 'http://k1:9092': the only scheme is kafka:// (or none: host:port)"),
    ({"AGG_TOPIC_REPLICATION_FACTOR": "0"},
     "AGG_TOPIC_REPLICATION_FACTOR / --topic-replication-factor: must be >= 1 (got 0)"),
    # Kafka's ceilings (CreateTopics: int32 partitions, int16 replication factor): above them
    # the service waited for the broker and then said that none answered
    ({"AGG_PARTITIONS": "2147483648"}, "AGG_PARTITIONS / --partitions: must be <= 2147483647 (got 2147483648)"),
    ({"AGG_TOPIC_REPLICATION_FACTOR": "32768"},
     "AGG_TOPIC_REPLICATION_FACTOR / --topic-replication-factor: must be <= 32767 (got 32768)"),
    ({"AGG_KAFKA_SECURITY_PROTOCOL": "TLS"}, "AGG_KAFKA_SECURITY_PROTOCOL / --kafka-security-protocol: expected one "
                                             "of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (got 'TLS')"),
])
def test_a_bad_value_is_one_line_naming_variable_and_flag(env, line):
    assert problems(env) == [line]


def test_every_problem_is_reported_at_once():
    lines = problems({"AGG_WINDOW_SECONDS": "-1", "AGG_LOG_LEVEL": "loud", "AGG_WEB_PORT": "x"})
    assert [ln.split(":")[0] for ln in lines] == ["AGG_WEB_PORT / --web-port", "AGG_WINDOW_SECONDS / --window-seconds",
                                                  "AGG_LOG_LEVEL / --log-level"]


def test_good_values_parse_case_insensitively():
    s = load(env={"AGG_LOG_LEVEL": "debug", "AGG_ROLE": "Worker", "AGG_BROKER": "kafka://k1:9092, k2:9093",
                  "AGG_RATE_LIMITS": "EU=5000, us-east=20000,", "AGG_KAFKA_SASL_MECHANISM": "scram-sha-512"})
    assert (s.log_level, s.role, s.kafka_sasl_mechanism) == ("DEBUG", "worker", "SCRAM-SHA-512")
    assert s.rate_limits == {"eu": 5000.0, "us-east": 20000.0}
    assert s.bootstrap() == "k1:9092,k2:9093"
    assert s.faust_broker() == ["kafka://k1:9092", "kafka://k2:9093"]


def test_unknown_agg_variables_are_not_errors_unless_strict():
    # AGG_LOG_FORMAT (read by aggregator.logs) and the tests' AGG_TEST_* are not settings
    assert load(env={"AGG_LOG_FORMAT": "text", "AGG_TEST_BROKER": "kafka"}).web_port == 8080
    assert load(env={"AGG_WINDOW_SECOND": "5"}).window_seconds == 60  # load() for a library caller


def test_the_commands_refuse_unknown_agg_variables_naming_the_closest_setting():
    assert problems({"AGG_WINDOW_SECOND": "5", "AGG_NOTHING_LIKE_IT": "1", "AGG_WINDOW_SECONDS": "0"},
                    strict_env=True) == [
        "AGG_NOTHING_LIKE_IT: no such setting; the settings are listed in docs/contract.md §7",
        "AGG_WINDOW_SECOND: no such setting (did you mean AGG_WINDOW_SECONDS?); the settings are listed in "
        "docs/contract.md §7",
        "AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got 0)"]
    # read elsewhere, not settings: the TOML file, the log format, the secrets' files, the
    # test suite's and the benchmarks' variables; and settings of other commands
    ok = {"AGG_CONFIG": "", "AGG_LOG_FORMAT": "TEXT", "AGG_INGEST_TOKEN_FILE": "/dev/null",
          "AGG_TEST_BROKER": "kafka", "AGG_TEST_KAFKA": "127.0.0.1:19092", "AGG_BENCH_ANYTHING": "1",
          "AGG_WINDOW_SECONDS": "5"}
    assert load(env=ok, strict_env=True, only=("broker_port", "log_level")).broker_port == 0
    assert problems({"AGG_BROKER_PORTS": "1"}, strict_env=True, only=("broker_port", "log_level")) == [
        "AGG_BROKER_PORTS: no such setting (did you mean AGG_BROKER_PORT?); the settings are listed in "
        "docs/contract.md §7"]


def test_log_format_is_json_or_text():
    from aggregator.config_load import log_format
    assert [log_format(v) for v in (None, "", "json", "JSON", " Text ")] == ["json", "json", "json", "json", "text"]
    assert problems({"AGG_LOG_FORMAT": "xml"}, strict_env=True) == ["AGG_LOG_FORMAT: expected json or text (got 'xml')"]


def test_precedence_flags_over_env_over_toml_over_defaults(tmp_path):
    toml = tmp_path / "agg.toml"
    toml.write_text('window_seconds = 10\ngrace_seconds = 2\npartitions = 8\nrate_limits = { eu = 7 }\n')
    s = load({"window_seconds": "30"}, env={"AGG_WINDOW_SECONDS": "20", "AGG_GRACE_SECONDS": "3"},
             config_file=str(toml))
    assert (s.window_seconds, s.grace_seconds, s.partitions, s.web_port) == (30, 3, 8, 8080)
    assert s.rate_limits == {"eu": 7.0}
    s = load(env={"AGG_CONFIG": str(toml)})  # AGG_CONFIG names the file too
    assert (s.window_seconds, s.partitions) == (10, 8)


def test_toml_unknown_key_bad_syntax_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("window_seconds = 5\nwindow_secs = 5\n")
    assert problems(config_file=str(bad)) == [f"AGG_CONFIG / --config: {bad}: unknown setting 'window_secs'"]
    broken = tmp_path / "broken.toml"
    broken.write_text("window_seconds = [\n")
    [line] = problems(config_file=str(broken))
    assert line.startswith(f"AGG_CONFIG / --config: {broken} is not valid TOML: ")
    assert problems(config_file=str(tmp_path / "nope.toml")) == [
        f"AGG_CONFIG / --config: no such file '{tmp_path / 'nope.toml'}'"]
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('window_seconds = -4\n')
    assert problems(config_file=str(wrong)) == ["AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got -4)"]


def test_secret_from_file_and_never_shown(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret-token\n")
    s = load(env={"AGG_INGEST_TOKEN_FILE": str(f)})
    assert s.ingest_token == "s3cret-token"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert problems({"AGG_INGEST_TOKEN": "other", "AGG_INGEST_TOKEN_FILE": str(f)}) == [
        "AGG_INGEST_TOKEN / AGG_INGEST_TOKEN_FILE: set one of them, not both"]
    assert problems({"AGG_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "none")})[0].startswith(
        f"AGG_KAFKA_SASL_PASSWORD_FILE: cannot read '{tmp_path / 'none'}'")
    # a secret's bad value is not echoed
    lines = problems({"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_PASSWORD": "hunter2"})
    assert lines == ["AGG_KAFKA_SASL_USERNAME / --kafka-sasl-username: required with "
                     "AGG_KAFKA_SECURITY_PROTOCOL=SASL_SSL"]
    assert not any("hunter2" in ln for ln in lines)


def test_kafka_cross_field_checks(tmp_path):
    assert problems({"AGG_KAFKA_SECURITY_PROTOCOL": "sasl_plaintext"}) == [
        "AGG_KAFKA_SASL_USERNAME / --kafka-sasl-username: required with AGG_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        "AGG_KAFKA_SASL_PASSWORD / --kafka-sasl-password: required with AGG_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"]
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    assert problems({"AGG_KAFKA_SSL_CERTFILE": str(cert)}) == [
        "AGG_KAFKA_SSL_KEYFILE / --kafka-ssl-keyfile: AGG_KAFKA_SSL_CERTFILE and AGG_KAFKA_SSL_KEYFILE go together: "
        "set both or neither"]
    assert problems({"AGG_KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem")}) == [
        f"AGG_KAFKA_SSL_CAFILE / --kafka-ssl-cafile: no readable file '{tmp_path / 'ca.pem'}'"]
    s = load(env={"AGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AGG_KAFKA_SASL_USERNAME": "u",
                  "AGG_KAFKA_SASL_PASSWORD": "p", "AGG_KAFKA_SSL_CAFILE": str(cert)})
    assert (s.kafka_security_protocol, s.kafka_sasl_username, s.kafka_sasl_password) == ("SASL_SSL", "u", "p")


def test_only_reads_the_commands_settings():
    # `aggregator broker` is not stopped by a variable it never uses
    s = load({"broker_port": "9092"}, env={"AGG_WINDOW_SECONDS": "-1"}, only=("broker_port", "log_level"))
    assert s.broker_port == 9092 and s.window_seconds == 60
    assert problems({"AGG_LOG_LEVEL": "loud"}, only=("broker_port", "log_level"))[0].startswith("AGG_LOG_LEVEL")


def test_keyword_construction_and_mutation_as_the_code_does(monkeypatch):
    monkeypatch.setenv("AGG_WINDOW_SECONDS", "-1")  # Settings(...) reads no environment
    s = Settings(window_seconds=5, rate_limits="eu=1")
    assert s.window_ms == 5000 and s.rate_limits == {"eu": 1.0}
    s.broker = "kafka://127.0.0.1:5555"   # cli.cmd_run after starting the embedded broker
    s.partitions = 8                      # cli.check_partitions
    assert s.bootstrap() == "127.0.0.1:5555" and s.partitions == 8
    with pytest.raises(ValidationError):
        s.partitions = 0
    with pytest.raises(ValidationError):
        Settings(window_seconds=0)


def test_rate_limit_regions_follow_the_region_rule_in_toml_too(tmp_path):
    cfg = tmp_path / "agg.toml"
    cfg.write_text('[rate_limits]\n"EU" = 5\n"us east" = 7\n')
    assert problems(config_file=str(cfg)) == [
        "AGG_RATE_LIMITS / --rate-limits: region 'us east' can never occur: a region is 1-64 characters of "
        "[a-z0-9._-] (got {'EU': 5, 'us east': 7})"]
    cfg.write_text('[rate_limits]\n"EU" = 5\n"__other__" = 7\n')
    assert load(env={}, config_file=str(cfg)).rate_limits == {"eu": 5.0, "__other__": 7.0}


def test_rate_limits_feed_the_rate_limiter():
    from aggregator.core.ratelimit import RateLimits
    s = load(env={"AGG_RATE_LIMIT": "10", "AGG_RATE_LIMITS": "eu=5,us=0"})
    rl = RateLimits(s.rate_limit, s.rate_limits)
    assert (rl.rate_for("eu"), rl.rate_for("us"), rl.rate_for("ap")) == (5.0, 0.0, 10.0)


def test_every_field_documents_itself():
    for name in config.FIELDS:
        assert config.describe(name), name


def test_ingest_linger_follows_the_broker_unless_set():
    """-1 (the default): 10 ms with the embedded broker, whose fetches cost per record batch
    it holds; 0 with Kafka, where the linger only adds latency (docs/performance.md)."""
    auto = load(env={})
    assert (auto.linger_s(embedded=True), auto.linger_s(embedded=False)) == (0.010, 0.0)
    fixed = load(env={"AGG_INGEST_LINGER_MS": "5"})
    assert (fixed.linger_s(embedded=True), fixed.linger_s(embedded=False)) == (0.005, 0.005)
    assert problems({"AGG_INGEST_LINGER_MS": "-0.5"}) == [
        "AGG_INGEST_LINGER_MS / --ingest-linger-ms: must be -1 (10 with the embedded broker, 0 with Kafka) or "
        "0..1000 ms (got -0.5)"]


def test_partitions_on_the_embedded_broker_are_one_unless_set():
    """The embedded broker's fetches cost per record batch it holds, and a request makes a
    batch in each partition its events go to: one partition there, 4 on Kafka, as set where set
    (a flag, the environment or the file)."""
    auto = load(env={})
    assert auto.partitions == 4
    auto.for_embedded_broker()
    assert auto.partitions == 1
    for fixed in (load(env={"AGG_PARTITIONS": "4"}), load({"partitions": 6}, env={})):
        before = fixed.partitions
        fixed.for_embedded_broker()
        assert fixed.partitions == before


# ---------------------------------------------------------------- the ingest token
TOKEN = "AGG_INGEST_TOKEN / --ingest-token: "
EMPTY_TOKEN = (TOKEN + "set but empty, which would turn authentication off: give a token, or unset it "
               "(and AGG_INGEST_TOKEN_FILE) for none")
SPACED_TOKEN = (TOKEN + "begins or ends with whitespace or holds a control character (a token file may end in one "
                "newline, no more): no request's Authorization header can match it")


@pytest.mark.parametrize(("content", "line"), [
    ("", EMPTY_TOKEN), ("\n", EMPTY_TOKEN), ("\r\n", EMPTY_TOKEN),
    ("  \n", SPACED_TOKEN), ("tok \n", SPACED_TOKEN), ("tok\n\n", SPACED_TOKEN), ("\ttok", SPACED_TOKEN),
])
def test_a_token_file_that_is_empty_or_padded_is_refused(tmp_path, content, line):
    """An empty token is no token: from a file (/dev/null, a stray newline) it silently
    turned authentication off.  aiohttp strips a header value's outer whitespace, so a
    padded token could never match.  The file's one trailing newline is not the token's."""
    f = tmp_path / "token"
    f.write_text(content, newline="")
    assert problems({"AGG_INGEST_TOKEN_FILE": str(f)}) == [line]
    f.write_text("tok\r\n", newline="")
    assert load(env={"AGG_INGEST_TOKEN_FILE": str(f)}).ingest_token == "tok"


def test_an_empty_token_from_a_variable_flag_or_toml_is_refused_unset_is_none(tmp_path):
    assert problems({"AGG_INGEST_TOKEN_FILE": "/dev/null"}) == [EMPTY_TOKEN]
    assert problems({"AGG_INGEST_TOKEN": ""}) == [EMPTY_TOKEN]
    assert problems({"AGG_INGEST_TOKEN": "secret"}, flags={"ingest_token": ""}) == [EMPTY_TOKEN]
    toml = tmp_path / "agg.toml"
    toml.write_text('ingest_token = ""\n')
    assert problems(config_file=str(toml)) == [EMPTY_TOKEN]
    for padded in ("s3cret ", " s3cret", "s3cret\n", "s3\x00cret", "s3cret\u00a0"):
        lines = problems({"AGG_INGEST_TOKEN": padded})
        assert lines == [SPACED_TOKEN] and not any(padded in ln for ln in lines)
    assert load(env={}).ingest_token == ""  # unset: no token (the default)
    assert load(env={"AGG_INGEST_TOKEN": "a b~c"}).ingest_token == "a b~c"
    assert config.default_text("ingest_token") == ""
    with pytest.raises(ValidationError):
        Settings(ingest_token="")


# ---------------------------------------------------------------- durations
MAXIMA = {"AGG_BROKER_WAIT_SECONDS": "3600", "AGG_WINDOW_SECONDS": "86400", "AGG_GRACE_SECONDS": "86400",
          "AGG_LATE_AFTER_SECONDS": "2592000", "AGG_MAX_AHEAD_SECONDS": "86400", "AGG_DEDUP_SECONDS": "604800",
          "AGG_REGION_IDLE_SECONDS": "2592000", "AGG_HTTP_HEADER_TIMEOUT_SECONDS": "3600",
          "AGG_HTTP_BODY_TIMEOUT_SECONDS": "3600", "AGG_STUCK_REBALANCE_SECONDS": "86400",
          "AGG_STATE_FLUSH_SECONDS": "60", "AGG_SESSION_TIMEOUT": "90"}


def test_every_duration_has_an_upper_bound():
    """AGG_WINDOW_SECONDS=1e17 passed, and then every state write failed (orjson: "Integer
    exceeds 64-bit range"); the other durations likewise, or waits that never end."""
    durations = [n for n, f in Settings.model_fields.items() if f.annotation is float and n != "rate_limit"]
    assert sorted(config.env_name(n) for n in durations if n != "ingest_linger_ms") == sorted(MAXIMA)
    for name in durations:
        var = config.env_name(name)
        top = MAXIMA.get(var, "1000")
        assert load(env={var: top}), var
        assert problems({var: "1e17"}) == [f"{var} / {config.flag_name(name)}: must be <= {top} (got 1e17)"]
        assert top in config.describe(name) or f"{int(top):,}" in config.describe(name), name


def test_the_longest_durations_still_make_state_that_can_be_written():
    import time

    import orjson

    from aggregator.core.dedup import DedupStore
    from aggregator.worker.partitions import BookSettings
    s = load(env=MAXIMA)
    book = BookSettings(s.window_ms, s.grace_ms, s.late_after_ms, s.idle_ms, s.max_regions, s.partitions,
                        s.dedup_ms, s.dedup_max_ids).new_book()
    now = int(time.time() * 1000)
    book.apply([("eu", now, now - s.late_after_ms)], 1, now)
    assert book.advance_to(now + s.window_ms + s.grace_ms + 1)
    assert orjson.loads(orjson.dumps({**book.to_dict(), "window_ms": book.window_ms}))["window_ms"] == 86_400_000
    assert DedupStore(s.dedup_ms).bucket_ms > 0


WHOLE_MS = "must be a whole number of milliseconds (0.001 s steps): the service counts in them"


@pytest.mark.parametrize(("env", "line"), [
    # sub-millisecond values were 0 ms: no lateness margin, dedup off in the worker while
    # ingest still attached dedup ids; 1.0009 s windows were 1000 ms long
    ({"AGG_LATE_AFTER_SECONDS": "0.0001"}, f"AGG_LATE_AFTER_SECONDS / --late-after-seconds: {WHOLE_MS} (got 0.0001)"),
    ({"AGG_MAX_AHEAD_SECONDS": "0.0009"}, f"AGG_MAX_AHEAD_SECONDS / --max-ahead-seconds: {WHOLE_MS} (got 0.0009)"),
    ({"AGG_REGION_IDLE_SECONDS": "0.0001"},
     f"AGG_REGION_IDLE_SECONDS / --region-idle-seconds: {WHOLE_MS} (got 0.0001)"),
    ({"AGG_DEDUP_SECONDS": "0.0005"}, f"AGG_DEDUP_SECONDS / --dedup-seconds: {WHOLE_MS} (got 0.0005)"),
    ({"AGG_WINDOW_SECONDS": "1.0009"}, f"AGG_WINDOW_SECONDS / --window-seconds: {WHOLE_MS} (got 1.0009)"),
    ({"AGG_GRACE_SECONDS": "2.5005"}, f"AGG_GRACE_SECONDS / --grace-seconds: {WHOLE_MS} (got 2.5005)"),
    # loops and timeouts: a flush tick that spins, connections closed at once
    ({"AGG_STATE_FLUSH_SECONDS": "1e-9"}, "AGG_STATE_FLUSH_SECONDS / --state-flush-seconds: must be >= 0.01 (got 1e-9)"),
    ({"AGG_HTTP_HEADER_TIMEOUT_SECONDS": "1e-9"},
     "AGG_HTTP_HEADER_TIMEOUT_SECONDS / --http-header-timeout-seconds: must be >= 0.1 (got 1e-9)"),
    ({"AGG_HTTP_BODY_TIMEOUT_SECONDS": "0.05"},
     "AGG_HTTP_BODY_TIMEOUT_SECONDS / --http-body-timeout-seconds: must be >= 0.1 (got 0.05)"),
    ({"AGG_BROKER_WAIT_SECONDS": "0.001"}, "AGG_BROKER_WAIT_SECONDS / --broker-wait-seconds: must be >= 0.1 (got 0.001)"),
    ({"AGG_STUCK_REBALANCE_SECONDS": "0.5"}, "AGG_STUCK_REBALANCE_SECONDS / --stuck-rebalance-seconds: must be 0 "
                                             "(never) or >= 1: /healthz would fail a worker at every rebalance (got 0.5)"),
])
def test_durations_below_a_millisecond_or_a_sensible_minimum_are_refused(env, line):
    assert problems(env) == [line]


def test_a_duration_in_whole_ms_is_that_many_ms_wherever_it_is_used(tmp_path):
    import random
    rng = random.Random(7)
    for ms in [1, 2, 3, 7, 999, 1001, 1009, 60_001, 2_591_999_999, 2_592_000_000,
               *(rng.randrange(1, 2_592_000_001) for _ in range(2000))]:
        s = load(env={"AGG_LATE_AFTER_SECONDS": str(ms / 1000)})
        assert s.late_after_ms == ms, ms
    toml = tmp_path / "agg.toml"
    toml.write_text("window_seconds = 1.001\ndedup_seconds = 0.001\ngrace_seconds = 0.1\n")
    s = load(env={}, config_file=str(toml))
    assert (s.window_ms, s.dedup_ms, s.grace_ms) == (1001, 1, 100)
    assert s.window_ms / 1000 == s.window_seconds  # what clickstream_window_seconds shows
    # dedup is on in ingest (roles: dedup_ms > 0) exactly when the worker's horizon is
    from aggregator.core.dedup import DedupStore
    for value in ("0", "0.001", "0.002", "600"):
        s = load(env={"AGG_DEDUP_SECONDS": value})
        assert (s.dedup_seconds > 0) == (s.dedup_ms > 0) == bool(DedupStore(s.dedup_ms).horizon_ms), value
    assert load(env={"AGG_STUCK_REBALANCE_SECONDS": "0"}).stuck_rebalance_seconds == 0
    assert load(env={"AGG_STATE_FLUSH_SECONDS": "0.01"}).state_flush_seconds == 0.01


# ---------------------------------------------------------------- the command itself
def run_refused(tmp_path, env, *args) -> list[str]:
    """``python -m aggregator run ARGS`` with ``env`` (and no other AGG_* variable): it must
    stop before anything starts (status 2, nothing in its data directory) -> its output lines.
    Should the settings pass, it starts no broker: it looks for none where none is, a second."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    full.update(PYTHONPATH=str(REPO), AGG_DATA_DIR=str(tmp_path / "data"), AGG_BROKER="kafka://127.0.0.1:1",
                AGG_BROKER_WAIT_SECONDS="1", AGG_WEB_PORT="0", **env)
    p = subprocess.run([sys.executable, "-m", "aggregator", "run", *args], env=full, cwd=str(REPO),
                       capture_output=True, text=True, timeout=30)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert (p.returncode, len(lines)) == (2, 1), lines
    assert not (tmp_path / "data").exists(), lines
    return lines


@pytest.mark.parametrize(("env", "args", "line"), [
    ({"AGG_INGEST_TOKEN_FILE": "/dev/null"}, (), EMPTY_TOKEN),
    ({"AGG_INGEST_TOKEN": "secret"}, ("--ingest-token", ""), EMPTY_TOKEN),
    ({"AGG_INGEST_TOKEN": "secret "}, (), SPACED_TOKEN),
    ({"AGG_PARTITIONS": "2147483648"}, (), "AGG_PARTITIONS / --partitions: must be <= 2147483647 (got 2147483648)"),
    ({"AGG_TOPIC_REPLICATION_FACTOR": "40000"}, (),
     "AGG_TOPIC_REPLICATION_FACTOR / --topic-replication-factor: must be <= 32767 (got 40000)"),
    ({"AGG_WINDOW_SECONDS": "1e17"}, (), "AGG_WINDOW_SECONDS / --window-seconds: must be <= 86400 (got 1e17)"),
    ({"AGG_DEDUP_SECONDS": "2e17"}, (), "AGG_DEDUP_SECONDS / --dedup-seconds: must be <= 604800 (got 2e17)"),
    ({"AGG_DEDUP_SECONDS": "0.0005"}, (), f"AGG_DEDUP_SECONDS / --dedup-seconds: {WHOLE_MS} (got 0.0005)"),
    ({}, ("--window-seconds", "1.0009"), f"AGG_WINDOW_SECONDS / --window-seconds: {WHOLE_MS} (got 1.0009)"),
    ({"AGG_STATE_FLUSH_SECONDS": "1e-9"}, (),
     "AGG_STATE_FLUSH_SECONDS / --state-flush-seconds: must be >= 0.01 (got 1e-9)"),
])
def test_run_refuses_bad_settings_in_one_line_without_a_traceback(tmp_path, env, args, line):
    assert run_refused(tmp_path, env, *args) == ["error: " + line]
