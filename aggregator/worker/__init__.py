"""The worker: consumer group, window state, snapshots.

Faust reads variables of its own when it is imported (``faust/types/_env.py``:
``FAUST_WEB_PORT``, ``F_CONSOLE_PORT``, ...), before any app is built with ``env={}``
(worker/faust_app.py); the worker sets what it needs itself, and a Kubernetes Service named
``faust-web`` injects ``FAUST_WEB_PORT=tcp://...``, which stopped the import with a
ValueError.  They are dropped from this process's environment before Faust is imported."""
import os as _os

for _name in ("DEBUG", "WORKDIR", "DATADIR", "BLOCKING_TIMEOUT", "FORCE_BLOCKING_TIMEOUT", "CONSOLE_PORT",
              "STRICT", "WEB_PORT", "F_WEB_BIND", "WEB_TRANSPORT"):
    for _prefix in ("FAUST_", "F_"):
        _os.environ.pop(_prefix + _name, None)
