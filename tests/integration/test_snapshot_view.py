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

    last: dict[int, list] = {}

    def all_listed(svc):
        def check():
            # one request: each region's 3 events share an ingest time, so one window each
            snaps = last[id(svc)] = [s for s in svc.snapshots() if s["region"] in REGIONS and s["count"]]
            return snaps if {s["region"] for s in snaps} == set(REGIONS) else None
        return check

    def listed(svc, timeout: float, what: str) -> list:
        try:
            return wait_for(all_listed(svc), timeout, what=what)
        except AssertionError as exc:  # say what was listed, and what both services logged
            raise AssertionError(f"{exc}; listed: {sorted(key(s) for s in last.get(id(svc), []))}\n"
                                 f"--- a ---\n{a.tail(6000)}\n--- b ---\n{b.tail(6000)}") from None

    seen_a = listed(a, 60, "every region's snapshots on worker a")
    assert sorted((s["region"], s["count"]) for s in seen_a) == [(r, 3) for r in sorted(REGIONS)]
    seen_b = listed(b, 30, "every region's snapshots on worker b")
    assert {key(s) for s in seen_a} == {key(s) for s in seen_b}

    a.kill()  # SIGKILL
    a.start()
    after = listed(a, 30, "the snapshots published before the crash, after the restart")
    assert {key(s) for s in after} == {key(s) for s in seen_a}
