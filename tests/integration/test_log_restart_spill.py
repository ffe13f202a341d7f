"""Events spilled (rate limit, contract §6) from a partition's log that starts over while
they drain are counted once (issue 15, fault 1; test_log_restart.py has the rest of it).

A module of its own: pytest-xdist keeps a module's tests in one process (``--dist
loadfile``), and these two are the longest of the suite after the bench's."""
from __future__ import annotations

import asyncio
import shutil
import time

import orjson
import pytest

from aggregator.broker import ensure_topics
from aggregator.core.contract import CLICKS, SNAPSHOTS
from tests.conftest import wait_for
from tests.integration.conftest import ON_REAL_KAFKA, Service, read_topic
from tests.integration.test_log_restart import (
    collect,
    delete_topic,
    metric,
    post_until_accepted,
    resets,
    restart_empty,
    totals,
)

pytestmark = pytest.mark.integration


# events/s of the spilling region; its events before, after the restart (on Kafka the group
# notices a recreated topic within about 10 s: a longer backlog is still draining then)
RATE, OLD, NEW = 10, 300 if ON_REAL_KAFKA else 200, 100


@pytest.mark.parametrize("spill_lost", [False, True], ids=["spill-kept", "spill-lost"])
def test_events_spilled_from_the_old_log_are_counted_once(tmp_path, spill_lost, request):
    """A region over its rate spills; its log starts over while its backlog drains (the
    embedded broker back empty; on Kafka, clicks deleted and created again), and more of its
    events spill behind it from the new log; then the worker is SIGKILLed and started
    again.  Every event is counted once (in a window or late).  When the spill is lost at
    that kill too (another host), the new log's spilled events are read again from it, and
    the old log's — in no log any more — are counted as lost faults, never replaced by other
    events of the new log at their old offsets."""
    region = "slow"
    backlog = f'clickstream_spill_backlog_events{{region="{region}"}}'
    env = {"AGG_PARTITIONS": "1", "AGG_GRACE_SECONDS": "10", "AGG_RATE_LIMITS": f"{region}={RATE}"}
    if ON_REAL_KAFKA:
        b = request.getfixturevalue("broker")
        svc = request.getfixturevalue("service_factory")("w", **env)
    else:
        from aggregator.broker import EmbeddedBroker

        b = EmbeddedBroker().start()
        svc = Service(b.url, tmp_path / "w", **env)
    final: dict = {}

    def published() -> int:
        seen = dict(final)
        collect(seen, [orjson.loads(v) for _, v in read_topic(b.bootstrap, SNAPSHOTS, idle=0.5)])
        return totals(seen)[region]

    def lost() -> float:
        return metric(svc, 'clickstream_spill_faults_total{kind="lost"}')

    try:
        svc.start()
        assert svc.post([{"region": region}] * OLD)[0] == 200
        wait_for(lambda: metric(svc, backlog) > 0, 30, what="spilled")
        time.sleep(1.5)  # counted RATE, spilled the rest, its state written
        if ON_REAL_KAFKA:
            delete_topic(b.bootstrap, CLICKS)
            asyncio.run(ensure_topics(b.bootstrap, 1))
        else:
            b = restart_empty(b, svc, 1)
        post_until_accepted(svc, [{"region": region}] * NEW, 60)
        wait_for(lambda: resets(svc) == 1, 60, what="the restart seen")
        time.sleep(2.5)  # a state with the old log's backlog fenced written
        assert metric(svc, backlog) > NEW  # the old log's still draining, the new log's behind it
        collect(final, svc.snapshots())  # what went to the broker that is gone (embedded)
        svc.kill()
        if spill_lost:
            shutil.rmtree(tmp_path / "w" / "spill")
        svc.start()
        try:
            wait_for(lambda: published() + lost() >= OLD + NEW, 120, interval=1.0, what="every event published")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {published()}, lost {lost()}\n{svc.tail(3000)}") from None
        time.sleep(3.0)  # nothing more turns up
        collect(final, [orjson.loads(v) for _, v in read_topic(b.bootstrap, SNAPSHOTS)])
        if spill_lost:
            assert 0 < lost() < OLD and totals(final)[region] + lost() == OLD + NEW, (totals(final), lost())
        else:
            assert totals(final)[region] == OLD + NEW and lost() == 0, (totals(final), lost())
    finally:
        if not ON_REAL_KAFKA:
            svc.kill()
            b.stop()
