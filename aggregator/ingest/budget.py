"""The global in-flight budget of ``POST /v1/events``: bytes of request bodies being read,
parsed or produced at once in this process (``AGG_INGEST_MAX_INFLIGHT_BYTES``).

A request takes the bytes of its body as they arrive (a gzip one also what its body
inflates to beyond that), and gives everything back when answered: a connection that
sends nothing holds nothing.  Bodies still arriving may hold only part of the budget
(``keep_for_whole``): the rest is for bodies that have come whole, so connections that
send most of a big body and then crawl cannot lock the others out (a stall is a 408
within seconds, ingest.handler.read_body).  A request that does not fit (its
``Content-Length`` beyond what is free when it starts, or its bytes when they arrive) is
answered 503 with ``Retry-After`` at once: memory follows this setting, not the traffic."""
from __future__ import annotations


class InflightBudget:
    __slots__ = ("limit", "used", "arriving", "arriving_limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight budget must be at least 1 byte")
        self.limit = limit
        self.used = 0
        self.arriving = 0  # of ``used``: the bytes of bodies still arriving
        self.arriving_limit = limit

    def keep_for_whole(self, max_body: int) -> None:
        """Bodies still arriving may hold three quarters of the budget at most (but at least
        ``max_body``, so that any body can arrive): the last quarter is for bodies that came
        whole (a small one in one read) and those being parsed and produced."""
        self.arriving_limit = min(self.limit, max(max_body, self.limit - self.limit // 4))

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

    __slots__ = ("budget", "held", "arriving")

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.held = 0
        self.arriving = 0  # of ``held``: taken while the body was still arriving

    def take(self, n: int, arriving: bool = False) -> bool:
        """``arriving``: the bytes of a body not yet whole, which must also fit in what
        bodies still arriving may hold (``InflightBudget.keep_for_whole``)."""
        budget = self.budget
        if arriving and n > 0 and budget.arriving + n > budget.arriving_limit:
            return False
        if not budget.take(n):
            return False
        self.held += n
        if arriving:
            self.arriving += n
            budget.arriving += n
        return True

    def arrived(self) -> None:
        """The body is whole: what it holds no longer counts as arriving."""
        if self.arriving:
            self.budget.arriving -= self.arriving
            self.arriving = 0

    def release(self) -> None:
        self.arrived()
        if self.held:
            self.budget.give(self.held)
            self.held = 0
