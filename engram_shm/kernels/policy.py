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

# int8 codes span +-INT8_MAX (symmetric: -128 is never stored).
INT8_MAX = 127

# What kernels take as `metric`: the code, the unit that turns a sum over
# stored elements into a distance, and per-dimension weights of that sum
# (empty: all 1). Float stores: unit 1, no weights. int8 stores code element d
# as value * 127 / scales[d]; with S = max(scales), unit = (S / 127)^2 and
# weights[d] = (scales[d] / S)^2, so that sums over codes (and over cues
# multiplied by 127 / scales) come out in the data's own units and thresholds
# such as DUPLICATE keep meaning.
Metric = namedtuple("Metric", "code unit weights")

_NO_WEIGHTS = np.zeros(0, np.float32)


def metric_of(name: str, scales: np.ndarray | None = None) -> Metric:
    """The kernels' metric for a store: float (`scales` None) or int8 codes
    of per-dimension `scales`."""
    if scales is None:
        return Metric(np.int64(METRIC_CODES[name]), np.float32(1.0), _NO_WEIGHTS)
    top = float(np.max(scales))
    weights = ((np.asarray(scales, np.float64) / top) ** 2).astype(np.float32)
    return Metric(np.int64(METRIC_CODES[name]), np.float32((top / INT8_MAX) ** 2), weights)

# Status codes kernels return instead of raising (Numba leaks a raising kernel's arrays).
OK = 0
BAD_ENTRY = -1
