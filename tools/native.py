"""The worker's hot path compiled with mypyc: an optional accelerator, built beside the
sources (which stay the truth; the extension modules are a build product, never committed).

    python -m tools.native build [--root DIR]  # compile SOURCES under DIR (default: this repository)
    python -m tools.native clean [--root DIR]  # remove the extension modules and the manifest
    python -m tools.native check [--root DIR]  # exit 1 with one line when a source changed since its build
    python -m tools.native sources             # the list, for the Makefile's dependencies

``build`` writes one extension module beside each source, one shared library holding
them all (``aggregator/_native__mypyc.*.so``: compiled modules call each other through it)
and, last, the manifest ``aggregator/_native.json``: ``{"mypy": version, "modules":
{module: sha256 of its source}}``.  The package's guard (aggregator/__init__.py) reads it
at import: a source whose hash differs, or ``AGG_NATIVE=off``, makes every listed module
load from its ``.py``.  Without a C compiler or Python's headers the build writes an empty
manifest and says the service runs its pure-Python modules (exit 0); mypyc failing on the
code is an error (exit 1, its messages shown).

This file imports nothing of ``aggregator`` or ``tools``: the Dockerfile copies it alone
and runs it on the installed package (``--root`` its site-packages)."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# The one list of compiled modules (the Makefile asks `sources`; the manifest carries it to
# the guard).  They are compiled together: all run compiled, or none.
SOURCES = (
    "aggregator/worker/decoder.py",
    "aggregator/core/windows.py",
    "aggregator/core/aggstate.py",
    "aggregator/core/sketches/cell.py",
    "aggregator/core/sketches/delays.py",
    "aggregator/core/sketches/topurls.py",
    "aggregator/core/sketches/users.py",
    "aggregator/core/sketches/urls.py",
)
GROUP = "aggregator._native"  # mypyc's group: the shared library is aggregator/_native__mypyc.*.so
MANIFEST = "aggregator/_native.json"
STEMS = [s.removesuffix(".py") for s in SOURCES] + [GROUP.replace(".", "/") + "__mypyc"]  # of the build's products
REPO = Path(__file__).resolve().parents[1]
PURE = "the service will run its pure-Python modules"

# run by the interpreter in a temporary directory: mypycify, then setuptools' build_ext, every
# file under that directory (the extension modules in lib/, copied beside the sources after)
SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify
tmp, paths = sys.argv[1], sys.argv[2:]
sys.argv[1:] = ["build_ext", "--build-temp", tmp + "/temp", "--build-lib", tmp + "/lib"]
setup(name="aggregator-native", py_modules=[],
      ext_modules=mypycify(["--config-file", tmp + "/mypy.ini", *paths], group_name=%r, target_dir=tmp + "/c"))
"""


def module_of(source: str) -> str:
    """``aggregator/core/windows.py`` -> ``aggregator.core.windows``."""
    return source.removesuffix(".py").replace("/", ".")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path) -> dict[str, str]:
    return {module_of(s): sha256(root / s) for s in SOURCES}


def read_manifest(root: Path) -> dict | None:
    try:
        found = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("modules"), dict) else None


def stale(root: Path | str, modules: dict[str, str]) -> list[str]:
    """The modules of a manifest's ``modules`` whose source under ``root`` is not the one
    compiled (changed or gone), and, when it lists any, those of SOURCES it does not list."""
    out = []
    for name, digest in modules.items():
        path = Path(root, name.replace(".", "/") + ".py")
        try:
            if sha256(path) != digest:
                out.append(name)
        except OSError:
            out.append(name)
    if modules:
        out += [module_of(s) for s in SOURCES if module_of(s) not in modules]
    return out


def products(root: Path, stems: list[str] | None = None) -> list[Path]:
    """The extension modules of a build under ``root`` (any interpreter's), the shared
    library among them; or those of ``stems`` (paths without ``.py``)."""
    out = []
    for stem in STEMS if stems is None else stems:
        path = root / stem
        out += sorted(path.parent.glob(path.name + ".*so"))
    return out


def clean(root: Path) -> int:
    for path in [*products(root), root / MANIFEST]:
        path.unlink(missing_ok=True)
    return 0


def write_manifest(root: Path, modules: dict[str, str]) -> None:
    """Written last, atomically: a manifest that lists modules means their build is whole."""
    try:
        from mypy.version import __version__ as mypy_version
    except ImportError:
        mypy_version = None
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"mypy": mypy_version, "modules": modules}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def missing_toolchain() -> str | None:
    """Why this machine cannot build the extension modules, or None."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        return f"no C compiler ({cc} not found; on Debian: apt-get install gcc libc6-dev)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h missing; on Debian: apt-get install python3-dev)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (pip install -c constraints.txt mypy)"
    return None


def build(root: Path) -> int:
    root = root.resolve()
    absent = [s for s in SOURCES if not (root / s).is_file()]
    if absent:
        print(f"native: {root} is not the package's root: no {', '.join(absent)}")
        return 2
    clean(root)  # nothing of an earlier build survives a failed or skipped one
    why = missing_toolchain()
    if why:
        write_manifest(root, {})
        print(f"native: {why}: {PURE}")
        return 0
    modules = hashes(root)  # before compiling: the sources compiled, even if one is edited meanwhile
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agg-native-") as tmp:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        (Path(tmp) / "mypy.ini").write_text(
            f"[mypy]\npython_version = {version}\nignore_missing_imports = True\ncache_dir = {tmp}/cache\n")
        res = subprocess.run([sys.executable, "-c", SETUP % GROUP, tmp, *(str(root / s) for s in SOURCES)],
                             cwd=tmp, capture_output=True, text=True)
        built = products(Path(tmp, "lib"))
        missing = [stem for stem in STEMS if not products(Path(tmp, "lib"), [stem])]
        if res.returncode == 0 and not missing:
            # in place only now: a build stopped before leaves nothing behind, one stopped
            # here leaves extension modules without a manifest, which the guard does not run
            for path in built:
                shutil.copyfile(path, root / path.relative_to(Path(tmp, "lib")))
    if res.returncode != 0 or missing:
        write_manifest(root, {})
        sys.stdout.write(res.stdout + res.stderr)
        because = f"mypyc failed (exit {res.returncode})" if res.returncode else f"no extension module for {', '.join(missing)}"
        print(f"native: {because}: {PURE}")
        return 1
    write_manifest(root, modules)
    print(f"native: {len(modules)} modules compiled with mypyc in {time.monotonic() - started:.0f} s ({MANIFEST})")
    return 0


def check(root: Path) -> int:
    manifest = read_manifest(root)
    if manifest is None:
        print(f"native: no {MANIFEST} (make native builds it)")
        return 1
    changed = stale(root, manifest["modules"])
    if changed:
        print(f"native: compiled modules stale, their sources changed: {', '.join(changed)} (make native rebuilds them)")
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.native", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "clean", "check", "sources"])
    parser.add_argument("--root", type=Path, default=REPO, help="the directory holding the package (default: the repository)")
    args = parser.parse_args(argv)
    if args.command == "sources":
        print(" ".join(SOURCES))
        return 0
    return {"build": build, "clean": clean, "check": check}[args.command](args.root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
