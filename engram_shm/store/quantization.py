"""int8 storage: per-dimension scales, taken from a space's first batch, and
a factor per row.

A row in code units is v[d] = value[d] * 127 / scales[d]; it is stored as
codes c[d] = round(v[d] * 127 / max|v|) (its largest element at +-127:
nothing is ever clipped, whatever the row's size) and one float32 factor F
per row, so that v is F * c (kernels/vectors._code_row). F is not the
rounding step but a fit: under cosine and ip, the one that makes the decoded
row's dot with the row equal the row's own (the rounding error has no part
along the row, which is the part a ranking of near neighbours feels); under
l2 the least-squares one. Kernels weight their sums by dimension
(kernels/policy.WeightedMetric) and multiply them by the rows' factors, so
distances stay in the data's own units.

The scales share the 255 levels of a row between its dimensions: one per
dimension, not one per space, because embeddings often have a few
dimensions much larger than the rest, and one scale set by those would
leave every other dimension a few coarse steps. A dimension's scale is its
root mean square in the first batch; a row's own largest element sets its
step, so a first batch that misjudges later rows costs precision, never a
clipped value.
"""

from __future__ import annotations

import numpy as np

from ..kernels.policy import INT8_MAX, ROW_FACTOR_CODES

# A dimension's root mean square is pooled with the batch's mean over
# dimensions as if from PRIOR_ROWS more rows: a first batch of a few rows says
# little about each dimension.
PRIOR_ROWS = 32


def calibrate(vectors: np.ndarray, metric: str) -> np.ndarray:
    """The per-dimension scales (float32 [dim]) of a space whose first batch
    is `vectors` (float32 or f16 bits), taken from its rows as they will be
    stored (at unit norm under cosine). Rows the store refuses (not finite)
    do not count."""
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
    scales = np.sqrt(pooled)
    # An all-zero batch says nothing: no dimension gets a scale of 0. Nor does
    # one of subnormal values, whose scales float32 holds as 0 or barely.
    floor = scales.max() if scales.max() > 0 else 1.0
    scales = np.where(scales > 0, scales, floor)
    return np.maximum(scales, np.finfo(np.float32).tiny).astype(np.float32)


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


def factors(rows: np.ndarray) -> np.ndarray:
    """The factors (float32 [n]) that end int8 rows [n, dim + ROW_FACTOR_CODES]."""
    return np.ascontiguousarray(rows[:, -ROW_FACTOR_CODES:]).view(np.float32)[:, 0]


def decoded(rows: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Stored int8 rows (codes, then their factor) as float32 values [n, dim].
    The factor meets the scales before the codes: a row far beyond its
    space's scales has a factor near float32's top, times 127 infinite."""
    codes = rows[:, :-ROW_FACTOR_CODES].astype(np.float32)
    return codes * (factors(rows)[:, None] * (scales / np.float32(INT8_MAX)))


def with_unit_factors(codes: np.ndarray) -> np.ndarray:
    """int8 rows of a block or log record written before rows had factors
    (codes of value * 127 / scales, layout < 5) as rows of today, factor 1."""
    rows = np.empty((codes.shape[0], codes.shape[1] + ROW_FACTOR_CODES), np.int8)
    rows[:, :-ROW_FACTOR_CODES] = codes
    rows[:, -ROW_FACTOR_CODES:] = np.ones((codes.shape[0], 1), np.float32).view(np.int8)
    return rows
