"""``AGG_ROLE``: HTTP ingest and the worker in separate processes, joined only by Kafka."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.integration


def test_ingest_and_worker_in_two_processes_count_exactly(service_factory):
    worker = service_factory("worker", agg_role="worker").start()
    front = service_factory("ingest", agg_role="ingest").start()

    # the worker process does not serve ingest, and says where to go instead
    status, headers, body = worker.post([{"region": "eu"}])
    assert status == 503 and "ingest" in body["error"] and "Retry-After" in headers

    expected: dict[str, int] = {}
    for k in range(20):
        events = [{"region": f"r{(k * 7 + i) % 5}", "user_id": f"u{i}"} for i in range(250)]
        events[0]["ts"] = int(time.time() * 1000) - 3_600_000  # an hour old: late, client_delay
        status, _, body = front.post(b"\n".join(orjson.dumps(e) for e in events), "application/x-ndjson")
        assert status == 200 and body["accepted"] == 250, body
        for e in events:
            expected[e["region"]] = expected.get(e["region"], 0) + 1

    def closed() -> dict | None:
        tot: dict[str, int] = {}
        late = 0
        for s in worker.snapshots():
            tot[s["region"]] = tot.get(s["region"], 0) + s["count"] + s["late"]
            late += s["late_by_reason"]["client_delay"]
        return tot if tot == expected and late == 20 else None

    wait_for(closed, 30, what="every ingested event in a closed window")
    ingested = {s.labels["region"]: int(s.value)
                for f in text_string_to_metric_families(front.metrics_text())
                for s in f.samples if s.name == "clickstream_events_ingested_total"}
    assert ingested == expected
    assert front.snapshots() == []  # snapshots are served by the workers

    front.stop()  # SIGTERM: finishes in-flight requests, flushes, exits 0
    assert front.proc.returncode == 0, front.tail()
    assert "ingest: stopping" in front.tail()


def test_a_role_other_than_all_needs_a_broker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    for role, rc, needle in (("ingest", 2, "needs AGG_BROKER"), ("worker", 2, "needs AGG_BROKER"),
                             ("both", 2, "expected one of all, ingest, worker")):
        p = subprocess.run([sys.executable, "-m", "aggregator", "run", "--role", role, "--data-dir", str(tmp_path)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == rc and needle in p.stderr, (role, p.returncode, p.stderr)
