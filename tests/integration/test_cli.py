"""Wrong invocations of ``aggregator``: each ends within seconds, with a few lines, no
traceback, the documented status, and nothing left running (real processes, no broker
needed except where a test starts none on purpose)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import BROKER_INDEPENDENT
from tools.harness import REPO, free_port

pytestmark = [BROKER_INDEPENDENT]

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}


def aggregator(*args, env=None, timeout=20.0, cwd=None):
    """(status, output lines, seconds) of ``python -m aggregator ARGS``."""
    full = dict(CLEAN_ENV, PYTHONPATH=str(REPO), **(env or {}))
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "aggregator", *args], env=full, cwd=str(cwd or REPO),
                       capture_output=True, text=True, timeout=timeout)
    out = (p.stdout + p.stderr).strip()
    return p.returncode, out.splitlines(), time.monotonic() - t


def assert_one_error(result, expected: str, max_seconds: float = 10.0):
    code, lines, took = result
    assert code == 2, lines
    assert lines == [expected], lines
    assert took < max_seconds, took


def no_broker_children():
    out = subprocess.run(["ps", "-eo", "ppid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "tansu" in ln and f" {os.getpid()} " in f" {ln} "]


@pytest.mark.parametrize(("env", "line"), [
    ({"AGG_WINDOW_SECONDS": "-1"}, "error: AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got -1)"),
    ({"AGG_WINDOW_SECONDS": "0"}, "error: AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got 0)"),
    ({"AGG_LOG_LEVEL": "loud"},
     "error: AGG_LOG_LEVEL / --log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got 'loud')"),
    ({"AGG_RATE_LIMITS": "garbage"}, "error: AGG_RATE_LIMITS / --rate-limits: item 'garbage' is not of the form "
                                     "region=rate (e.g. 'eu=5000,us-east=20000')"),
    ({"AGG_BROKER": "nonsense"}, "error: AGG_BROKER / --broker: 'nonsense' is not host:port or kafka://host:port"),
])
def test_bad_setting_stops_run_before_anything_starts(env, line, tmp_path):
    assert_one_error(aggregator("run", env=dict(env, AGG_DATA_DIR=str(tmp_path))), line)
    assert not list(tmp_path.iterdir())  # not even the data directory's lock


def test_unreachable_broker_is_one_line_after_the_bounded_wait(tmp_path):
    code, lines, took = aggregator("run", env={"AGG_BROKER": "kafka://127.0.0.1:1", "AGG_BROKER_WAIT_SECONDS": "2",
                                               "AGG_DATA_DIR": str(tmp_path), "AGG_WEB_PORT": str(free_port())})
    assert code == 2 and lines == [
        "error: AGG_BROKER: no Kafka broker answered at 127.0.0.1:1 within 2 s (AGG_BROKER_WAIT_SECONDS) (the last "
        "try: KafkaConnectionError: Unable to bootstrap from [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)]): is it "
        "running, is the address right, and does it speak AGG_KAFKA_SECURITY_PROTOCOL?"], lines
    assert 2 <= took < 10


def test_web_port_in_use_is_reported_before_the_broker_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = aggregator("run", env={"AGG_WEB_PORT": str(port), "AGG_DATA_DIR": str(tmp_path)})
    assert_one_error(result, f"error: AGG_WEB_PORT / --web-port: 127.0.0.1:{port} is already in use "
                             "(another process listens there)")
    assert not no_broker_children()


def test_broker_takes_only_its_own_options():
    assert_one_error(aggregator("broker", "--window-seconds", "5"),
                     "error: aggregator broker: no such option: --window-seconds: it is a setting of `aggregator run`; "
                     "`aggregator broker` takes --broker-port, --log-level, --partitions, --topic-prefix and --config")


def test_bad_toml(tmp_path):
    cfg = tmp_path / "agg.toml"
    cfg.write_text("window_seconds = 5\nwindow_secs = 5\n")
    assert_one_error(aggregator("run", "--config", str(cfg), env={"AGG_DATA_DIR": str(tmp_path)}),
                     f"error: AGG_CONFIG / --config: {cfg}: unknown setting 'window_secs'")
    cfg.write_text("window_seconds = [\n")
    code, lines, _ = aggregator("run", env={"AGG_CONFIG": str(cfg), "AGG_DATA_DIR": str(tmp_path)})
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: AGG_CONFIG / --config: {cfg} is not valid")


def test_secret_and_its_file_both_set(tmp_path):
    (tmp_path / "token").write_text("from-file\n")
    code, lines, _ = aggregator("run", env={"AGG_INGEST_TOKEN": "visible-secret", "AGG_DATA_DIR": str(tmp_path),
                                            "AGG_INGEST_TOKEN_FILE": str(tmp_path / "token")})
    assert code == 2 and lines == ["error: AGG_INGEST_TOKEN / AGG_INGEST_TOKEN_FILE: set one of them, not both"]
    assert not any("secret" in ln or "from-file" in ln for ln in lines)


def test_gen_reads_the_window_setting_and_rejects_a_bad_one():
    assert_one_error(aggregator("gen", env={"AGG_WINDOW_SECONDS": "0"}),
                     "error: AGG_WINDOW_SECONDS / --window-seconds: must be >= 1 (got 0)")


def test_help_shows_defaults_and_variables():
    code, lines, _ = aggregator("run", "--help")
    text = " ".join(" ".join(lines).split())
    assert code == 0
    for fragment in ("--window-seconds SECONDS", "[env: AGG_WINDOW_SECONDS; default: 60]",
                     "[env: AGG_WEB_PORT; default: 8080]", "[env: AGG_INGEST_TOKEN or AGG_INGEST_TOKEN_FILE; "
                     "default: empty]", "[env: AGG_CONFIG]", "--debug"):
        assert fragment in text, fragment
    code, lines, _ = aggregator("gen", "--help", env={"AGG_INGEST_TOKEN": "do-not-show"})
    text = " ".join(" ".join(lines).split())
    assert code == 0 and "[env: AGG_WINDOW_SECONDS; default: 60]" in text and "do-not-show" not in text


def test_version():
    from importlib.metadata import version
    code, lines, _ = aggregator("--version")
    assert code == 0 and lines == [f"aggregator {version('clickstream-aggregator')}"]


def _sigint_as_from_a_terminal() -> None:
    """In the child before exec: SIGINT at its default and not blocked, as a shell starts a
    command.  A child inherits an ignored or blocked SIGINT, and the test process's may be
    either after other tests ran in it (twice gen never saw the signal, under pytest-xdist)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_on_gen_waiting_for_the_service_is_one_line():
    env = dict(CLEAN_ENV, PYTHONPATH=str(REPO))
    # a listener that never answers: gen's first /healthz connecting to it shows gen is past
    # its imports (a SIGINT among them is Python's own KeyboardInterrupt traceback, not the
    # command's) and waiting for the service; a fixed sleep was too short or too long on a
    # loaded machine (gen gave up after its 10 s first)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(60)
        p = subprocess.Popen([sys.executable, "-m", "aggregator", "gen", "--url",
                              f"http://127.0.0.1:{silent.getsockname()[1]}"],
                             env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_sigint_as_from_a_terminal)
        conn, _ = silent.accept()
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=10)
        conn.close()
    assert p.returncode == 130, out
    assert out.strip().splitlines() == ["aggregator: interrupted"], out


def test_gen_against_nothing_gives_up_in_one_line():
    port = free_port()
    code, lines, took = aggregator("gen", env={"AGG_WEB_PORT": str(port)}, timeout=30)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: gen: nothing answered at http://127.0.0.1:{port} within 10 s"), lines
    assert "Traceback" not in lines[0] and took < 20


def test_debug_shows_the_traceback(tmp_path):
    code, lines, _ = aggregator("--debug", "run", env={"AGG_WINDOW_SECONDS": "-1", "AGG_DATA_DIR": str(tmp_path)})
    assert code != 0 and any(ln.startswith("Traceback") for ln in lines)



def test_a_state_directory_that_cannot_be_made_names_its_setting(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "sub"
    assert_one_error(aggregator("run", env={"AGG_DATA_DIR": str(bad), "AGG_WEB_PORT": str(free_port())}),
                     f"error: AGG_DATA_DIR / --data-dir: cannot use {bad} as a state directory: Not a directory")
    assert_one_error(aggregator("run", env={"AGG_DATA_DIR": str(tmp_path / "d"), "AGG_SPILL_DIR": str(bad),
                                            "AGG_WEB_PORT": str(free_port())}),
                     f"error: AGG_SPILL_DIR / --spill-dir: cannot use {bad} as a state directory: Not a directory")
    assert not no_broker_children()


def test_web_port_equal_to_the_embedded_brokers_port_is_refused(tmp_path):
    port = free_port()
    assert_one_error(aggregator("run", env={"AGG_WEB_PORT": str(port), "AGG_BROKER_PORT": str(port),
                                            "AGG_DATA_DIR": str(tmp_path)}),
                     f"error: AGG_WEB_PORT / --web-port: {port} is also AGG_BROKER_PORT, the embedded broker's port: "
                     "give them different ports")
    assert not list(tmp_path.iterdir())


def test_an_unknown_agg_variable_stops_every_command_naming_the_closest_setting(tmp_path):
    line = ("error: AGG_WINDOW_SECOND: no such setting (did you mean AGG_WINDOW_SECONDS?); the settings are listed "
            "in docs/contract.md §7")
    assert_one_error(aggregator("run", env={"AGG_WINDOW_SECOND": "5", "AGG_DATA_DIR": str(tmp_path)}), line)
    assert_one_error(aggregator("broker", env={"AGG_WINDOW_SECOND": "5"}), line)
    assert_one_error(aggregator("run", env={"AGG_LOG_FORMAT": "xml", "AGG_DATA_DIR": str(tmp_path)}),
                     "error: AGG_LOG_FORMAT: expected json or text (got 'xml')")
    assert not list(tmp_path.iterdir())


def test_run_on_a_free_port_names_it_and_the_embedded_broker_gets_no_idempotent_producer(tmp_path):
    """AGG_WEB_PORT=0 used to announce http://127.0.0.1:0; and every start on the embedded broker
    logged aiokafka's InitProducerIdRequest error and a warning that batches may be stored twice.
    The embedded broker's topics get one partition (AGG_PARTITIONS unset)."""
    import asyncio
    import re
    import urllib.request

    from aggregator.broker import partition_counts

    out = tmp_path / "out.txt"
    broker_port = free_port()
    env = dict(CLEAN_ENV, PYTHONPATH=str(REPO), AGG_WEB_PORT="0", AGG_DATA_DIR=str(tmp_path / "data"),
               AGG_BROKER_PORT=str(broker_port))
    with out.open("w") as f:
        p = subprocess.Popen([sys.executable, "-m", "aggregator", "run"], env=env, cwd=str(REPO), stdout=f,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while "ingest ready" not in out.read_text() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        text = out.read_text()
        assert "ingest ready" in text, text
        found = re.findall(r"^aggregator: HTTP on http://127\.0\.0\.1:(\d+) ", text, re.M)
        assert len(found) == 1 and found[0] != "0", text
        with urllib.request.urlopen(f"http://127.0.0.1:{found[0]}/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert f'"HTTP listening on http://127.0.0.1:{found[0]}"' in text, text
        assert "InitProducerIdRequest" not in text and "stored twice" not in text, text
        assert '"level": "error"' not in text, text
        counts = asyncio.run(partition_counts(f"127.0.0.1:{broker_port}", ["clicks", "clicks-repartition"]))
        assert counts == {"clicks": 1, "clicks-repartition": 1}, counts
        assert "note: clicks has" not in text, text
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert not no_broker_children()


def test_gen_and_audit_refuse_bad_arguments_before_sending_anything(tmp_path):
    port = free_port()  # nothing listens: a check after sending would wait 10 s and say so instead
    url = f"http://127.0.0.1:{port}"
    assert_one_error(aggregator("gen", "--skew", "nan", "--url", url),
                     "error: aggregator gen: invalid value for '--skew': nan is not a number in 0..10 "
                     "(see aggregator gen --help)")
    assert_one_error(aggregator("gen", "--url", "notaurl"),
                     "error: gen: --url: 'notaurl' is not an http:// or https:// URL with a host "
                     "(e.g. http://127.0.0.1:8080)")
    assert_one_error(aggregator("gen", "--url", url, "--truth", "/nonexistent/t.json"),
                     "error: gen: --truth: cannot write /nonexistent/t.json: no directory /nonexistent")
    truth = tmp_path / "t.json"
    truth.write_text('{"counts": {}}')
    assert_one_error(aggregator("audit", "--truth", str(truth), "--url", "ftp://x"),
                     "error: audit: --url: 'ftp://x' is not an http:// or https:// URL with a host "
                     "(e.g. http://127.0.0.1:8080)")


def test_gen_and_audit_against_no_kafka_are_one_line_with_a_kafka_hint(tmp_path):
    truth = tmp_path / "t.json"
    truth.write_text('{"counts": {}}')
    bootstrap = f"127.0.0.1:{free_port()}"
    for args, start in ((("audit", "--truth", str(truth)), "error: audit: cannot read click-snapshots from Kafka"),
                        (("gen", "--count", "10"), "error: gen: producing to Kafka")):
        code, lines, took = aggregator(*args, "--kafka", bootstrap, timeout=60)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"{start} at {bootstrap}"), lines
        assert lines[0].endswith("(is a broker running there? --kafka, or AGG_BROKER)"), lines
        assert "--url" not in lines[0] and took < 30, (lines, took)
