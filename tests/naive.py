"""Reference implementations: the simplest correct NumPy version of what each
kernel does. Fast code is tested against these."""

from __future__ import annotations

from collections import deque

import numpy as np


def as_f32(store: np.ndarray) -> np.ndarray:
    """Stored rows (float32, or float16 bits as uint16) as float64 values."""
    if store.dtype == np.uint16:
        return store.view(np.float16).astype(np.float64)
    return store.astype(np.float64)


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


def links(row: np.ndarray) -> list[int]:
    return row[1:1 + row[0]].tolist()


def graph_violations(g, n: int, M: int) -> list[str]:
    """Every broken HNSW invariant of a graph holding nodes [0, n): links are
    published nodes, no self-links or duplicates, degrees within 2M (layer 0)
    and M (upper layers), upper links only to nodes on that layer, and every
    node reachable on layer 0 from the entry point."""
    bad = []
    for node in range(n):
        for layer in range(0, int(g.level[node]) + 1):
            if layer == 0:
                row, limit = g.links0[node], 2 * M
            else:
                r = g.upper_row[node]
                if r < 0:
                    bad.append(f"node {node} of level {g.level[node]} has no upper row")
                    break
                row, limit = g.upper[r, layer - 1], M
            if not 0 <= row[0] <= limit:
                bad.append(f"node {node} layer {layer} degree {row[0]} outside [0, {limit}]")
                continue
            ls = links(row)
            if len(set(ls)) != len(ls):
                bad.append(f"node {node} layer {layer} has duplicate links {ls}")
            for x in ls:
                if not 0 <= x < n:
                    bad.append(f"node {node} layer {layer} links unpublished node {x}")
                elif x == node:
                    bad.append(f"node {node} layer {layer} links itself")
                elif g.level[x] < layer:
                    bad.append(f"node {node} layer {layer} links {x} of level {g.level[x]}")
    if n == 0:
        return bad
    entry = int(g.state[0])
    if entry < 0:
        return bad + ["graph with nodes has no entry point"]
    ep, top = entry & 0xFFFFFFFF, entry >> 32
    if not 0 <= ep < n or top != g.level[ep] or top != g.level[:n].max():
        bad.append(f"entry {ep} at level {top} is not a top-level published node")
        return bad
    seen = np.zeros(n, bool)
    seen[ep] = True
    todo = deque([ep])
    while todo:
        for x in links(g.links0[todo.popleft()]):
            if 0 <= x < n and not seen[x]:
                seen[x] = True
                todo.append(x)
    if not seen.all():
        bad.append(f"{int((~seen).sum())} nodes unreachable from the entry point, e.g. "
                   f"{np.nonzero(~seen)[0][:5].tolist()}")
    return bad


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
