"""Incoming vectors, checked and stored in one kernel: each row is checked
(finite, norm in float64 so tiny and huge rows survive) and written scaled
straight into segment storage (float32, float16 bits, or int8 codes and
their row's factor). Replaces the
half-dozen numpy passes (cast, isfinite, norm, divide, astype) a batch of
256 x 768 would otherwise take on the ingest hot path, and reads the batch
from memory once."""

import functools

import numpy as np

from ..errors import InvalidArgument
from .distance import STORE_DTYPES, stored_width
from .policy import INT8_MAX, kernel, uncounted_inline_kernel
from .scalar import as_f32, is_codes, set_row_factor, store_f32, value_of_bits

ROW_OK = 0
ROW_NON_FINITE = 1
ROW_ZERO = 2
ROW_TOO_BIG = 3
ROW_BEYOND_SCALES = 4  # an int8 row whose factor overflows float32

F32_MAX = float(np.finfo(np.float32).max)
F32_EXPONENT = np.uint32(0x7F800000)  # all ones: infinity or NaN
CODE_MAX = float(INT8_MAX)


@kernel
def _check_store(src, bits, exponent, unit, limit, quant, least_squares, dst):
    """dst[i] = src[i] * factor * quant row by row, where factor is 1/norm
    (unit) or 1 and quant [dim] turns values into int8 codes' units (1 for
    float stores), after checking the row: returns (first bad row, reason)
    or (-1, ROW_OK). An int8 row is coded by `_code_row`. Each row is read
    from memory once (the later passes hit the cache). Finiteness is read
    from the bits (all-ones exponent): fastmath may fold float tests away.
    Squares of float32 values cannot overflow float64; the factor stays
    float64 because that of a subnormal row exceeds float32. Written as one
    loop nest: split into helper functions it is not vectorised (4x slower).
    The largest magnitude is taken on the bits (sign cleared, they order as
    the values do): an integer maximum is vectorised, a float one without
    fastmath's nnan is not (it took as long as coding an int8 row)."""
    magnitude = exponent | (exponent - 1)  # all bits but the sign
    for i in range(src.shape[0]):
        acc = 0.0
        peak_bits = 0
        for j in range(src.shape[1]):
            x = np.float64(as_f32(src[i, j]))
            acc += x * x
            peak_bits = max(peak_bits, bits[i, j] & magnitude)
        if peak_bits >= exponent:  # an all-ones exponent: infinity or NaN
            return i, ROW_NON_FINITE
        if unit:
            if acc == 0.0:
                return i, ROW_ZERO
            factor = 1.0 / np.sqrt(acc)
        else:
            if value_of_bits(bits, peak_bits) > limit:
                return i, ROW_TOO_BIG
            factor = 1.0
        if is_codes(dst):
            if not _code_row(src, i, factor, quant, least_squares, dst):
                return i, ROW_BEYOND_SCALES
        else:
            for j in range(src.shape[1]):
                store_f32(dst, i, j, np.float32(as_f32(src[i, j]) * factor * quant[j]))
    return -1, ROW_OK


@uncounted_inline_kernel
def _code_row(src, i, factor, quant, least_squares, dst):
    """Row i as int8 codes and their factor (store/quantization.py). In code
    units (v = value * quant) the row's largest element becomes +-127, then
    the factor F that the codes c are multiplied by is chosen in the data's
    units (weights 1 / quant^2): with A = v.v, B = v.c, C = c.c, F = A / B
    makes the decoded row's dot with the row equal the row's own (no error
    along the row: what cosine and ip rankings feel), F = B / C is the least
    squares fit (l2). A zero row is all zero codes, factor 0. Returns False,
    writing no factor, when the factor exceeds float32 (a row some 1e38 times
    its space's scales)."""
    top = 0.0
    for j in range(src.shape[1]):
        top = max(top, abs(np.float64(as_f32(src[i, j])) * quant[j]))
    top *= factor
    per_step = INT8_MAX / top if top > 0.0 else 0.0
    # Sums over x = the row's values (before `factor`) and c / quant (the
    # codes in the data's units, up to F): no weight per element.
    a = 0.0
    b = 0.0
    c = 0.0
    for j in range(src.shape[1]):
        x = np.float64(as_f32(src[i, j]))
        code = min(max(np.floor(x * (quant[j] * factor * per_step) + 0.5), -CODE_MAX), CODE_MAX)
        dst[i, j] = np.int8(code)
        weighted = code / quant[j]
        a += x * x
        b += x * weighted
        c += weighted * weighted
    a *= factor * factor
    b *= factor
    f = (b / c if least_squares else a / b) if b > 0.0 else 0.0
    if f > F32_MAX:
        return False
    set_row_factor(dst, i, f)
    return True


def check_store_rows(src: np.ndarray, unit: bool, limit: float, dst: np.ndarray,
                     quant: float | np.ndarray = 1.0, least_squares: bool = False) -> tuple[int, int]:
    """Check each row of `src` (float32 or f16 bits, 2-D) and store it scaled
    into `dst` (float32, f16 bits, or int8 codes and their factor: rows of
    distance.stored_width): rows must be finite, and non-zero when `unit`
    (stored at unit norm), within +-limit otherwise (stored as is); int8
    rows are coded from value * quant (one factor, or one per dimension) by
    `_code_row`, whose factor is a least-squares fit with `least_squares`
    (l2 spaces). Returns (first bad row, reason) or (-1, ROW_OK); rows
    before a bad one are written. int8 rows from a log are stored rows:
    copied as they are."""
    if src.dtype == np.int8 and dst.dtype == np.int8 and src.ndim == 2 and src.shape == dst.shape:
        dst[...] = src
        return -1, ROW_OK
    if (src.ndim != 2 or dst.dtype not in STORE_DTYPES
            or dst.shape != (src.shape[0], stored_width(src.shape[1], dst.dtype))):
        raise InvalidArgument("check_store_rows needs dst with the source's rows as float32, f16 bits "
                              "or int8 codes and their factor")
    bits, exponent = source_bits(src)
    quant = _per_dimension(quant, src.shape[1])
    bad, reason = _check_store(src, bits, exponent, unit, np.float64(limit), quant, bool(least_squares), dst)
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
        return src.view(np.uint32), F32_EXPONENT
    return src, np.uint16(0x7C00)
