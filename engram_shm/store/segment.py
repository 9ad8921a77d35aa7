"""A mapped segment: numpy views over one shared-memory block (see layout.py).

Segments are created by the writing process and attached by others. The
writer unlinks the segments a compaction retires; the owner of the engine's
catalog removes all the others (catalog.py). A mapping no longer referenced
closes itself: processes forget retired segments rather than close them, as a
recall in flight may still hold views of one. Writable views exist only where
a writer needs them; readers get read-only views, so the recall kernels never
hold a pointer they could write through.
"""

from __future__ import annotations

import time
from collections import namedtuple

import numpy as np

from ..errors import Corrupt
from ..kernels.hnsw import Graph, SegmentView
from . import shm
from .layout import ACCEPTED, ENTRY, INDEXED, LAYOUT_VERSION, SEALED, WRITER, SegmentLayout, uniform_scales

Columns = namedtuple("Columns", "vectors generation when confidence id_hash text_end id_len "
                                "level upper_row parent links0 upper arena")
RECORD_COLUMNS = ("text_end", "id_len", "confidence", "when", "generation")


class Segment:
    def __init__(self, block, layout: SegmentLayout, writable: bool):
        self.block = block
        self.name = block.name
        self.layout = layout
        ro = block.buf.toreadonly()
        self.header = np.ndarray((64,), np.int64, buffer=block.buf if writable else ro)
        offsets, _ = layout.offsets()

        def columns(buf):
            return Columns(*(np.ndarray(shape, dtype, buffer=buf, offset=offsets[name])
                             for name, dtype, shape in layout.columns() if name in Columns._fields))

        self.r = columns(ro)
        self.arena = ro[offsets["arena"]:offsets["arena"] + layout.arena_capacity]  # ids and texts, UTF-8
        # A slot's record read through memoryviews: each index gives a Python
        # number at once, several times faster than numpy's scalar indexing
        # (exports and id checks read rows this way; a recall's kernel gathers its own).
        self._record_columns = tuple(memoryview(getattr(self.r, name)) for name in RECORD_COLUMNS)
        self.w = columns(block.buf) if writable else None
        self.vectors_address = self.r.vectors.ctypes.data  # read once: .ctypes costs microseconds
        self.graph_r = self._graph(self.r, np.ndarray((2,), np.int64, buffer=ro, offset=ENTRY * 8))
        # What the recall kernel reads, header included, through read-only views.
        self.view = SegmentView(self.r.vectors, self.r.generation, self.graph_r,
                                np.ndarray((64,), np.int64, buffer=ro))
        self.graph_w = (self._graph(self.w, self.header[ENTRY:ENTRY + 2]) if writable else None)
        self.scales = self._read_scales(ro, offsets)  # written by the creator, before anyone attaches

    @staticmethod
    def _graph(c: Columns, state: np.ndarray) -> Graph:
        return Graph(c.links0, c.upper, c.level, c.upper_row, c.parent, state)

    @classmethod
    def create(cls, name: str, layout: SegmentLayout, metric: int, space: int,
               segment_no: int, scales: np.ndarray | None = None) -> "Segment":
        """A new segment; `scales`: an int8 store's (store/quantization.py)."""
        if (scales is None) != (layout.dtype != "int8"):
            raise ValueError("an int8 segment needs its scales, a float one has none")
        block = shm.create(name, layout.size)
        try:
            header = np.ndarray((64,), np.int64, buffer=block.buf)
            offsets = layout.offsets()[0]
            parent = np.ndarray((layout.capacity,), np.int32, buffer=block.buf, offset=offsets["parent"])
            parent.fill(-1)
            del parent
            if layout.has_scales:
                column = np.ndarray((layout.dim,), np.float32, buffer=block.buf, offset=offsets["scales"])
                column[:] = scales
                del column
            layout.write_header(header, metric, space, segment_no, time.time_ns(),
                                1.0 if scales is None else float(np.max(scales)))
            del header
            return cls(block, layout, writable=True)
        except BaseException:
            shm.destroy(block)
            raise

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> "Segment":
        block = shm.attach(name)
        try:
            header = np.ndarray((64,), np.int64, buffer=block.buf)
            layout = SegmentLayout.from_header(header, block.size)
            del header
            if layout.version != LAYOUT_VERSION:  # kernels read the current layout only
                raise Corrupt(f"segment {name} has layout version {layout.version}, not "
                              f"{LAYOUT_VERSION}: a block of an older engram_shm (restart its "
                              f"engine, which loads it from a checkpoint)")
            return cls(block, layout, writable=writable)
        except BaseException:
            shm.close(block)
            raise

    # Counters. Each is written by one process; reads are plain aligned loads.
    @property
    def accepted(self) -> int:
        return int(self.header[ACCEPTED])

    @property
    def indexed(self) -> int:
        return int(self.header[INDEXED])

    def _read_scales(self, ro, offsets: dict[str, int]) -> np.ndarray | None:
        """A copy (it outlives the mapping: a space keeps it after its
        segments retire) of the per-dimension scales of an int8 store's codes,
        a layout 1 block's one SCALE for every dimension; None for floats."""
        if self.layout.dtype != "int8":
            return None
        if self.layout.has_scales:
            return np.ndarray((self.layout.dim,), np.float32, buffer=ro, offset=offsets["scales"]).copy()
        return uniform_scales(self.header)

    @property
    def sealed(self) -> bool:
        return bool(self.header[SEALED])

    @property
    def writer(self) -> int:
        return int(self.header[WRITER])

    @property
    def backlog(self) -> int:
        return self.accepted - self.indexed

    def record(self, slot: int) -> tuple[str, str, float, float, int]:
        """(id, text, confidence, when, generation) of one slot."""
        text_end, id_len, confidence, when, generation = self._record_columns
        start = text_end[slot - 1] if slot > 0 else 0
        split = start + id_len[slot]
        return (str(self.arena[start:split], "utf-8"), str(self.arena[split:text_end[slot]], "utf-8"),
                confidence[slot], when[slot], generation[slot])

    def rows(self, slots) -> list[tuple[str, str, float, float, int]]:
        """`record` of each slot."""
        return [self.record(slot) for slot in np.asarray(slots).tolist()]

    def ids(self, slots) -> list[str]:
        return [row[0] for row in self.rows(slots)]

    def close(self, warn: bool = True) -> None:
        """Release the views and unmap (the block stays for other processes)."""
        if self.block is None:
            return
        self.r = self.w = self.graph_r = self.graph_w = self.header = self.view = None
        for view in (self.arena, *self._record_columns):
            view.release()
        block, self.block = self.block, None
        shm.close(block, warn)

    def __del__(self):
        # Views of a forgotten segment may outlive it (a recall's kernel
        # table); they keep the mapping until they go.
        if getattr(self, "block", None) is not None:
            self.close(warn=False)
