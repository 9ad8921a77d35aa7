"""Incoming vectors in two passes: `check_rows` reads a batch once (finite,
norm in float64 so tiny and huge rows survive), `store_rows` reads it again
and writes scaled rows straight into segment storage (float32, or float16
bits). Replaces the half-dozen numpy passes (cast, isfinite, norm, divide,
astype) a batch of 256 x 768 would otherwise take on the ingest hot path."""

import numpy as np

from ..errors import InvalidArgument
from .policy import kernel
from .scalar import as_f32, store_f32

ROW_OK = 0
ROW_NON_FINITE = 1
ROW_ZERO = 2
ROW_TOO_BIG = 3


@kernel
def _check_rows(src, bits, exponent, unit, limit, scale):
    """Per row: 1/norm (unit) or 1 into scale. Returns (first bad row, reason).
    Finiteness is read from the bits (all-ones exponent): fastmath may fold
    float tests away. Squares of float32 values cannot overflow float64."""
    for i in range(src.shape[0]):
        acc = 0.0
        peak = 0.0
        special = 0
        for j in range(src.shape[1]):
            x = np.float64(as_f32(src[i, j]))
            acc += x * x
            peak = max(peak, abs(x))
            special |= (bits[i, j] & exponent) == exponent
        if special:
            return i, ROW_NON_FINITE
        if unit:
            if acc == 0.0:
                return i, ROW_ZERO
            scale[i] = 1.0 / np.sqrt(acc)
        else:
            if peak > limit:
                return i, ROW_TOO_BIG
            scale[i] = 1.0
    return -1, ROW_OK


@kernel
def store_row(src, i, s, dst, slot):
    """dst[slot] = src[i] * s in dst's storage; s is float64: the scale of a
    subnormal row exceeds float32."""
    for j in range(src.shape[1]):
        store_f32(dst, slot, j, np.float32(as_f32(src[i, j]) * s))


@kernel
def _store_rows(src, scale, dst):
    for i in range(src.shape[0]):
        store_row(src, i, scale[i], dst, i)


def check_rows(src: np.ndarray, unit: bool, limit: float) -> tuple[np.ndarray, int, int]:
    """(float64 scale per row, first bad row or -1, reason). `src` is float32 or f16
    bits (uint16), 2-D; rows must be finite, non-zero when `unit`, and within
    +-limit otherwise."""
    _check_matrix(src)
    scale = np.empty(src.shape[0], np.float64)
    if src.dtype == np.float32:
        bits, exponent = src.view(np.uint32), np.uint32(0x7F800000)
    else:
        bits, exponent = src, np.uint16(0x7C00)
    bad, reason = _check_rows(src, bits, exponent, unit, np.float64(limit), scale)
    return scale, int(bad), int(reason)


def store_rows(src: np.ndarray, scale: np.ndarray, dst: np.ndarray) -> None:
    """dst[i] = src[i] * scale[i], in dst's storage (float32 or f16 bits)."""
    _check_matrix(src)
    if dst.shape != src.shape or scale.shape != (src.shape[0],) or scale.dtype != np.float64:
        raise InvalidArgument("store_rows needs dst of the source's shape and one float64 scale per row")
    if dst.dtype not in (np.float32, np.uint16):
        raise InvalidArgument(f"storage dtype {dst.dtype} is neither float32 nor f16 bits")
    _store_rows(src, scale, dst)


def _check_matrix(src: np.ndarray) -> None:
    if src.ndim != 2 or src.dtype not in (np.float32, np.uint16) or not src.flags.c_contiguous:
        raise InvalidArgument("vectors must be a C-contiguous 2-D float32 or f16-bits array")
