"""A request key's indices in one partition's dedup store (core.dedup): a bitmap of the
indices seen, one bit each from index 0, and a set of far ones past its end.  Pure:
standard library only.

An entry is ``[bucket, bitmap, far indices (a _Far) or None, its memory as core.dedup counts it]``.  The hot path
(``DedupStore.filter``) tests and sets bits inline and grows the bitmap inline while no
far set exists and the index is within SPARSE_BYTES of its end; everything else comes
here (``mark``).
"""
from __future__ import annotations

from heapq import heappop, heappush
from itertools import chain
from typing import Any

# a key's bitmap grows by less than this many bytes for one index; an index further past its
# end goes to the key's set of far indices (``mark``)
SPARSE_BYTES = 256
FAR_BYTES = 64  # a far index's memory in its set and heap, about (a bitmap byte holds eight)


class _Far(set[int]):
    """A key's far indices (``mark``), with a heap of them: taking those the bitmap now
    covers is a pop each, not a scan of the set at every step of the bitmap's growth (a
    retry's run of indices below the far ones of its first attempt took that scan once an
    event: 55 s for 150,000 events).  Indices the set lost (``undo``) stay in the heap
    until popped, and are skipped then."""

    __slots__ = ("heap",)

    def __init__(self) -> None:
        super().__init__()
        self.heap: list[int] = []

    def push(self, i: int) -> None:
        self.add(i)
        heappush(self.heap, i)
        if len(self.heap) > 2 * len(self) + 64:  # indices undone and marked again, over and over
            self.heap = sorted(self)  # (a sorted list is a heap)

    def take_below(self, end: int) -> list[int]:
        """Remove and return the indices below ``end``."""
        heap, out = self.heap, []
        while heap and heap[0] < end:
            j = heappop(heap)
            if j in self:
                self.discard(j)
                out.append(j)
        return out


def mark(entry: list[Any], i: int) -> bool:
    """Mark index ``i`` past the end of a key's bitmap (``entry``: ``[bucket, bitmap, far
    indices (``_Far``) or None]``); -> False when it was marked already.  Within
    SPARSE_BYTES of the end the bitmap grows to it, taking in the far indices it now
    covers; further, ``i`` goes to the far set, until the set costs more than the bitmap
    grown to ``i`` would (FAR_BYTES an index: a run that starts far, one region's share of
    a body sorted by region), and then the bitmap grows.  So a key costs memory by the
    events it brought (a bit each while they are dense, at most SPARSE_BYTES or FAR_BYTES
    each), not by the length of a body whose items were mostly refused (2.8M items of
    ``{}``, then four events: 350 KB a partition)."""
    bitmap, far = entry[1], entry[2]
    byte = i >> 3
    if byte - len(bitmap) >= SPARSE_BYTES:
        if far is None:
            far = entry[2] = _Far()
        elif i in far:
            return False
        far.push(i)
        if len(far) * FAR_BYTES < byte + 1 - len(bitmap):
            return True
        bitmap.extend(bytes(byte + 1 - len(bitmap)))
        _take_in(entry, bitmap, far)  # i among them
        return True
    bitmap.extend(bytes(byte + 1 - len(bitmap)))
    if far is not None:
        _take_in(entry, bitmap, far)  # i too, if it was a far one
    if bitmap[byte] >> (i & 7) & 1:
        return False
    bitmap[byte] |= 1 << (i & 7)
    return True


def _take_in(entry: list[Any], bitmap: bytearray, far: _Far) -> None:
    """Move the far indices the bitmap covers now into it."""
    for j in far.take_below(len(bitmap) * 8):
        bitmap[j >> 3] |= 1 << (j & 7)
    if not far:
        entry[2] = None


def cost(entry: list[Any]) -> int:
    """What a key's indices cost against AGG_DEDUP_MAX_IDS (core.dedup), in bytes: a bit
    each up to the highest, but at most SPARSE_BYTES each (a far one costs FAR_BYTES in the
    set, or grew the bitmap by less than SPARSE_BYTES: never more).  A function of the
    indices alone, not of the order they came in or of repeats (which can shape the bitmap
    and the set otherwise), so a store restored from its records counts what the original
    did."""
    bitmap, far = entry[1], entry[2]
    bits = int.from_bytes(bitmap, "little")
    n = bits.bit_count() + (len(far) if far else 0)
    highest = max(far) if far else bits.bit_length() - 1
    return min((highest >> 3) + 1, SPARSE_BYTES * n) if n else 0


def runs(kh: int, entry: list[Any]) -> list[list[int]]:
    """The runs ``[kh, first, last]`` of the indices a key's ``entry`` marks."""
    bitmap, far = entry[1], entry[2]
    out: list[list[int]] = []
    for i in chain((i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1), sorted(far or ())):
        if out and out[-1][2] == i - 1:
            out[-1][2] = i
        else:
            out.append([kh, i, i])
    return out
