import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engram_shm.kernels.policy import ROW_FACTOR_CODES
from engram_shm.kernels.vectors import (
    F32_MAX,
    ROW_BEYOND_SCALES,
    ROW_NON_FINITE,
    ROW_OK,
    ROW_TOO_BIG,
    ROW_ZERO,
    check_store_rows,
)
from engram_shm.store import quantization

import naive

ELEMENTS = [st.floats(width=32),  # NaN, infinities, subnormals, huge
            st.floats(-1e3, 1e3, width=32),
            st.floats(-2.0**-126, 2.0**-126, width=32)]  # subnormal territory


@st.composite
def matrices(draw):
    n, dim = draw(st.integers(1, 12)), draw(st.integers(1, 70))
    m = draw(arrays(np.float32, (n, dim), elements=ELEMENTS[draw(st.integers(0, 2))]))
    if draw(st.booleans()):
        m[draw(st.integers(0, n - 1))] = 0
    return m


def reference(m: np.ndarray, unit: bool, limit: float):
    """First bad row and reason, and the rows as stored, the slow way."""
    x = naive.as_f32(m)
    if unit:
        with np.errstate(all="ignore"):
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i, row in enumerate(naive.as_f32(m)):
        if not np.isfinite(row).all():
            return i, ROW_NON_FINITE, x
        if unit and not row.any():
            return i, ROW_ZERO, x
        if not unit and np.abs(row).max() > limit:
            return i, ROW_TOO_BIG, x
    return -1, ROW_OK, x


@given(matrices(), st.booleans(), st.sampled_from(["f32", "f16"]), st.sampled_from(["f32", "f16"]))
def test_check_and_store_match_the_reference(m, unit, src_kind, dst_kind):
    if src_kind == "f16":
        with np.errstate(over="ignore"):
            m = m.astype(np.float16).view(np.uint16)
    limit = 65504.0 if dst_kind == "f16" else np.inf
    dst = np.zeros(m.shape, np.float32 if dst_kind == "f32" else np.uint16)
    bad, reason = check_store_rows(m, unit, limit, dst)
    want_bad, want_reason, want_rows = reference(m, unit, limit)
    assert (bad, reason) == (want_bad, want_reason)
    done = slice(0, bad if bad >= 0 else len(m))  # rows before a bad one are stored
    if dst_kind == "f32":
        np.testing.assert_allclose(dst[done], want_rows[done], rtol=1e-6, atol=1e-37)
    else:
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(dst[done].view(np.float16), want_rows[done].astype(np.float16))


@given(matrices(), st.booleans(), st.booleans(), st.data())
def test_int8_rows_match_the_reference(m, unit, least_squares, draw):
    """int8 storage: each row in code units (value times 127 / its
    dimension's scale) coded with its largest element at +-127, rounded half
    up, nothing clipped, and ended by the factor the reference computes from
    those codes; the checks are those of float storage."""
    scale = draw.draw(arrays(np.float64, m.shape[1:], elements=st.floats(0.01, 100)))
    quant = 127 / scale
    dst = np.zeros((m.shape[0], m.shape[1] + ROW_FACTOR_CODES), np.int8)
    bad, reason = check_store_rows(m, unit, np.inf, dst, quant, least_squares)
    want_bad, want_reason, want_rows = reference(m, unit, np.inf)
    checked = slice(0, want_bad if want_bad >= 0 else len(m))
    with np.errstate(all="ignore"):
        want_codes = naive.int8_codes(want_rows[checked], quant)
        huge = naive.int8_factor(want_rows[checked], want_codes, quant, least_squares) > F32_MAX
    if huge.any():  # a row whose factor overflows float32 is refused first
        want_bad, want_reason = int(np.argmax(huge)), ROW_BEYOND_SCALES
    assert (bad, reason) == (want_bad, want_reason)
    done = slice(0, bad if bad >= 0 else len(m))
    codes = dst[done, :-ROW_FACTOR_CODES].astype(np.float64)
    want_codes = want_codes[done]
    # float rounding of the products may move a value sitting on a half step
    assert np.abs(codes - want_codes).max(initial=0) <= 1
    nonzero = np.abs(want_rows[done]).max(axis=1, initial=0) > 0
    assert (np.abs(codes).max(axis=1, initial=0)[nonzero] == 127).all()  # the whole range, no clipping
    factors = quantization.factors(dst[done])
    want = naive.int8_factor(want_rows[done], codes, quant, least_squares)
    np.testing.assert_allclose(factors, want, rtol=1e-5, atol=2.0**-140)  # float32: subnormal factors too


def test_int8_rows_from_the_log_are_copied_as_they_are():
    codes = np.arange(-127, 128, dtype=np.int8)[:250].reshape(10, 25)  # 21 codes and a factor a row
    dst = np.zeros_like(codes)
    assert check_store_rows(codes, False, np.inf, dst, 3.0) == (-1, ROW_OK)
    np.testing.assert_array_equal(dst, codes)


@given(st.integers(1, 4), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_vectors_matrix_takes_float32_rows_as_its_checks_would(n, dim, one_d, strided, seed):
    """A C-contiguous float32 matrix (or one vector, for a single cue) skips
    vectors_matrix's general checks: the result, and the error of a shape
    that does not fit, are those of the same values in a strided copy, which
    takes the general path."""
    import pytest

    from engram_shm.errors import DimensionMismatch, LengthMismatch
    from engram_shm.observations import vectors_matrix

    rng = np.random.default_rng(seed)
    shape = (dim,) if one_d else (n, dim)
    values = rng.normal(size=shape).astype(np.float32)
    given_ = np.repeat(values, 2, axis=-1)[..., ::2] if strided else values
    assert given_.flags.c_contiguous or strided
    if strided and dim > 1:  # (numpy may call one strided column contiguous)
        assert not given_.flags.c_contiguous
    expect_n = 1 if one_d else n
    out = vectors_matrix(given_, expect_n, True, dim, "cue")
    assert out.shape == (expect_n, dim) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, values.reshape(expect_n, dim))
    with pytest.raises(DimensionMismatch):
        vectors_matrix(given_, expect_n, True, dim + 1, "cue")
    with pytest.raises(LengthMismatch):
        vectors_matrix(given_, expect_n + 1, True, dim, "cue")
