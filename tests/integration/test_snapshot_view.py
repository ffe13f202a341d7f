"""GET /v1/snapshots across restarts and workers (issue 15, fault 9): the view is fed from
``click-snapshots``, so a restarted worker still lists the windows published before its
crash, and every worker of the group lists every region, not only its own partitions'."""
from __future__ import annotations

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.integration
REGIONS = [f"v{i}" for i in range(12)]  # over the 4 partitions, so both workers own some


def key(s: dict) -> tuple:
    return s["region"], s["window_start"], s["count"]


def test_every_worker_lists_every_region_and_a_restart_forgets_nothing(service_factory):
    a = service_factory("a").start()
    b = service_factory("b").start()
    status, _, body = a.post([{"region": r} for r in REGIONS for _ in range(3)])
    assert status == 200 and body["accepted"] == 3 * len(REGIONS)

    def all_listed(svc):
        def check():
            snaps = [s for s in svc.snapshots() if s["region"] in REGIONS]
            return snaps if sum(s["count"] for s in snaps) == 3 * len(REGIONS) else None
        return check

    seen_a = wait_for(all_listed(a), 60, what="every region's snapshots on worker a")
    seen_b = wait_for(all_listed(b), 30, what="every region's snapshots on worker b")
    assert {key(s) for s in seen_a if s["count"]} == {key(s) for s in seen_b if s["count"]}

    a.kill()  # SIGKILL
    a.start()
    after = wait_for(all_listed(a), 30, what="the snapshots published before the crash, after the restart")
    assert {key(s) for s in after if s["count"]} == {key(s) for s in seen_a if s["count"]}
