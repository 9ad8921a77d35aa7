"""How many accepted-but-unindexed observations a space may hold.

A strong recall scans a space's unindexed window exactly, so the window's
size is recall latency. Its bound is the smaller of `ring_capacity` and what
one thread scans within `window_budget_ms`, at the scan rate this machine
measures for the space's dimension and dtype (once per process; the scan is
the recall kernel's own distance loop). Beyond the bound, observe waits
(embedded) or the front refuses credit, as for the ring.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from ..config import EngineConfig
from ..kernels.distance import distances, empty_store
from ..kernels.policy import INT8_MAX
from ..kernels.vectors import check_store_rows
from ..store.layout import STORAGE

MIN_WINDOW = 1024  # never fewer: a window this small costs a scan microseconds
_PROBE_ROWS = 4096


@functools.cache
def scan_ns_per_row(dim: int, dtype: str) -> float:
    """Nanoseconds the exact scan takes per row of `dim` in `dtype` here (the
    best of three passes over a block larger than the L2 cache)."""
    rows = np.random.default_rng(0).normal(size=(_PROBE_ROWS, dim)).astype(np.float32)
    store = empty_store(_PROBE_ROWS, dim, STORAGE[dtype])  # stored as a space stores them
    # int8: with scales, as a space's scan runs (and the only int8 kernel type warmed)
    scales = np.ones(dim, np.float32) if dtype == "int8" else None
    check_store_rows(rows, True, np.inf, store, INT8_MAX if dtype == "int8" else 1.0)
    q = rows[0] / np.linalg.norm(rows[0])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        distances(store, q, "ip", scales)
        best = min(best, (time.perf_counter_ns() - start) / _PROBE_ROWS)
    return best


def window_limit(config: EngineConfig, dim: int, dtype: str) -> int:
    """The most unindexed observations a space of `dim` and `dtype` may hold."""
    if config.window_budget_ms <= 0:
        return config.ring_capacity
    rows = int(config.window_budget_ms * 1e6 / scan_ns_per_row(dim, dtype))
    return min(config.ring_capacity, max(MIN_WINDOW, rows))
