"""aggregator/process.py: the open-file limit a process's connection cap and spill need,
raised at start where the hard limit lets it, refused in one line where it does not.
Run in child processes given real limits (setrlimit before exec)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)

needs_room = pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 2_000,
                                reason="the hard open-file limit here is below what the test gives its child")


def limited(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def child(code: str, soft: int, hard: int) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=30,
                       preexec_fn=limited(soft, hard))
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@needs_room
def test_the_soft_limit_is_raised_to_what_connections_and_spill_writers_need():
    code = ("import resource; from aggregator.process import FD_RESERVE, open_files; "
            "print(open_files(300, 100), *resource.getrlimit(resource.RLIMIT_NOFILE), FD_RESERVE)")
    problem, soft, hard, reserve = child(code, 400, 2_000).split()
    assert (problem, int(soft), int(hard)) == ("None", 300 + 100 + int(reserve), 2_000)
    # a soft limit already above it is left as it is
    assert child(code, 1_500, 2_000).split()[:3] == ["None", "1500", "2000"]


def test_a_hard_limit_below_the_need_is_refused_with_the_numbers_and_the_remedy():
    code = "from aggregator.process import open_files; print(open_files(1000, 1000)); print(open_files(100, 0))"
    first, second = child(code, 512, 512).splitlines()
    assert first.startswith("AGG_HTTP_MAX_CONNECTIONS=1000 and AGG_MAX_REGIONS=1000 (a spill file each) need about "
                            "2256 open files, and this process may open 512 at most (RLIMIT_NOFILE): raise that limit")
    assert "lower AGG_HTTP_MAX_CONNECTIONS" not in first  # no cap fits beside 1000 spill files
    assert second == "None"  # 100 connections and no spill fit in 512


def test_run_refuses_a_connection_cap_the_open_file_limit_cannot_hold(tmp_path):
    """Before anything starts (no broker looked for, no data directory), status 2, one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGG_")}
    env.update(PYTHONPATH=str(REPO), AGG_DATA_DIR=str(tmp_path / "data"), AGG_BROKER="kafka://127.0.0.1:1",
               AGG_BROKER_WAIT_SECONDS="1", AGG_WEB_PORT="0", AGG_HTTP_MAX_CONNECTIONS="600",
               AGG_MAX_REGIONS="10")
    p = subprocess.run([sys.executable, "-m", "aggregator", "run"], env=env, cwd=str(REPO), capture_output=True,
                       text=True, timeout=30, preexec_fn=limited(512, 512))
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert (p.returncode, lines) == (2, [
        "error: AGG_HTTP_MAX_CONNECTIONS=600 and AGG_MAX_REGIONS=10 (a spill file each) need about 866 open files, "
        "and this process may open 512 at most (RLIMIT_NOFILE): raise that limit (ulimit -n, systemd "
        "LimitNOFILE=, docker --ulimit nofile=) or lower AGG_HTTP_MAX_CONNECTIONS to 246 or less"])
    assert not (tmp_path / "data").exists()
