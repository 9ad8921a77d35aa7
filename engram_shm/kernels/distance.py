"""Distances between stored vectors and float32 queries, f32 accumulation.

Stored rows are float32, float16 bits (uint16) or int8 codes ending in their
row's factor (policy.ROW_FACTOR_CODES); queries are float32 in the store's
units (an int8 space's cue is scaled like its rows), or for int8 codes an
int16 cue (`int16_cue_max`), whose dot products are summed exactly in int32.
Cosine and inner product both rank by `1 - dot` (cosine rows and cues are
unit-norm); L2 is the squared Euclidean distance. Sums are taken in the
store's units, weighted per dimension for int8 codes, whose rows' factors
multiply them, and multiplied by `metric.unit` once (see policy.Metric and
WeightedMetric).
"""

import numpy as np
from numba import types
from numba.extending import overload

from ..errors import DimensionMismatch, InvalidArgument
from .intdot import multiply_add_prefix
from .policy import (
    INT8_MAX,
    L2,
    ROW_FACTOR_CODES,
    kernel,
    metric_of,
    uncounted_inline_kernel,
    uncounted_kernel,
)
from .scalar import as_f32, pointer_to, row_factor, vector_dim

STORE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int8))


def stored_width(dim: int, dtype: np.dtype) -> int:
    """Elements in a stored row of `dim` dimensions: int8 rows end in their factor."""
    return dim + ROW_FACTOR_CODES if np.dtype(dtype) == np.int8 else dim


def stored_dim(store: np.ndarray) -> int:
    """The dimension of the vectors in a store's rows (see `stored_width`)."""
    return store.shape[1] - ROW_FACTOR_CODES if store.dtype == np.int8 else store.shape[1]


def empty_store(n: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Room for n rows of `dim` dimensions as a store of `dtype` holds them."""
    return np.empty((n, stored_width(dim, dtype)), dtype)


def weights_of(metric, dim):
    """A WeightedMetric's weights as a pointer to `dim` float32, indexed like
    an array (not an array: kernels without NRT make none); None for a
    Metric (jitted code only)."""
    raise NotImplementedError("weights_of is for jitted code")


@overload(weights_of, inline="always")
def _weights_of(metric, dim):
    if isinstance(metric, types.BaseNamedTuple) and "weights" in metric.fields:
        return lambda metric, dim: pointer_to(metric.weights, np.float32)
    return lambda metric, dim: None


def row_weights(weights, b):
    """The weights of a distance to `b`: none when `b` is a float32 or int16
    cue beside int8 codes under a dot metric, which `weighted_cue` (or
    hnsw._load_cue) has weighted already (one multiply less per element on
    the search path); the weights otherwise (jitted code only)."""
    raise NotImplementedError("row_weights is for jitted code")


@overload(row_weights, inline="always")
def _row_weights(weights, b):
    if weights != types.none and b.dtype in (types.float32, types.int16):
        return lambda weights, b: None
    return lambda weights, b: weights


# An int16 cue's elements span at most +-INT16_CUE_MAX, and less where that
# could carry a row's sum past int32: 127 * max * dim < 2**31 (32,767 up to
# 516 dimensions, 22,017 at 768, 4,128 at 4,096).
INT16_CUE_MAX = 32767


@uncounted_inline_kernel
def int16_cue_max(dim):
    return min(INT16_CUE_MAX, (2**31 - 1) // (INT8_MAX * max(dim, 1)))


def int16_cue_width(dim: int) -> int:
    """Elements of an int16 cue's row: dim, then its float32 factor in two."""
    return dim + ROW_FACTOR_CODES // 2


def integer_sums(a, b):
    """True when rows of `a` are int8 codes and `b` is an int16 cue: their
    dot products are then summed in int32 (intdot; jitted code only)."""
    raise NotImplementedError("integer_sums is for jitted code")


def _codes_and_cue(a, b) -> bool:
    """At typing: are `a` int8 codes and `b` an int16 cue?"""
    return a.dtype == types.int8 and b.dtype == types.int16


@overload(integer_sums, inline="always")
def _integer_sums(a, b):
    both = _codes_and_cue(a, b)
    return lambda a, b: both


def _dot_sum(a, i, b, j, metric):
    """The dot product of row i of `a` with row j of `b`: the exact int32 sum
    of int8 codes and an int16 cue (intdot), else a float32 one weighted per
    dimension (jitted code only)."""
    raise NotImplementedError("_dot_sum is for jitted code")


@overload(_dot_sum, inline="always")
def _dot_sum_impl(a, i, b, j, metric):
    if _codes_and_cue(a, b):
        return lambda a, i, b, j, metric: _code_sum(a, i, b, j)
    return lambda a, i, b, j, metric: _float_sum(a, i, b, j, metric)


def _dot_sums4(a, i0, i1, i2, i3, b, j, metric):
    """`_dot_sum` of four rows in one pass over b's row (jitted code only)."""
    raise NotImplementedError("_dot_sums4 is for jitted code")


@overload(_dot_sums4, inline="always")
def _dot_sums4_impl(a, i0, i1, i2, i3, b, j, metric):
    if _codes_and_cue(a, b):
        return lambda a, i0, i1, i2, i3, b, j, metric: _code_sums4(a, i0, i1, i2, i3, b, j)
    return lambda a, i0, i1, i2, i3, b, j, metric: _float_sums4(a, i0, i1, i2, i3, b, j, metric)


@uncounted_inline_kernel
def _code_sum(a, i, b, j):
    """Row i of int8 codes `a` times int16 cue row j of `b`, as float32."""
    dim = vector_dim(a)
    (s,), done = multiply_add_prefix(a, (np.intp(i),), b, j, dim)
    total = np.int64(s)
    for t in range(done, dim):
        total += np.int64(a[i, t]) * np.int64(b[j, t])
    return np.float32(total)


@uncounted_inline_kernel
def _code_sums4(a, i0, i1, i2, i3, b, j):
    """`_code_sum` of four rows in one pass over the cue."""
    dim = vector_dim(a)
    (s0, s1, s2, s3), done = multiply_add_prefix(a, (np.intp(i0), np.intp(i1), np.intp(i2), np.intp(i3)),
                                                 b, j, dim)
    t0, t1, t2, t3 = np.int64(s0), np.int64(s1), np.int64(s2), np.int64(s3)
    for t in range(done, dim):
        y = np.int64(b[j, t])
        t0 += np.int64(a[i0, t]) * y
        t1 += np.int64(a[i1, t]) * y
        t2 += np.int64(a[i2, t]) * y
        t3 += np.int64(a[i3, t]) * y
    return np.float32(t0), np.float32(t1), np.float32(t2), np.float32(t3)


def weight(weights, t):
    """weights[t], or 1 when there are none (jitted code only)."""
    raise NotImplementedError("weight is for jitted code")


@overload(weight, inline="always")
def _weight(weights, t):
    if weights == types.none:
        return lambda weights, t: np.float32(1.0)
    return lambda weights, t: weights[t]


@uncounted_inline_kernel
def dist(a, i, b, j, metric):
    """Distance between row i of `a` and row j of `b` (stored rows, a float32
    query held as a one-row matrix, or beside int8 codes an int16 cue).
    Float rows' factors are constants 1, which the compiler folds away."""
    dim = vector_dim(a)
    w = weights_of(metric, dim)
    acc = np.float32(0.0)
    if metric.code == L2:
        fa = row_factor(a, i)
        fb = row_factor(b, j)
        for t in range(dim):
            diff = as_f32(a[i, t]) * fa - as_f32(b[j, t]) * fb
            acc += diff * diff * weight(w, t)
        return acc * metric.unit
    return _dot_distance(_dot_sum(a, i, b, j, metric), a, i, b, j, metric)


@uncounted_inline_kernel
def dist4(a, i0, i1, i2, i3, b, j, metric):
    """The distances of rows i0, i1, i2 and i3 of `a` to row j of `b` under a
    dot metric, as `dist` gives each, in one pass over b's row: four sums in
    flight, which a search's batch of neighbours and a window's scan overlap."""
    acc0, acc1, acc2, acc3 = _dot_sums4(a, i0, i1, i2, i3, b, j, metric)
    return (_dot_distance(acc0, a, i0, b, j, metric), _dot_distance(acc1, a, i1, b, j, metric),
            _dot_distance(acc2, a, i2, b, j, metric), _dot_distance(acc3, a, i3, b, j, metric))


@uncounted_inline_kernel
def _float_sum(a, i, b, j, metric):
    """The dot product of row i of `a` with row j of `b`, in float32."""
    dot_w = row_weights(weights_of(metric, vector_dim(a)), b)
    acc = np.float32(0.0)
    for t in range(vector_dim(a)):
        acc += as_f32(a[i, t]) * as_f32(b[j, t]) * weight(dot_w, t)
    return acc


@uncounted_inline_kernel
def _float_sums4(a, i0, i1, i2, i3, b, j, metric):
    """The dot products of four rows of `a` with row j of `b`, in float32."""
    dot_w = row_weights(weights_of(metric, vector_dim(a)), b)
    acc0 = np.float32(0.0)
    acc1 = np.float32(0.0)
    acc2 = np.float32(0.0)
    acc3 = np.float32(0.0)
    for t in range(vector_dim(a)):
        y = as_f32(b[j, t]) * weight(dot_w, t)
        acc0 += as_f32(a[i0, t]) * y
        acc1 += as_f32(a[i1, t]) * y
        acc2 += as_f32(a[i2, t]) * y
        acc3 += as_f32(a[i3, t]) * y
    return acc0, acc1, acc2, acc3


@uncounted_inline_kernel
def _dot_distance(acc, a, i, b, j, metric):
    """A dot metric's distance from the sum of row i of `a` times row j of `b`."""
    return np.float32(1.0) - acc * (row_factor(a, i) * row_factor(b, j) * metric.unit)


@uncounted_kernel
def distances_of(store, rows, n, q, metric, out):
    """out[:n] = the distances of rows rows[:n] of `store` to q (a one-row
    matrix), four rows at a time under a dot metric (see `dist4`). Called,
    not inlined: Numba's inlining types a callee again in every caller,
    and warm() took 1.6 times as long (docs/architecture.md, Kernels)."""
    t = 0
    if metric.code != L2:
        while t + 3 < n:
            out[t], out[t + 1], out[t + 2], out[t + 3] = dist4(store, rows[t], rows[t + 1], rows[t + 2],
                                                               rows[t + 3], q, 0, metric)
            t += 4
    while t < n:
        out[t] = dist(store, rows[t], q, 0, metric)
        t += 1


@kernel
def _distances(store, q, metric, out):
    n = store.shape[0]
    distances_of(store, np.arange(n, dtype=np.int32), n, q, metric, out)


def weighted_cue(q: np.ndarray, metric, weights: np.ndarray | None) -> np.ndarray:
    """A float32 cue as `dist` takes it: under a dot metric with weights
    (int8), multiplied by them (see `row_weights`)."""
    if weights is None or metric.code == L2:
        return q
    return q * weights


def check_store(store: np.ndarray) -> None:
    if store.ndim != 2 or store.dtype not in STORE_DTYPES or not store.flags.c_contiguous:
        raise InvalidArgument("store must be a C-contiguous 2-D float32, uint16 (f16 bits) or int8 array")
    if stored_dim(store) < 1:
        raise InvalidArgument("an int8 store's rows are codes then their factor: "
                              f"at least {ROW_FACTOR_CODES + 1} wide")


def check_query(q: np.ndarray, dim: int) -> None:
    if q.dtype != np.float32 or q.ndim != 1 or not q.flags.c_contiguous:
        raise InvalidArgument("query must be a C-contiguous 1-D float32 array")
    if q.shape[0] != dim:
        raise DimensionMismatch(f"query has {q.shape[0]} dims, store has {dim}")


def distances(store: np.ndarray, q: np.ndarray, metric: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Distance of `q` to every row of `store` (float32 [n]); `scales`: those
    of an int8 store's codes (policy.metric_of), `q` then in code units."""
    check_store(store)
    check_query(q, stored_dim(store))
    out = np.empty(store.shape[0], np.float32)
    kernel_metric, weights = metric_of(metric, scales)  # weights: referenced until the kernel returns
    _distances(store, weighted_cue(q, kernel_metric, weights).reshape(1, -1), kernel_metric, out)
    return out
