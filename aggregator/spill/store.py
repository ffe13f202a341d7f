"""Durable per-region spill (CONTRACT §6).

Layout under ``root_dir``::

    regions/r-<escaped region>/000000000001.seg   append-only segments (see segment.py)
    regions/r-<escaped region>/cursor             drain cursor {"seq": N, "offset": B}, atomic
    quarantine/<region dir>.<segment>.corrupt     raw bytes of corrupt records found on recovery
    quarantine/<region dir>.<segment>.torn        raw bytes of torn tails cut on recovery

Region names are escaped: every character outside ``[a-z0-9_-]`` (including
``.``, ``/``, upper case and non-ASCII) becomes ``%xx`` per UTF-8 byte, and a
``r-`` prefix is added, so a region can never name ``.``, ``..``, a path
separator or anything outside its own directory.  Very long names use
``h-<sha256>`` with the name kept in a ``region`` file.

The drain cursor is the byte position (segment, offset) of the first record not
yet acknowledged.  ``ack`` persists it (tmp + fsync + rename + dir fsync)
before deleting fully drained segments, so a restart never redelivers
acknowledged records.

Not thread-safe by design beyond a coarse lock around every public method.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from io import BufferedWriter
from typing import Literal, overload

from .segment import (
    HEADER,
    HEADER_SIZE,
    MAX_RECORD_BYTES,
    encode_records,
    scan_bytes,
)

__all__ = ["DEFAULT_SEGMENT_BYTES", "SpillStore", "escape_region", "unescape_region"]

log = logging.getLogger("aggregator.spill")

DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
_SEG_RE = re.compile(r"^(\d{12})\.seg$")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_ESCAPED = 200
_crc32 = zlib.crc32


def escape_region(region: str) -> str:
    """Directory name for a region: ``r-`` + escaped name (or ``h-<sha256>``)."""
    out = []
    for ch in region:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "r-" + "".join(out)
    if len(name) > _MAX_ESCAPED:
        digest = hashlib.sha256(region.encode("utf-8", "surrogatepass")).hexdigest()
        name = "h-" + digest
    return name


def unescape_region(dirname: str) -> str | None:
    """Inverse of :func:`escape_region` for ``r-`` names; ``None`` if not one."""
    if not dirname.startswith("r-"):
        return None
    s = dirname[2:]
    buf = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            try:
                buf.append(int(s[i + 1 : i + 3], 16))
            except ValueError:
                return None
            if len(s[i + 1 : i + 3]) != 2:
                return None
            i += 3
        elif c in _SAFE:
            buf.append(ord(c))
            i += 1
        else:
            return None
    try:
        return buf.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def _seg_name(seq: int) -> str:
    return f"{seq:012d}.seg"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse directory fsync
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


class _Segment:
    __slots__ = ("seq", "path", "size")

    def __init__(self, seq: int, path: str, size: int) -> None:
        self.seq = seq
        self.path = path
        self.size = size


class _Region:
    __slots__ = (
        "name",
        "dir",
        "segments",
        "head_off",
        "next_seq",
        "backlog",
        "size_total",
        "writer",
        "cache",
        "rpos",
        "bad",
        "roll",
    )

    def __init__(self, name: str, dir: str) -> None:
        self.name = name
        self.dir = dir
        self.segments: list[_Segment] = []  # oldest first
        self.head_off = 0  # drain cursor offset inside segments[0]
        self.next_seq = 1
        self.backlog = 0  # undrained good records
        self.size_total = 0  # sum of segment sizes
        self.writer: BufferedWriter | None = None  # open append handle on segments[-1]
        # records read by read_batch but not yet acked: (payload, seq, end)
        self.cache: deque[tuple[bytes, int, int]] = deque()
        self.rpos: tuple[int, int] | None = None  # read position after the cache
        self.bad: set[tuple[int, int]] = set()  # (seq, offset) of records quarantined at runtime
        self.roll = False  # force a new segment on the next append

    def cursor(self) -> tuple[int, int]:
        if self.segments:
            return self.segments[0].seq, self.head_off
        return self.next_seq - 1, 0

    def live_bytes(self) -> int:
        return self.size_total - self.head_off


class SpillStore:
    """Per-region durable FIFO of byte payloads; see the module docstring.

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
                if os.path.basename(d).startswith("h-"):
                    self._write_atomic(os.path.join(d, "region"), region.encode("utf-8", "surrogatepass"))
                if self.fsync:
                    _fsync_dir(self.regions_dir)
            r = _Region(region, d)
            self._regions[region] = r
            self.corrupt_records.setdefault(region, 0)
        return r

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(os.path.dirname(path))

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

    # --------------------------------------------------------------- recovery

    def _recover(self) -> None:
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
            self._write_atomic(path, new_data)  # path is in r.dir: that directory is fsynced
            size = len(new_data)
        else:
            size = len(data)
        return _Segment(seq, path, size), start

    # ---------------------------------------------------------------- reading

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
        if r.rpos is None:
            seq, off = r.cursor()
        else:
            seq, off = r.rpos
        need = n - len(r.cache)
        cache = r.cache
        for item in self._iter_from(r, seq, off):
            cache.append(item)
            need -= 1
            if need <= 0:
                break
        if cache:
            r.rpos = (cache[-1][1], cache[-1][2])

    # ------------------------------------------------------------- public API

    def append(self, region: str, payloads: list[bytes]) -> None:
        """Durably append ``payloads`` (one write, one flush, one fsync per call)."""
        if not payloads:
            return
        buf = encode_records(payloads)
        with self._lock:
            r = self._get(region, create=True)
            # roll when this batch would push a non-empty segment past segment_bytes
            # (a single batch bigger than segment_bytes gets a segment of its own)
            tail = r.segments[-1].size if r.segments else 0
            if r.writer is not None and tail and tail + len(buf) > self.segment_bytes:
                r.writer.close()
                r.writer = None
            if r.writer is None:
                if not r.segments or r.roll or (tail and tail + len(buf) > self.segment_bytes):
                    r.roll = False
                    seq = r.next_seq
                    r.next_seq += 1
                    seg = _Segment(seq, os.path.join(r.dir, _seg_name(seq)), 0)
                    r.writer = open(seg.path, "ab")  # noqa: SIM115 - kept open across appends, closed on roll/close
                    if self.fsync:
                        _fsync_dir(r.dir)
                    if not r.segments:
                        r.head_off = 0
                    r.segments.append(seg)
                else:
                    r.writer = open(r.segments[-1].path, "ab")  # noqa: SIM115 - as above
            seg = r.segments[-1]
            w = r.writer
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
                try:
                    os.truncate(seg.path, seg.size)
                except OSError:
                    log.exception("spill: region %r: could not undo a failed write to %s",
                                  region, seg.path)
                raise
            seg.size += len(buf)
            r.size_total += len(buf)
            r.backlog += len(payloads)

    def read_batch(self, region: str, max_n: int) -> list[bytes]:
        """Oldest ``max_n`` not-yet-acknowledged records, in order, not removed."""
        with self._lock:
            r = self._regions.get(region)
            if r is None or max_n <= 0 or r.backlog <= 0:
                return []
            self._fill(r, max_n)
            cache = r.cache
            if len(cache) <= max_n:
                return [c[0] for c in cache]
            return [cache[i][0] for i in range(max_n)]

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
            self._fill(r, n)
            if len(r.cache) < n:  # records vanished (corruption found while reading)
                n = len(r.cache)
                if n == 0:
                    return
            for _ in range(n - 1):
                r.cache.popleft()
            last = r.cache.popleft()  # n >= 1 here
            if not r.cache:
                r.rpos = None
            seq, end = last[1], last[2]
            # advance the in-memory cursor, persist it, then delete drained segments
            drained: list[_Segment] = []
            while r.segments and r.segments[0].seq < seq:
                seg = r.segments.pop(0)
                r.size_total -= seg.size
                drained.append(seg)
            r.head_off = end
            r.backlog -= n
            self._write_cursor(r, seq, end)
            for seg in drained:
                try:
                    os.unlink(seg.path)
                except FileNotFoundError:
                    pass
            self._gc(r, bool(drained))

    def _write_cursor(self, r: _Region, seq: int, off: int) -> None:
        data = json.dumps({"seq": seq, "offset": off}).encode()
        self._write_atomic(os.path.join(r.dir, "cursor"), data)

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
            except FileNotFoundError:
                pass
            removed = True
            r.head_off = 0
        if removed and self.fsync:
            _fsync_dir(r.dir)

    def truncate_after(self, region: str, keep: int) -> None:
        """Drop every undrained record but the first ``keep`` (crash recovery)."""
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
