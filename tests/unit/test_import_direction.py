"""Which parts of the package may import which (the redesign's layering), checked on the
source with ``ast``: nothing is imported, so a module with heavy imports (Faust) or one
that fails to import is still checked.

* ``aggregator.core`` imports nothing of the project outside ``aggregator.core``;
* ``aggregator.spill`` imports only ``aggregator.core`` and ``aggregator.spill``;
* ``aggregator.worker`` and ``aggregator.ingest`` never import ``aggregator.web``;
* ``aggregator.web`` never imports ``aggregator.worker`` or ``aggregator.ingest``;
* ``aggregator.ingest`` and ``aggregator.worker`` never import each other.

Every import counts: absolute and relative, at module level or inside a function or an
``if TYPE_CHECKING:`` block, and ``importlib.import_module("...")`` with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "aggregator"


def module_name(path: Path) -> str:
    """``aggregator/core/windows.py`` -> ``aggregator.core.windows``; a package's
    ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import in ``source``.

    ``from X import a, b`` gives ``X.a`` and ``X.b`` (either may be a submodule, as in
    ``from aggregator import web``); relative imports are resolved against ``module``."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                out.append((node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((node.lineno, arg.value))
    return out


def _part(name: str) -> str:
    """``aggregator.core.windows`` -> ``core``; ``aggregator`` -> ``""``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violation(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target``, or None when it may."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return None  # not a project module
    src, dst = _part(importer), _part(target)
    if src == "core" and dst != "core":
        return "aggregator.core imports nothing of the project outside aggregator.core"
    if src == "spill" and dst not in ("core", "spill"):
        return "aggregator.spill imports only aggregator.core and aggregator.spill"
    if src in ("worker", "ingest") and dst == "web":
        return f"aggregator.{src} must not import aggregator.web"
    if src == "web" and dst in ("worker", "ingest"):
        return f"aggregator.web must not import aggregator.{dst}"
    if {src, dst} == {"worker", "ingest"}:
        return "aggregator.ingest and aggregator.worker must not import each other"
    return None


def check_source(source: str, module: str, is_package: bool = False, where: str = "") -> list[str]:
    """The violations in one module's source, one readable line each."""
    where = where or module
    found: dict[tuple[int, str], list[str]] = {}  # (line, why) -> targets: one line per import statement
    for line, target in imported_names(source, module, is_package):
        why = violation(module, target)
        if why:
            found.setdefault((line, why), []).append(target)
    return [f"{where}:{line}: {module} imports {', '.join(targets)}: {why}"
            for (line, why), targets in sorted(found.items())]


def package_modules() -> list[Path]:
    return sorted((ROOT / PACKAGE).rglob("*.py"))


def test_import_direction():
    paths = package_modules()
    # not vacuous: the walk finds the package, and the parts the rules are about
    assert len(paths) >= 25, f"only {len(paths)} modules found under {ROOT / PACKAGE}"
    names = {module_name(p) for p in paths}
    for expected in ("aggregator.core.windows", "aggregator.spill.ledger", "aggregator.worker.service",
                     "aggregator.ingest.handler", "aggregator.web.server"):
        assert expected in names, f"{expected} not found: has the package moved?"
    problems: list[str] = []
    project_imports = 0
    for path in paths:
        module = module_name(path)
        source = path.read_text(encoding="utf-8")
        is_package = path.name == "__init__.py"
        project_imports += sum(1 for _, t in imported_names(source, module, is_package)
                               if t == PACKAGE or t.startswith(PACKAGE + "."))
        problems += check_source(source, module, is_package, where=str(path.relative_to(ROOT)))
    assert project_imports >= 30, f"only {project_imports} imports of {PACKAGE}.* found: is the parser broken?"
    assert not problems, "imports against the package's layering:\n" + "\n".join(problems)


# --- the checker itself, on synthetic sources: it must catch what it claims to

@pytest.mark.parametrize(("module", "is_package", "source", "target"), [
    # inside a function, absolute
    ("aggregator.core.windows", False, "def f():\n    from aggregator.web import server\n", "aggregator.web.server"),
    # the shell's config is outside core too
    ("aggregator.core.events", False, "import aggregator.config\n", "aggregator.config"),
    # relative, two levels up
    ("aggregator.spill.ledger", False, "from ..worker import app\n", "aggregator.worker.app"),
    # relative from a package's __init__
    ("aggregator.spill", True, "from ..metrics import Metrics\n", "aggregator.metrics.Metrics"),
    # the package, then the submodule as a name
    ("aggregator.worker.app", False, "from aggregator import web\n", "aggregator.web"),
    ("aggregator.ingest.service", False, "if TYPE_CHECKING:\n    import aggregator.web.server\n", "aggregator.web.server"),
    ("aggregator.web.server", False, "from aggregator.ingest.producer import BatchProducer\n",
     "aggregator.ingest.producer.BatchProducer"),
    ("aggregator.web.server", False, "from ..worker.app import Worker\n", "aggregator.worker.app.Worker"),
    ("aggregator.ingest.body", False, "import importlib\nimportlib.import_module('aggregator.worker.app')\n",
     "aggregator.worker.app"),
    ("aggregator.worker.consumer", False, "class C:\n    def m(self):\n        from ..ingest import body\n",
     "aggregator.ingest.body"),
])
def test_checker_catches(module, is_package, source, target):
    problems = check_source(source, module, is_package)
    assert len(problems) == 1, problems
    assert f"{module} imports {target}:" in problems[0]


@pytest.mark.parametrize(("module", "source"), [
    ("aggregator.core.windows", "from aggregator.core.contract import Snapshot\nfrom . import events\nimport math\n"),
    ("aggregator.spill.partition", "from aggregator.core.ratelimit import RateLimits\nfrom .store import SpillStore\n"),
    ("aggregator.worker.app", "from aggregator.spill.ledger import SpillLedger\nfrom aggregator.metrics import Metrics\n"),
    ("aggregator.ingest.service", "from aggregator.core.contract import CLICKS\nimport aiohttp.web\n"),
    ("aggregator.web.server", "from aggregator.core.snapshots import SnapshotStore\nfrom aggregator.config import Settings\n"),
    ("aggregator.cli", "from aggregator.worker.app import Worker\nfrom aggregator.web.server import WebService\n"),
])
def test_checker_allows(module, source):
    assert check_source(source, module) == []
