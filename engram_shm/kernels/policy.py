"""The one decorator policy of every kernel, and the codes kernels share.

fastmath without `nnan`/`ninf`: +inf is the empty-heap sentinel and must compare
correctly. `cache=True`: workers load compiled kernels from disk (see `warm`).
"""

from collections import namedtuple

import numba
import numpy as np

FASTMATH = frozenset({"contract", "reassoc", "arcp", "nsz", "afn"})

kernel = numba.njit(nogil=True, cache=True, fastmath=set(FASTMATH))

# Metric codes, as stored in segment headers.
COSINE = 0
IP = 1
L2 = 2
METRIC_CODES = {"cosine": COSINE, "ip": IP, "l2": L2}

# What kernels take as `metric`: the code, and the unit that turns a sum over
# stored elements into a distance (1 for float storage; (scale / 127)^2 for
# int8 storage, whose elements are value * 127 / scale: distances then come
# out in the data's own units, so thresholds such as DUPLICATE keep meaning).
Metric = namedtuple("Metric", "code unit")


def metric_of(name: str, unit: float = 1.0) -> Metric:
    return Metric(np.int64(METRIC_CODES[name]), np.float32(unit))

# Status codes kernels return instead of raising (Numba leaks a raising kernel's arrays).
OK = 0
BAD_ENTRY = -1
