"""The sketches' parameters and the packing of 64-bit hashes in their state (pure)."""
from __future__ import annotations

import base64
import math
import sys
from array import array
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SketchParams:
    """Settings of the sketches; cells merge only with cells of the same parameters."""

    hll_p: int = 12              # HyperLogLog precision: 2**hll_p registers, error ~1.04/sqrt(2**hll_p)
    exact_users: int = 256       # exact distinct users up to this many
    url_capacity: int = 128      # Misra-Gries counters (exact while distinct URLs <= this)
    delay_accuracy: float = 0.01  # relative accuracy of the delay quantiles

    def __post_init__(self) -> None:
        if not 4 <= self.hll_p <= 18:
            raise ValueError(f"hll_p must be within 4..18 (got {self.hll_p})")
        if not 100 <= self.exact_users <= 4096:
            raise ValueError(f"exact_users must be within 100..4096 (got {self.exact_users})")
        if not 40 <= self.url_capacity <= 4096:
            raise ValueError(f"url_capacity must be within 40..4096 (got {self.url_capacity})")
        if not 0.001 <= self.delay_accuracy <= 0.1:
            raise ValueError(f"delay_accuracy must be within 0.001..0.1 (got {self.delay_accuracy})")

    def key(self) -> list[Any]:
        return [self.hll_p, self.exact_users, self.url_capacity, self.delay_accuracy]

    @property
    def users_bound(self) -> float:
        """The relative bound stated for ``unique_users`` beyond ``exact_users``: three standard
        errors of the estimate (1.04 / sqrt(2^hll_p)), rounded up to half a percent -- 5 % at
        the default precision 12, 10 % at 10, 1.5 % at 16."""
        return math.ceil(3 * 1.04 / math.sqrt(1 << self.hll_p) * 200) / 200


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pack(hashes: list[int]) -> str:
    """base64 of 64-bit hashes, 8 bytes each, big-endian."""
    a = array("Q", hashes)
    if sys.byteorder == "little":
        a.byteswap()
    return b64(a.tobytes())


def unpack(text: str) -> array[int]:
    """The hashes of a :func:`pack` text (ValueError: not one)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 8:
        raise ValueError("bad packed hashes")
    a = array("Q", raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a
