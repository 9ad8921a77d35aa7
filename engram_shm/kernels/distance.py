"""Distances between stored vectors and float32 queries, f32 accumulation.

Stored rows are float32, float16 bits (uint16) or int8 codes; queries are
float32 in the store's units (an int8 space's cue is scaled like its rows).
Cosine and inner product both rank by `1 - dot` (cosine rows and cues are
unit-norm); L2 is the squared Euclidean distance. Sums are taken in the
store's units, weighted per dimension for int8 codes, and multiplied by
`metric.unit` once (see policy.Metric).
"""

import numpy as np

from ..errors import DimensionMismatch, InvalidArgument
from .policy import L2, kernel, metric_of
from .scalar import as_f32

STORE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int8))


@kernel
def dist(a, i, b, j, metric):
    """Distance between row i of `a` and row j of `b` (stored rows or a float32
    query held as a one-row matrix)."""
    dim = a.shape[1]
    w = metric.weights
    acc = np.float32(0.0)
    if metric.code == L2:
        if w.shape[0] == 0:
            for t in range(dim):
                diff = as_f32(a[i, t]) - as_f32(b[j, t])
                acc += diff * diff
        else:
            for t in range(dim):
                diff = as_f32(a[i, t]) - as_f32(b[j, t])
                acc += diff * diff * w[t]
        return acc * metric.unit
    if w.shape[0] == 0:
        for t in range(dim):
            acc += as_f32(a[i, t]) * as_f32(b[j, t])
    else:
        for t in range(dim):
            acc += as_f32(a[i, t]) * as_f32(b[j, t]) * w[t]
    return np.float32(1.0) - acc * metric.unit


@kernel
def _distances(store, q, metric, out):
    for i in range(store.shape[0]):
        out[i] = dist(store, i, q, 0, metric)


def check_store(store: np.ndarray) -> None:
    if store.ndim != 2 or store.dtype not in STORE_DTYPES or not store.flags.c_contiguous:
        raise InvalidArgument("store must be a C-contiguous 2-D float32, uint16 (f16 bits) or int8 array")


def check_query(q: np.ndarray, dim: int) -> None:
    if q.dtype != np.float32 or q.ndim != 1 or not q.flags.c_contiguous:
        raise InvalidArgument("query must be a C-contiguous 1-D float32 array")
    if q.shape[0] != dim:
        raise DimensionMismatch(f"query has {q.shape[0]} dims, store has {dim}")


def distances(store: np.ndarray, q: np.ndarray, metric: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Distance of `q` to every row of `store` (float32 [n]); `scales`: those
    of an int8 store's codes (policy.metric_of), `q` then in code units."""
    check_store(store)
    check_query(q, store.shape[1])
    out = np.empty(store.shape[0], np.float32)
    _distances(store, q.reshape(1, -1), metric_of(metric, scales), out)
    return out
