"""Benchmarks: each module runs engram_shm and its peers in one run."""
