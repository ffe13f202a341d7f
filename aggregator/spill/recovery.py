"""Recovery of a spill directory when a :class:`~aggregator.spill.store.SpillStore` starts,
and the deletion of a region's directory that recovery must never half-see.

Every ``regions/`` entry whose name round-trips through the escaping in layout.py
becomes a region; per region the drain cursor is read, leftover ``.tmp`` files
and segments drained before the cursor are deleted, torn tails are cut and
corrupt records removed (both saved under ``quarantine/``), and the undrained
records are counted.

A mixin rather than functions: recovery fills the store's regions and fault
counters and counts records with the store's reading path, which itself
quarantines; the attributes and the method it relies on are declared below.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING

from .layout import (
    _SEG_RE,
    GONE,
    _fsync_dir,
    _Region,
    _seg_name,
    _Segment,
    _write_atomic,
    escape_region,
    move_to_gone,
    unescape_region,
)
from .segment import scan_bytes

__all__ = ["RecoveryMixin"]

log = logging.getLogger("aggregator.spill")


class RecoveryMixin:
    """Start-up scan of ``regions_dir`` and quarantining, for :class:`SpillStore`."""

    # set by SpillStore.__init__ before it calls _recover
    regions_dir: str
    quarantine_dir: str
    fsync: bool
    corrupt_records: dict[str, int]
    torn_tails: dict[str, int]
    _regions: dict[str, _Region]
    _lock: threading.RLock

    if TYPE_CHECKING:
        def _count(self, r: _Region) -> int: ...  # SpillStore's reading path

    def _quarantine(self, r: _Region, seg: _Segment, kind: str, chunks: list[bytes]) -> str:
        os.makedirs(self.quarantine_dir, exist_ok=True)
        qpath = os.path.join(
            self.quarantine_dir, f"{os.path.basename(r.dir)}.{seg.seq:012d}.{kind}"
        )
        with open(qpath, "ab") as f:
            f.write(b"".join(chunks))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        return qpath

    def drop_region(self, region: str) -> None:
        """Forget a region with nothing left to drain and delete its directory.  It is moved
        out of ``regions/`` first, in one rename, so a crash half-way through the deletion
        never leaves a region recovery would half-read (what it leaves in ``gone/`` is
        deleted at the next start).  Raises ``OSError`` when the disk refuses the rename (the
        region stays, with nothing to drain)."""
        with self._lock:
            r = self._regions.get(region)
            if r is None:
                return
            if r.backlog:
                raise ValueError(f"spill: region {region!r} still has {r.backlog} records to drain")
            if r.writer is not None:
                r.writer.close()
                r.writer = None
            moved = move_to_gone(r.dir, os.path.dirname(self.regions_dir))
            del self._regions[region]
            self.corrupt_records.pop(region, None)
            self.torn_tails.pop(region, None)
        shutil.rmtree(moved, ignore_errors=True)  # what stays is deleted at the next start

    # --------------------------------------------------------------- recovery

    def _recover(self) -> None:
        shutil.rmtree(os.path.join(os.path.dirname(self.regions_dir), GONE), ignore_errors=True)
        for entry in sorted(os.listdir(self.regions_dir)):
            d = os.path.join(self.regions_dir, entry)
            if not os.path.isdir(d) or os.path.islink(d):
                continue
            name: str | None
            if entry.startswith("h-"):
                try:
                    with open(os.path.join(d, "region"), "rb") as f:
                        name = f.read().decode("utf-8", "surrogatepass")
                except (OSError, UnicodeDecodeError):
                    log.warning("spill: ignoring directory %s without a readable region name", d)
                    continue
            else:
                name = unescape_region(entry)
                if name is None:
                    log.warning("spill: ignoring unexpected directory %s", d)
                    continue
            if escape_region(name) != entry:
                log.warning("spill: ignoring directory %s (name does not round-trip)", d)
                continue
            r = _Region(name, d)
            self._regions[name] = r
            self.corrupt_records.setdefault(name, 0)
            self._recover_region(r)

    def _read_cursor(self, r: _Region) -> tuple[int, int]:
        path = os.path.join(r.dir, "cursor")
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read())
            return int(obj["seq"]), int(obj["offset"])
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("spill: region %r: unreadable cursor file %s (%s); draining from the start",
                        r.name, path, e)
            return 0, 0

    def _recover_region(self, r: _Region) -> None:
        cur_seq, cur_off = self._read_cursor(r)
        seqs: list[int] = []
        for fn in os.listdir(r.dir):
            m = _SEG_RE.match(fn)
            if m:
                seqs.append(int(m.group(1)))
            elif fn.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(r.dir, fn))
                except OSError:
                    pass
        seqs.sort()
        r.next_seq = max([cur_seq + 1] + [s + 1 for s in seqs])
        changed_dir = False
        for seq in seqs:
            path = os.path.join(r.dir, _seg_name(seq))
            if seq < cur_seq:
                os.unlink(path)  # fully drained before the last restart
                changed_dir = True
                continue
            start = cur_off if seq == cur_seq else 0
            seg, start = self._recover_segment(r, seq, path, start)
            if seg is None:
                changed_dir = True
                continue
            if not r.segments:
                off = start
                if off > seg.size:
                    log.warning("spill: region %r: cursor offset %d beyond segment %s (%d bytes)",
                                r.name, off, path, seg.size)
                    off = seg.size
                r.head_off = off
            r.segments.append(seg)
            r.size_total += seg.size
        # drop leading segments that are fully drained
        while r.segments and r.head_off >= r.segments[0].size:
            seg = r.segments.pop(0)
            r.size_total -= seg.size
            os.unlink(seg.path)
            changed_dir = True
            r.head_off = 0
        if changed_dir and self.fsync:
            _fsync_dir(r.dir)
        r.backlog = self._count(r)
        if r.backlog:
            log.info("spill: region %r: recovered %d events (%d bytes) in %d segments",
                     r.name, r.backlog, r.live_bytes(), len(r.segments))

    def _recover_segment(
        self, r: _Region, seq: int, path: str, start: int
    ) -> tuple[_Segment | None, int]:
        with open(path, "rb") as f:
            data = f.read()
        res = scan_bytes(data)
        # the cursor must sit on a record boundary
        if start:
            bounds = {0} | {e.end for e in res.entries}
            if start not in bounds:
                nxt = min((b for b in bounds if b > start), default=res.good_bytes)
                log.warning("spill: region %r: cursor offset %d in %s is not a record boundary; "
                            "moving to %d", r.name, start, path, nxt)
                start = nxt
        new_data = None
        if res.torn:
            tail = data[res.good_bytes :]
            qpath = self._quarantine(r, _Segment(seq, path, 0), "torn", [tail])
            log.warning(
                "spill: region %r: segment %s has a torn tail of %d bytes at offset %d; "
                "truncated (tail saved to %s)", r.name, path, len(tail), res.good_bytes, qpath)
            self.torn_tails[r.name] = self.torn_tails.get(r.name, 0) + 1
            new_data = data[: res.good_bytes]
        bad = [e for e in res.entries if not e.ok and e.offset >= start]
        if bad:
            qpath = self._quarantine(
                r, _Segment(seq, path, 0), "corrupt", [data[e.offset : e.end] for e in bad]
            )
            log.warning(
                "spill: region %r: %d corrupt record(s) (CRC mismatch) in segment %s at offsets %s; "
                "quarantined to %s, the other records are kept",
                r.name, len(bad), path, [e.offset for e in bad][:10], qpath)
            self.corrupt_records[r.name] = self.corrupt_records.get(r.name, 0) + len(bad)
            bad_offsets = {e.offset for e in bad}
            # records before `start` are already drained; keep their bytes so the cursor stays valid
            new_data = b"".join(
                [data[:start]]
                + [data[e.offset : e.end] for e in res.entries
                   if e.offset >= start and e.offset not in bad_offsets]
            )
        if new_data is not None:
            if not new_data:
                os.unlink(path)
                return None, 0
            _write_atomic(path, new_data, self.fsync)  # path is in r.dir: that directory is fsynced
            size = len(new_data)
        else:
            size = len(data)
        return _Segment(seq, path, size), start
