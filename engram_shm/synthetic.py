"""Synthetic embeddings shaped like real ones: clustered, unit-norm."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int, clusters: int = 100, spread: float = 0.6, seed: int = 0,
              labels: bool = False):
    """n unit float32 vectors around `clusters` random centres; `spread` is the
    noise per dimension relative to the centres' (1.0 per dimension). Queries
    are best drawn as extra rows of the same call (held out from the data).
    With `labels`, also returns each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    cluster = rng.integers(0, clusters, n)
    x = centres[cluster]
    x += rng.normal(scale=spread, size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x, cluster) if labels else x
