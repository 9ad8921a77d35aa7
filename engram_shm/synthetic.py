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


def sentence_like(n: int, dim: int = 384, topics: int | None = None, latent: int = 128, seed: int = 0):
    """n unit float32 vectors with the structure of sentence embeddings
    (the shape of MiniLM-style models' output): anisotropic, with a common
    direction every vector shares (random pairs have cosine about 0.2, not
    0), a spectrum that decays (most variance in a few dozen directions, a
    low intrinsic dimension), a handful of dimensions much larger than the
    rest, and topics nested in themes (neighbours differ by small moves in a
    low-dimensional space, plus per-sentence noise)."""
    rng = np.random.default_rng(seed)
    latent = min(latent, dim)
    topics = topics or max(8, n // 50)
    themes = max(2, topics // 20)
    # Latent space: themes, topics around them, sentences around topics.
    theme_centres = rng.normal(size=(themes, latent))
    topic_centres = theme_centres[rng.integers(0, themes, topics)] + 0.7 * rng.normal(size=(topics, latent))
    z = topic_centres[rng.integers(0, topics, n)] + 0.6 * rng.normal(size=(n, latent))
    # Into `dim` through a map whose singular values decay like a power law.
    basis, _ = np.linalg.qr(rng.normal(size=(dim, latent)))
    x = (z * (np.arange(1, latent + 1) ** -0.5)) @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x += 0.3 * _unit(rng.normal(size=dim))  # the shared direction
    x += rng.normal(scale=0.5 / np.sqrt(dim), size=(n, dim))  # what the latent space does not explain
    outliers = rng.choice(dim, size=max(1, dim // 96), replace=False)
    x[:, outliers] *= 4.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)
