"""Reading a region's spill records, for :class:`~aggregator.spill.store.SpillStore`: the
records from a position, the damage found on the way (a corrupt record is quarantined, a
torn tail cut), the read-ahead cache and the positions of records taken (drained, not
acknowledged yet: only where they end is kept, not their payloads).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING

from .layout import _Region, _Segment
from .segment import HEADER, HEADER_SIZE, MAX_RECORD_BYTES

__all__ = ["ReadingMixin"]

log = logging.getLogger("aggregator.spill")
_crc32 = zlib.crc32


class ReadingMixin:
    """The reading path of :class:`SpillStore` (which holds the lock around its callers)."""

    corrupt_records: dict[str, int]

    if TYPE_CHECKING:
        def _quarantine(self, r: _Region, seg: _Segment, kind: str, chunks: list[bytes]) -> str: ...

    def _iter_from(self, r: _Region, seq: int, off: int) -> Iterator[tuple[bytes, int, int]]:
        """Yield ``(payload, seq, end)`` for good records from position (seq, off)."""
        for seg in list(r.segments):
            if seg.seq < seq:
                continue
            pos = off if seg.seq == seq else 0
            if r.segments and seg is r.segments[0] and pos < r.head_off:
                pos = r.head_off
            if pos >= seg.size:
                continue
            limit = seg.size
            with open(seg.path, "rb", buffering=1 << 16) as f:
                f.seek(pos)
                read = f.read
                unpack = HEADER.unpack
                while pos < limit:
                    hdr = read(HEADER_SIZE)
                    if len(hdr) < HEADER_SIZE:
                        self._runtime_torn(r, seg, pos)
                        break
                    length, crc = unpack(hdr)
                    end = pos + HEADER_SIZE + length
                    if length > MAX_RECORD_BYTES or end > limit:
                        self._runtime_torn(r, seg, pos)
                        break
                    payload = read(length)
                    if len(payload) < length:
                        self._runtime_torn(r, seg, pos)
                        break
                    if _crc32(payload) != crc:
                        if (seg.seq, pos) not in r.bad:
                            self._runtime_corrupt(r, seg, pos, hdr + payload)
                    else:
                        yield payload, seg.seq, end
                    pos = end

    def _runtime_corrupt(self, r: _Region, seg: _Segment, pos: int, raw: bytes) -> None:
        qpath = self._quarantine(r, seg, "corrupt", [raw])
        log.warning("spill: region %r: corrupt record (CRC mismatch) at offset %d of %s while "
                    "draining; quarantined to %s", r.name, pos, seg.path, qpath)
        self.corrupt_records[r.name] = self.corrupt_records.get(r.name, 0) + 1
        r.bad.add((seg.seq, pos))
        r.backlog = max(0, r.backlog - 1)

    def _runtime_torn(self, r: _Region, seg: _Segment, pos: int) -> None:
        log.error("spill: region %r: segment %s unexpectedly ends or is damaged at offset %d "
                  "(expected %d bytes); the rest of the segment is skipped", r.name, seg.path,
                  pos, seg.size)
        r.size_total -= seg.size - pos
        seg.size = pos
        # what is appended next (a re-read's records) goes to a new segment: appends are
        # O_APPEND, and the cut below may fail, leaving the damaged bytes where they would follow
        r.roll = True
        if r.writer is not None and seg is r.segments[-1]:
            try:
                r.writer.close()
            except OSError:
                pass
            r.writer = None
        try:  # cut the file there too (recovery then finds it as memory says)
            os.truncate(seg.path, pos)
        except OSError as e:
            log.error("spill: region %r: cutting %s at offset %d failed: %s", r.name, seg.path, pos, e)
        r.backlog = self._count(r)

    def _count(self, r: _Region) -> int:
        if not r.segments:
            return 0
        n = 0
        for _ in self._iter_from(r, r.segments[0].seq, r.head_off):
            n += 1
        return n

    def _fill(self, r: _Region, n: int) -> None:
        if len(r.cache) >= n:
            return
        if r.rpos is not None:
            seq, off = r.rpos
        elif r.taken:  # after the records taken: the cache holds none of them
            seq, off = r.taken[-1][1], r.taken[-1][2]
        else:
            seq, off = r.cursor()
        need = n - len(r.cache)
        cache = r.cache
        try:
            for item in self._iter_from(r, seq, off):
                cache.append(item)
                need -= 1
                if need <= 0:
                    break
        finally:  # a read error (EIO) half-way: what was read stays cached, never twice
            if cache:
                r.rpos = (cache[-1][1], cache[-1][2])

    def _peek(self, r: _Region, max_n: int) -> list[bytes]:
        self._fill(r, max_n)
        cache = r.cache
        if len(cache) <= max_n:
            return [c[0] for c in cache]
        return [cache[i][0] for i in range(max_n)]

    def _position(self, r: _Region, n: int) -> tuple[int, int] | None:
        """Where the ``n``-th record from the cursor ends (read from disk)."""
        pos = None
        for _p, s, e in islice(self._iter_from(r, *r.cursor()), n):
            pos = (s, e)
        return pos

    @staticmethod
    def _keep_taken(r: _Region, keep: int, seq: int, off: int) -> None:
        """At most ``keep`` records stay taken (the ``keep``-th ends at ``(seq, off)``)."""
        kept: deque[list[int]] = deque()
        for c in r.taken:
            if keep <= 0:
                break
            kept.append(c if c[0] <= keep else [keep, seq, off])
            keep -= c[0]
        r.taken = kept
