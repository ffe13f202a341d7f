"""One process per local state directory (docs/contract.md §7).

A second service started on the same ``AGG_DATA_DIR`` or ``AGG_SPILL_DIR`` used to
delete the first one's spill files, after which the first failed every checkpoint.
Each directory now holds a ``.lock`` file with an exclusive ``flock`` for as long as
the process lives (the kernel drops it when the process dies, SIGKILL included, so a
crash never leaves a stale lock), and the file names the holder's pid.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class DirInUse(RuntimeError):
    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is in use by another aggregator process ({holder}); give each process "
                         "its own AGG_DATA_DIR and AGG_SPILL_DIR")
        self.path = path


class DirUnusable(RuntimeError):
    """The directory cannot be made, its lock file not opened or not written (a bad path, no
    permission, a full disk)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot use {path} as a state directory: {exc.strerror or exc}")
        self.path = path


class DirLock:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock or raise ``DirInUse`` at once (never waits); ``DirUnusable`` when
        the directory cannot be made or written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DirUnusable(self.directory, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a full disk refuses the pid's bytes (ENOSPC) on a first start: said as such
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        except BlockingIOError:  # only flock's: another process holds the lock
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise DirInUse(self.directory, holder) from None
        except OSError as exc:  # ENOLCK (a file system that keeps no locks), ENOSPC, EIO
            os.close(fd)
            raise DirUnusable(self.directory, exc) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def lock_dirs(*dirs: str | os.PathLike[str]) -> list[DirLock]:
    """Locks on every distinct directory, in order; releases those taken if one is in use,
    unusable, or fails in any other way."""
    taken: list[DirLock] = []
    seen: set[Path] = set()
    try:
        for d in dirs:
            p = Path(d).resolve()
            if p in seen:
                continue
            seen.add(p)
            taken.append(DirLock(p).acquire())
    except BaseException:
        for lock in taken:
            lock.release()
        raise
    return taken
