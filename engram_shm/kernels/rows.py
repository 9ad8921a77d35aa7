"""Writing a run of observations into a segment's columns in two kernel calls:
vectors (checked, scaled, in storage dtype; vectors.py), then generation,
timestamp, confidence, id hash, text arena and offsets, HNSW level and upper
row. One placement replaces a dozen numpy operations on the ingest path.

Levels are floor(-ln(U) / ln(M)) capped at max_level, with U drawn by
splitmix64 from (seed, generation): the same observation always gets the same
level, so re-inserting after a crash or replaying a log rebuilds the same
graph shape.
"""

import numpy as np

from ..errors import InvalidArgument
from .distance import stored_dim
from .ids import fnv1a_range
from .policy import kernel
from .vectors import ROW_OK, check_store_rows

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@kernel
def _level(seed, generation, log_m, max_level):
    z = np.uint64(generation) + np.uint64(seed) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    u = 1.0 - np.float64(z >> np.uint64(11)) * 2.0 ** -53  # (0, 1]
    return min(np.int32(np.floor(-np.log(u) / log_m)), max_level)


@kernel
def _draw_levels(seed, generations, m, max_level, out):
    log_m = np.log(np.float64(m))
    for i in range(generations.shape[0]):
        out[i] = _level(seed, generations[i], log_m, max_level)


@kernel
def _append_rows(c, first_generation, when, confidence, records, record_ends, id_lens, levels, lo, hi,
                 slot, arena_at, upper_at):
    """Every column but the vectors of rows [lo, hi) into slots from `slot`;
    returns the next free upper row."""
    start = record_ends[lo - 1] if lo > 0 else 0
    for i in range(lo, hi):
        s = slot + i - lo
        c.generation[s] = np.uint64(first_generation + i)
        c.when[s] = when[i]
        c.confidence[s] = confidence[i]
        rec = record_ends[i - 1] if i > 0 else 0
        c.id_hash[s] = fnv1a_range(records, rec, id_lens[i])
        c.text_end[s] = arena_at + record_ends[i] - start
        c.id_len[s] = id_lens[i]
        c.level[s] = levels[i]
        if levels[i] > 0:  # one row per upper layer
            c.upper_row[s] = upper_at
            upper_at += levels[i]
        else:
            c.upper_row[s] = -1
    c.arena[arena_at:arena_at + record_ends[hi - 1] - start] = records[start:record_ends[hi - 1]]
    return upper_at


def draw_levels(seed: int, generations: np.ndarray, M: int, max_level: int) -> np.ndarray:
    out = np.empty(len(generations), np.int32)
    _draw_levels(np.uint64(seed), np.ascontiguousarray(generations, np.uint64), M, max_level, out)
    return out


def append_rows(columns, batch, first_generation: int, levels: np.ndarray, lo: int, hi: int,
                slot: int, arena_at: int, upper_at: int, unit: bool, limit: float,
                quant: float | np.ndarray = 1.0, least_squares: bool = False) -> tuple[int, int]:
    """Write batch rows [lo, hi) into `columns` (a segment's writable Columns)
    at `slot`, `arena_at`, `upper_at`, checking each vector as it is stored
    (`check_store_rows` with unit, limit, quant and least_squares). Returns (ROW_OK, next free upper
    row), or (reason, first bad batch row) with the other columns unwritten.
    The caller has checked that the rows fit, and publishes nothing on a bad
    row: what was written stays past the published count, unseen."""
    c = columns
    n = hi - lo
    if not (0 <= lo < hi <= batch.n and slot >= 0 and slot + n <= c.vectors.shape[0]
            and stored_dim(c.vectors) == batch.dim and levels.shape == (batch.n,)):
        raise InvalidArgument("rows do not fit the segment or the batch")
    bad, reason = check_store_rows(batch.vectors[lo:hi], unit, limit, c.vectors[slot:slot + n], quant,
                                   least_squares)
    if reason != ROW_OK:
        return reason, lo + bad
    return ROW_OK, int(_append_rows(c, first_generation, batch.when, batch.confidence, batch.records,
                                    batch.record_ends, batch.id_lens, levels, lo, hi, slot, arena_at,
                                    upper_at))
