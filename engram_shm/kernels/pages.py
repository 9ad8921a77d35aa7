"""Populating pages of a mapping from compiled code, without the GIL.

The prefaulter (store/prefault.py) keeps segment pages populated ahead of the
writer. Populating holds the process's mmap lock, and whatever maps or unmaps
memory meanwhile (Python's frame and object allocators, freed ZeroMQ messages)
waits for it, page faults queueing behind: one madvise over megabytes stalled
the writer for milliseconds. Small steps bound that wait, and a loop of small
steps must not go back to Python (and the GIL) between them, so it is a
kernel. madvise is called by its C name: the compiled code links against the
process's libc, and Numba can cache it (a ctypes pointer it could not).
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .policy import kernel

MADV_POPULATE_WRITE = 23  # Linux 5.14


@intrinsic
def _madvise(typingctx, addr, length, advice):
    """libc's madvise(addr, length, advice): 0, or -1 on failure."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(64), ir.IntType(64), ir.IntType(32)])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "madvise"), args)

    return types.int32(types.uint64, types.uint64, types.int32), codegen


@kernel
def _populate(start, end, step):
    at = start
    while at < end:
        n = min(step, end - at)
        if _madvise(at, n, np.int32(MADV_POPULATE_WRITE)) != 0:
            return at
        at += n
    return end


def populate(start: int, end: int, step: int) -> int:
    """Populate (write-fault) the page-aligned range [start, end) of this
    process's mappings, `step` bytes per call. Returns where it stopped: `end`,
    or the first address the kernel refused (no MADV_POPULATE_WRITE before
    Linux 5.14, or not mapped)."""
    return int(_populate(np.uint64(start), np.uint64(end), np.uint64(step)))
