"""The one decorator policy of every kernel, and the codes kernels share.

fastmath without `nnan`/`ninf`: +inf is the empty-heap sentinel and must compare
correctly. `cache=True`: workers load compiled kernels from disk (see `warm`).
"""

import numba

FASTMATH = frozenset({"contract", "reassoc", "arcp", "nsz", "afn"})

kernel = numba.njit(nogil=True, cache=True, fastmath=set(FASTMATH))

# Metric codes, as stored in segment headers.
COSINE = 0
IP = 1
L2 = 2
METRIC_CODES = {"cosine": COSINE, "ip": IP, "l2": L2}

# Storage dtype codes, as stored in segment headers; f16 is held as its uint16 bits.
F32 = 0
F16 = 1
DTYPE_CODES = {"f32": F32, "f16": F16}

# Status codes kernels return instead of raising (Numba leaks a raising kernel's arrays).
OK = 0
BAD_ENTRY = -1
