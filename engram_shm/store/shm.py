"""Shared-memory blocks: naming, creation, attachment, removal, collection.

Every block is a `multiprocessing.shared_memory.SharedMemory` named
`engram_<engine>_<suffix>`. Lifetime is owned explicitly (the engine that
created a block unlinks it; `collect_stale` removes the blocks of engines whose
owner process is gone), so the resource tracker is kept out of it: on Python
3.11 and 3.12 it registers every attach and unlinks the block when the first
attaching process exits, which would pull memory from under a running engine.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
from multiprocessing import shared_memory

from ..errors import ShmFull

log = logging.getLogger(__name__)

PREFIX = "engram_"
SHM_DIR = "/dev/shm"
_tracker_lock = threading.Lock()


def block_name(engine: str, suffix: str) -> str:
    return f"{PREFIX}{engine}_{suffix}"


@contextlib.contextmanager
def _untracked():
    """Keep SharedMemory from registering with (or unregistering from) the
    resource tracker; see the module docstring for why."""
    if sys.version_info >= (3, 13):
        yield
        return
    tracker = shared_memory.resource_tracker
    with _tracker_lock:
        register, unregister = tracker.register, tracker.unregister
        tracker.register = tracker.unregister = lambda name, rtype: None
        try:
            yield
        finally:
            tracker.register, tracker.unregister = register, unregister


class _Block(shared_memory.SharedMemory):
    """A SharedMemory whose close cannot fail. With numpy views of the
    mapping still alive, SharedMemory.close raises BufferError and leaves
    the block open; when the object is collected, its __del__ closes again
    and raises again, as an unraisable exception, and its file descriptor
    stays open until the process exits. This close then leaves the mapping
    to the views (the memoryview they hold keeps it; it is unmapped with the
    last of them) and closes the descriptor."""

    def close(self) -> bool:
        """True if the mapping was unmapped, False if views keep it."""
        try:
            super().close()
            return True
        except BufferError:
            # SharedMemory's own attributes (as 3.11's close uses them): the
            # views hold the memoryview, which keeps the mmap.
            self._buf = None
            self._mmap = None
            super().close()  # the descriptor
            return False


def _open(name: str, create: bool, size: int = 0) -> shared_memory.SharedMemory:
    kwargs = {"track": False} if sys.version_info >= (3, 13) else {}
    with _untracked():
        return _Block(name=name, create=create, size=size, **kwargs)


def free_bytes() -> int:
    """Bytes free in /dev/shm (tmpfs pages are only used when touched)."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def total_bytes() -> int:
    """Size of /dev/shm."""
    st = os.statvfs(SHM_DIR)
    return st.f_blocks * st.f_frsize


def fill() -> float:
    """Share of /dev/shm in use."""
    st = os.statvfs(SHM_DIR)
    return 1.0 - st.f_bavail / max(1, st.f_blocks)


def create(name: str, size: int) -> shared_memory.SharedMemory:
    """A new zero-filled block. Refuses with ShmFull when /dev/shm could not hold
    it entirely: tmpfs allocates lazily, and a page it cannot allocate later
    kills the writing process with SIGBUS instead of an error."""
    free = free_bytes()
    if size > free:
        raise ShmFull(
            f"/dev/shm has {free / 2**20:.0f} MiB free, a new segment needs {size / 2**20:.0f} MiB; "
            "enlarge it (docker: --shm-size) or lower segment_capacity",
            free_bytes=free, needed_bytes=size)
    try:
        return _open(name, create=True, size=size)
    except OSError as e:  # a file size limit, or tmpfs out of room meanwhile
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        raise ShmFull(f"/dev/shm refused a segment of {size / 2**20:.1f} MiB: {e.strerror}",
                      free_bytes=free, needed_bytes=size) from None


def attach(name: str) -> shared_memory.SharedMemory:
    return _open(name, create=False)


def unlink(name: str) -> bool:
    """Remove a block by name; False if it was already gone. By its path,
    without mapping it: a process killed while creating a block leaves it
    empty (SharedMemory sizes a block after creating it), and SharedMemory
    cannot open an empty block."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True


def destroy(block: shared_memory.SharedMemory) -> None:
    """Unlink a block this process created, then unmap it."""
    try:
        with _untracked():
            block.unlink()
    except FileNotFoundError:
        log.warning("shared memory %s was removed by someone else", block.name)
    close(block)


def close(shm: shared_memory.SharedMemory, warn: bool = True) -> None:
    """Close a block; numpy views of it should be released first. A view still
    held elsewhere keeps the mapping until that view goes (logged unless
    `warn` is false: the caller expects it; see _Block)."""
    if not shm.close() and warn:
        log.warning("shared memory %s still has views in use; left mapped until they go", shm.name)


def list_blocks(engine: str | None = None) -> list[str]:
    """Names of engram blocks in /dev/shm, all or one engine's."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    prefix = PREFIX if engine is None else block_name(engine, "")
    return sorted(n for n in names if n.startswith(prefix))


def block_bytes(name: str) -> int:
    """Bytes of /dev/shm a block actually occupies (touched pages)."""
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512
    except FileNotFoundError:
        return 0
