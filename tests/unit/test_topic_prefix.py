"""AGG_TOPIC_PREFIX: the names it gives (core.topics), its checks (one line naming the
variable and the flag, before anything starts), and that the parts which name a topic or
the group take the prefixed names: Faust's own derivations of the app id included.  Two
deployments on one broker: tests/integration/test_topic_prefix.py; prefixed ACLs on Kafka:
tests/integration/test_kafka_security.py."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from aggregator.broker.topiccheck import judge
from aggregator.config import Settings
from aggregator.config_load import load
from aggregator.core import contract
from aggregator.core.topics import DEFAULT, MAX_NAME_CHARS, MAX_PREFIX_CHARS, Topics, prefix_problem
from aggregator.metrics import Metrics
from aggregator.worker.checkpoint import Checkpointer
from aggregator.worker.partitions import Partitions
from tests.unit.test_settings import problems
from tests.unit.worker.test_checkpoint import BOOKS, RecordingProducer
from tools.harness import REPO

NAMES = ("clicks", "dlq", "snapshots", "clicks_repartition", "app_id", "state_changelog", "leader_topic")
BAD_CHARS = "AGG_TOPIC_PREFIX / --topic-prefix: Kafka names take only the characters a-z, A-Z, 0-9, '.', '_' and '-'"


def test_no_prefix_is_the_names_of_before():
    old = (contract.CLICKS, contract.DLQ, contract.SNAPSHOTS, contract.CLICKS_REPARTITION, contract.APP_ID,
           contract.STATE_CHANGELOG, contract.LEADER_TOPIC)
    assert tuple(getattr(DEFAULT, n) for n in NAMES) == old
    assert old == ("clicks", "clicks-dlq", "click-snapshots", "clicks-repartition", "clickstream-aggregator",
                   "clickstream-aggregator-window-state-changelog", "clickstream-aggregator-__assignor-__leader")
    assert Topics() == DEFAULT == load(env={}).topics == Settings().topics
    assert load(env={}).topic_prefix == ""


def test_a_prefix_is_before_every_topic_and_the_group():
    t = load(env={"AGG_TOPIC_PREFIX": "team-a."}).topics
    assert t == Topics("team-a.")
    assert (t.clicks, t.dlq, t.snapshots, t.clicks_repartition) == (
        "team-a.clicks", "team-a.clicks-dlq", "team-a.click-snapshots", "team-a.clicks-repartition")
    assert t.app_id == "team-a.clickstream-aggregator"
    assert t.state_changelog == "team-a.clickstream-aggregator-window-state-changelog"
    assert t.leader_topic == "team-a.clickstream-aggregator-__assignor-__leader"
    for name in NAMES:  # every name, none left behind
        assert getattr(t, name) == "team-a." + getattr(DEFAULT, name)
    assert t.topics(worker=False) == ("team-a.clicks", "team-a.clicks-repartition", "team-a.clicks-dlq",
                                      "team-a.click-snapshots")
    assert set(t.topics()) == {getattr(t, n) for n in NAMES if n != "app_id"}


@pytest.mark.parametrize("prefix", ["a b", "team/a.", "tëam.", "x\n", "a:b", "*"])
def test_a_prefix_with_a_character_kafka_refuses_is_one_line(prefix):
    [line] = problems({"AGG_TOPIC_PREFIX": prefix})
    assert line.startswith(BAD_CHARS) and repr(prefix) in line, line
    with pytest.raises(ValueError):
        Topics(prefix)


def test_a_prefix_that_makes_a_name_longer_than_kafka_allows_is_one_line():
    longest = max(len(getattr(DEFAULT, n)) for n in NAMES)
    assert MAX_PREFIX_CHARS == MAX_NAME_CHARS - longest == 249 - len(contract.STATE_CHANGELOG)
    at_most = "x" * MAX_PREFIX_CHARS
    t = Topics(at_most)
    assert max(len(getattr(t, n)) for n in NAMES) == MAX_NAME_CHARS
    assert load(flags={"topic_prefix": at_most}, env={}).topics == t
    over = at_most + "x"
    assert problems(flags={"topic_prefix": over}) == [
        f"AGG_TOPIC_PREFIX / --topic-prefix: at most {MAX_PREFIX_CHARS} characters: the longest name it prefixes, "
        f"{contract.STATE_CHANGELOG}, would be {MAX_NAME_CHARS + 1} characters, over Kafka's {MAX_NAME_CHARS} "
        f"(got {MAX_PREFIX_CHARS + 1})"]
    assert prefix_problem(over) is not None and prefix_problem("Team_A-1.") is None


def test_the_commands_refuse_a_bad_prefix_before_anything_starts(tmp_path):
    """Each command that names a topic takes the prefix (flag or variable), and refuses a bad
    one in one line, status 2, no traceback; `run` before it looks for a broker."""
    truth = tmp_path / "truth.json"
    truth.write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    env.update(AGG_DATA_DIR=str(tmp_path / "data"), AGG_BROKER="kafka://127.0.0.1:1", AGG_BROKER_WAIT_SECONDS="1")
    for args, extra in [(("run", "--topic-prefix", "a b"), {}),
                        (("run",), {"AGG_TOPIC_PREFIX": "a b"}),
                        (("broker", "--topic-prefix", "a b"), {}),
                        (("gen", "--kafka", "127.0.0.1:1", "--count", "1", "--topic-prefix", "a b"), {}),
                        (("audit", "--kafka", "127.0.0.1:1", "--truth", str(truth)), {"AGG_TOPIC_PREFIX": "a b"})]:
        p = subprocess.run([sys.executable, "-m", "aggregator", *args], env={**env, **extra}, cwd=str(REPO),
                           capture_output=True, text=True, timeout=60)
        lines = (p.stdout + p.stderr).strip().splitlines()
        assert (p.returncode, len(lines)) == (2, 1), (args, lines)
        assert lines[0].startswith("error: " + BAD_CHARS), (args, lines)
        assert not (tmp_path / "data").exists()


def test_faust_derives_the_group_changelog_and_leader_topic_from_the_prefixed_app_id():
    """Faust names the consumer group, the table's changelog and its leader topic after the
    app id itself: what the service creates and checks (core.topics) must be those names."""
    from aggregator.worker.faust_app import FaustApp

    t = Topics("team-a.")
    f = FaustApp(Settings(broker="kafka://127.0.0.1:1", topic_prefix="team-a."))  # never connects
    assert f.topics == t and f.app.conf.id == t.app_id
    assert f.table.changelog_topic_name == t.state_changelog
    assert f.app._leader_assignor._leader_topic_name == t.leader_topic
    assert (f.clicks.get_topic_name(), f.forwarded.get_topic_name()) == (t.clicks, t.clicks_repartition)
    plain = FaustApp(Settings(broker="kafka://127.0.0.1:1"))
    assert (plain.app.conf.id, plain.table.changelog_topic_name) == (contract.APP_ID, contract.STATE_CHANGELOG)


def test_the_checkpoint_writes_to_the_prefixed_topics(tmp_path):
    t = Topics("team-a.")
    log: list = []
    producer = RecordingProducer(log)
    m = Metrics()
    cp = Checkpointer(lambda: producer, lambda p, recs: None, lambda p, o: None, m, [], topics=t)
    parts = Partitions(BOOKS, tmp_path, lambda p: None, m)
    p = parts.open(0)
    p.book.apply([("eu", 1_000, None), ("eu", 2_500, None)], 2, 2_500)
    cp.dead.append((b"x", b'{"reason": "bad_region"}'))
    cp.forward.append((1, b"us", b'{"region": "us"}', [("clickstream-ingest", b"1"), ("clickstream-source", b"0,0")]))
    asyncio.run(cp.checkpoint([p]))
    sent = {e[1] for e in log if e[0] == "send"}
    assert sent == {t.state_changelog, t.dlq, t.clicks_repartition, t.snapshots}, sent


def test_the_topic_checks_judge_the_prefixed_topics():
    t = Topics("team-a.")
    deleting = {t.state_changelog: {"cleanup.policy": "delete"}, t.clicks: {"cleanup.policy": "compact"}}
    problem, warnings = judge(deleting, {}, 1, worker=True, topics=t)
    assert problem is not None and problem.startswith(f"topic {t.state_changelog} has cleanup.policy=delete")
    assert [w.split(" is compacted")[0] for w in warnings] == [f"topic {t.clicks}"]
    # the unprefixed names are another deployment's: not judged for this one
    assert judge({contract.STATE_CHANGELOG: {"cleanup.policy": "delete"}}, {}, 1, worker=True, topics=t) == (None, [])
