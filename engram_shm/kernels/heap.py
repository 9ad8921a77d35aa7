"""Fixed-capacity binary min-heaps on parallel key/value arrays.

A max-heap of distances is a min-heap of negated distances: one implementation
serves both the candidate queue and the bounded result set. Callers own the
arrays and track the size; every function returns the new size.
"""

import numpy as np

from .policy import uncounted_kernel

# Heap positions are unsigned: Numba wraps a signed index that may be
# negative around the array's end, a shift, a mask and an add per access
# of the sift loops (which never index below 0).
_ONE = np.uint64(1)


@uncounted_kernel
def _sift_down(keys, vals, start, size):
    i = np.uint64(start)
    n = np.uint64(size)
    key = keys[i]
    val = vals[i]
    while True:
        child = i + i + _ONE
        if child >= n:
            break
        right = child + _ONE
        if right < n:  # the smaller child without a branch on the keys: one would miss half the time
            child += np.uint64(keys[right] < keys[child])
        if keys[child] >= key:
            break
        keys[i] = keys[child]
        vals[i] = vals[child]
        i = child
    keys[i] = key
    vals[i] = val


@uncounted_kernel
def heap_push(keys, vals, size, key, val):
    i = np.uint64(size)
    while i != np.uint64(0):
        parent = (i - _ONE) >> _ONE
        if keys[parent] <= key:
            break
        keys[i] = keys[parent]
        vals[i] = vals[parent]
        i = parent
    keys[i] = key
    vals[i] = val
    return size + 1


@uncounted_kernel
def heap_pop(keys, vals, size):
    """Drop the root (read keys[0], vals[0] first)."""
    size -= 1
    if size > 0:
        keys[0] = keys[size]
        vals[0] = vals[size]
        _sift_down(keys, vals, 0, size)
    return size


@uncounted_kernel
def heap_replace_top(keys, vals, size, key, val):
    keys[0] = key
    vals[0] = val
    _sift_down(keys, vals, 0, size)


@uncounted_kernel
def heap_sort_descending(keys, vals, size):
    """Sort a heap in place into descending key order (ascending distance for
    a heap of negated distances)."""
    for end in range(size - 1, 0, -1):
        k = keys[0]
        v = vals[0]
        keys[0] = keys[end]
        vals[0] = vals[end]
        keys[end] = k
        vals[end] = v
        _sift_down(keys, vals, 0, end)


# Up to this many keys a rank sort beats the heap sort (in a throwaway
# benchmark, stop 33: half the time at 100 random keys, even at 200).
RANK_SORT_MAX = 160


@uncounted_kernel
def heap_sort_ascending(neg_keys, vals, size, out_k, out_v):
    """A heap of negated distances as ascending distances in out_k/out_v
    (separate arrays, at least `size` long). Up to RANK_SORT_MAX keys each
    goes straight to its rank, the number of keys before it in the order
    (ties by position): size^2 comparisons, vectorised, against a heap
    sort's branches, half of which mispredict. NaN keys have no rank (they
    would collide): then, and for more keys, the heap sort."""
    ordered = size <= RANK_SORT_MAX
    for i in range(size):
        ordered &= neg_keys[i] == neg_keys[i]
    if not ordered:
        heap_sort_descending(neg_keys, vals, size)
        for i in range(size):
            out_k[i] = -neg_keys[i]
            out_v[i] = vals[i]
        return
    for i in range(size):
        key = neg_keys[i]
        rank = 0
        for j in range(size):
            rank += neg_keys[j] > key
        for j in range(i):
            rank += neg_keys[j] == key
        out_k[rank] = -key
        out_v[rank] = vals[i]


@uncounted_kernel
def topk_push(neg_keys, vals, size, k, dist, val):
    """Offer (dist, val) to a bounded top-k (smallest distances) kept as a heap of
    negated distances; returns the new size."""
    if size < k:
        return heap_push(neg_keys, vals, size, -dist, val)
    if dist < -neg_keys[0]:
        heap_replace_top(neg_keys, vals, size, -dist, val)
    return size


@uncounted_kernel
def topk_finish(neg_keys, vals, size):
    """Turn a top-k heap into distances in ascending order, in place."""
    heap_sort_descending(neg_keys, vals, size)
    for i in range(size):
        neg_keys[i] = -neg_keys[i]


INF = np.float32(np.inf)
