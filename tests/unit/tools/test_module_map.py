"""docs/architecture.md's module map stays true, and no module grows past the house limit
(tools/module_map.py)."""
from __future__ import annotations

from tools import module_map


def test_the_module_map_lists_every_module_with_its_size():
    assert module_map.problems(module_map.DOC.read_text(encoding="utf-8")) == []


def test_the_check_catches_a_missing_module_a_stale_count_and_a_missing_file():
    text = module_map.DOC.read_text(encoding="utf-8")
    row = next(m for m in module_map.ROW.finditer(text) if m.group(1) == "core/windows.py")
    actual = module_map.lines_of(module_map.PACKAGE / "core" / "windows.py")
    stale = text.replace(row.group(0), f"| `core/windows.py` | {actual + 200} |")
    assert module_map.problems(stale) == [
        f"aggregator/core/windows.py: the map says {actual + 200} lines, it has {actual}"]
    gone = text.replace(row.group(0), "| `core/nothing.py` | 10 |")
    assert sorted(module_map.problems(gone)) == ["aggregator/core/nothing.py: in the module map, but no such file",
                                                 "aggregator/core/windows.py: not in the module map"]
    assert module_map.problems(module_map.rewritten(stale)) == []


def test_a_module_over_the_limit_fails(monkeypatch):
    windows = module_map.lines_of(module_map.PACKAGE / "core" / "windows.py")
    monkeypatch.setattr(module_map, "MAX_LINES", windows - 1)
    found = module_map.problems(module_map.DOC.read_text(encoding="utf-8"))
    assert f"aggregator/core/windows.py: {windows} lines, over {windows - 1}" in found
