"""int8 calibration (store/quantization.py): per-dimension scales from a
space's first batch, kept through segments, logs and checkpoints."""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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
def test_the_first_batch_fits_its_scales(metric, batch):
    """Scales are positive and finite whatever the batch (all zeros too), no
    element of the batch as stored lies beyond its dimension's scale (the
    first batch is never clipped), and under cosine no scale exceeds 1."""
    scales = quantization.calibrate(batch, metric)
    assert scales.dtype == np.float32 and scales.shape == batch.shape[1:]
    assert np.isfinite(scales).all() and (scales > 0).all()
    rows = batch.astype(np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = rows[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
        assert scales.max() <= 1.0
    assert (np.abs(rows) <= scales * (1 + 1e-6)).all()


def stored_recall(base: np.ndarray, queries: np.ndarray, scales: np.ndarray) -> float:
    """recall@10 of the exact search over the decoded codes of `base`."""
    codes = np.clip(np.rint(base * quantization.codes_per_unit(scales)), -127, 127).astype(np.int8)
    decoded = quantization.decoded(codes, scales)
    found = [naive.exact_knn(decoded, q, 10, "cosine") for q in queries]
    return naive.recall_at_k(found, [naive.exact_knn(base, q, 10, "cosine") for q in queries])


def test_per_dimension_scales_keep_the_neighbours_that_one_scale_loses():
    """On data with a few dimensions much larger than the rest (as some
    sentence embedding models give), the exact search over codes with
    per-dimension scales finds more of the true neighbours than with one
    scale for every dimension (the largest)."""
    data = sentence_like(5100, 384, seed=1)
    base, queries = data[:5000], data[5000:]
    scales = quantization.calibrate(base[:256], "cosine")
    per_dimension = stored_recall(base, queries, scales)
    one_scale = stored_recall(base, queries, np.full_like(scales, scales.max()))
    assert per_dimension >= 0.975 and per_dimension > one_scale + 0.01, (per_dimension, one_scale)


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
