"""Index writers: move nodes from a segment's unindexed window into its graph.

A writer claims a segment by compare-and-swap of the segment's WRITER word
from 0 to its token, so a graph never has two writers, whether the writers are
threads of one process or separate processes. It first looks at the segments a
stable hash assigns to it, then steals any other segment with a backlog (the
rebalancing of whole segments). Each claim inserts a chunk sized to take about
`slice_s`, publishes INDEXED, and releases, so an idle writer can take over a
hot segment between chunks. A writer that dies holding a claim is released by
whoever restarts it (`release_dead`); the next writer resumes at INDEXED and
re-inserts the half-inserted node safely (see kernels/hnsw.py).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

from ..kernels import hnsw
from ..kernels.atomics import compare_and_swap
from ..store.catalog import SpaceParams
from ..store.layout import INDEXED, WRITER
from ..store.segment import Segment


@dataclass
class Target:
    """A segment an index writer may work on, with its space's parameters."""
    index: int  # catalog segment index
    segment: Segment
    params: SpaceParams


def token_for(worker: int, incarnation: int) -> int:
    """A claim token unique to one incarnation of one writer (never 0)."""
    return ((incarnation & 0xFFFFFFFF) << 16 | (worker & 0xFFFF)) + 1


def release_dead(targets: list[Target], token: int) -> int:
    """Free the segments a dead writer held; returns how many."""
    return sum(compare_and_swap(t.segment.header, WRITER, token, 0) == token for t in targets)


@dataclass
class IndexWriter:
    worker: int
    workers: int
    token: int
    slice_s: float = 0.02
    inserted: int = 0
    busy_s: float = 0.0
    _per_node_s: float = 1e-4
    _scratch: dict = field(default_factory=dict)

    def step(self, targets: list[Target]) -> int:
        """Index one chunk of one segment with a backlog; returns the number of
        nodes inserted (0 when there is no work this writer could claim)."""
        target = self._claim(targets)
        if target is None:
            return 0
        seg = target.segment
        try:
            lo = seg.indexed
            hi = min(seg.accepted, lo + max(1, int(self.slice_s / self._per_node_s)))
            if hi <= lo:
                return 0
            start = time.perf_counter()
            hnsw.insert(seg.w.vectors, seg.w.generation, seg.graph_w, lo, hi,
                        target.params.ef_construction, target.params.metric, self._scratch_for(seg, target.params))
            elapsed = time.perf_counter() - start
            seg.header[INDEXED] = hi  # publish after the kernel returned: its stores are done
        finally:
            seg.header[WRITER] = 0
        self._per_node_s = 0.7 * self._per_node_s + 0.3 * max(elapsed / (hi - lo), 1e-7)
        self.inserted += hi - lo
        self.busy_s += elapsed
        return hi - lo

    def _claim(self, targets: list[Target]) -> Target | None:
        waiting = [t for t in targets if t.segment.backlog > 0 and t.segment.writer == 0]
        mine = [t for t in waiting if self.owner_of(t) == self.worker]
        others = sorted((t for t in waiting if self.owner_of(t) != self.worker),
                        key=lambda t: -t.segment.backlog)
        for t in mine + others:
            if compare_and_swap(t.segment.header, WRITER, 0, self.token) == 0:
                return t
        return None

    def owner_of(self, t: Target) -> int:
        """The writer a stable hash assigns the segment to."""
        return zlib.crc32(t.segment.name.encode()) % self.workers

    def _scratch_for(self, seg: Segment, params: SpaceParams) -> hnsw.Scratch:
        layout = seg.layout
        key = (layout.capacity, layout.dim, layout.M, params.ef_construction)
        sc = self._scratch.get(key)
        if sc is None:
            sc = self._scratch[key] = hnsw.new_scratch(layout.capacity, layout.dim, layout.M,
                                                       params.ef_construction)
        return sc
