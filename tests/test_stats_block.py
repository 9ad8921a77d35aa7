"""The stats block's histograms against a naive one (numpy over the raw
observations), and its layout shared between a writer and an attached
reader."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engram_shm.observability.stats_block import LATENCY_BOUNDS, Histogram, StatsBlock, latency_summary

values = st.lists(st.floats(0, 20, allow_nan=False), max_size=60)


def naive_cumulative(observations: list[float]) -> list[int]:
    """Prometheus's buckets: how many observations are <= each bound, then all."""
    seen = np.asarray(observations, dtype=np.float64)
    return [int((seen <= bound).sum()) for bound in LATENCY_BOUNDS] + [len(seen)]


@given(values)
def test_buckets_count_like_prometheus(observations):
    h = Histogram(np.zeros(len(LATENCY_BOUNDS) + 2, np.int64), LATENCY_BOUNDS, 1e9)
    for v in observations:
        h.observe(v)
    buckets, total, count = h.buckets()
    assert [c for _, c in buckets] == naive_cumulative(observations)
    assert buckets[-1][0] == "+Inf" and count == len(observations)
    assert abs(total - sum(observations)) <= 1e-9 * len(observations) + 1e-6


@given(values.filter(bool), st.sampled_from([0.5, 0.9, 0.99]))
def test_quantiles_lie_in_the_bucket_of_the_true_quantile(observations, q):
    h = Histogram(np.zeros(len(LATENCY_BOUNDS) + 2, np.int64), LATENCY_BOUNDS, 1e9)
    for v in observations:
        h.observe(v)
    true = float(np.sort(observations)[max(0, int(np.ceil(q * len(observations))) - 1)])
    bounds = (0.0, *LATENCY_BOUNDS)
    below = max([b for b in bounds if b < true], default=0.0)
    above = min([b for b in LATENCY_BOUNDS if b >= true], default=LATENCY_BOUNDS[-1])
    assert below <= h.quantile(q) <= above, (true, h.quantile(q))


def test_weighted_observations_count_each_observation():
    block = StatsBlock.private(2, 1)
    block.observe_latency.observe(0.003, 10)
    assert latency_summary([block.observe_latency])["count"] == 10
    assert block.observe_latency.buckets()[1] == 0.03


def test_a_writer_and_an_attached_reader_share_the_words():
    block = StatsBlock.create("t-stats-share", spaces=3, workers=2)
    try:
        other = StatsBlock.attach("t-stats-share", spaces=99, workers=99)  # its shape comes from the block
        try:
            assert (other.slots, other.n_workers) == (4, 2)
            other.accepted[other.slot(7), 1] += 5  # past the 3 labelled slots: "other"
            other.batch_sizes[1].observe(300)
            assert block.accepted[3, 1] == 5 and block.batch_sizes[1].buckets()[2] == 1
        finally:
            other.close()
    finally:
        block.close()
