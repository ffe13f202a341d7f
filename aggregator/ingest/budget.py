"""The global in-flight budget of ``POST /v1/events``: bytes of request bodies being read,
parsed or produced at once in this process (``AGG_INGEST_MAX_INFLIGHT_BYTES``).

A request takes its ``Content-Length`` before it reads a byte of its body (a chunked one
takes each chunk as it arrives, a gzip one what its body inflates to beyond that), and
gives everything back when answered.  A request that does not fit is answered 503 with
``Retry-After`` at once: memory follows this setting, not the traffic."""
from __future__ import annotations


class InflightBudget:
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight budget must be at least 1 byte")
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when they do not fit."""
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
        if self.used < 0:
            raise AssertionError(f"in-flight budget given back more than taken ({self.used})")


class Reservation:
    """What one request holds of the budget; ``release()`` gives all of it back (idempotent)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        if self.budget.take(n):
            self.held += n
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.budget.give(self.held)
            self.held = 0
