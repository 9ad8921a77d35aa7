"""Graph integrity of one segment's HNSW arrays: the invariants the insert
kernel keeps (kernels/hnsw.py), checked the simplest way, in NumPy and
Python. The kernels' tests use it as their oracle after every insert
sequence, and the chaos suite on every segment of a live engine after its
faults (chaos/validators.py)."""

from __future__ import annotations

from collections import deque

import numpy as np

from .layout import STABLE_SHIFT


def count_word(row: np.ndarray) -> tuple[int, int]:
    """(links, length of the stable prefix) of a list's count word."""
    word = int(row[0])
    return word & ((1 << STABLE_SHIFT) - 1), word >> STABLE_SHIFT


def links(row: np.ndarray) -> list[int]:
    return row[1:1 + count_word(row)[0]].tolist()


def list_of(g, node: int, layer: int) -> np.ndarray:
    """The link list (count word first) of `node` on `layer`: upper layers
    take one row each, from the node's upper_row (layout.py)."""
    return g.links0[node] if layer == 0 else g.upper[g.upper_row[node] + layer - 1]


def graph_violations(g, n: int, M: int) -> list[str]:
    """Every broken HNSW invariant of a graph holding nodes [0, n): links are
    published nodes, no self-links or duplicates, degrees within 2M (layer 0)
    and M (upper layers), upper links only to nodes on that layer, and every
    node reachable on layer 0 from the entry point; a stable prefix no longer
    than its list."""
    bad = []
    for node in range(n):
        for layer in range(0, int(g.level[node]) + 1):
            if layer > 0 and g.upper_row[node] < 0:
                bad.append(f"node {node} of level {g.level[node]} has no upper row")
                break
            row, limit = list_of(g, node, layer), (2 * M if layer == 0 else M)
            degree, stable = count_word(row)
            if row[0] < 0 or degree > limit or stable > degree:
                bad.append(f"node {node} layer {layer} degree {degree} outside [0, {limit}] "
                           f"or stable prefix {stable} longer")
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
