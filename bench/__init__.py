"""Benchmarks: each module runs engram_shm and its peers in one run."""


def unbounded_window(n: int) -> tuple[str, ...]:
    """Server flags for a window that holds n observations, bounded by no
    scan budget: no backpressure, so what is measured is the rate of
    accepting, never a wait for indexing."""
    return ("--ring-capacity", str(n), "--window-budget-ms", "0")
