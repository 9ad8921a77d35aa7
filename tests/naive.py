"""Reference implementations: the simplest correct NumPy version of what each
kernel does. Fast code is tested against these."""

from __future__ import annotations

import numpy as np

from engram_shm.store.graphcheck import count_word, graph_violations, links, list_of  # noqa: F401 (the oracle lives there)


def as_f32(store: np.ndarray) -> np.ndarray:
    """Stored rows (float32, or float16 bits as uint16) as float64 values."""
    if store.dtype == np.uint16:
        return store.view(np.float16).astype(np.float64)
    return store.astype(np.float64)


def int8_factor(values: np.ndarray, codes: np.ndarray, quant: np.ndarray, least_squares: bool) -> np.ndarray:
    """The factors of int8 rows (quantization.py): with v the rows in code
    units and weights 1 / quant^2, v.v / v.c (the decoded row's dot with the
    row is the row's own) or v.c / c.c (least squares); 0 for a zero row."""
    v = values * quant
    w = 1.0 / quant ** 2
    a, b, c = (v * v * w).sum(axis=1), (v * codes * w).sum(axis=1), (codes * codes * w).sum(axis=1)
    with np.errstate(all="ignore"):
        return np.where(b > 0, (b / c) if least_squares else (a / b), 0.0)


def int8_codes(values: np.ndarray, quant: np.ndarray) -> np.ndarray:
    """Rows as int8 codes: in code units (values * quant), each row's largest
    element at +-127, rounded half up."""
    v = values * quant
    top = np.abs(v).max(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        return np.where(top > 0, np.floor(v * (127 / top) + 0.5), 0.0)


def int8_rows(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """int8 rows as a store holds them: codes, then the row's float32 factor."""
    tail = np.asarray(factors, np.float32).reshape(-1, 1).view(np.int8)
    return np.ascontiguousarray(np.concatenate([codes.astype(np.int8), tail], axis=1))


def distances(store: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    x = as_f32(store)
    q = q.astype(np.float64)
    if metric == "l2":
        return ((x - q) ** 2).sum(axis=1)
    return 1.0 - x @ q


def exact_knn(store: np.ndarray, q: np.ndarray, k: int, metric: str, mask=None) -> np.ndarray:
    d = distances(store, q, metric)
    if mask is not None:
        d = np.where(mask, d, np.inf)
    order = np.argsort(d, kind="stable")[:k]
    return order[np.isfinite(d[order])]


def recall_at_k(found: list[np.ndarray], exact: list[np.ndarray]) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / max(1, sum(len(e) for e in exact))


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def levels(seed: int, generations: np.ndarray, M: int, max_level: int) -> np.ndarray:
    """HNSW levels from splitmix64(seed, generation), in numpy uint64 arithmetic."""
    with np.errstate(over="ignore"):
        z = generations.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = 1.0 - (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.minimum(np.floor(-np.log(u) / np.log(M)), max_level).astype(np.int32)


class IdIndex:
    """The id index as a dict of lists: hash -> refs (segment number << 32 |
    slot) of the rows holding it, buried rows left out."""

    BURIED = np.iinfo(np.uint64).max

    def __init__(self):
        self.refs: dict[int, list[int]] = {}

    def insert_rows(self, id_hash: np.ndarray, generation: np.ndarray, segment_no: int, lo: int,
                    hi: int) -> None:
        for s in range(lo, hi):
            if int(generation[s]) != self.BURIED:
                self.refs.setdefault(int(id_hash[s]), []).append(segment_no << 32 | s)

    def lookup(self, query) -> list[tuple[int, int]]:
        """Every (query row, ref) whose row holds the query row's hash."""
        return sorted((row, ref) for row, h in enumerate(query) for ref in self.refs.get(int(h), []))

    def __len__(self) -> int:
        return sum(map(len, self.refs.values()))
