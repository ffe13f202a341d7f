"""The global in-flight budget of ``POST /v1/events``: bytes of request bodies being read,
parsed or produced at once in this process (``AGG_INGEST_MAX_INFLIGHT_BYTES``).

A request takes the bytes of its body as they arrive (a gzip one also what its body
inflates to beyond that), and gives everything back when answered: a connection that
sends nothing holds nothing, so slow clients cannot lock the others out.  A request
that does not fit (its ``Content-Length`` beyond what is free when it starts, or its
bytes when they arrive) is answered 503 with ``Retry-After`` at once: memory follows
this setting, not the traffic."""
from __future__ import annotations


class InflightBudget:
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight budget must be at least 1 byte")
        self.limit = limit
        self.used = 0

    def fits(self, n: int) -> bool:
        """Whether ``n`` bytes would fit now (nothing reserved)."""
        return n <= 0 or self.used + n <= self.limit

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
