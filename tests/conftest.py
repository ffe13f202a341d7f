"""Shared by every test: the repository root, tools the suite may need, and the process
and HTTP helpers of tools/harness.py.  The broker and service fixtures are in
tests/integration/conftest.py; everything under tests/integration/ is marked
``integration`` here (``-m integration`` / ``-m "not integration"`` keep working)."""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.harness import REPO, free_port, http, wait_for

__all__ = ["REPO", "free_port", "http", "require_tool", "wait_for"]

INTEGRATION = Path(__file__).resolve().parent / "integration"


def require_tool(name: str, install_hint: str) -> str:
    """Path of a tool that .ci/run installs: missing, it fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing in CI ({install_hint})")
        pytest.skip(f"{name} not installed ({install_hint})")
    return path


OTLP_EXPORTER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


def require_module(name: str, install_hint: str) -> Any:
    """A module the test venv installs (the Makefile's ``.[test,bench]``): missing, it fails
    under CI and skips elsewhere, like ``require_tool`` (``pytest.importorskip`` would
    skip under CI too)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing in CI ({install_hint}): {exc}")
        pytest.skip(f"{name} not installed ({install_hint})")


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created): a disk that really fills up.
    Where mounting is not permitted (it needs root) the test fails under CI (.ci/run runs
    as root) and is skipped elsewhere, like a missing tool (``require_tool``)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI (needs root): {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with a filler file (delete it to free the space)."""
    path = disk / "filler"
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the last partial page
            f.write(b"\0")
    return path


@pytest.fixture
def spans() -> Iterator[Any]:
    """Tracing on (aggregator.tracing), always sampling, into an in-memory exporter (not the
    global provider); off again afterwards."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from aggregator import tracing
    from aggregator.tracing import TracingConfig

    mem = InMemorySpanExporter()
    tracing.setup(TracingConfig(("console",), "always_on", None, "http/protobuf"), exporters=[mem],
                  install_global=False)
    yield mem
    tracing.shutdown()
    assert tracing.tracer is None
