"""Logging for every command: one JSON object per line on stderr (``AGG_LOG_FORMAT=text``
for plain lines; json or text, in any case: the commands refuse anything else before they
start, config_load.unknown_variables); the libraries' chatter is kept at WARNING and above, and
their repeated lines are collapsed (logcollapse.RepeatFilter: while the broker is away,
about one line per template every 10 s instead of ~100 a second).  With tracing on
(docs/tracing.md), a JSON line written inside a span carries its ``trace_id`` and ``span_id``."""
from __future__ import annotations

import json
import logging
import os
import sys

from aggregator import tracing
from aggregator.config_load import LOG_FORMAT_ENV, log_format
from aggregator.logcollapse import RepeatFilter


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        ids = tracing.current_ids()  # None at once while tracing is off
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        suppressed = getattr(record, "suppressed", None)  # a collapsed line: how many like it were left out
        if suppressed is not None:
            out["suppressed"] = suppressed
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    try:
        fmt = log_format(os.environ.get(LOG_FORMAT_ENV))
    except ValueError:
        fmt = "json"  # checked by the commands before they start; the default otherwise
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faust", "mode", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
