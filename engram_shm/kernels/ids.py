"""64-bit FNV-1a hashes of ids, stable across processes and runs (Python's
`hash` is salted per process)."""

import numpy as np

from .policy import kernel

_OFFSET = np.uint64(0xCBF29CE484222325)
_PRIME = np.uint64(0x100000001B3)


@kernel
def fnv1a_range(data, start, length):
    h = _OFFSET
    for j in range(start, start + length):
        h = (h ^ np.uint64(data[j])) * _PRIME
    return h

