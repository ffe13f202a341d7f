"""Keep the memory that fetched records use, instead of giving it back to the kernel after
every fetch and faulting it in again for the next one.

CPython's small-object allocator (pymalloc) carves objects out of 1 MiB arenas it maps
from the kernel, and unmaps an arena as soon as its last object is freed (it keeps one
empty arena at most).  A fetch of four partitions is some 60,000 records (a record
object, its value and key, a headers list: about 500 bytes each), so each fetch maps
tens of fresh arenas, and the fetch before freed as many.  Every page of a fresh arena
costs a page fault on first touch; on a virtual machine such a fault took 15-25 µs
here, most of the consumer thread's time in the kernel (docs/performance.md).

:class:`ArenaKeeper` holds on to one record in each 256 KiB block of addresses that
records were seen in: an arena with a live object is never unmapped, and its free
pools serve the next fetch, whatever their size class.  The process then keeps the
high-water mark of its fetched records' memory, as a JVM keeps its heap; it does not
grow past it (the arenas kept are reused, not added to), and ``limit`` bounds the
blocks kept.  Pure Python: no Faust, no aiokafka; ``id`` is the object's address in
CPython.

:func:`keep_heap` does the same for the fetched bytes, which C's ``malloc`` holds: each
fetch response (up to 4 partitions x 4 MiB) is read into a growing buffer and copied out
whole, in the consumer's thread.  glibc's defaults hand such blocks back to the kernel
when they are freed (an ``mmap`` of their own above a threshold that moves with what was
freed, a heap trimmed above 128 KiB free at its top), so the next fetch faulted them in
again: 8,000-17,000 faults a million events in the consumer thread, 0.2-0.4 µs an event
of system time in slow minutes.  With the threshold at glibc's largest (32 MiB) and the
heap trimmed only above 64 MiB free, the blocks are reused (141-2,700 faults in four runs)."""
from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from typing import Any

BLOCK_BITS = 18  # 256 KiB: a 1 MiB arena, wherever it starts, has three blocks of its own
STRIDE = 64  # a record in 64 is looked at: some 8 in each block for records of ~500 bytes
LIMIT = 2048  # blocks kept at most: 512 MiB of address space, far above the worker's peak


class ArenaKeeper:
    __slots__ = ("kept", "limit", "stride")

    def __init__(self, limit: int = LIMIT, stride: int = STRIDE) -> None:
        self.kept: dict[int, Any] = {}
        self.limit = limit
        self.stride = stride

    def keep(self, records: list[Any]) -> None:
        """Hold one of ``records`` in each block they lie in that holds none yet (up to
        ``limit`` blocks).  Called once per fetched batch, before its records are freed."""
        kept = self.kept
        if len(kept) >= self.limit:
            return
        for rec in records[::self.stride]:
            kept.setdefault(id(rec) >> BLOCK_BITS, rec)
        while len(kept) > self.limit:
            kept.popitem()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap: glibc's largest on 64-bit
TRIM_THRESHOLD = 64 << 20  # free memory a heap keeps at its top: a few rounds of fetches
# an operator's own malloc settings, which then stand
MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_heap(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's malloc to keep freed blocks of up to ``MMAP_THRESHOLD`` for reuse, and
    up to ``TRIM_THRESHOLD`` free at a heap's top; process-wide, for what is allocated
    from now on.  False where it does nothing: not glibc, or malloc settings of the
    operator's own in ``environ``."""
    if any(name in environ for name in MALLOC_ENV) or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
