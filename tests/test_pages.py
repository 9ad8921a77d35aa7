import mmap

import numpy as np

from engram_shm.kernels.pages import populate
from engram_shm.store import shm


def test_populate_allocates_the_range_and_changes_no_byte():
    block = shm.create("engram_t-pages_000000", 64 * mmap.PAGESIZE)
    try:
        data = np.ndarray((block.size,), np.uint8, buffer=block.buf)
        data[:100] = np.arange(100)
        base = data.ctypes.data
        assert shm.block_bytes(block.name) <= 2 * mmap.PAGESIZE  # tmpfs allocates on first write
        start, end = base + 8 * mmap.PAGESIZE, base + 40 * mmap.PAGESIZE
        assert populate(start, end, 3 * mmap.PAGESIZE) == end  # steps need not divide the range
        assert shm.block_bytes(block.name) >= 32 * mmap.PAGESIZE
        assert data[:100].tolist() == list(range(100)) and not data[100:].any()
        del data
    finally:
        shm.destroy(block)


def test_populate_stops_where_the_kernel_refuses():
    # The first pages of the address space are never mapped (vm.mmap_min_addr).
    assert populate(0, 4 * mmap.PAGESIZE, mmap.PAGESIZE) == 0
