"""Click event validation (docs/contract.md §2).  Standard library only.

``validate(obj)`` returns a normalised event dict or raises ``EventError``
with a short, client-readable reason.  The normalised event keeps only
the known fields; ``ts`` becomes epoch milliseconds (int) or is absent.

``normalise_region`` is THE region rule: the HTTP ingest and the worker (for
records produced straight to Kafka) both call it, so a region is accepted, and
spelled, the same way whichever way it came in.
"""
from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

REGION_MAX_CHARS = 64
REGION_RE = re.compile(rf"[a-z0-9._-]{{1,{REGION_MAX_CHARS}}}\Z")
LIMITS = {"event_id": 128, "user_id": 128, "url": 2048}
# a client ``ts`` number (ms) must lie strictly between these (contract §2, "within ±2^53"):
# the one bound of HTTP ingest and the worker, whichever way a record came in
TS_MIN, TS_MAX = -(2**53), 2**53


class EventError(ValueError):
    """A record that cannot be accepted; ``reason`` is a bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def parse_client_ts(ts: object) -> int:
    """Client ``ts`` as epoch ms: a number of ms or an RFC 3339 string."""
    if isinstance(ts, bool):
        raise EventError("bad_ts", "ts must be epoch milliseconds or an RFC 3339 string")
    if isinstance(ts, (int, float)):
        if isinstance(ts, float) and not math.isfinite(ts):
            raise EventError("bad_ts", "ts must be finite")
        if not TS_MIN < ts < TS_MAX:
            raise EventError("bad_ts", "ts out of range")
        return int(ts)
    if isinstance(ts, str) and 10 <= len(ts) <= 40:
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            pass
        else:
            if dt.tzinfo is None:
                raise EventError("bad_ts", "RFC 3339 ts needs a time zone offset")
            return int(dt.timestamp() * 1000)
    raise EventError("bad_ts", "ts must be epoch milliseconds or an RFC 3339 string")


def normalise_region(raw: object) -> str:
    """The region as counted: ``raw`` lower-cased, if it is 1-64 ASCII characters of
    ``[a-z0-9._-]`` after lower-casing; else ``EventError("bad_region")``.

    ASCII is checked before lower-casing: ``str.lower()`` maps KELVIN SIGN (U+212A) to
    ``k`` and DOTTED CAPITAL I (U+0130) to ``i`` + a combining dot, and full-width
    letters are letters too; none of them is a region."""
    if not isinstance(raw, str):
        raise EventError("bad_region", "region is required and must be a string")
    if not raw.isascii():
        raise EventError("bad_region", "region must be 1-64 characters of [a-z0-9._-]")
    region = raw.lower()
    if not REGION_RE.match(region):
        raise EventError("bad_region", "region must be 1-64 characters of [a-z0-9._-]")
    return region


def validate(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EventError("not_an_object", "event must be a JSON object")
    out: dict[str, Any] = {"region": normalise_region(obj.get("region"))}
    for field, limit in LIMITS.items():
        v = obj.get(field)
        if v is None:
            continue
        if not isinstance(v, str):
            raise EventError("bad_field", f"{field} must be a string")
        if len(v) > limit:
            raise EventError("bad_field", f"{field} longer than {limit} characters")
        out[field] = v
    ts = obj.get("ts")
    if ts is not None:
        out["ts"] = parse_client_ts(ts)
    return out
