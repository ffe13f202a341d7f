"""The line a lasting rebalance logs names, per changelog partition being recovered,
whether Faust fetches it and the offset recovery waits for (a stalled recovery's cause)."""
from __future__ import annotations

import faust

from aggregator.config import Settings
from aggregator.worker.faust_app import FaustApp, _changelog_state


def test_each_changelog_partition_in_recovery_is_named_with_what_is_known_of_it():
    f = FaustApp(Settings(broker="kafka://127.0.0.1:1"))  # never connects: nothing is started
    rec, consumer = f.app.tables.recovery, f.app.consumer
    assert _changelog_state(rec, consumer) == "none"
    fetched, idle = faust.types.TP("t-changelog", 3), faust.types.TP("t-changelog", 1)
    rec.active_tps.update({fetched, idle})
    rec.active_highwaters.update({fetched: 90, idle: 7})
    consumer.resume_partitions({fetched})  # Faust fetches it; the other is not active
    assert _changelog_state(rec, consumer) == ("1 (not fetching, ?, recovers to 7); "
                                               "3 (fetching, ?, recovers to 90)")
    # whatever goes wrong reading Faust's side, the rest of the log line stays
    assert _changelog_state(None, consumer).startswith("(unavailable: ")


def test_fausts_own_environment_variables_do_not_override_the_validated_settings(monkeypatch):
    """Faust reads unprefixed variables (BROKER_URL, PRODUCER_ACKS, WEB_PORT...) over what the
    app is given: one pointed the worker at another cluster or made its producer acks=1, and
    the WEB_PORT a Kubernetes Service named ``web`` injects stopped it with a ValueError."""
    for name, value in {"BROKER_URL": "kafka://other:9092", "PRODUCER_ACKS": "1",
                        "WEB_PORT": "tcp://10.96.0.12:80", "TOPIC_REPLICATION_FACTOR": "7",
                        "BROKER_SESSION_TIMEOUT": "60"}.items():
        monkeypatch.setenv(name, value)
    conf = FaustApp(Settings(broker="kafka://127.0.0.1:1", session_timeout=9)).app.conf
    assert [str(u) for u in conf.broker] == ["kafka://127.0.0.1:1"]
    assert (conf.producer_acks, conf.topic_replication_factor, conf.broker_session_timeout) == (-1, 1, 9)



def test_fausts_prefixed_variables_read_at_its_import_are_dropped_first():
    """faust/types/_env.py reads FAUST_WEB_PORT (a Kubernetes Service named faust-web injects
    tcp://...) as an int when Faust is imported: the import stopped with a ValueError."""
    import os
    import subprocess
    import sys

    from tools.harness import REPO

    env = dict(os.environ, FAUST_WEB_PORT="tcp://10.96.0.12:80", F_CONSOLE_PORT="tcp://10.96.0.13:80",
               FAUST_BLOCKING_TIMEOUT="soon", PYTHONPATH=str(REPO))
    code = ("from aggregator.config import Settings; from aggregator.worker.faust_app import FaustApp; "
            "FaustApp(Settings(broker='kafka://127.0.0.1:1')); print('built')")
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
                       timeout=60)
    assert (p.returncode, p.stdout.strip()) == (0, "built"), p.stderr[-2000:]
