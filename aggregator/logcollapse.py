"""Repeated library log lines collapsed (docs/contract.md §7, "Logs").

While the broker is away aiokafka logs every failed connection, metadata update and
fetch at ERROR, about 100 lines a second from one worker (issue: an operator's log
pipeline floods).  ``RepeatFilter`` sits on the one handler (logs.setup_logging): a line of
aiokafka, Faust or mode is shown the first time; the same logger's lines of the same
level and template (the message before its arguments are filled in) are then shown at
most once per ``interval_s``, and the one shown says how many were left out since the
previous one.  The project's own lines (``broker unreachable`` …) are never touched.

It runs on log calls only (a prefix check for everyone else's), never per record
consumed.  A count still pending when the lines stop (the broker is back) is said with
the next such line, whenever that comes."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

INTERVAL_S = 10.0
LIBRARIES = ("aiokafka", "faust", "mode")
MAX_KEYS = 1024  # templates remembered at most (a library's templates are few; this bounds memory)


class RepeatFilter(logging.Filter):
    def __init__(self, libraries: Sequence[str] = LIBRARIES, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS) -> None:
        super().__init__()
        self.names = tuple(libraries)
        self.prefixes = tuple(f"{n}." for n in libraries)
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        # (logger, level, template) -> [when last shown, lines left out since]
        self.seen: dict[tuple[str, int, str], list[float]] = {}
        self.lock = threading.Lock()  # Faust's consumer thread logs too; filters run outside the handler's lock

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name not in self.names and not name.startswith(self.prefixes):
            return True
        msg = record.msg
        key = (name, record.levelno, msg if isinstance(msg, str) else type(msg).__name__)
        now = self.clock()
        with self.lock:
            entry = self.seen.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return False
            left_out, since = (0, 0.0) if entry is None else (int(entry[1]), now - entry[0])
            if entry is None and len(self.seen) >= self.max_keys:
                self._forget(now)
            self.seen[key] = [now, 0]
        if left_out:
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format is the handler's to report; keep the template
                text = str(msg)
            record.msg = (f"{text} [the same {logging.getLevelName(record.levelno).lower()} {left_out} more "
                          f"time{'s' if left_out > 1 else ''} in the last {since:.0f} s, not shown]")
            record.args = None
            record.suppressed = left_out  # JSON lines carry it as a field (logs.JsonFormatter)
        return True

    def _forget(self, now: float) -> None:
        """Room for a new template: drop those not shown for an interval (their next line
        is shown anyway), or every one if that is not enough."""
        for k in [k for k, (shown, _) in self.seen.items() if now - shown >= self.interval_s]:
            del self.seen[k]
        if len(self.seen) >= self.max_keys:
            self.seen.clear()
