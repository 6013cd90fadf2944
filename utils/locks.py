"""Operating-system locks that die with their process: no stale lock survives a killed run.

`hold_run_dir(run_dir)` keeps a second training out of a run directory while one uses it (the lock file holds the
holder's pid, for the refusal message). `locked_temp_dir(...)` creates a temporary directory that its creator
holds locked while it fills it, and `remove_abandoned(...)` deletes only temporary directories whose creator is
gone (their lock is free): a generator killed half-way leaves no folder forever, a live one is never touched.

Linux and macOS use `fcntl.flock`; Windows uses `msvcrt.locking` for run directories and keeps abandoned
temporary directories (it cannot lock a directory).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

RUN_LOCK = ".lock"
# msvcrt locks byte ranges and a locked byte cannot be read: lock one far beyond the pid written at offset 0.
_WINDOWS_LOCK_OFFSET = 1 << 20
_MIN_AGE_S = 60.0


class RunDirInUseError(OSError):
    """Another live process holds the run directory."""


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` (created if needed) for this process; RunDirInUseError naming the holder's pid if taken.

    The lock goes when the block ends or the process dies (the OS releases it), whatever the way it ends.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            raise RunDirInUseError(f"{run_dir} is in use by another training run (pid {holder or '?'}): wait for it "
                                   f"to end, or give this run another --run_name")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def locked_temp_dir(final: Path) -> Iterator[Path]:
    """A new empty directory beside `final` (`.NAME.tmp-XXXX`, mode from the umask), locked by this process
    while the block runs. The caller renames it into place or leaves it; `remove_abandoned` cleans the rest."""
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(6)}")
    tmp.mkdir(0o777)
    fd = os.open(tmp, os.O_RDONLY) if fcntl is not None else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and private: cannot be taken by anyone else yet
        yield tmp
    finally:
        if fd is not None:
            os.close(fd)


def remove_abandoned(directory: Path, names: str) -> list[Path]:
    """Delete the temp dirs `locked_temp_dir` left in `directory` for finals matching the glob `names` whose
    creator is gone; return them.

    A directory counts as abandoned only when its lock is free AND it is older than a minute (a creator takes its
    lock right after mkdir: the age covers that instant). Without fcntl (Windows) nothing is deleted.
    """
    if fcntl is None:
        return []
    removed = []
    for tmp in directory.glob(f".{names}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime < _MIN_AGE_S:
                continue
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone meanwhile (renamed into place or removed by another cleaner), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its creator is alive
            os.close(fd)
            continue
        try:  # held by us now: no creator can be writing into it
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed
