"""Durable per-region spill (docs/contract.md §6).

The on-disk layout and the escaping of region names are described in layout.py;
what happens to a spill directory at start, in recovery.py.

The drain cursor is the byte position (segment, offset) of the first record not
yet acknowledged.  ``ack`` persists it (tmp + fsync + rename + dir fsync)
before deleting fully drained segments, so a restart never redelivers
acknowledged records.

Not thread-safe by design beyond a coarse lock around every public method.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from itertools import islice
from typing import Literal, overload

from .layout import _fsync_dir, _Region, _seg_name, _Segment, _write_atomic, escape_region, unescape_region
from .reading import ReadingMixin
from .recovery import RecoveryMixin
from .segment import (
    HEADER_SIZE,
    encode_records,
)

__all__ = ["DEFAULT_SEGMENT_BYTES", "SpillStore", "escape_region", "unescape_region"]

log = logging.getLogger("aggregator.spill")

DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024


class SpillStore(ReadingMixin, RecoveryMixin):
    """Per-region durable FIFO of byte payloads; see the module docstring (and layout.py).

    ``max_bytes <= 0`` means never :meth:`full`.  ``bytes()`` counts the encoded
    size of records not yet acknowledged (disk usage exceeds it by at most the
    drained part of each region's oldest segment).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        max_bytes: int,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root_dir))
        self.max_bytes = int(max_bytes)
        self.fsync = bool(fsync)
        self.segment_bytes = max(int(segment_bytes), HEADER_SIZE + 1)
        self.regions_dir = os.path.join(self.root, "regions")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        self.corrupt_records: dict[str, int] = {}
        self.torn_tails: dict[str, int] = {}
        self._regions: dict[str, _Region] = {}
        self._cuts: dict[str, int] = {}  # segment path -> size: failed writes still to cut off
        self.cursor_error: OSError | None = None  # the last cursor write failed (retried at the next ack)
        self._lock = threading.RLock()
        os.makedirs(self.regions_dir, exist_ok=True)
        self._recover()

    # ------------------------------------------------------------------ paths

    def region_dir(self, region: str) -> str:
        path = os.path.join(self.regions_dir, escape_region(region))
        # belt and braces: the escaped name can never leave regions_dir
        if os.path.dirname(path) != self.regions_dir:  # pragma: no cover
            raise ValueError(f"unsafe region name {region!r}")
        return path

    @overload
    def _get(self, region: str, create: Literal[True]) -> _Region: ...
    @overload
    def _get(self, region: str, create: bool) -> _Region | None: ...
    def _get(self, region: str, create: bool) -> _Region | None:
        r = self._regions.get(region)
        if r is None and create:
            d = self.region_dir(region)
            if not os.path.isdir(d):
                os.makedirs(d, exist_ok=True)
                if self.fsync:
                    _fsync_dir(self.regions_dir)
            name_file = os.path.join(d, "region")
            if os.path.basename(d).startswith("h-") and not os.path.exists(name_file):
                # (again, if a full disk refused it the first time: recovery needs it)
                _write_atomic(name_file, region.encode("utf-8", "surrogatepass"), self.fsync)
            r = _Region(region, d)
            self._regions[region] = r
            self.corrupt_records.setdefault(region, 0)
        return r

    # ------------------------------------------------------------- public API

    def append(self, region: str, payloads: list[bytes]) -> None:
        """Durably append ``payloads`` (one write, one flush, one fsync per call).

        On an ``OSError`` (disk full, I/O error, read-only) nothing of the call is
        kept: the partial write is cut off again (or, if even that fails, cut off
        before the next append, which raises until it can), and the store is as before."""
        if not payloads:
            return
        buf = encode_records(payloads)
        with self._lock:
            self._retry_cuts()
            r = self._get(region, create=True)
            # roll when this batch would push a non-empty segment past segment_bytes
            # (a single batch bigger than segment_bytes gets a segment of its own)
            tail = r.segments[-1].size if r.segments else 0
            if r.writer is not None and tail and tail + len(buf) > self.segment_bytes:
                r.writer.close()
                r.writer = None
            if r.writer is None:
                self._open_writer(r, bool(not r.segments or r.roll or (tail and tail + len(buf) > self.segment_bytes)))
            seg = r.segments[-1]
            w = r.writer
            assert w is not None  # _open_writer opened it or raised
            try:
                w.write(buf)
                w.flush()
                if self.fsync:
                    os.fsync(w.fileno())
            except BaseException:
                # undo a partial write so no garbage sits between records, and
                # never append to this segment again
                r.writer = None
                r.roll = True
                try:
                    w.close()
                except OSError:
                    pass
                if seg.size == 0:  # opened for this write: leave no empty segment per retry
                    try:
                        os.unlink(seg.path)
                    except OSError:
                        pass  # cut to nothing below, and kept
                    else:
                        r.segments.pop()
                        raise
                try:
                    os.truncate(seg.path, seg.size)
                except OSError as e:
                    log.error("spill: region %r: could not undo a failed write to %s (%s); "
                              "retried before the next append", region, seg.path, e)
                    self._cuts[seg.path] = seg.size
                raise
            seg.size += len(buf)
            r.size_total += len(buf)
            r.backlog += len(payloads)

    def _open_writer(self, r: _Region, new: bool) -> None:
        """Open the append handle: on a new segment, or on the last one."""
        if not new:
            r.writer = open(r.segments[-1].path, "ab")  # noqa: SIM115 - kept open across appends, closed on roll/close
            return
        seq = r.next_seq
        seg = _Segment(seq, os.path.join(r.dir, _seg_name(seq)), 0)
        w = open(seg.path, "ab")  # noqa: SIM115 - as above
        try:
            if self.fsync:
                _fsync_dir(r.dir)
        except OSError:
            w.close()
            try:
                os.unlink(seg.path)
            except OSError:
                pass
            raise
        r.next_seq += 1
        r.roll = False
        r.writer = w
        if not r.segments:
            r.head_off = 0
        r.segments.append(seg)

    def _retry_cuts(self) -> None:
        """Cut off failed writes that could not be cut off when they failed."""
        for path, size in list(self._cuts.items()):
            try:
                os.truncate(path, size)
            except FileNotFoundError:
                pass
            del self._cuts[path]

    def read_batch(self, region: str, max_n: int) -> list[bytes]:
        """Oldest ``max_n`` not-yet-acknowledged records, in order, not removed."""
        with self._lock:
            r = self._regions.get(region)
            if r is None or max_n <= 0 or r.backlog <= 0:
                return []
            if r.taken:  # records taken are not kept in memory: read from the cursor
                return [p for p, _, _ in islice(self._iter_from(r, *r.cursor()), max_n)]
            return self._peek(r, max_n)

    def peek(self, region: str, max_n: int) -> list[bytes]:
        """The oldest ``max_n`` records after those taken (:meth:`take`), not removed."""
        with self._lock:
            r = self._regions.get(region)
            if r is None or max_n <= 0 or r.backlog <= 0:
                return []
            return self._peek(r, max_n)

    def take(self, region: str, n: int) -> None:
        """The next ``n`` records after those taken are drained, to be acknowledged later:
        only where they end is kept, not their payloads (a drain's memory is its own)."""
        with self._lock:
            r = self._regions.get(region)
            if r is None or n <= 0:
                return
            self._fill(r, n)
            n = min(n, len(r.cache))
            if n <= 0:
                return
            cache = r.cache
            for _ in range(n - 1):
                cache.popleft()
            last = cache.popleft()
            r.taken.append([n, last[1], last[2]])

    def taken(self, region: str) -> int:
        """Records taken and not acknowledged yet."""
        r = self._regions.get(region)
        return sum(c[0] for c in r.taken) if r is not None else 0

    def ack(self, region: str, n: int) -> None:
        """Mark the oldest ``n`` records drained; persists the cursor, deletes drained segments."""
        if n <= 0:
            return
        with self._lock:
            r = self._regions.get(region)
            if r is None or n > r.backlog:
                raise ValueError(
                    f"spill: cannot ack {n} records of region {region!r}: backlog is "
                    f"{0 if r is None else r.backlog}"
                )
            # the records taken first (where each take ended), then those read ahead; what
            # may fail (a read) comes before anything changes
            pos: tuple[int, int] | None = None
            k, i, taken = n, 0, r.taken
            while i < len(taken) and taken[i][0] <= k:
                k -= taken[i][0]
                pos = (taken[i][1], taken[i][2])
                i += 1
            if k and i < len(taken):  # part of a take: where its last record ends is read again
                pos = self._position(r, n)
            elif k:  # records not taken (a restart's reconcile): from the read cache
                self._fill(r, k)
                if len(r.cache) < k:  # records vanished (corruption found while reading)
                    n -= k - len(r.cache)
                    k = len(r.cache)
            for _ in range(i):
                taken.popleft()
            if k and taken:
                taken[0][0] -= k
            elif k:
                for _ in range(k - 1):
                    r.cache.popleft()
                last = r.cache.popleft()
                pos = (last[1], last[2])
                if not r.cache:
                    r.rpos = None
            if pos is None:
                return
            seq, end = pos
            # advance the in-memory cursor, persist it, then delete drained segments
            drained: list[_Segment] = []
            while r.segments and r.segments[0].seq < seq:
                seg = r.segments.pop(0)
                r.size_total -= seg.size
                drained.append(seg)
            r.head_off = end
            r.backlog -= n
            # Deleting before the cursor is written is safe: the records are acknowledged
            # only once the spill ledger that counts them drained is durable, and on a
            # restart the ledger, not the cursor, decides what is redelivered (a cursor
            # naming a deleted segment means "from the start of the next one").  So a full
            # disk that refuses the cursor still gets the drained segments' space back.
            for seg in drained:
                try:
                    os.unlink(seg.path)
                except OSError:
                    pass  # gone already, or a read-only disk: recovery deletes it
            self._gc(r, bool(drained))
            try:
                self._write_cursor(r, seq, end)
            except OSError as e:
                if self.cursor_error is None:
                    log.warning("spill: cannot write the drain cursor of region %r (%s); the spill "
                                "ledger covers it, retried at the next acknowledgement", r.name, e)
                self.cursor_error = e
            else:
                self.cursor_error = None

    def _write_cursor(self, r: _Region, seq: int, off: int) -> None:
        data = json.dumps({"seq": seq, "offset": off}).encode()
        _write_atomic(os.path.join(r.dir, "cursor"), data, self.fsync)

    def _gc(self, r: _Region, removed: bool = False) -> None:
        """Delete fully drained head segments (and fsync the directory if anything went)."""
        while r.segments and r.head_off >= r.segments[0].size:
            seg = r.segments.pop(0)
            r.size_total -= seg.size
            if not r.segments and r.writer is not None:
                r.writer.close()
                r.writer = None
            try:
                os.unlink(seg.path)
            except OSError:
                pass  # gone already, or a read-only disk: recovery deletes it
            removed = True
            r.head_off = 0
        if removed and self.fsync:
            try:
                _fsync_dir(r.dir)
            except OSError as e:  # the deletions are done in memory: a restart redoes them
                log.warning("spill: region %r: fsync of %s failed: %s", r.name, r.dir, e)

    def truncate_after(self, region: str, keep: int, quiet: bool = False) -> None:
        """Drop every undrained record but the first ``keep`` (crash recovery, or the
        rollback of a batch whose spill write failed: ``quiet``, no log line)."""
        keep = max(0, int(keep))
        with self._lock:
            r = self._regions.get(region)
            if r is None or keep >= r.backlog:
                return
            r.cache.clear()
            r.rpos = None
            seq, off = r.cursor()
            if keep:
                for i, (_p, s, e) in enumerate(self._iter_from(r, seq, off), 1):
                    if i == keep:
                        seq, off = s, e
                        break
                else:  # fewer records than thought (corruption found while reading)
                    return
                if keep >= r.backlog:
                    return
            self._keep_taken(r, keep, seq, off)
            if r.writer is not None:
                r.writer.close()
                r.writer = None
            kept: list[_Segment] = []
            for seg in r.segments:
                if seg.seq < seq:
                    kept.append(seg)
                elif seg.seq == seq:
                    if off < seg.size:
                        with open(seg.path, "r+b") as f:
                            f.truncate(off)
                            f.flush()
                            if self.fsync:
                                os.fsync(f.fileno())
                        r.size_total -= seg.size - off
                        seg.size = off
                    kept.append(seg)
                else:
                    os.unlink(seg.path)
                    r.size_total -= seg.size
            r.segments = kept
            dropped = r.backlog - keep
            r.backlog = keep
            if self.fsync:
                _fsync_dir(r.dir)
            self._gc(r)
            if not quiet:
                log.warning("spill: region %r: discarded %d spilled records beyond the first %d",
                            region, dropped, keep)

    def backlog(self, region: str) -> int:
        r = self._regions.get(region)
        return r.backlog if r is not None else 0

    def bytes(self, region: str) -> int:
        r = self._regions.get(region)
        return r.live_bytes() if r is not None else 0

    def total_bytes(self) -> int:
        return sum(r.size_total - r.head_off for r in self._regions.values())

    def total_backlog(self) -> int:
        return sum(r.backlog for r in self._regions.values())

    def regions(self) -> list[str]:
        return sorted(self._regions)

    def full(self) -> bool:
        return self.max_bytes > 0 and self.total_bytes() >= self.max_bytes

    def close(self) -> None:
        with self._lock:
            for r in self._regions.values():
                if r.writer is not None:
                    r.writer.close()
                    r.writer = None

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
