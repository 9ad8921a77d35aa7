"""The writer side of a memory space: routes validated batches into segments,
writes them, and publishes them.

A space keeps up to `writers` open segments (one per index writer), so that a
single hot space is indexed by every core; chunks of a batch go to the open
segment with the smallest unindexed window, and a new segment opens when every
open one already has a chunk's worth of backlog. Full segments are sealed.
Segments are sized to the data (`SegmentSizes`): a space's first is small and
each next one larger, up to the configured capacity.

Writes follow the publication order of DESIGN 3: every column of a slot is
written before the segment's ACCEPTED count covers it. The caller publishes the
committed generation after `append` returns.

Ids are unique per space. The writer finds stored ids through an id index
(kernels/idindex.py): a hash table over the segments' id_hash column, held in
the writer's memory and rebuilt from those columns when a writer adopts
segments (a restart), without decoding any id; a merge moves rows without
a rebuild (`_swap`). Only an id whose hash is
already present is compared with the stored id, so two ids with one hash are
both stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DuplicateId
from ..kernels import idindex
from ..kernels.idindex import BURIED
from ..kernels.policy import METRIC_CODES
from ..kernels.rows import append_rows, draw_levels
from ..kernels.vectors import ROW_OK
from ..observations import Batch, raise_bad_row, vector_rule
from . import compaction, quantization, shm
from .catalog import BUILDING, G_MERGED_INTO, LIVE, RETIRED, Catalog, SpaceParams, segment_name
from .layout import (
    ACCEPTED,
    ARENA_USED,
    MAX_LEVEL,
    MIN_GEN,
    SEALED,
    SEGMENT_NO,
    UPPER_USED,
    SegmentLayout,
    raise_max_gen,
)
from .prefault import Prefaulter
from .segment import Segment

log = logging.getLogger(__name__)

CHUNK = 256
_LOW32 = 0xFFFFFFFF

# The size schedule of a space's segments: its first segment has
# first_segment_capacity slots (config, default 64) and each next one
# SEGMENT_GROWTH times more, up to segment_capacity.
# Why: creating a segment touches memory in proportion to its capacity (the
# parent column is filled with -1, every column gets its first page, the
# prefaulter works ahead of the cursor) and a checkpoint copies segments, so a
# space of one observation must not own 131,072 slots (6.8 MB at 128-d, 16 MB at
# 768-d). Smaller first segments than 64 slots would save little: each of the 13
# columns costs at least a 4 KiB page once written, and 64 slots of 768-d f16
# are 96 KiB of vectors, the same order. Growing 4x reaches 131,072 slots in
# six steps, so a large space has about six segments more than before (each one
# more graph a recall searches; they hold 87,360 slots together, so they are
# small and fast), and each segment has about 3x the slots of all before it: the
# number of segments grows with the log of the space's size until the largest.
SEGMENT_GROWTH = 4


@dataclass(frozen=True)
class SegmentSizes:
    """How large each segment of a space is (segment numbers count from 0)."""
    largest: int  # slots of the largest segment (config segment_capacity)
    text_bytes_per_slot: int  # the text arena reserves this per slot ...
    record_bytes: int  # ... but never less than one maximal record (max id + max text)
    first: int = 64  # slots of a space's first segment (config first_segment_capacity)

    def capacity(self, number: int) -> int:
        slots = self.first
        for _ in range(number):
            if slots >= self.largest:
                break
            slots *= SEGMENT_GROWTH
        return min(slots, self.largest)

    def layout(self, number: int, params: SpaceParams) -> SegmentLayout:
        capacity = self.capacity(number)
        arena = max(capacity * self.text_bytes_per_slot, self.record_bytes)
        return SegmentLayout(capacity, params.dim, params.dtype, params.M, arena)


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
    at: _Cursor  # where they start
    end: _Cursor  # where the segment's cursors stand after them


class SpaceWriter:
    def __init__(self, catalog: Catalog, index: int, params: SpaceParams, sizes: SegmentSizes,
                 writers: int, on_new_segment: Callable[[int, Segment], None],
                 prefault: Prefaulter | None = None, window_limit: int = 1 << 30,
                 on_retired: Callable[[int, Segment], None] = lambda index, seg: None):
        self.catalog = catalog
        self.index = index
        self.params = params
        self.sizes = sizes
        self.writers = writers
        self.on_new_segment = on_new_segment
        self.on_retired = on_retired
        self.segments: list[Segment] = []  # the LIVE ones, in catalog order
        self.open: list[Segment] = []
        self._catalog_index: dict[int, int] = {}  # id(segment) -> its catalog index
        self.next_number = 0  # of the space's next segment (numbers are never reused)
        self.merge: compaction.Merge | None = None
        self.compactions = 0  # merges swapped in
        self.last_append = time.monotonic()
        self._id_table: idindex.IdTable | None = idindex.new_table()  # None: rebuild before use
        # Refs name segments by catalog index. A merge moves rows without
        # touching the table: catalog index of a merged-away segment -> (that
        # of the segment it went into, the slot its rows start at there),
        # until the next rebuild.
        self._moved: dict[int, tuple[int, int]] = {}
        self.prefault = prefault
        self.vector_rule = vector_rule(params.metric, params.dtype)
        self.window_limit = window_limit  # the most unindexed rows it holds (engine/window.py)
        self.buried = 0  # rows hidden for good after a crash (bury_uncommitted)
        # int8 spaces: the per-dimension scales of their codes, fixed by the
        # first batch stored (quantization.calibrate) and kept in every
        # segment; None until then, and for float storage.
        self.scales: np.ndarray | None = None

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

    def has_room(self, n: int) -> bool:
        """May n more observations join the unindexed window? (An empty window
        takes any batch, so a batch larger than the limit is not refused forever.)"""
        window = self.window
        return window == 0 or window + n <= self.window_limit

    @property
    def pressure(self) -> float:
        """How full the window is: 0 empty, 1 at its limit."""
        return self.window / self.window_limit

    def stats(self) -> dict:
        """`count`: observations visible (rows but the buried ones); `indexed`
        and `window`: rows in the graphs and not yet, buried ones included."""
        rows, indexed = self.count, self.indexed
        window = rows - indexed
        return {"count": rows - self.buried, "buried": self.buried, "indexed": indexed, "window": window,
                "window_limit": self.window_limit,
                "pressure": round(window / self.window_limit, 4),
                "segments": len(self.segments), "compactions": self.compactions,
                "compacting": self.merge.rows if self.merge else 0,
                "shm_bytes": sum(shm.block_bytes(s.name) for s in self._all_segments())}

    def _all_segments(self) -> list[Segment]:
        return self.segments + ([self.merge.target] if self.merge else [])

    def adopt(self, seg: Segment, index: int) -> None:
        """Take over a LIVE segment written before (a restarted writer), with
        its catalog index: its place among the open segments unless sealed;
        its ids join the index when it is next used (`index_ids`)."""
        self.segments.append(seg)
        self._catalog_index[id(seg)] = index
        self.next_number = max(self.next_number, int(seg.header[SEGMENT_NO]) + 1)
        if not seg.sealed:
            self.open.append(seg)
        self._id_table = None
        self.scales = seg.scales

    def bury_uncommitted(self, committed: int) -> int:
        """Hide rows published past the committed generation (a batch cut short
        by a crash) for good, release their ids; returns the highest generation
        found."""
        highest = 0
        self.buried = 0
        for seg in self.segments:
            gens = seg.w.generation[:seg.accepted]
            live = gens != BURIED
            if live.any():
                highest = max(highest, int(gens[live].max()))
                orphans = np.nonzero(live & (gens > committed))[0]
                if len(orphans):
                    gens[orphans] = BURIED
                    self._id_table = None  # buried ids leave the index by a rebuild (rare)
            buried = int((gens == BURIED).sum())
            if buried:  # also rows buried before a restart: a recall then filters them row by row
                raise_max_gen(seg.header, BURIED)
            self.buried += buried
        return highest

    def index_ids(self) -> int:
        """Make the id index current (after `adopt` or `bury_uncommitted` it is
        rebuilt from the segments' id_hash columns, skipping buried rows);
        returns the number of ids stored."""
        if self._id_table is None:
            table = idindex.new_table(sum(s.accepted for s in self.segments))
            for seg in self.segments:
                table = idindex.insert_rows(table, seg.r.id_hash, seg.r.generation,
                                            self._catalog_index[id(seg)], 0, seg.accepted)
            self._id_table = table
            self._moved.clear()
        return int(self._id_table.used[0])

    def _segment_of(self, ref: int) -> tuple[Segment, int]:
        """The segment and slot an id index ref names, following the merges
        since the index was built."""
        index, slot = ref >> 32, ref & _LOW32
        while index in self._moved:
            index, start = self._moved[index]
            slot += start
        return next(s for s in self.segments if self._catalog_index[id(s)] == index), slot

    def find_id(self, id: str) -> tuple[Segment, int] | None:
        """Where the id is stored in this space: (segment, slot), or None."""
        raw = np.frombuffer(id.encode("utf-8"), np.uint8)
        n = np.array([len(raw)], np.int64)
        for _, seg, slot in self._stored(raw, n, n.astype(np.int32), [id]):
            return seg, slot
        return None

    def check_new_ids(self, batch: Batch) -> None:
        """Raise DuplicateId if an id of the batch is already stored."""
        for row, _, _ in self._stored(batch.records, batch.record_ends, batch.id_lens, batch.ids):
            dup = batch.ids[row]
            raise DuplicateId(f"id {dup!r} is already stored in space {self.params.name!r}", id=dup)

    def stored_of(self, ids: list[str]) -> set[str]:
        """Those of `ids` already stored in this space."""
        raws = [i.encode("utf-8") for i in ids]
        lens = np.array([len(r) for r in raws], np.int32)
        records = np.frombuffer(b"".join(raws), np.uint8)
        return {ids[row] for row, _, _ in self._stored(records, np.cumsum(lens, dtype=np.int64), lens, ids)}

    def _stored(self, records: np.ndarray, record_ends: np.ndarray, id_lens: np.ndarray, ids: list[str]):
        """(row, segment, slot) of each of `ids` (encoded in records as in a
        Batch) that is stored: the index gives the rows whose hash is present,
        and only those stored ids are read and compared."""
        self.index_ids()
        rows, refs = idindex.lookup_ids(self._id_table, records, record_ends, id_lens)
        for row, ref in zip(rows.tolist(), refs.tolist()):
            seg, slot = self._segment_of(ref)
            if seg.ids(np.array([slot]))[0] == ids[row]:
                yield row, seg, slot

    def append(self, batch: Batch, first_generation: int, stored: bool = False,
               scales: np.ndarray | None = None,
               log: Callable[[list[np.ndarray]], None] | None = None,
               admit: Callable[[int], None] | None = None) -> list[tuple[Segment, int]]:
        """Store a prepared batch with generations first_generation.. (ids must
        have passed `check_new_ids`); returns (segment, end slot) per placement.
        Raises before publishing anything if a needed segment cannot be created,
        a vector is refused (NaN or infinity, zero under cosine, beyond f16) or
        `log` raises. `admit(bytes)` is asked before each new segment is
        created and refuses it by raising. `log` gets the stored vectors (a view per placement, in
        batch order) after they are written and before anything is published.
        `stored` vectors are already in storage form (a log replay): they are
        copied bit for bit, not scaled again, and `scales` are those they were
        coded with (int8)."""
        if self.params.dtype == "int8" and self.scales is None:
            self.scales = scales if stored else quantization.calibrate(batch.vectors, self.params.metric)
        self.last_append = time.monotonic()
        self.index_ids()  # before publishing: a rebuild must not see the rows, then get them again
        generations = np.arange(first_generation, first_generation + batch.n, dtype=np.uint64)
        levels = draw_levels(self.params.seed, generations, self.params.M, MAX_LEVEL)
        placements, full = self._plan(batch, levels, admit)
        rule = (False, np.inf) if stored else self.vector_rule
        quant = quantization.codes_per_unit(self.scales) if self.params.dtype == "int8" else 1.0
        for p in placements:
            reason, value = append_rows(p.segment.w, batch, first_generation, levels, p.lo, p.hi,
                                        p.at.slot, p.at.arena, p.at.upper, *rule, quant,
                                        self.params.metric == "l2")
            if reason != ROW_OK:  # nothing is published: the rows written stay unseen
                raise_bad_row(reason, value, "vector")
        if log is not None:
            log([p.segment.w.vectors[p.at.slot:p.at.slot + p.hi - p.lo] for p in placements])
        for p in placements:
            self._publish(p, generations)
        for seg in self.open[:]:
            if id(seg) in full or seg.accepted == seg.layout.capacity:
                self._seal(seg)
        self._index_placements(placements)
        return [(p.segment, p.end.slot) for p in placements]

    # -- planning --------------------------------------------------------------
    def _plan(self, batch: Batch, levels: np.ndarray,
              admit: Callable[[int], None] | None) -> tuple[list[_Placement], set[int]]:
        """Where each chunk goes, and the (ids of) segments found full."""
        upper_cum = np.concatenate([[0], np.cumsum(levels, dtype=np.int64)])  # a row per upper layer
        ends = batch.record_ends
        cursors: dict[int, _Cursor] = {}
        full: set[int] = set()
        placements = []
        lo = 0
        while lo < batch.n:
            hi = min(batch.n, lo + CHUNK)
            seg = self._route(cursors, full, admit)
            at = cursors.setdefault(id(seg), _Cursor(seg.accepted, int(seg.header[ARENA_USED]),
                                                     int(seg.header[UPPER_USED])))
            start = int(ends[lo - 1]) if lo else 0
            m = hi - lo
            L = seg.layout
            if at.slot + m > L.capacity or \
                    at.arena + int(ends[hi - 1]) - start > L.arena_capacity or \
                    at.upper + int(upper_cum[hi] - upper_cum[lo]) > L.upper_capacity:
                m = min(m, L.capacity - at.slot,
                        int(np.searchsorted(ends[lo:hi] - start, L.arena_capacity - at.arena,
                                            side="right")),
                        int(np.searchsorted(upper_cum[lo + 1:hi + 1] - upper_cum[lo],
                                            L.upper_capacity - at.upper, side="right")))
            if m < hi - lo:
                full.add(id(seg))
            if m == 0:
                continue
            start_at = _Cursor(at.slot, at.arena, at.upper)
            at.slot += m
            at.arena += int(ends[lo + m - 1]) - start
            at.upper += int(upper_cum[lo + m] - upper_cum[lo])
            placements.append(_Placement(seg, lo, lo + m, start_at, _Cursor(at.slot, at.arena, at.upper)))
            lo += m
        return placements, full

    def _route(self, cursors: dict[int, _Cursor], full: set[int],
               admit: Callable[[int], None] | None) -> Segment:
        """The open segment with the smallest window (counting rows planned),
        or a new one (sized by the schedule) when all have a chunk of backlog
        and a writer is free."""
        def load(seg):
            at = cursors.get(id(seg))
            return (at.slot if at else seg.accepted) - seg.indexed

        candidates = [s for s in self.open if id(s) not in full]
        best = min(candidates, key=load, default=None)
        if best is None or (load(best) >= CHUNK and len(candidates) < self.writers):
            best = self._new_segment(admit)
        return best

    def _new_segment(self, admit: Callable[[int], None] | None) -> Segment:
        seg = self._create(self.sizes.layout(self.next_number, self.params), admit)
        self.segments.append(seg)
        self.open.append(seg)
        self._publish_segment(seg, LIVE)
        return seg

    def _create(self, layout: SegmentLayout, admit: Callable[[int], None] | None) -> Segment:
        """A new segment of this space (admitted first), not yet published."""
        index = self.catalog.reserve_segment()
        if admit is not None:
            admit(layout.size)
        seg = Segment.create(segment_name(self.catalog.engine, index), layout,
                             METRIC_CODES[self.params.metric], self.index, self.next_number, self.scales)
        self.next_number += 1
        self._catalog_index[id(seg)] = index
        self.on_new_segment(index, seg)  # before the catalog publishes it
        return seg

    def _publish_segment(self, seg: Segment, state: int) -> None:
        self.catalog.add_segment(self._catalog_index[id(seg)], self.index, int(seg.header[SEGMENT_NO]), state)

    # -- compaction (store/compaction.py) ------------------------------------------
    def maintain(self, largest: int, idle_s: float, budget_s: float,
                 admit: Callable[[int], None] | None = None,
                 pending: Callable[[], bool] = compaction.nothing_waits) -> bool:
        """Advance compaction by about `budget_s` (less once `pending()`):
        start a merge if the policy asks for one, copy rows, swap a merged
        graph in once it is complete. Returns whether there was a merge to
        work on."""
        if self.merge is None and not self._start_merge(largest, idle_s, admit):
            return False
        self.merge.step(budget_s, pending)
        self._fault_ahead(self.merge.target, self.merge.slot)  # the copy's next rows
        if self.merge.done:
            self._swap()
        return True

    def _start_merge(self, largest: int, idle_s: float, admit: Callable[[int], None] | None) -> bool:
        if len(self.segments) < 2:
            return False
        idle = time.monotonic() - self.last_append >= idle_s
        settled = [s for s in self.segments if s.backlog == 0]  # (choose skips empty ones)
        # An idle space's open segments are sealed only if the merge takes them.
        sources = compaction.choose([s for s in settled if s.sealed or idle], idle, largest)
        if not sources:
            return False
        seg = self._create(compaction.merged_layout(sources, self.params), admit)
        for src in sources:
            if not src.sealed:
                self._seal(src)
        indexes = [self._catalog_index[id(s)] for s in sources]
        self.catalog.segments[indexes, G_MERGED_INTO] = self._catalog_index[id(seg)]
        self._publish_segment(seg, BUILDING)
        self.merge = compaction.Merge(self._catalog_index[id(seg)], seg, sources, indexes)
        log.info("space %s: merging %d segments (%d observations) into segment %d", self.params.name,
                 len(sources), self.merge.rows, self.merge.index)
        return True

    def _swap(self) -> None:
        """Put the merged graph in its sources' place, for readers (one
        layout change), for ids (the index follows the rows: `_moved`)
        and for memory (the sources are unlinked)."""
        m = self.merge
        self.catalog.change_states({m.index: LIVE, **{i: RETIRED for i in m.source_indexes}})
        gone = {id(s) for s in m.sources}
        self.segments = sorted([s for s in self.segments if id(s) not in gone] + [m.target],
                               key=lambda s: self._catalog_index[id(s)])
        start = 0
        for seg, index in zip(m.sources, m.source_indexes):  # copied in this order (compaction.Merge)
            self._moved[index] = (m.index, start)
            start += seg.accepted
        for seg, index in zip(m.sources, m.source_indexes):
            del self._catalog_index[id(seg)]
            shm.unlink(seg.name)
            self.on_retired(index, seg)
        if self.prefault is not None:
            self.prefault.forget(id(m.target))
        self.merge = None
        self.compactions += 1
        log.info("space %s: segment %d (%d observations) swapped in for %d segments after %.1f s",
                 self.params.name, m.index, m.rows, len(m.sources), time.monotonic() - m.started)

    def _seal(self, seg: Segment) -> None:
        seg.header[SEALED] = 1
        self.open.remove(seg)
        if self.prefault is not None:
            self.prefault.forget(id(seg))

    # -- publishing --------------------------------------------------------------
    def _index_placements(self, placements: list[_Placement]) -> None:
        """Enter published rows into the (current) id index, by segment
        (catalog index) and slot."""
        for p in placements:
            r = p.segment.r
            self._id_table = idindex.insert_rows(self._id_table, r.id_hash, r.generation,
                                                 self._catalog_index[id(p.segment)], p.at.slot, p.end.slot)

    def _publish(self, p: _Placement, generations: np.ndarray) -> None:
        header = p.segment.header
        if p.at.slot == 0:
            header[MIN_GEN] = generations[p.lo]
        raise_max_gen(header, generations[p.hi - 1])
        header[ARENA_USED] = p.end.arena
        header[UPPER_USED] = p.end.upper
        header[ACCEPTED] = p.end.slot  # last: the rows become visible
        self._fault_ahead(p.segment, p.end.slot)

    def _fault_ahead(self, seg: Segment, slots: int) -> None:
        """`slots` rows of `seg` are written: have the pages of the next ones'
        vectors faulted in off this thread (store/prefault.py)."""
        if self.prefault is not None:
            vectors = seg.w.vectors
            self.prefault.ahead(id(seg), seg.vectors_address, slots * vectors.strides[0], vectors.nbytes)
