"""Compaction: merging a space's sealed segments into one larger graph, so that
the number of graphs a recall searches stays small as a space grows
(docs/architecture.md, "Compaction").

The writer picks the sources (`choose`), creates the merged segment in state
BUILDING and copies the sources' rows into it a budget at a time (`Merge`):
first the largest source whole, graph included, so that its rows are already
indexed, then the others' rows without their graphs. Index writers insert
those like any window, after every live one. Once the merged graph holds every
row, the writer swaps it in (catalog.change_states: merged LIVE, sources
RETIRED) and unlinks the sources.

A source is sealed and wholly indexed, so its rows, and the largest one's
graph, never change while they are copied; rows keep their generations, so
snapshots and the exact-scan rules read the merged segment as they read its
sources.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .catalog import SpaceParams
from .layout import (
    ACCEPTED,
    ARENA_USED,
    ENTRY,
    INDEXED,
    MAX_GEN,
    MIN_GEN,
    REPAIR,
    SEALED,
    UPPER_USED,
    SegmentLayout,
    first_upper_rows,
    raise_max_gen,
)
from .segment import Segment

# Merge into the largest graph once the others hold this share of its rows
# (while the space takes writes; `IDLE_SHARE` once it has been idle): the
# largest graph is copied whole at each merge, so a merge must bring enough new
# rows to pay for that copy. Rows are copied about 1 / ACTIVE_SHARE times over
# a space's life at most.
ACTIVE_SHARE = 0.25
IDLE_SHARE = 1 / 64
# Sealed graphs beyond the largest that are merged among themselves (not into
# the largest) once there are this many: small ones cost a recall little each,
# but not nothing.
MAX_SMALL = 4
# Rows and links copied per step, at any dimension: a recall waits for one step
# (a traced recall waited 0.8 ms for the 1 MiB step in hand; docs/architecture.md).
COPY_BYTES = 1 << 18
GRAPH_COLUMNS = ("parent", "links0")
ROW_COLUMNS = ("vectors", "generation", "when", "confidence", "id_hash", "id_len", "level")


def nothing_waits() -> bool:
    """The default `pending`: no caller's requests wait for a merge's step."""
    return False


def choose(candidates: list[Segment], idle: bool, largest: int) -> list[Segment]:
    """The sources of the next merge (largest first), or [] for none.
    `candidates`: a space's sealed, wholly indexed segments; `largest`: the
    most rows a merged segment may hold."""
    fits = sorted((s for s in candidates if 0 < s.accepted < largest), key=lambda s: -s.accepted)
    if len(fits) < 2:
        return []
    base, rest = fits[0], fits[1:]
    share = IDLE_SHARE if idle else ACTIVE_SHARE
    into_base = _fitting([base], rest[::-1], largest)
    if sum(s.accepted for s in into_base[1:]) >= share * base.accepted:
        return into_base
    if len(rest) >= MAX_SMALL:
        return _fitting([rest[0]], rest[:0:-1], largest)
    return []


def _fitting(chosen: list[Segment], smallest_first: list[Segment], largest: int) -> list[Segment]:
    total = sum(s.accepted for s in chosen)
    for s in smallest_first:
        if total + s.accepted > largest:
            break
        chosen.append(s)
        total += s.accepted
    return chosen if len(chosen) > 1 else []


def merged_layout(sources: list[Segment], params: SpaceParams) -> SegmentLayout:
    """The room the sources' rows take (a merged segment takes no appends):
    their slots, text and upper rows."""
    return SegmentLayout.holding(sum(s.accepted for s in sources),
                                 sum(int(s.header[UPPER_USED]) for s in sources),
                                 params.dim, params.dtype, params.M,
                                 sum(int(s.header[ARENA_USED]) for s in sources))


@dataclass
class Merge:
    """A merge in progress: `target` (catalog index `index`) is filled from
    `sources` (catalog indexes `source_indexes`), the first one graph and all."""
    index: int
    target: Segment
    sources: list[Segment]
    source_indexes: list[int]
    started: float = field(default_factory=time.monotonic)
    source: int = 0  # the source being copied ...
    row: int = 0  # ... and its next row
    slot: int = 0  # the target's next slot, arena byte and upper row
    arena: int = 0
    upper: int = 0

    @property
    def copied(self) -> bool:
        return self.source == len(self.sources)

    @property
    def done(self) -> bool:
        """Every row copied and in the merged graph: ready to swap in."""
        return self.copied and self.target.indexed == self.target.accepted

    @property
    def rows(self) -> int:
        return sum(s.accepted for s in self.sources)

    def step(self, budget_s: float, pending: Callable[[], bool] = nothing_waits) -> None:
        """Copy rows for about `budget_s` (at least one step), or until
        `pending()` says other work waits (a server's requests)."""
        deadline = time.perf_counter() + budget_s
        w = self.target.w
        rows = max(1, COPY_BYTES // (w.vectors[0].nbytes + w.links0[0].nbytes))
        while not self.copied:
            self._copy(rows)
            if time.perf_counter() >= deadline or pending():
                break

    def _copy(self, n: int) -> None:
        src = self.sources[self.source]
        lo, hi = self.row, min(src.accepted, self.row + n)
        w, r, at = self.target.w, src.r, self.slot
        m = hi - lo
        for name in ROW_COLUMNS:
            getattr(w, name)[at:at + m] = getattr(r, name)[lo:hi]
        start = int(r.text_end[lo - 1]) if lo else 0
        end = int(r.text_end[hi - 1])
        w.text_end[at:at + m] = r.text_end[lo:hi] - start + self.arena
        w.arena[self.arena:self.arena + end - start] = r.arena[start:end]
        self.arena += end - start
        if self.source == 0:  # the base: its graph comes along, slot for slot
            w.upper_row[at:at + m] = r.upper_row[lo:hi]
            for name in GRAPH_COLUMNS:
                getattr(w, name)[at:at + m] = getattr(r, name)[lo:hi]
        else:  # the others get fresh upper rows, one per layer; the index writers link them
            w.upper_row[at:at + m] = first_upper_rows(r.level[lo:hi], self.upper)
            self.upper += int(r.level[lo:hi].sum())
        self.slot += m
        self.row = hi
        if hi == src.accepted:
            self._finish_source(src)
        elif self.source > 0:
            self._publish()

    def _finish_source(self, src: Segment) -> None:
        header = self.target.header
        if self.source == 0:
            upper_used = int(src.header[UPPER_USED])
            self.target.w.upper[:upper_used] = src.r.upper[:upper_used]
            self.upper = upper_used
            # Indexed before accepted: no index writer takes the base's rows
            # for a window (the build is not searched, so INDEXED may lead).
            header[ENTRY] = src.header[ENTRY]
            header[REPAIR] = 0
            header[INDEXED] = self.slot
        self.source += 1
        self.row = 0
        if self.copied:
            header[SEALED] = 1
        self._publish()

    def _publish(self) -> None:
        header = self.target.header
        done = self.sources[:self.source + (self.row > 0)]
        header[MIN_GEN] = min(int(s.header[MIN_GEN]) for s in done)
        for s in done:
            raise_max_gen(header, np.uint64(s.header[MAX_GEN]))
        header[ARENA_USED] = self.arena
        header[UPPER_USED] = self.upper
        header[ACCEPTED] = self.slot  # last: the index writers take the rows from here
