import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engram_shm.kernels.heap import (
    RANK_SORT_MAX,
    heap_pop,
    heap_push,
    heap_sort_ascending,
    topk_finish,
    topk_push,
)

keys = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), max_size=200)


@given(keys)
def test_heap_pops_in_order(ks):
    k = np.empty(len(ks) + 1, np.float32)
    v = np.empty(len(ks) + 1, np.int32)
    size = 0
    for i, key in enumerate(ks):
        size = heap_push(k, v, size, np.float32(key), np.int32(i))
    out = []
    while size:
        out.append((k[0], v[0]))
        size = heap_pop(k, v, size)
    assert [x for x, _ in out] == sorted(np.float32(x) for x in ks)
    assert sorted(i for _, i in out) == list(range(len(ks)))


@given(keys, st.integers(1, 50))
def test_topk_is_the_k_smallest(ks, k):
    neg = np.empty(k, np.float32)
    ids = np.empty(k, np.int32)
    size = 0
    for i, key in enumerate(ks):
        size = topk_push(neg, ids, size, k, np.float32(key), np.int32(i))
    topk_finish(neg, ids, size)
    want = np.sort(np.array(ks, np.float32))[:k]
    np.testing.assert_array_equal(neg[:size], want)
    np.testing.assert_array_equal(np.array(ks, np.float32)[ids[:size]], want)


SORT_KEYS = st.one_of(st.sampled_from([0.0, 1.0, float("inf"), float("-inf"), float("nan")]),
                      st.floats(-1e6, 1e6, width=32))


# The size drawn first: hypothesis's own list sizes stay far below the limit.
@given(st.integers(0, RANK_SORT_MAX + 40).flatmap(lambda n: st.lists(SORT_KEYS, min_size=n, max_size=n)))
def test_sort_ascending_is_a_permutation_in_order(ks):
    """Ties, infinities and sizes on both sides of the rank sort's limit;
    with NaN (no order) the output must still hold every item once."""
    n = len(ks)
    k = np.empty(n + 1, np.float32)
    v = np.empty(n + 1, np.int32)
    size = 0
    for i, key in enumerate(ks):
        size = heap_push(k, v, size, -np.float32(key), np.int32(i))
    out_k = np.full(n + 1, 7.0, np.float32)
    out_v = np.full(n + 1, -1, np.int32)
    heap_sort_ascending(k, v, size, out_k, out_v)
    assert sorted(out_v[:n]) == list(range(n))
    np.testing.assert_array_equal(out_k[:n], np.array(ks, np.float32)[out_v[:n]])
    if not np.isnan(np.array(ks, np.float32)).any():
        assert (out_k[1:n] >= out_k[:n - 1]).all()
