"""int8 storage: per-dimension scales, taken from a space's first batch.

Element d of a row is stored as round(value * 127 / scales[d]), clipped to
+-127; kernels weight their sums by dimension (kernels/policy.WeightedMetric), so
distances stay in the data's own units. One scale per dimension, not one per
space: embeddings often have a few dimensions much larger than the rest, and
one scale set by those leaves every other dimension a few coarse steps.
"""

from __future__ import annotations

import numpy as np

from ..kernels.policy import INT8_MAX

# A dimension's scale is the larger of MARGIN times its largest magnitude in
# the first batch and SPREAD times its root mean square, so that later rows
# rarely clip (an element that does is stored at +-scale). The root mean
# square is pooled with the batch's mean over dimensions as if from PRIOR_ROWS
# more rows: a first batch of a few rows says little about each dimension.
MARGIN = 1.25
SPREAD = 5.0
PRIOR_ROWS = 32


def calibrate(vectors: np.ndarray, metric: str) -> np.ndarray:
    """The per-dimension scales (float32 [dim]) of a space whose first batch
    is `vectors` (float32 or f16 bits), taken from its rows as they will be
    stored (at unit norm under cosine, where no scale exceeds 1). Rows the
    store refuses (not finite) do not count."""
    rows = vectors.view(np.float16) if vectors.dtype == np.uint16 else vectors
    rows = rows.astype(np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)]
    if metric == "cosine":
        rows /= np.maximum(np.sqrt((rows * rows).sum(axis=1, keepdims=True)), np.finfo(np.float64).tiny)
    dim = vectors.shape[1]
    if rows.shape[0] == 0:
        return np.ones(dim, np.float32)
    n = rows.shape[0]
    mean_square = (rows * rows).mean(axis=0)
    pooled = (n * mean_square + PRIOR_ROWS * mean_square.mean()) / (n + PRIOR_ROWS)
    scales = np.maximum(MARGIN * np.abs(rows).max(axis=0), SPREAD * np.sqrt(pooled))
    if metric == "cosine":
        scales = np.minimum(scales, 1.0)
    # An all-zero batch says nothing: no dimension gets a scale of 0.
    floor = scales.max() if scales.max() > 0 else 1.0
    return np.where(scales > 0, scales, floor).astype(np.float32)


def codes_per_unit(scales: np.ndarray) -> np.ndarray:
    """What a value of each dimension is multiplied by to give its code."""
    return INT8_MAX / scales.astype(np.float64)


def logged(scales: np.ndarray | None) -> bytes | None:
    """Scales as a log record carries them (float32 bytes)."""
    return None if scales is None else np.ascontiguousarray(scales, np.float32).tobytes()


def from_log(meta: dict) -> np.ndarray | None:
    """The scales a logged batch was coded with: its `scales`, or the one
    `scale` of every dimension in a record written before scales were per
    dimension; None for float storage."""
    if meta.get("scales") is not None:
        return np.frombuffer(meta["scales"], np.float32).copy()
    if meta.get("scale") is not None and meta.get("dtype") == "int8":
        return np.full(meta["dim"], meta["scale"], np.float32)
    return None


def decoded(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes [n, dim] as float32 values."""
    return codes.astype(np.float32) * (scales / np.float32(INT8_MAX))
