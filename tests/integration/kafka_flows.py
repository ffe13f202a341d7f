"""What the secured-Kafka tests (test_kafka_security.py, test_kafka_oauth.py) do alike: run
the CLI with only the given AGG_* settings, post events over HTTP keeping their truth per
window, wait until a service's snapshots count them, and check ``gen --kafka`` plus
``audit --kafka`` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import Service
from tools.harness import REPO, wait_for

WINDOW_MS = 2000  # Service.DEFAULTS: AGG_WINDOW_SECONDS=2
Counts = dict[str, dict[str, int]]  # region -> window start (str) -> events


def aggregator(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``aggregator ARGS`` with the AGG_* settings of ``env`` only (none of this process's)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "aggregator", *args], env=full, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def post(svc: Service, counts: Counts, tag: str, region: str, n: int) -> None:
    """``n`` events of ``region`` over HTTP, all accepted, added to ``counts`` by window."""
    status, _, ans = svc.post([{"region": region, "event_id": f"{tag}-{j}"} for j in range(n)])
    assert status == 200 and ans["accepted"] == n, ans
    ws = str(ans["ingest_ts"] - ans["ingest_ts"] % WINDOW_MS)
    per = counts.setdefault(region, {})
    per[ws] = per.get(ws, 0) + n


def wait_counted(svc: Service, counts: Counts, timeout: float, what: str) -> None:
    """Until the snapshots of ``svc`` count, for each region of ``counts``, its events."""
    want = {r: sum(per.values()) for r, per in counts.items()}

    def counted() -> bool:
        totals = dict.fromkeys(want, 0)
        for s in svc.snapshots():
            if s["region"] in totals:
                totals[s["region"]] += s["count"]
        return totals == want

    wait_for(counted, timeout, what=what)


def gen_and_audit(bootstrap: str, tmp_path: Path, svc: Service, counts: Counts, gen_env: dict[str, str],
                  audit_env: dict[str, str], n: int = 600, regions: int = 4) -> Path:
    """``gen --kafka`` produces ``n`` events (``gen_env``'s login), then ``audit --kafka``
    (``audit_env``'s) finds the snapshots of the topic exact against one truth: the generated
    events' and ``counts``'.  -> that truth's file."""
    gen_truth = tmp_path / "gen.json"
    res = aggregator("gen", "--kafka", bootstrap, "--count", str(n), "--rate", "0", "--regions", str(regions),
                     "--window-seconds", str(WINDOW_MS / 1000), "--truth", str(gen_truth), env=gen_env)
    assert res.returncode == 0, res.stderr[-3000:]
    truth = json.loads(gen_truth.read_text())
    assert truth["accepted"] == n
    for region, per in counts.items():  # one truth for the whole topic
        mine = truth["counts"].setdefault(region, {})
        for ws, k in per.items():
            mine[ws] = mine.get(ws, 0) + k
    all_truth = tmp_path / "all.json"
    all_truth.write_text(json.dumps(truth))
    res = aggregator("audit", "--kafka", bootstrap, "--truth", str(all_truth), "--wait", "30", env=audit_env,
                     timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + svc.tail()
    assert "match the ground truth exactly" in res.stdout
    return all_truth
