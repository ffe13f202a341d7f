"""The guard of the compiled hot path (tools/native.py builds it; README, "Compiled hot path").

``_native.json``, written last by a build, lists the compiled modules with the sha256 of
the source each was compiled from.  With ``AGG_NATIVE=off`` (``0``, ``false``), a source
that differs from its hash, an extension module missing, or extension modules without a
manifest (an interrupted build), a finder put first in ``sys.meta_path`` loads every listed
module (without a manifest: every module) from its ``.py``: the compiled modules call each
other directly, so they run all compiled or none.  ``NATIVE``: compiled modules in use."""
from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from importlib.util import spec_from_file_location

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def stale(root: str, modules: dict[str, str]) -> list[str]:
    """The modules of a manifest (name -> sha256 of its source) whose source under ``root``
    is not the one compiled."""
    from hashlib import sha256

    out = []
    for name, digest in modules.items():
        try:
            with open(os.path.join(root, *name.split(".")) + ".py", "rb") as f:
                if sha256(f.read()).hexdigest() != digest:
                    out.append(name)
        except OSError:
            out.append(name)
    return out


class _FromSource:
    """A meta path finder: modules of the package from their ``.py``, never an extension
    module; those named in ``names`` (None: every module with a ``.py``)."""

    def __init__(self, names: set[str] | None) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if not fullname.startswith("aggregator.") or (self.names is not None and fullname not in self.names):
            return None
        source = os.path.join(_ROOT, *fullname.split(".")) + ".py"
        return spec_from_file_location(fullname, source) if os.path.isfile(source) else None


def _guard() -> bool:
    lib = os.path.join(_HERE, "_native__mypyc" + EXTENSION_SUFFIXES[0])
    try:
        with open(os.path.join(_HERE, "_native.json"), "rb") as f:
            from json import loads

            modules = dict(loads(f.read())["modules"])
    except (OSError, ValueError, KeyError, TypeError):
        modules = {}
    if not modules and not os.path.exists(lib):
        return False  # nothing compiled (the common case without a build: one open, one stat)
    if os.environ.get("AGG_NATIVE", "").strip().lower() not in ("off", "0", "false"):
        changed = stale(_ROOT, modules)
        missing = [n for n in modules if not os.path.exists(os.path.join(_ROOT, *n.split(".")) + EXTENSION_SUFFIXES[0])]
        if modules and not changed and not missing and os.path.exists(lib):
            return True
        what = (f"stale, their sources changed since the build: {', '.join(changed)}" if changed else
                f"missing: {', '.join(missing or ['aggregator._native__mypyc'])}" if modules else
                "without a manifest listing them (an interrupted build?)")
        redo = "`make native-clean native`" if modules and not changed else "`make native`"
        print(f"aggregator: compiled modules {what}; running all compiled modules from source ({redo} rebuilds them)",
              file=sys.stderr)
    sys.meta_path.insert(0, _FromSource(set(modules) or None))
    return False


NATIVE = _guard()
