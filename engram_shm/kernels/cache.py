"""Numba's on-disk cache checks a kernel against its own source file only. A
kernel compiled into the cache before a change to another file it was built
from (a kernel of another module it calls, a layout constant, the decorator
policy with its flags) would load unchanged after it: old code beside new.
An engine updated in place (a `git pull` in an editable install) would run
it. So the kernels' cache is keyed on a digest of every file they are
compiled from, recorded beside it: when the digest differs, their cached
specialisations are dropped before any is loaded, and `warm` compiles them
again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib

from numba.core.registry import CPUDispatcher

log = logging.getLogger(__name__)

RECORD = "engram_shm-kernels.digest"
_PACKAGE = pathlib.Path(__file__).resolve().parent.parent


def sources() -> list[pathlib.Path]:
    """The files the kernels are compiled from: the kernel modules and the
    segment layout whose constants they read."""
    return [*sorted((_PACKAGE / "kernels").glob("*.py")), _PACKAGE / "store" / "layout.py"]


def sources_digest(files: list[pathlib.Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def drop_stale(modules, digest: str) -> int:
    """Drop the cached specialisations of every kernel in `modules` from
    each cache directory whose recorded digest is not `digest`, then record
    it; returns how many kernels' caches it dropped. Call before any of them
    runs in this process (a kernel already loaded stays loaded)."""
    kernels = [k for module in modules for k in vars(module).values() if isinstance(k, CPUDispatcher)]
    by_directory: dict[str, list[CPUDispatcher]] = {}
    for kernel in kernels:
        # Numba's cache of the kernel: a NullCache (no cache_path) when caching is off.
        path = getattr(getattr(kernel, "_cache", None), "cache_path", None)
        if path is not None:
            by_directory.setdefault(path, []).append(kernel)
    dropped = 0
    for directory, cached in by_directory.items():
        record = os.path.join(directory, RECORD)
        try:
            with open(record) as f:
                if f.read().strip() == digest:
                    continue
        except OSError:  # none recorded yet, or unreadable: drop
            pass
        for kernel in cached:
            kernel._cache.flush()
        dropped += len(cached)
        try:
            os.makedirs(directory, exist_ok=True)
            with open(record, "w") as f:
                f.write(digest + "\n")
        except OSError as e:  # a read-only cache: Numba then saves nothing there either
            log.warning("cannot record the kernels' source digest in %s: %s", directory, e)
    if dropped:
        log.info("dropped %d cached kernels compiled from other sources", dropped)
    return dropped
