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
