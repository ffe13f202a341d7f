"""The compiled hot path's machinery (tools/native.py, the guard in aggregator/__init__.py),
run for real: the staleness check on a temporary tree, the build's way out without a C
compiler, and interpreters started on the repository or on a copy of the package.  Whether
the compiled modules compute the right thing is the other unit tests' business (run
compiled, and once more as pure Python by `make test`).  The cases that need extension
modules are skipped when the manifest lists none (no `make native`, or no C compiler)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import aggregator
from tests.conftest import REPO
from tools import native

MODULES = [native.module_of(s) for s in native.SOURCES]
# every listed module's file, the guard's verdict, and what it said: in a fresh interpreter
PROBE = ("import importlib, json, aggregator; "
         "print(json.dumps({'native': aggregator.NATIVE, "
         "'files': {m: importlib.import_module(m).__file__ for m in %r}}))" % MODULES)


def probe(cwd: Path, **env: str) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items() if k != "AGG_NATIVE"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env={**base, **env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def built_modules() -> dict[str, str]:
    manifest = native.read_manifest(REPO)
    return manifest["modules"] if manifest else {}


NO_BUILD = "aggregator/_native.json lists no compiled module (run `make native`; needs a C compiler)"


@pytest.fixture
def needs_build_fixture() -> None:
    """Compiled modules present: skipped without them, failed under CI (.ci/run installs the
    C compiler, so a build that compiled nothing there is a gap, as a missing tool is)."""
    if not built_modules():
        if os.environ.get("CI"):
            pytest.fail(f"CI: {NO_BUILD}")
        pytest.skip(NO_BUILD)


needs_build = pytest.mark.usefixtures("needs_build_fixture")


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A tree holding the listed sources (small stand-ins) and nothing else."""
    for i, s in enumerate(native.SOURCES):
        (tmp_path / s).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / s).write_text(f"X = {i}\n")
    return tmp_path


@pytest.mark.parametrize("stale", [native.stale, aggregator.stale], ids=["tools.native", "guard"])
def test_a_changed_or_missing_source_is_stale_an_unchanged_one_not(sources, stale):
    modules = native.hashes(sources)
    assert set(modules) == set(MODULES)
    assert stale(str(sources), modules) == []
    (sources / "aggregator/core/windows.py").write_text("X = 'edited'\n")
    (sources / "aggregator/core/sketches/urls.py").unlink()
    assert sorted(stale(str(sources), modules)) == [
        "aggregator.core.sketches.urls", "aggregator.core.windows"]


def test_check_says_stale_in_one_line_and_exits_1(sources):
    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tools/native.py"), "check", "--root", str(sources)],
                              capture_output=True, text=True, timeout=60)
    assert check().returncode == 1  # no manifest yet
    native.write_manifest(sources, native.hashes(sources))
    assert check().returncode == 0
    (sources / "aggregator/core/aggstate.py").write_text("X = 'edited'\n")
    res = check()
    assert res.returncode == 1 and res.stdout.count("\n") == 1, res.stdout
    assert "aggregator.core.aggstate" in res.stdout and "make native" in res.stdout


def test_without_a_c_compiler_the_build_writes_an_empty_manifest_and_says_so(sources):
    for s in native.SOURCES[:2]:  # left by an earlier build: removed, never half a build
        (sources / s).with_suffix(EXTENSION_SUFFIXES[0]).write_bytes(b"")
    res = subprocess.run([sys.executable, str(REPO / "tools/native.py"), "build", "--root", str(sources)],
                         env={**os.environ, "CC": "no-such-cc-here"}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("\n") == 1 and "no C compiler" in res.stdout and "pure-Python" in res.stdout
    assert json.loads((sources / native.MANIFEST).read_text())["modules"] == {}
    assert native.products(sources) == []


def test_tools_native_is_standalone():
    """The Dockerfile copies tools/native.py alone: it imports nothing of the project and
    runs as a script from anywhere."""
    tree = ast.parse((REPO / "tools/native.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("aggregator", "tools")]
    res = subprocess.run([sys.executable, str(REPO / "tools/native.py"), "sources"], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split() == list(native.SOURCES)


def test_agg_native_off_runs_every_listed_module_from_its_source():
    found, err = probe(REPO, AGG_NATIVE="off")
    assert found["native"] is False and err == ""
    assert [f for f in found["files"].values() if not f.endswith(".py")] == []
    assert found["files"]["aggregator.core.windows"] == str(REPO / "aggregator/core/windows.py")


@needs_build
def test_a_build_runs_every_listed_module_compiled():
    assert set(built_modules()) == set(MODULES)
    found, err = probe(REPO)
    assert [f for f in found["files"].values() if not f.endswith(".so")] == [], "stale build? run `make native`"
    assert found["native"] is True and err == ""


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """The package as built (extension modules and manifest) in a temporary directory."""
    shutil.copytree(REPO / "aggregator", tmp_path / "aggregator", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@needs_build
def test_an_edited_source_runs_all_listed_modules_from_source_with_one_warning(package_copy):
    found, _ = probe(package_copy)
    assert found["native"] is True  # the copy, as it is, runs compiled
    with (package_copy / "aggregator/core/sketches/urls.py").open("a") as f:
        f.write("# edited without a rebuild\n")
    found, err = probe(package_copy)
    assert found["native"] is False
    assert found["files"] == {m: str(package_copy / (m.replace(".", "/") + ".py")) for m in MODULES}
    assert err.count("\n") == 1 and "aggregator.core.sketches.urls" in err and "`make native`" in err, err
    assert "aggregator.core.windows" not in err  # names only what changed


@needs_build
def test_a_missing_extension_module_runs_all_listed_modules_from_source(package_copy):
    for so in (package_copy / "aggregator/core").glob("windows.*so"):
        so.unlink()
    found, err = probe(package_copy)
    assert found["native"] is False and [f for f in found["files"].values() if not f.endswith(".py")] == []
    assert err.count("\n") == 1 and "missing" in err and "aggregator.core.windows" in err, err


@needs_build
def test_extension_modules_without_a_manifest_never_run(package_copy):
    """A build stopped between putting its extension modules in place and writing the
    manifest: nothing vouches for them, so nothing of the package runs compiled."""
    (package_copy / native.MANIFEST).unlink()
    found, err = probe(package_copy)
    assert found["native"] is False and [f for f in found["files"].values() if not f.endswith(".py")] == []
    assert err.count("\n") == 1 and "without a manifest" in err and "`make native`" in err, err
    found, err = probe(package_copy, AGG_NATIVE="off")
    assert found["native"] is False and err == ""
    assert [f for f in found["files"].values() if not f.endswith(".py")] == []


def test_agg_native_is_no_unknown_setting():
    """`aggregator run` refuses AGG_* variables it does not know; AGG_NATIVE is read by the guard."""
    from aggregator.config_load import unknown_variables

    assert unknown_variables({"AGG_NATIVE": "off"}) == []
    assert "did you mean AGG_NATIVE?" in unknown_variables({"AGG_NATIV": "off"})[0]
