"""64-bit FNV-1a hashes of ids, stable across processes and runs (Python's
`hash` is salted per process)."""

import numpy as np

from ..errors import InvalidArgument
from .policy import kernel

_OFFSET = np.uint64(0xCBF29CE484222325)
_PRIME = np.uint64(0x100000001B3)


@kernel
def fnv1a_range(data, start, length):
    h = _OFFSET
    for j in range(start, start + length):
        h = (h ^ np.uint64(data[j])) * _PRIME
    return h


@kernel
def _fnv1a(data, starts, lengths, out):
    for i in range(starts.shape[0]):
        out[i] = fnv1a_range(data, starts[i], lengths[i])


def fnv1a(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Hash data[starts[i]:starts[i]+lengths[i]] for every i (uint64 [n])."""
    data = np.ascontiguousarray(data, np.uint8)
    starts = np.ascontiguousarray(starts, np.int64)
    lengths = np.ascontiguousarray(lengths, np.int64)
    if starts.shape != lengths.shape or (len(starts) and (
            starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > len(data))):
        raise InvalidArgument("hash ranges must lie inside the data")
    out = np.empty(len(starts), np.uint64)
    _fnv1a(data, starts, lengths, out)
    return out
