"""A data directory: the system of record of one engine; shared memory is its
working copy (docs/durability.md).

    DIR/LOCK                      flock: held by the engine that owns DIR
    DIR/wal/<first lsn>.wal       the write-ahead log, in files (wal.py)
    DIR/wal/LOCK                  flock: held by the one process appending to it
    DIR/checkpoints/ckpt-<n>/     complete checkpoints (checkpoint.py);
    DIR/checkpoints/ckpt-<n>.tmp/ one being written (removed if found at start)

Locks are `flock`s, so a process that dies (even by SIGKILL) releases them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re

from ..errors import DataDirInUse, StorageError, StorageFull

FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def storage_error(e: OSError, doing: str) -> StorageError:
    """The coded error of a failed write: storage_full for a full disk or a
    file size limit, storage_error for anything else."""
    cls = StorageFull if e.errno in FULL_ERRNOS else StorageError
    return cls(f"{doing} failed: {e.strerror or e}", errno=e.errno or 0)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (files created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock(path: str, holder: str) -> int:
    """Take the exclusive flock of `path` (created if missing) or raise
    DataDirInUse naming the process that holds it. Returns the fd to keep."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise storage_error(e, f"opening the lock file {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        finally:
            os.close(fd)
        raise DataDirInUse(f"{path} is locked by {owner}: one engine per data directory",
                           path=path) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)
    return fd


def holder_pid(path: str) -> int | None:
    """The pid of the process holding the flock of `path`, or None if no one
    holds it (the file names a holder only while it is locked)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # we got it: nobody holds it
    except BlockingIOError:
        match = re.search(rb"\(pid (\d+)\)", os.pread(fd, 200, 0))
        return int(match.group(1)) if match else None
    finally:
        os.close(fd)


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


class DataDir:
    """The directory's layout, created if missing, locked by this process."""

    def __init__(self, path: str, holder: str = "engram-shm"):
        self.path = os.path.abspath(path)
        self.wal = os.path.join(self.path, "wal")
        self.checkpoints = os.path.join(self.path, "checkpoints")
        try:
            for d in (self.path, self.wal, self.checkpoints):  # people's data: the owner's only
                os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise storage_error(e, f"creating the data directory {self.path}") from None
        if not os.access(self.path, os.W_OK):
            raise StorageError(f"the data directory {self.path} is not writable", errno=errno.EACCES)
        self._lock = lock(os.path.join(self.path, "LOCK"), holder)

    def close(self) -> None:
        fd, self._lock = self._lock, None
        unlock(fd)
