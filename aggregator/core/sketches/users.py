"""Unique users of one cell: the exact set of their hashes, then a HyperLogLog (pure).

Exact up to ``SketchParams.exact_users`` distinct hashes; one more turns the set into
``2**hll_p`` one-byte registers.  The estimate is then the HIP (historic inverse
probability) estimate, started at the exact count and raised each time a register rises;
after a merge of two HyperLogLogs, which HIP cannot follow, Ertl's improved estimator on
the registers (:func:`hll_estimate`).
"""
from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from typing import Any

from aggregator.core.sketches.params import SketchParams, b64, pack, unpack

# ---------------------------------------------------------------------------------------
# HyperLogLog estimate (Ertl 2017, "New cardinality estimation algorithms for HyperLogLog
# sketches", the improved raw estimator of section 4.2)


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        z_old = z
        z += x * y
        y += y
        if z == z_old:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        z_old = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == z_old:
            return z / 3


def hll_estimate(registers: bytes | bytearray, p: int) -> float:
    """Cardinality estimate of HyperLogLog ``registers`` (values 0..65-p)."""
    m = len(registers)
    q = 64 - p
    counts = [registers.count(k) for k in range(q + 2)]
    z = m * _tau(1 - counts[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return m * m / (2 * math.log(2)) / z


class UniqueUsers:
    """The distinct user hashes of one cell: exact, then a HyperLogLog with HIP."""

    __slots__ = ("_p", "_exact_users", "_users", "_regs", "_mask", "_rmax", "_hip", "_kxq", "_scale")

    def __init__(self, p: SketchParams) -> None:
        self._p = p.hll_p
        self._exact_users = p.exact_users
        self._users: set[int] | None = set()    # exact mode; None once in HyperLogLog mode
        self._regs: bytearray | None = None
        self._mask = (1 << p.hll_p) - 1         # register index: the hash's low hll_p bits
        self._rmax = 65 - p.hll_p                # rank: leading zeros of the other bits + 1
        # HIP (historic inverse probability) estimate, kept while the registers change one
        # insert at a time; None after a merge of two HyperLogLogs (then Ertl's estimate).
        # _kxq = sum over registers of 2**(rmax - r) (0 for r == rmax): the chance that a
        # new user changes a register is _kxq / _scale.
        self._hip: float | None = None
        self._kxq = 0
        self._scale = 1 << (p.hll_p + self._rmax)

    @property
    def exact(self) -> bool:
        return self._users is not None

    def add(self, user: int) -> None:
        """One user's hash (the per-event path)."""
        users = self._users
        if users is not None:
            users.add(user)
            if len(users) > self._exact_users:
                self._to_hll()
        else:
            regs = self._regs
            assert regs is not None
            i = user & self._mask
            r = 65 - user.bit_length()
            if regs[i] < r:
                self._raise(i, r)

    def add_many(self, users: Iterable[int | None]) -> None:
        """Users' hashes in order (None: an event without one)."""
        self.add_logged([u for u in users if u is not None])

    def add_logged(self, users: list[int]) -> list[int]:
        """A batch's hashes in order -> the ones that changed the state, in order: the
        first sighting of each hash new to the exact set, then (past the switch) each that
        raised a register.  The others change nothing, so adding only these to the state
        this one had gives the same state (what a logged batch needs)."""
        exact = self._users
        if exact is None:
            return self._hll_changed(users)
        fresh = [u for u in dict.fromkeys(users) if u not in exact]
        limit = self._exact_users
        if len(exact) + len(fresh) <= limit:
            exact.update(fresh)
            return fresh
        for k, user in enumerate(fresh):  # past the limit within this batch
            exact.add(user)
            if len(exact) > limit:
                self._to_hll()
                # a repeat of a hash seen before the switch is in the registers already
                return fresh[:k + 1] + self._hll_changed(fresh[k + 1:])
        return fresh  # not reached: ``fresh`` passes the limit

    def _hll_changed(self, users: Iterable[int | None]) -> list[int]:
        """Hashes into the registers -> those that raised one.  ``int | None`` elements:
        compiled code keeps them as objects instead of trying each 64-bit hash as a
        machine integer first."""
        regs = self._regs
        assert regs is not None
        mask = self._mask
        changed: list[int] = []
        for user in users:
            if user is None:
                continue
            i = user & mask
            r = 65 - user.bit_length()
            if regs[i] < r and self._raise(i, r):
                changed.append(user)
        return changed

    def _raise(self, i: int, r: int) -> bool:
        """Register ``i`` goes up to rank ``r`` (rare: at most rmax times per register);
        -> whether it rose.
        The callers compare ``r`` before it is clamped to rmax (which keeps their loops
        short): a rank past rmax (a hash below ``2**hll_p``) comes here again each time the
        hash is seen, and must not count as a rise once the register is at rmax."""
        regs = self._regs
        assert regs is not None
        rmax = self._rmax
        if r > rmax:
            r = rmax
        old = regs[i]
        if old >= r:
            return False
        if self._hip is not None:
            self._hip += self._scale / self._kxq
        self._kxq -= (1 << (rmax - old)) - (1 << (rmax - r) if r < rmax else 0)
        regs[i] = r
        return True

    def _set_kxq(self) -> None:
        regs = self._regs
        assert regs is not None
        rmax = self._rmax
        self._kxq = sum(regs.count(k) << (rmax - k) for k in range(rmax))

    def _to_hll(self) -> None:
        users = self._users
        assert users is not None
        regs = self._regs = bytearray(1 << self._p)
        self._users = None
        mask, rmax = self._mask, self._rmax
        for user in users:  # order-free: the registers' maxima
            i = user & mask
            r = min(65 - user.bit_length(), rmax)
            if regs[i] < r:
                regs[i] = r
        # _set_kxq's sum from the registers these users set (at most exact_users of them)
        # instead of counting every register once per rank (~1.2M instructions a cell)
        kxq = len(regs) << rmax
        for i in {user & mask for user in users}:
            r = regs[i]
            kxq -= (1 << rmax) - ((1 << (rmax - r)) if r < rmax else 0)
        self._kxq = kxq
        self._hip = float(len(users))  # the exact count so far: HIP goes on from there

    def merge(self, other: UniqueUsers) -> None:
        if other._users is not None:
            if self._users is not None:
                self._users |= other._users
                if len(self._users) > self._exact_users:
                    self._to_hll()
            else:
                self._hll_changed(sorted(other._users))  # one by one: HIP stays valid
        else:
            assert other._regs is not None
            if self._users is not None:
                # take the other's registers and HIP, then insert ours one by one
                mine = sorted(self._users)
                self._users, self._regs = None, bytearray(other._regs)
                self._hip, self._kxq = other._hip, other._kxq
                self._hll_changed(mine)
            else:
                assert self._regs is not None
                self._regs[:] = bytes(map(max, self._regs, other._regs))
                self._set_kxq()
                self._hip = None  # two histories: HIP no longer applies

    def count(self) -> int:
        if self._users is not None:
            return len(self._users)
        assert self._regs is not None
        est = self._hip if self._hip is not None else hll_estimate(self._regs, self._p)
        return max(self._exact_users + 1, round(est))

    def write(self, out: dict[str, Any]) -> None:
        """Into a cell's state: ``"ux"`` (the sorted exact hashes) or ``"uh"`` (the
        registers) and ``"hip"``; nothing for no users."""
        if self._users is not None:
            if self._users:
                out["ux"] = pack(sorted(self._users))
        else:
            assert self._regs is not None
            out["uh"] = b64(bytes(self._regs))
            if self._hip is not None:
                out["hip"] = self._hip

    def read(self, obj: Any) -> None:
        """From a cell's state, into a new (empty) instance (ValueError and others: bad)."""
        if "ux" in obj:
            users = unpack(obj["ux"])
            if len(users) > self._exact_users:
                raise ValueError("bad exact users")
            self._users = set(users)
        elif "uh" in obj:
            regs = bytearray(base64.b64decode(obj["uh"], validate=True))
            if len(regs) != 1 << self._p or max(regs) > self._rmax:
                raise ValueError("bad registers")
            self._users, self._regs = None, regs
            self._set_kxq()
            if "hip" in obj:
                if type(obj["hip"]) not in (int, float):
                    raise ValueError("bad HIP estimate")
                self._hip = float(obj["hip"])
                if not self._exact_users < self._hip < 2.0**64:
                    raise ValueError("bad HIP estimate")
