"""On-disk layout of the per-region spill (docs/contract.md §6) and its in-memory records.

Layout under ``root_dir``::

    regions/r-<escaped region>/000000000001.seg   append-only segments (see segment.py)
    regions/r-<escaped region>/cursor             drain cursor {"seq": N, "offset": B}, atomic
    quarantine/<region dir>.<segment>.corrupt     raw bytes of corrupt records found on recovery
    quarantine/<region dir>.<segment>.torn        raw bytes of torn tails cut on recovery
    gone/                                         directories moved out to be deleted (what a
                                                  crash left of one is deleted at the next start)

Region names are escaped: every character outside ``[a-z0-9_-]`` (including
``.``, ``/``, upper case and non-ASCII) becomes ``%xx`` per UTF-8 byte, and a
``r-`` prefix is added, so a region can never name ``.``, ``..``, a path
separator or anything outside its own directory.  Very long names use
``h-<sha256>`` with the name kept in a ``region`` file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections import deque
from io import BufferedWriter

__all__ = ["escape_region", "unescape_region"]

_SEG_RE = re.compile(r"^(\d{12})\.seg$")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_ESCAPED = 200


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


def _write_atomic(path: str, data: bytes, fsync: bool) -> None:
    """Replace ``path`` with ``data``: tmp + fsync + rename + dir fsync (no fsyncs if not ``fsync``)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        # a full or failing disk: leave no half-written tmp file taking space
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(os.path.dirname(path))


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
        "taken",
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
        # records read ahead, after the taken ones: (payload, seq, end)
        self.cache: deque[tuple[bytes, int, int]] = deque()
        self.rpos: tuple[int, int] | None = None  # read position after the cache
        # records taken (drained) but not acked yet, by take(): [count, seq, end] per call,
        # positions only (their payloads are not kept)
        self.taken: deque[list[int]] = deque()
        self.bad: set[tuple[int, int]] = set()  # (seq, offset) of records quarantined at runtime
        self.roll = False  # force a new segment on the next append

    def cursor(self) -> tuple[int, int]:
        if self.segments:
            return self.segments[0].seq, self.head_off
        return self.next_seq - 1, 0

    def live_bytes(self) -> int:
        return self.size_total - self.head_off


DISK_ID = "disk-id"  # in a partition's spill directory: the id a window state names it by
GONE = "gone"  # in a partition's spill directory: what is being deleted (moved here first, in one rename)


def move_to_gone(path: str, partition_dir: str) -> str:
    """Move ``path`` into ``partition_dir``'s ``gone/`` in one rename, to be deleted there: a
    crash half-way through the deletion leaves nothing half where it was (what stays in
    ``gone/`` is deleted at the next start); -> where it went.  Raises ``OSError`` when the
    disk refuses the rename."""
    trash = os.path.join(partition_dir, GONE)
    os.makedirs(trash, exist_ok=True)
    moved = os.path.join(trash, f"{os.path.basename(path)}.{os.urandom(4).hex()}")
    os.rename(path, moved)
    return moved


def disk_id(root: str, fsync: bool) -> str:
    """The id of the spill directory ``root`` (16 hex digits), made and stored at its first
    use.  A window state names the directory its spill backlog is on: the records of another
    directory (a stale spill left on a host the partition comes back to) are never taken
    for it, even where their sequence numbers and first record agree."""
    path = os.path.join(root, DISK_ID)
    try:
        with open(path, "rb") as f:
            got = f.read(64).strip()
        if len(got) == 16 and all(c in b"0123456789abcdef" for c in got):
            return got.decode()
    except FileNotFoundError:
        pass
    made = os.urandom(8).hex()
    _write_atomic(path, made.encode(), fsync)
    if fsync:
        _fsync_dir(root)
    return made
