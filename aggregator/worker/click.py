"""The decoder's typed parse of a record produced straight to Kafka (``Click``).

A module of its own because msgspec reads the struct's annotations at run time: the
decoder (worker/decoder.py) may be compiled with mypyc (tools/native.py), and a compiled
module's annotations are not the types msgspec needs, so this one is never compiled."""
from __future__ import annotations

from typing import Annotated

import msgspec

from aggregator.core.events import TS_MAX, TS_MIN

# an ingest time before the epoch goes the full way, to bad_ingest_ts
_ITS = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
# a client ts in range (core.events, checked in C): one beyond goes the full way, to bad_ts
_TS = Annotated[int, msgspec.Meta(gt=TS_MIN, lt=TS_MAX)]


class Click(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The typed parse of a record produced straight to Kafka: an object of these fields
    and no other, of these types.  It builds no dict (about 0.24 against 0.33 us a record
    for ``orjson.loads``) and its fields are attributes.  A value it refuses (another
    field, a ``ts`` string, float or out of range, a number beyond 64 bits, not an object,
    not JSON) is read by the full path (``orjson.loads`` and the checks of ``decode``),
    which is what decides whether and why a record is rejected.  Only what both accept
    takes this path, with the same values: msgspec leaves the text of fields it skips
    unchecked (invalid UTF-8, 1e400), so unknown fields are refused here rather than
    skipped.

    ``gc=False``: its fields are strings, integers and None, which cannot make a cycle;
    without the collector's header and bookkeeping a record costs 1.4 % fewer instructions
    an event on figure 1c's records, compiled (15,551 against 15,336, cachegrind, see
    tools/worker_micro.py)."""

    region: str
    ingest_ts: _ITS | None = None
    ts: _TS | None = None
    event_id: str | None = None
    user_id: str | None = None
    url: str | None = None


# the typed parse of one value: a Click, or msgspec.DecodeError / TypeError for a value the
# decoder's full path reads
parse_click = msgspec.json.Decoder(Click).decode
