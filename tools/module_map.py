"""The line counts of docs/architecture.md's module map, kept true.

    python -m tools.module_map          # list modules whose count in the map is off, or missing
    python -m tools.module_map --write  # rewrite every count in the map from the files

A row of the map is ``| `<module>` | <lines> | <what> |``; a module is named by its path
under ``aggregator/`` (``core/windows.py``) or from the repository root
(``aggregator/metrics.py``).  tests/unit/tools/test_module_map.py fails when a module of
the package is missing from the map, a row names no file, a count is off by more than
``TOLERANCE``, or a module is longer than ``MAX_LINES`` (the house rule: no module over
about 400 lines)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "aggregator"
DOC = REPO / "docs" / "architecture.md"
MAX_LINES = 450
ROW = re.compile(r"^\| `([\w/.]+\.py)` \| (\d+) \|", re.MULTILINE)


def tolerance(lines: int) -> int:
    """How far a stated count may be from the file before the map is stale."""
    return max(20, lines // 10)


def path_of(name: str) -> Path:
    return REPO / name if name.startswith("aggregator/") else PACKAGE / name


def lines_of(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def modules() -> list[Path]:
    """The package's modules the map must list: all but ``__main__`` and the ``__init__``s
    that hold nothing but imports and a short docstring (under 40 lines)."""
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        if p.name == "__main__.py" or (p.name == "__init__.py" and lines_of(p) < 40):
            continue
        out.append(p)
    return out


def rows(text: str) -> dict[Path, int]:
    return {path_of(m.group(1)): int(m.group(2)) for m in ROW.finditer(text)}


def problems(text: str) -> list[str]:
    listed = rows(text)
    out = [f"{p.relative_to(REPO)}: not in the module map" for p in modules() if p not in listed]
    for p, n in listed.items():
        if not p.exists():
            out.append(f"{p.relative_to(REPO)}: in the module map, but no such file")
            continue
        actual = lines_of(p)
        if abs(actual - n) > tolerance(actual):
            out.append(f"{p.relative_to(REPO)}: the map says {n} lines, it has {actual}")
    out += [f"{p.relative_to(REPO)}: {lines_of(p)} lines, over {MAX_LINES}"
            for p in PACKAGE.rglob("*.py") if lines_of(p) > MAX_LINES]
    return out


def rewritten(text: str) -> str:
    def count(m: re.Match[str]) -> str:
        p = path_of(m.group(1))
        return f"| `{m.group(1)}` | {lines_of(p) if p.exists() else m.group(2)} |"
    return ROW.sub(count, text)


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    if "--write" in argv:
        DOC.write_text(rewritten(text), encoding="utf-8")
        text = DOC.read_text(encoding="utf-8")
    found = problems(text)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
