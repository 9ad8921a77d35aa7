"""The one decorator policy of every kernel, and the codes kernels share.

fastmath without `nnan`/`ninf`: +inf is the empty-heap sentinel and must compare
correctly. `cache=True`: workers load compiled kernels from disk (see `warm`).
`error_model="numpy"`: a division by zero gives inf or nan (kernels guard
the divisors that can be zero) instead of a check for Python's
ZeroDivisionError, whose branch keeps a loop from being vectorised.
"""

import os
from collections import namedtuple

import numba
import numpy as np
from llvmlite import binding as llvm
from numba import types
from numba.extending import overload


def _prefer_512_bit_vectors() -> None:
    """Let LLVM vectorise with 512-bit registers where the host has AVX-512.
    Its tuning for Intel's AVX-512 cores prefers 256-bit ones (to spare the
    clock of older parts), which halves the kernels' lanes; with 512-bit
    ones, engram_shm's clustered-768 inserts went from 1.45x to 1.57x
    hnswlib's rate per CPU second on an Emerald Rapids VM (f16; int8 1.99x
    to 2.14x; docs/architecture.md, Kernels). Numba's own setting, for the
    whole process, read when it first compiles or loads a kernel (its cache
    keys on it); a NUMBA_CPU_NAME or NUMBA_CPU_FEATURES of the user's comes
    first."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


_prefer_512_bit_vectors()

FASTMATH = frozenset({"contract", "reassoc", "arcp", "nsz", "afn"})

_OPTIONS = dict(nogil=True, cache=True, fastmath=set(FASTMATH), error_model="numpy")
kernel = numba.njit(**_OPTIONS)
# The graph kernels make no arrays: they index and slice those they are given,
# which their callers keep alive. Compiled without Numba's runtime (NRT), they
# pass arrays on without reference counts: with it, every call between
# kernels increments and decrements each array it passes, an atomic
# operation each, which took a tenth of an insert's time. A kernel that makes
# an array (numba.carray, a copy), and every caller of one, is a `kernel`; a
# helper that returns a view is inlined (a kernel without NRT returns no array).
uncounted_kernel = numba.njit(**_OPTIONS, _nrt=False)
uncounted_inline_kernel = numba.njit(**_OPTIONS, _nrt=False, inline="always")

# Metric codes, as stored in segment headers.
COSINE = 0
IP = 1
L2 = 2
METRIC_CODES = {"cosine": COSINE, "ip": IP, "l2": L2}

# int8 codes span +-INT8_MAX (symmetric: -128 is never stored).
INT8_MAX = 127
# An int8 row ends in its factor, a float32 in ROW_FACTOR_CODES int8 slots
# (store/quantization.py): a store's row is dim codes then the factor, so
# every copy of a row (logs, checkpoints, compaction) carries it.
ROW_FACTOR_CODES = 4

# What kernels take as `metric`: the code and the unit that turns a sum over
# stored elements into a distance (Metric: float stores, unit 1), and for int8
# stores per-dimension weights of that sum (WeightedMetric). An int8 row's
# element d stands for factor * code * scales[d] / 127 (value * 127 / scales[d]
# in code units is factor * code); with S = max(scales), unit = (S / 127)^2
# and weights[d] = (scales[d] / S)^2, so that sums over codes (and over cues
# multiplied by 127 / scales) come out in the data's own units and thresholds
# such as DUPLICATE keep meaning. The weights are passed as the address of a
# float32 [dim] array: an array in the tuple is reference-counted at every
# distance call, which slowed every store's inserts and searches, float ones
# too. Two types, so that float stores compile without weights at all.
Metric = namedtuple("Metric", "code unit")
WeightedMetric = namedtuple("WeightedMetric", "code unit weights")


def metric_of(name: str, scales: np.ndarray | None = None
              ) -> tuple[Metric | WeightedMetric, np.ndarray | None]:
    """The kernels' metric for a store, float (`scales` None) or int8 codes
    of per-dimension `scales`, and the weights array it points to, which the
    caller keeps referenced until the kernel returns."""
    code = np.int64(METRIC_CODES[name])
    if scales is None:
        return Metric(code, np.float32(1.0)), None
    top = float(np.max(scales))
    weights = ((np.asarray(scales, np.float64) / top) ** 2).astype(np.float32)
    return WeightedMetric(code, np.float32((top / INT8_MAX) ** 2), np.int64(weights.ctypes.data)), weights


def metric_fields(metric: Metric | WeightedMetric) -> tuple:
    """A kernel metric as a plain tuple of Python numbers, which Numba types
    at a call in C (a named tuple or NumPy scalars: in Python, microseconds
    per call); `metric_from` makes the metric again in the kernel."""
    return (int(metric.code), float(metric.unit), *(int(w) for w in metric[2:]))


def metric_from(fields):
    """The Metric or WeightedMetric of `metric_fields` (jitted code only)."""
    raise NotImplementedError("metric_from is for jitted code")


@overload(metric_from, inline="always")
def _metric_from(fields):
    if not isinstance(fields, types.BaseTuple):
        return None
    if len(fields) == 2:
        return lambda fields: Metric(np.int64(fields[0]), np.float32(fields[1]))
    return lambda fields: WeightedMetric(np.int64(fields[0]), np.float32(fields[1]), np.int64(fields[2]))


# Status codes kernels return instead of raising (Numba leaks a raising kernel's arrays).
OK = 0
BAD_ENTRY = -1
