"""Byte layout of a segment: one shared-memory block, a header then columns.

Header: int64 words. Each group sits on its own 64-byte line and has exactly one
writer, so counters are 8-byte aligned and never share a cache line with
another process's counters.

| word        | writer        | meaning                                               |
|-------------|---------------|-------------------------------------------------------|
| MAGIC..     | creator       | magic, layout version, capacity, dim, dtype, metric,  |
|             |               | M, max level, upper capacity, arena capacity, space,  |
|             |               | segment number, creation time, SCALE (float64 bits:   |
|             |               | the largest of an int8 store's scales; 1 otherwise)   |
| ACCEPTED    | front         | slots [0, ACCEPTED) are complete and visible          |
| ARENA_USED  | front         | bytes of the text arena in use                        |
| UPPER_USED  | front         | rows of `upper` handed out (a node of level L takes L)|
| SEALED      | front         | 1 once the segment takes no more appends              |
| MIN/MAX_GEN | front         | generation range held (MAX_GEN all ones, BURIED, once |
|             |               | recovery buried rows in the segment)                  |
| INDEXED     | index writer  | nodes [0, INDEXED) are in the graph                   |
| ENTRY       | index writer  | (top level << 32) | entry node; -1 while empty        |
| REPAIR      | index writer  | journal of the link list being rewritten (hnsw.py)    |
| WRITER      | CAS           | token of the index writer holding the segment, 0 free |

Columns (cap = capacity; `-1` sentinels are written by the creator):

| column     | dtype             | shape                       | sentinel | writer       |
|------------|-------------------|-----------------------------|----------|--------------|
| vectors    | f32, u16 = f16, i8| [cap, dim]; int8: [cap,    |          | front        |
|            |                   | dim + 4], codes then factor |          |              |
| generation | uint64            | [cap]                       |          | front        |
| when       | float64 (unix s)  | [cap]                       |          | front        |
| confidence | float32           | [cap]                       |          | front        |
| id_hash    | uint64 (FNV-1a)   | [cap]                       |          | front        |
| text_end   | int64             | [cap]                       |          | front        |
| id_len     | int32             | [cap]                       |          | front        |
| level      | int32             | [cap]                       |          | front        |
| upper_row  | int32             | [cap]                       | -1       | front        |
|            |                   | (first of the node's rows)  |          |              |
| parent     | int32             | [cap]                       | -1       | index writer |
| links0     | int32             | [cap, 2M+1]                 | count 0  | index writer |
|            |                   | ([0]: count word, hnsw.py)  |          |              |
| upper      | int32             | [upper_cap, M+1]            | count 0  | index writer |
|            |                   | (row upper_row + l - 1:     |          |              |
|            |                   | the node's layer l list)    |          |              |
| arena      | uint8             | [arena_cap]                 |          | front        |
| scales     | float32           | [dim], int8 stores only     |          | creator      |

An int8 row is dim codes then its factor, a float32 in the row's last 4 bytes:
element d stands for factor * code * scales[d] / 127 (store/quantization.py,
kernels/policy.WeightedMetric). Layout version 1 had no `scales` column: its int8 stores code every element
with SCALE, and are read as scales of SCALE throughout. Version 3 added the
stable-prefix length to link lists' count words (STABLE_SHIFT); the plain
counts of earlier versions read as a prefix of 0. A checkpoint's blocks are
loaded at the current version, so that the code that writes prefixes never
labels them with an older one. Version 4 gives a node of level L exactly L
rows of `upper`, one per layer; before, every node above layer 0 held a row
of MAX_LEVEL lists (`upper` was [upper_cap, MAX_LEVEL, M+1]), most of them
never used: a checkpoint's block of an older version is regrouped as it
loads (checkpoint.py), and a live block of an older version is refused.
Version 5 ends each int8 row in its factor; an older int8 block's rows,
codes of element d as value * 127 / scales[d], load with factor 1.

Slot i's record is arena[text_end[i-1]:text_end[i]] (0 for i = 0): its first
id_len[i] bytes are the id, the rest the text, both UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Corrupt
from ..kernels.distance import stored_width

MAGIC_VALUE = 0x454E4752414D5347  # "ENGRAMSG"
LAYOUT_VERSION = 5
# 1: before int8 stores had per-dimension scales; 2: before stable prefixes;
# 3: before upper rows per layer; 4: before int8 rows' factors
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MAX_LEVEL = 6
HEADER_WORDS = 64
# A link list's count word (hnsw.py): links | stable-prefix length << STABLE_SHIFT.
STABLE_SHIFT = 16
ALIGN = 64

# Header words, grouped by writer on 64-byte lines.
(MAGIC, VERSION, CAPACITY, DIM, DTYPE, METRIC, M_WORD, MAX_LEVEL_WORD,
 UPPER_CAP, ARENA_CAP, SPACE, SEGMENT_NO, CREATED_NS, SCALE) = range(14)
ACCEPTED, ARENA_USED, UPPER_USED, SEALED, MIN_GEN, MAX_GEN = range(16, 22)
INDEXED, ENTRY, REPAIR = 24, 25, 26
WRITER = 32

DTYPE_NAMES = {0: "f32", 1: "f16", 2: "int8"}
STORAGE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}


@dataclass(frozen=True)
class SegmentLayout:
    capacity: int
    dim: int
    dtype: str
    M: int
    arena_capacity: int
    version: int = LAYOUT_VERSION

    @property
    def upper_capacity(self) -> int:
        # A node reaches layer l with probability M^-l, so it takes 1/(M-1)
        # rows on average; twice the mean plus slack makes running out (which
        # seals the segment early) vanishingly rare.
        if not self.rows_per_layer:
            return min(self.capacity, 2 * self.capacity // self.M + 64)
        return min(self.capacity * MAX_LEVEL, 2 * self.capacity // (self.M - 1) + 64 * MAX_LEVEL)

    @property
    def rows_per_layer(self) -> bool:
        """Upper rows hold one layer's list (version 4), not MAX_LEVEL of them."""
        return self.version >= 4

    @classmethod
    def holding(cls, rows: int, upper_rows: int, dim: int, dtype: str, M: int, arena: int) -> "SegmentLayout":
        """The smallest layout (current version) with room for `rows` slots,
        `upper_rows` upper rows and `arena` text bytes: more slots than rows
        only for a run of unusually many tall nodes."""
        capacity = max(rows, -(-upper_rows // MAX_LEVEL), -(-(upper_rows - 64 * MAX_LEVEL) * (M - 1) // 2))
        layout = cls(capacity, dim, dtype, M, max(arena, 1))
        assert layout.upper_capacity >= upper_rows
        return layout

    def upper_rows_used(self, levels: np.ndarray) -> int:
        """Upper rows taken by nodes of these levels."""
        if not self.rows_per_layer:
            return int(np.count_nonzero(levels > 0))
        return int(levels.sum(dtype=np.int64))

    def columns(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        cap = self.capacity
        return [
            ("vectors", STORAGE[self.dtype], (cap, self.row_width)),
            ("generation", np.dtype(np.uint64), (cap,)),
            ("when", np.dtype(np.float64), (cap,)),
            ("confidence", np.dtype(np.float32), (cap,)),
            ("id_hash", np.dtype(np.uint64), (cap,)),
            ("text_end", np.dtype(np.int64), (cap,)),
            ("id_len", np.dtype(np.int32), (cap,)),
            ("level", np.dtype(np.int32), (cap,)),
            ("upper_row", np.dtype(np.int32), (cap,)),
            ("parent", np.dtype(np.int32), (cap,)),
            ("links0", np.dtype(np.int32), (cap, 2 * self.M + 1)),
            ("upper", np.dtype(np.int32), (self.upper_capacity,)
             + ((self.M + 1,) if self.rows_per_layer else (MAX_LEVEL, self.M + 1))),
            ("arena", np.dtype(np.uint8), (self.arena_capacity,)),
        ] + ([("scales", np.dtype(np.float32), (self.dim,))] if self.has_scales else [])

    @property
    def row_width(self) -> int:
        """Elements of a stored row: an int8 row ends in its factor (version 5)."""
        return stored_width(self.dim, STORAGE[self.dtype]) if self.version >= 5 else self.dim

    @property
    def has_scales(self) -> bool:
        return self.dtype == "int8" and self.version >= 2

    def offsets(self) -> tuple[dict[str, int], int]:
        """Byte offset of every column, and the total size."""
        offset = HEADER_WORDS * 8
        table = {}
        for name, dtype, shape in self.columns():
            offset = -(-offset // ALIGN) * ALIGN
            table[name] = offset
            offset += dtype.itemsize * int(np.prod(shape))
        return table, -(-offset // ALIGN) * ALIGN

    @property
    def size(self) -> int:
        return self.offsets()[1]

    def write_header(self, header: np.ndarray, metric: int, space: int, segment_no: int,
                     created_ns: int, scale: float = 1.0) -> None:
        """The creator's words; `scale`: the largest of an int8 store's scales."""
        dtype_code = {v: k for k, v in DTYPE_NAMES.items()}[self.dtype]
        header[[CAPACITY, DIM, DTYPE, METRIC, M_WORD, MAX_LEVEL_WORD, UPPER_CAP, ARENA_CAP,
                SPACE, SEGMENT_NO, CREATED_NS]] = [
            self.capacity, self.dim, dtype_code, metric, self.M, MAX_LEVEL,
            self.upper_capacity, self.arena_capacity, space, segment_no, created_ns]
        header[SCALE:SCALE + 1].view(np.float64)[0] = scale
        header[ENTRY] = -1
        header[VERSION] = self.version
        header[MAGIC] = MAGIC_VALUE  # last: a block with a magic has a whole header

    @classmethod
    def from_header(cls, header: np.ndarray, size: int) -> "SegmentLayout":
        if header[MAGIC] != MAGIC_VALUE or header[VERSION] not in READABLE_VERSIONS:
            raise Corrupt("segment header has no engram magic or an unknown layout version")
        dtype = DTYPE_NAMES.get(int(header[DTYPE]))
        if dtype is None:
            raise Corrupt(f"segment header names unknown dtype code {header[DTYPE]}")
        layout = cls(int(header[CAPACITY]), int(header[DIM]), dtype, int(header[M_WORD]),
                     int(header[ARENA_CAP]), int(header[VERSION]))
        if (layout.size > size or header[MAX_LEVEL_WORD] != MAX_LEVEL
                or header[UPPER_CAP] != layout.upper_capacity):
            raise Corrupt("segment header does not match the block it heads")
        return layout


def raise_max_gen(header: np.ndarray, generation) -> None:
    """MAX_GEN = max(MAX_GEN, generation), compared unsigned, so that BURIED
    (all ones: recovery buried rows in the segment) stays once set, whatever
    is appended after (hnsw._search_space trusts MAX_GEN to cover every row)."""
    word = header[MAX_GEN:MAX_GEN + 1].view(np.uint64)
    if np.uint64(generation) > word[0]:
        word[0] = generation


def first_upper_rows(levels: np.ndarray, start: int = 0) -> np.ndarray:
    """upper_row of nodes of these levels given rows from `start` in order: a
    node of level L takes the next L rows, a node of level 0 none (-1)."""
    ends = start + np.cumsum(levels, dtype=np.int64)
    return np.where(levels > 0, ends - levels, -1).astype(np.int32)


def uniform_scales(header: np.ndarray) -> np.ndarray:
    """A layout 1 int8 block's scales: its header's one SCALE for every dimension."""
    return np.full(int(header[DIM]), header[SCALE:SCALE + 1].view(np.float64)[0], np.float32)
