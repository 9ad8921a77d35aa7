"""int8 calibration (store/quantization.py): per-dimension scales from a
space's first batch, kept through segments, logs and checkpoints."""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engram_shm.kernels.distance import empty_store
from engram_shm.kernels.vectors import check_store_rows
from engram_shm.store import quantization, shm
from engram_shm.store.layout import SegmentLayout
from engram_shm.store.segment import Segment
from engram_shm.synthetic import sentence_like

import naive

batches = st.integers(1, 40).flatmap(lambda dim: arrays(
    np.float32, st.tuples(st.integers(1, 30), st.just(dim)),
    elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@given(batch=batches)
def test_scales_are_positive_and_finite_whatever_the_batch(metric, batch):
    scales = quantization.calibrate(batch, metric)
    assert scales.dtype == np.float32 and scales.shape == batch.shape[1:]
    assert np.isfinite(scales).all() and (scales > 0).all()


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@given(first=batches, draw=st.data())
def test_stored_rows_keep_their_error_bounds(metric, first, draw):
    """Rows coded with the scales of any first batch (later rows need not
    resemble it: nothing is clipped): under l2 the decoded row is off by at
    most E, the norm of half a step per dimension (step = scales[d] *
    max|value / scales| / 127); under cosine and ip its dot with the row is
    the row's own, and it is off by at most 2E|x| / (|x| - E)."""
    rows = draw.draw(arrays(np.float32, (draw.draw(st.integers(1, 20)), first.shape[1]),
                            elements=st.floats(-1e4, 1e4, width=32)))
    scales = quantization.calibrate(first, metric).astype(np.float64)
    stored = empty_store(*rows.shape, np.int8)
    bad, _ = check_store_rows(rows, metric == "cosine", np.inf, stored, quantization.codes_per_unit(scales),
                              metric == "l2")
    x = rows.astype(np.float64)[:bad if bad >= 0 else None]
    if metric == "cosine":
        x = x[np.linalg.norm(x, axis=1) > 0]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = quantization.decoded(stored[:len(x)], scales.astype(np.float32)).astype(np.float64)
    norm = np.linalg.norm(x, axis=1)
    e = np.linalg.norm(scales * np.abs(x / scales).max(axis=1, keepdims=True) / 254, axis=1)
    error = np.linalg.norm(got - x, axis=1)
    slack = 1e-5 * norm + 1e-30  # float32 factor and decode
    if metric == "l2":
        assert (error <= e + slack).all()
    else:
        np.testing.assert_allclose((got * x).sum(axis=1), norm ** 2, rtol=1e-5, atol=1e-30)
        close = e < norm / 2
        e, norm = e[close], norm[close]
        assert (error[close] <= 2 * e * norm / (norm - e) + slack[close]).all()


def stored_recall(base: np.ndarray, queries: np.ndarray, scales: np.ndarray) -> float:
    """recall@10 of the exact search over the decoded int8 rows of `base`."""
    stored = empty_store(*base.shape, np.int8)
    check_store_rows(base, True, np.inf, stored, quantization.codes_per_unit(scales))
    decoded = quantization.decoded(stored, scales)
    found = [naive.exact_knn(decoded, q, 10, "cosine") for q in queries]
    return naive.recall_at_k(found, [naive.exact_knn(base, q, 10, "cosine") for q in queries])


def test_per_dimension_scales_and_row_factors_keep_the_neighbours():
    """On data with a few dimensions much larger than the rest (as some
    sentence embedding models give), the exact search over int8 rows finds
    at least 0.99 of the true neighbours, more than with one scale for
    every dimension (the largest), and more than codes with per-dimension
    scales alone (value * 127 / (1.25 x the dimension's largest value), no
    factor: as rows were coded before they had factors)."""
    data = sentence_like(5100, 384, seed=1)
    base, queries = data[:5000], data[5000:]
    scales = quantization.calibrate(base[:256], "cosine")
    per_dimension = stored_recall(base, queries, scales)
    one_scale = stored_recall(base, queries, np.full_like(scales, scales.max()))
    top = 1.25 * np.abs(base[:256]).max(axis=0)
    codes = np.clip(np.floor(base * (127 / top) + 0.5), -127, 127)
    found = [naive.exact_knn(codes * (top / 127), q, 10, "cosine") for q in queries]
    no_factors = naive.recall_at_k(found, [naive.exact_knn(base, q, 10, "cosine") for q in queries])
    assert per_dimension >= 0.99 and per_dimension > max(one_scale, no_factors), \
        (per_dimension, one_scale, no_factors)


def test_scales_round_trip_through_a_log_record():
    scales = quantization.calibrate(np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32), "l2")
    meta = {"dtype": "int8", "dim": 12, "scales": quantization.logged(scales)}
    np.testing.assert_array_equal(quantization.from_log(meta), scales)
    assert quantization.logged(None) is None
    assert quantization.from_log({"dtype": "f16", "dim": 12, "scales": None}) is None


def test_a_log_record_of_one_scale_gives_it_to_every_dimension():
    """Records written before scales were per dimension carry one `scale`."""
    np.testing.assert_array_equal(quantization.from_log({"dtype": "int8", "dim": 3, "scale": 0.5}),
                                  np.full(3, 0.5, np.float32))


def test_a_layout_1_int8_block_reads_its_one_scale_for_every_dimension():
    """A block written before the `scales` column (a checkpoint of layout 1)
    has its header's SCALE for every dimension; a new block keeps its own."""
    names = [f"engram-test-quant-{os.getpid()}-{v}" for v in ("v1", "v2")]
    try:
        old = Segment.create(names[0], SegmentLayout(64, 5, "int8", 4, 256, version=1), 0, 0, 0,
                             np.full(5, 0.25, np.float32))
        assert not old.layout.has_scales
        np.testing.assert_array_equal(old.scales, np.full(5, 0.25, np.float32))  # attach refuses layout 1
        scales = np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)
        new = Segment.create(names[1], SegmentLayout(64, 5, "int8", 4, 256), 0, 0, 0, scales)
        assert new.layout.has_scales
        np.testing.assert_array_equal(Segment.attach(names[1]).scales, scales)
        with pytest.raises(ValueError):  # an int8 segment without scales
            Segment.create(f"engram-test-quant-{os.getpid()}-none", SegmentLayout(64, 5, "int8", 4, 256),
                           0, 0, 0)
    finally:
        for name in names:
            shm.unlink(name)
