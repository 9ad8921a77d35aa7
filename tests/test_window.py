import numpy as np
import pytest

from engram_shm import Engine
from engram_shm.config import EngineConfig
from engram_shm.engine.window import MIN_WINDOW, scan_ns_per_row, window_limit


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
def test_the_window_is_what_the_budget_scans_within_the_ring(dtype):
    ns = scan_ns_per_row(384, dtype)
    assert 0 < ns < 1e5
    ring = 1 << 20
    wide = window_limit(EngineConfig(ring_capacity=ring, window_budget_ms=50.0), 384, dtype)
    assert wide == min(ring, max(MIN_WINDOW, int(50e6 / ns)))
    assert window_limit(EngineConfig(ring_capacity=ring, window_budget_ms=0), 384, dtype) == ring
    assert window_limit(EngineConfig(ring_capacity=5000, window_budget_ms=1e5), 384, dtype) == 5000
    assert window_limit(EngineConfig(ring_capacity=ring, window_budget_ms=1e-6), 384, dtype) == MIN_WINDOW


def test_a_space_holds_no_more_unindexed_rows_than_its_limit():
    """With the writers stopped, observe fills the window up to the limit the
    budget sets, and the next batch waits, then fails Overloaded; stats show
    the limit and the pressure."""
    from engram_shm.errors import Overloaded

    data = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    with Engine(workers=1, window_budget_ms=1e-6, observe_timeout_s=0.2) as e:
        e._indexing.stop()  # nothing leaves the window
        e.observe("w", [str(i) for i in range(MIN_WINDOW)], data[:MIN_WINDOW])
        space = e.stats()["spaces"]["w"]
        assert space["window_limit"] == MIN_WINDOW and space["pressure"] == 1.0
        with pytest.raises(Overloaded):
            e.observe("w", "one more", data[MIN_WINDOW])
