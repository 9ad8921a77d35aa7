"""Index writers: move nodes from a segment's unindexed window into its graph.

A writer claims a segment by compare-and-swap of the segment's WRITER word
from 0 to its token, so a graph never has two writers, whether the writers are
threads of one process or separate processes. It first looks at the segments a
stable hash assigns to it, then steals any other segment with a backlog (the
rebalancing of whole segments); segments a compaction builds come after every
live one. Each claim inserts a chunk sized to take about
`slice_s`, publishes INDEXED, and releases, so an idle writer can take over a
hot segment between chunks.

A writer that dies holding a claim is released by its supervisor
(`release_claims`); the next writer repairs the list the dead one was
rewriting, if any, resumes at INDEXED and re-inserts the half-inserted node
safely (see kernels/hnsw.py).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from .. import faults
from ..kernels import hnsw
from ..kernels.atomics import compare_and_swap
from ..store.catalog import W_BUSY_NS, W_CLAIMED, W_HEARTBEAT_NS, W_INSERTED
from ..store.layout import INDEXED, MAX_LEVEL, WRITER
from ..store.segment import Segment
from .directory import Target

# Yield the core this often within a chunk (kernels/cpu.py): a recall that
# waits behind an index writer waits about this long, not a scheduler tick
# (4 ms). A yield costs about 8 us on the Zen 3 VM (a throwaway in-process
# A/B of 384-d int8 inserts, stop 36: every 0.25 ms 2-4% more CPU, every
# ~1 ms none measurable).
YIELD_S = 1e-3


def token_for(worker: int, incarnation: int) -> int:
    """A claim token unique to one incarnation of one writer (never 0)."""
    return ((incarnation & 0xFFFFFFFF) << 16 | (worker & 0xFFFF)) + 1


def release_claims(segments: list[Segment], token: int) -> int:
    """Free the segments a dead writer held; returns how many."""
    return sum(compare_and_swap(s.header, WRITER, token, 0) == token for s in segments)


class IndexWriter:
    """One index writer. `stats` is its row of the catalog's worker table."""

    def __init__(self, worker: int, workers: int, token: int, stats: np.ndarray,
                 beacon: np.ndarray | None = None, slice_s: float = 0.02):
        self.worker = worker
        self.workers = workers
        self.token = token
        self.stats = stats
        self.slice_s = slice_s
        self.beacon = beacon  # the catalog's recall beacon (beacon.py); None: defer to nothing
        self.deferred_s = 0.0  # slept while recalls ran (metrics)
        self._per_node_s = 1e-4
        self._scratch = hnsw.ScratchCache()
        self.stolen = 0  # claims of segments the hash assigns to another writer (metrics)
        stats[W_CLAIMED] = -1

    def step(self, targets: list[Target]) -> int:
        """Index one chunk of one segment with a backlog; returns the number of
        nodes inserted (0 when there is no work this writer could claim)."""
        self.stats[W_HEARTBEAT_NS] = time.time_ns()
        target = self._claim(targets)
        if target is None:
            return 0
        seg, params = target.segment, target.params
        self.stats[W_CLAIMED] = target.index
        try:
            L = seg.layout
            sc = self._scratch.get(L.capacity, L.dim, L.M, params.ef_construction, MAX_LEVEL)
            lo = seg.indexed
            accepted = seg.accepted
            hnsw.repair(seg.graph_w, accepted, sc)
            hi = min(accepted, lo + max(1, int(self.slice_s / self._per_node_s)))
            start = time.perf_counter_ns()
            deferred = hnsw.insert(seg.w.vectors, seg.w.generation, seg.graph_w, lo, hi,
                                   params.ef_construction, params.metric, sc, seg.scales,
                                   reverse=not faults.SKIP_REVERSE_LINKS,
                                   yield_every=max(1, int(YIELD_S / self._per_node_s)), beacon=self.beacon)
            elapsed = time.perf_counter_ns() - start - int(deferred * 1e9)  # the time spent inserting
            seg.header[INDEXED] = hi  # publish after the kernel returned: its stores are done
        finally:
            self.stats[W_CLAIMED] = -1
            seg.header[WRITER] = 0
        if hi > lo:
            self._per_node_s = 0.7 * self._per_node_s + 0.3 * max(elapsed * 1e-9 / (hi - lo), 1e-7)
        self.deferred_s += deferred
        self.stats[W_INSERTED] += hi - lo
        self.stats[W_BUSY_NS] += elapsed
        return hi - lo

    def _claim(self, targets: list[Target]) -> Target | None:
        waiting = [t for t in targets if t.segment.backlog > 0 and t.segment.writer == 0]
        # Live windows first (strong recalls scan them); a compaction's build
        # takes what is left.
        for group in ([t for t in waiting if not t.building], [t for t in waiting if t.building]):
            mine = [t for t in group if self.owner_of(t.segment) == self.worker]
            others = sorted((t for t in group if self.owner_of(t.segment) != self.worker),
                            key=lambda t: -t.segment.backlog)
            for t in mine + others:
                if compare_and_swap(t.segment.header, WRITER, 0, self.token) == 0:
                    self.stolen += self.owner_of(t.segment) != self.worker
                    return t
        return None

    def owner_of(self, seg: Segment) -> int:
        """The writer a stable hash assigns the segment to."""
        return zlib.crc32(seg.name.encode()) % self.workers
