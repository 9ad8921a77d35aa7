"""The writer side of a memory space: routes validated batches into segments,
writes them, and publishes them.

A space keeps up to `writers` open segments (one per index writer), so that a
single hot space is indexed by every core; chunks of a batch go to the open
segment with the smallest unindexed window, and a new segment opens when every
open one already has a chunk's worth of backlog. Full segments are sealed.

Writes follow the publication order of DESIGN 3: every column of a slot is
written before the segment's ACCEPTED count covers it. The caller publishes the
committed generation after `append` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DuplicateId
from ..kernels.ids import fnv1a
from ..kernels.policy import METRIC_CODES
from ..kernels.vectors import store_rows
from ..observations import Batch
from .catalog import Catalog, SpaceParams, segment_name
from .layout import (
    ACCEPTED,
    ARENA_USED,
    MAX_GEN,
    MAX_LEVEL,
    MIN_GEN,
    SEALED,
    SEGMENT_NO,
    UPPER_USED,
    SegmentLayout,
)
from .segment import Segment

CHUNK = 256
BURIED = np.iinfo(np.uint64).max  # the generation of a row no snapshot will ever include


def draw_levels(seed: int, generations: np.ndarray, M: int) -> np.ndarray:
    """HNSW levels, floor(-ln(U) / ln(M)) capped at MAX_LEVEL, with U drawn by
    splitmix64 from (seed, generation): the same observation always gets the
    same level, so re-inserting after a crash or replaying a log rebuilds the
    same graph shape."""
    with np.errstate(over="ignore"):
        z = generations.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = 1.0 - (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # (0, 1]
    levels = np.floor(-np.log(u) / np.log(M))
    return np.minimum(levels, MAX_LEVEL).astype(np.int32)


@dataclass
class _Cursor:
    """Where the next rows of a segment go, before they are published."""
    slot: int
    arena: int
    upper: int


@dataclass
class _Placement:
    segment: Segment
    lo: int  # batch rows [lo, hi)
    hi: int
    at: _Cursor


class SpaceWriter:
    def __init__(self, catalog: Catalog, index: int, params: SpaceParams, capacity: int,
                 arena_capacity: int, writers: int, on_new_segment: Callable[[int, Segment], None]):
        self.catalog = catalog
        self.index = index
        self.params = params
        self.layout = SegmentLayout(capacity, params.dim, params.dtype, params.M, arena_capacity)
        self.writers = writers
        self.on_new_segment = on_new_segment
        self.segments: list[Segment] = []
        self.open: list[Segment] = []
        self.ids: dict[str, int] = {}  # id -> (segment number << 32) | slot

    @property
    def count(self) -> int:
        return sum(s.accepted for s in self.segments)

    @property
    def indexed(self) -> int:
        return sum(s.indexed for s in self.segments)

    @property
    def window(self) -> int:
        """Accepted but not yet indexed observations."""
        return sum(s.backlog for s in self.segments)

    def adopt(self, seg: Segment) -> None:
        """Take over a segment written before (a restarted writer): its ids,
        and its place among the open segments unless sealed."""
        self.segments.append(seg)
        if not seg.sealed:
            self.open.append(seg)
        n = seg.accepted
        if n:
            number = int(seg.header[SEGMENT_NO])
            self.ids.update(zip(seg.ids(np.arange(n)), ((number << 32) + np.arange(n)).tolist()))

    def bury_uncommitted(self, committed: int) -> int:
        """Hide rows published past the committed generation (a batch cut short
        by a crash) for good, release their ids; returns the highest generation
        found."""
        highest = 0
        for seg in self.segments:
            gens = seg.w.generation[:seg.accepted]
            live = gens != BURIED
            if not live.any():
                continue
            highest = max(highest, int(gens[live].max()))
            orphans = np.nonzero(live & (gens > committed))[0]
            if len(orphans):
                for ident in seg.ids(orphans):
                    self.ids.pop(ident, None)
                gens[orphans] = BURIED
        return highest

    def check_new_ids(self, ids: list[str]) -> None:
        if not self.ids.keys().isdisjoint(ids):
            dup = next(i for i in ids if i in self.ids)
            raise DuplicateId(f"id {dup!r} is already stored in space {self.params.name!r}", id=dup)

    def append(self, batch: Batch, first_generation: int) -> list[tuple[Segment, int]]:
        """Store a validated batch with generations first_generation.. (ids must
        have passed `check_new_ids`); returns (segment, end slot) per placement.
        Raises before writing anything if a needed segment cannot be created."""
        generations = np.arange(first_generation, first_generation + batch.n, dtype=np.uint64)
        levels = draw_levels(self.params.seed, generations, self.params.M)
        placements, full = self._plan(batch, levels)
        for p in placements:
            self._write(p, batch, generations, levels)
        for p in placements:
            self._publish(p, generations)
        for seg in self.open[:]:
            if id(seg) in full or seg.accepted == self.layout.capacity:
                seg.header[SEALED] = 1
                self.open.remove(seg)
        positions = np.concatenate([
            (np.int64(p.segment.header[SEGMENT_NO]) << 32) + np.arange(p.at.slot, p.at.slot + p.hi - p.lo)
            for p in placements])
        self.ids.update(zip(batch.ids, positions.tolist()))
        return [(p.segment, p.at.slot + p.hi - p.lo) for p in placements]

    # -- planning --------------------------------------------------------------
    def _plan(self, batch: Batch, levels: np.ndarray) -> tuple[list[_Placement], set[int]]:
        """Where each chunk goes, and the (ids of) segments found full."""
        upper_cum = np.concatenate([[0], np.cumsum(levels > 0)])
        ends = batch.record_ends
        cursors: dict[int, _Cursor] = {}
        full: set[int] = set()
        placements = []
        lo = 0
        while lo < batch.n:
            hi = min(batch.n, lo + CHUNK)
            seg = self._route(cursors, full)
            at = cursors.setdefault(id(seg), _Cursor(seg.accepted, int(seg.header[ARENA_USED]),
                                                     int(seg.header[UPPER_USED])))
            start = int(ends[lo - 1]) if lo else 0
            m = min(hi - lo, self.layout.capacity - at.slot,
                    int(np.searchsorted(ends[lo:hi] - start, self.layout.arena_capacity - at.arena,
                                        side="right")),
                    int(np.searchsorted(upper_cum[lo + 1:hi + 1] - upper_cum[lo],
                                        self.layout.upper_capacity - at.upper, side="right")))
            if m < hi - lo:
                full.add(id(seg))
            if m == 0:
                continue
            placements.append(_Placement(seg, lo, lo + m, _Cursor(at.slot, at.arena, at.upper)))
            at.slot += m
            at.arena += int(ends[lo + m - 1]) - start
            at.upper += int(upper_cum[lo + m] - upper_cum[lo])
            lo += m
        return placements, full

    def _route(self, cursors: dict[int, _Cursor], full: set[int]) -> Segment:
        """The open segment with the smallest window (counting rows planned),
        or a new one when all have a chunk of backlog and a writer is free."""
        def load(seg):
            at = cursors.get(id(seg))
            return (at.slot if at else seg.accepted) - seg.indexed

        candidates = [s for s in self.open if id(s) not in full]
        best = min(candidates, key=load, default=None)
        if best is None or (load(best) >= CHUNK and len(candidates) < self.writers):
            best = self._new_segment()
        return best

    def _new_segment(self) -> Segment:
        index = self.catalog.reserve_segment()
        seg = Segment.create(segment_name(self.catalog.engine, index), self.layout,
                             METRIC_CODES[self.params.metric], self.index,
                             len(self.segments))
        self.segments.append(seg)
        self.open.append(seg)
        self.on_new_segment(index, seg)  # before the catalog publishes it
        self.catalog.add_segment(index, self.index, len(self.segments) - 1)
        return seg

    # -- writing -----------------------------------------------------------------
    def _write(self, p: _Placement, batch: Batch, generations: np.ndarray, levels: np.ndarray) -> None:
        w = p.segment.w
        lo, hi = p.lo, p.hi
        slots = slice(p.at.slot, p.at.slot + hi - lo)
        store_rows(batch.vectors[lo:hi], batch.scale[lo:hi], w.vectors[slots])
        w.generation[slots] = generations[lo:hi]
        w.when[slots] = batch.when[lo:hi]
        w.confidence[slots] = batch.confidence[lo:hi]
        ends = batch.record_ends
        start = int(ends[lo - 1]) if lo else 0
        starts = np.concatenate([[start], ends[lo:hi - 1]])
        w.id_hash[slots] = fnv1a(batch.records, starts, batch.id_lens[lo:hi])
        w.text_end[slots] = ends[lo:hi] - start + p.at.arena
        w.arena[p.at.arena:p.at.arena + int(ends[hi - 1]) - start] = batch.records[start:ends[hi - 1]]
        w.id_len[slots] = batch.id_lens[lo:hi]
        lv = levels[lo:hi]
        w.level[slots] = lv
        w.upper_row[slots] = np.where(lv > 0, p.at.upper + np.cumsum(lv > 0) - 1, -1)

    def _publish(self, p: _Placement, generations: np.ndarray) -> None:
        header, w = p.segment.header, p.segment.w
        end = p.at.slot + p.hi - p.lo
        if p.at.slot == 0:
            header[MIN_GEN] = generations[p.lo]
        header[MAX_GEN] = generations[p.hi - 1]
        header[ARENA_USED] = int(w.text_end[end - 1])
        header[UPPER_USED] = p.at.upper + int((w.level[p.at.slot:end] > 0).sum())
        header[ACCEPTED] = end  # last: the rows become visible
