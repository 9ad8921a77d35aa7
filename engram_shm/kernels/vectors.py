"""Incoming vectors, checked and stored in one kernel: each row is checked
(finite, norm in float64 so tiny and huge rows survive) and written scaled
straight into segment storage (float32, or float16 bits). Replaces the
half-dozen numpy passes (cast, isfinite, norm, divide, astype) a batch of
256 x 768 would otherwise take on the ingest hot path, and reads the batch
from memory once."""

import functools

import numpy as np

from ..errors import InvalidArgument
from .distance import STORE_DTYPES
from .policy import kernel
from .scalar import as_f32, store_f32

ROW_OK = 0
ROW_NON_FINITE = 1
ROW_ZERO = 2
ROW_TOO_BIG = 3


@kernel
def _check_store(src, bits, exponent, unit, limit, quant, dst):
    """dst[i] = src[i] * factor * quant row by row, where factor is 1/norm
    (unit) or 1 and quant [dim] turns values into int8 codes (1 for float stores),
    after checking the row: returns (first bad row, reason) or (-1, ROW_OK).
    Each row is read from memory once (the second pass hits the cache).
    Finiteness is read from the bits (all-ones exponent): fastmath may fold
    float tests away. Squares of float32 values cannot overflow float64; the
    factor stays float64 because that of a subnormal row exceeds float32.
    Written as one loop nest: split into helper functions it is not
    vectorised (4x slower)."""
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
            factor = 1.0 / np.sqrt(acc)
        else:
            if peak > limit:
                return i, ROW_TOO_BIG
            factor = 1.0
        for j in range(src.shape[1]):
            store_f32(dst, i, j, np.float32(as_f32(src[i, j]) * factor * quant[j]))
    return -1, ROW_OK


def check_store_rows(src: np.ndarray, unit: bool, limit: float, dst: np.ndarray,
                     quant: float | np.ndarray = 1.0) -> tuple[int, int]:
    """Check each row of `src` (float32 or f16 bits, 2-D) and store it scaled
    into `dst` (float32, f16 bits or int8 codes, same shape): rows must be
    finite, and non-zero when `unit` (stored at unit norm), within +-limit
    otherwise (stored as is); int8 codes are value * quant (one factor, or
    one per dimension), rounded and clipped to +-127. Returns (first bad
    row, reason) or (-1, ROW_OK); rows before a bad one are written. int8
    rows from a log are stored codes: copied as they are."""
    if dst.shape != src.shape or dst.dtype not in STORE_DTYPES:
        raise InvalidArgument("check_store_rows needs dst of the source's shape, float32, f16 bits or int8")
    if src.dtype == np.int8 and dst.dtype == np.int8 and src.ndim == 2:
        dst[...] = src
        return -1, ROW_OK
    bits, exponent = source_bits(src)
    quant = _per_dimension(quant, src.shape[1])
    bad, reason = _check_store(src, bits, exponent, unit, np.float64(limit), quant, dst)
    return int(bad), int(reason)


@functools.cache
def _ones(dim: int) -> np.ndarray:
    return np.ones(dim)  # shared by every call: the kernel only reads it


def _per_dimension(quant: float | np.ndarray, dim: int) -> np.ndarray:
    """`quant` as float64 [dim], the one type the kernel is compiled for;
    without a copy when it is one already or 1 (a recall's cue passes here:
    broadcasting costs microseconds)."""
    if (isinstance(quant, np.ndarray) and quant.dtype == np.float64 and quant.shape == (dim,)
            and quant.flags.c_contiguous):
        return quant
    if isinstance(quant, float) and quant == 1.0:
        return _ones(dim)
    return np.array(np.broadcast_to(np.asarray(quant, np.float64), (dim,)))


def source_bits(src: np.ndarray) -> tuple[np.ndarray, np.uint32 | np.uint16]:
    """The bits of a float32 or f16-bits matrix `_check_store` reads, and their
    exponent mask (all ones: infinity or NaN)."""
    if src.ndim != 2 or src.dtype not in (np.float32, np.uint16) or not src.flags.c_contiguous:
        raise InvalidArgument("vectors must be a C-contiguous 2-D float32 or f16-bits array")
    if src.dtype == np.float32:
        return src.view(np.uint32), np.uint32(0x7F800000)
    return src, np.uint16(0x7C00)
