"""One process per state directory: flock, released when the holder goes away."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aggregator.dirlock import DirInUse, DirLock, lock_dirs


def test_a_second_lock_on_the_same_directory_is_refused_and_names_the_holder(tmp_path):
    first = DirLock(tmp_path / "data").acquire()
    with pytest.raises(DirInUse) as err:
        DirLock(tmp_path / "data").acquire()
    assert "in use by another aggregator process (pid " in str(err.value)
    first.release()
    DirLock(tmp_path / "data").acquire().release()  # free again


def test_lock_dirs_takes_each_directory_once_and_gives_back_what_it_took_on_refusal(tmp_path):
    data, spill = tmp_path / "d", tmp_path / "d" / "spill"
    taken = lock_dirs(data, spill, data)
    assert [lk.directory for lk in taken] == [data.resolve(), spill.resolve()]
    other = DirLock(tmp_path / "other").acquire()
    with pytest.raises(DirInUse):
        lock_dirs(tmp_path / "fresh", tmp_path / "other")
    DirLock(tmp_path / "fresh").acquire()  # the first one was released again
    other.release()
    for lk in taken:
        lk.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from aggregator.dirlock import DirLock; DirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(DirInUse, match=f"pid {holder.pid}"):
            DirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    DirLock(tmp_path).acquire().release()


def test_a_directory_that_cannot_be_made_is_dir_unusable_and_releases_the_others(tmp_path):
    from aggregator.dirlock import DirUnusable
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DirUnusable) as err:
        lock_dirs(tmp_path / "data", tmp_path / "file" / "spill")
    assert err.value.path == tmp_path / "file" / "spill"
    assert str(err.value) == f"cannot use {tmp_path / 'file' / 'spill'} as a state directory: Not a directory"
    DirLock(tmp_path / "data").acquire().release()  # the first lock was given back


def test_a_first_start_on_a_full_disk_is_dir_unusable_and_releases_the_others(tmp_path):
    """No ``.lock`` yet: its pid bytes are refused (ENOSPC), said as DirUnusable (the CLI
    names the setting), not a bare OSError, and the locks taken before are given back."""
    from aggregator.dirlock import DirUnusable
    from tests.conftest import fill, small_tmpfs
    with small_tmpfs(tmp_path / "disk") as disk:
        (disk / "spill").mkdir()  # the directory exists; its lock file does not
        fill(disk)
        with pytest.raises(DirUnusable) as err:
            lock_dirs(tmp_path / "data", disk / "spill")
        assert err.value.path == disk / "spill"
        assert str(err.value) == f"cannot use {disk / 'spill'} as a state directory: No space left on device"
        DirLock(tmp_path / "data").acquire().release()  # the first lock was given back


def test_a_lock_the_file_system_refuses_is_dir_unusable_and_releases_the_others(tmp_path, monkeypatch):
    """flock failing otherwise than "held" (ENOLCK: a file system without locks) is said the
    same way."""
    import errno
    import fcntl

    from aggregator.dirlock import DirUnusable
    real = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "nfs")):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real(fd, op)

    monkeypatch.setattr("aggregator.dirlock.fcntl.flock", flock)
    with pytest.raises(DirUnusable, match="No locks available"):
        lock_dirs(tmp_path / "data", tmp_path / "nfs")
    monkeypatch.undo()
    DirLock(tmp_path / "data").acquire().release()  # the first lock was given back
