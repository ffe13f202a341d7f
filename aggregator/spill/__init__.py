"""Durable on-disk spill of rate-limited events (docs/contract.md §6)."""

from .segment import encode_record, encode_records, read_segment
from .store import SpillStore, escape_region, unescape_region

__all__ = [
    "SpillStore",
    "encode_record",
    "encode_records",
    "escape_region",
    "read_segment",
    "unescape_region",
]
