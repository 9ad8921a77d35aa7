"""A whole recall in one kernel call: the cue checked and scaled as the space
stores rows, every segment of the space searched and merged (hnsw), and the
fields of the k rows kept gathered (similarity, confidence, time,
generation, and their ids and texts, copied side by side into one buffer).

One call instead of a kernel per step and a numpy or Python pass per field:
at 384 dimensions the search itself takes about as long as hnswlib's, so
what a recall pays around it decides whether it keeps up. Only the id and
text are left to Python to decode: one decode of the buffer, whose ASCII
text (most ids and texts) is then sliced by byte offsets: decoding each
id and text from its arena was the largest step Python took in a recall.
"""

from typing import NamedTuple

import numpy as np
from numba import carray

from .cpu import announce_recall, recall_searched
from .hnsw import T_CAPACITY, T_GENS, Scratch, SpaceViews, _search_space, new_scratch
from .policy import COSINE, L2, kernel, metric_fields, metric_from, metric_of
from .scalar import pointer_to
from .vectors import F32_EXPONENT, ROW_OK, _check_store

# A space's record columns as the kernel reads them (segment column names,
# with their dtypes): a row of addresses per segment, in the order of its
# SpaceViews table.
# The last is the segment's arena of ids and texts (bytes, not rows): its
# size follows its address in the plan's table.
RECORD_COLUMNS = (("text_end", np.int64), ("id_len", np.int32), ("confidence", np.float32),
                  ("when", np.float64), ("arena", np.uint8))
(R_TEXT_END, R_ID_LEN, R_CONFIDENCE, R_WHEN, R_ARENA, R_ARENA_BYTES) = range(len(RECORD_COLUMNS) + 1)
# What the kernel writes per row kept: rows (int64) and values (float64).
# start/split/end: where the id (start..split) and text (split..end) lie, in
# the scratch's text buffer when the kernel gathered them (every row's fit),
# else in the row's segment's arena.
ROW_FIELDS = ("ref", "start", "split", "end", "generation")
VALUE_FIELDS = ("similarity", "confidence", "when")
(ROW_REF, ROW_START, ROW_SPLIT, ROW_END, ROW_GENERATION) = range(len(ROW_FIELDS))
(VALUE_SIMILARITY, VALUE_CONFIDENCE, VALUE_WHEN) = range(len(VALUE_FIELDS))
_LOW32 = np.int64(0xFFFFFFFF)
# The ids and texts of one recall's rows gathered in one buffer up to this
# size (a recall of 10 rows of 200 bytes takes 2 KB); larger answers are
# read from the arenas row by row.
TEXT_BYTES = 1 << 18
_NO_BEACON = np.zeros(1, np.int64)  # stamped by recalls that announce themselves to no writer


class RecallPlan(NamedTuple):
    """What every recall of a space's current segments needs, worked out once
    when they change: the search table, the record columns' table, the
    kernels' metric (policy.metric_fields), the factor per dimension a cue
    is multiplied by (int8: codes per unit, times the metric's weights under
    a dot product) and the cue's check (vectors.check_store_rows: scaled to
    unit norm, or within +-limit). `columns` and `weights` are held so that
    the addresses in `records` and `metric` stay valid."""
    views: SpaceViews
    records: np.ndarray
    columns: list
    metric: tuple
    weights: np.ndarray | None
    cue_scale: np.ndarray
    unit: bool
    limit: float


class RecallScratch:
    """One thread's scratch for recalls of spaces of up to `capacity` nodes
    with beams up to `ef`: the search's (hnsw.Scratch) and the buffers the
    kernel writes to (each segment's top-k, the merged top-k, and the rows,
    values and texts it gathers), as the plain tuples the kernel takes
    (Numba types a named tuple argument in Python at every call: 3 us here)."""
    __slots__ = ("capacity", "dim", "ef", "outputs", "rows", "search", "text", "values")

    def __init__(self, capacity: int, dim: int, M: int, ef: int, max_level: int):
        self.capacity, self.dim, self.ef = capacity, dim, ef
        self.search = tuple(new_scratch(capacity, dim, M, ef, max_level))
        n = ef + 1
        self.rows = np.empty((n, len(ROW_FIELDS)), np.int64)
        self.values = np.empty((n, len(VALUE_FIELDS)), np.float64)
        self.text = np.empty(TEXT_BYTES, np.uint8)
        self.outputs = (np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.float32),
                        np.empty(n, np.int64), self.rows, self.values, self.text)


def plan(views: SpaceViews, record_columns: list[tuple[np.ndarray, ...]], metric: str,
         scales: np.ndarray | None, codes_per_unit: np.ndarray | float,
         cue_rule: tuple[bool, float]) -> RecallPlan:
    """The plan of a space whose segments have `views` and, in the same order,
    record columns (RECORD_COLUMNS); `cue_rule`: (unit, limit) of a cue."""
    want = [dtype for _, dtype in RECORD_COLUMNS]
    if len(record_columns) != views.n or any(
            len(cols) != len(want) or any(c.dtype != d or c.ndim != 1 or not c.flags.c_contiguous
                                          or (c.shape[0] < v.store.shape[0] and i != R_ARENA)
                                          for i, (c, d) in enumerate(zip(cols, want)))
            for cols, v in zip(record_columns, views.views)):
        raise ValueError(f"record columns must match the segments: {[n for n, _ in RECORD_COLUMNS]}")
    records = np.array([[c.ctypes.data for c in cols] + [cols[R_ARENA].shape[0]] for cols in record_columns],
                       np.int64)
    kernel_metric, weights = metric_of(metric, scales)
    cue_scale = np.broadcast_to(np.asarray(codes_per_unit, np.float64), (views.dim,)).copy()
    if weights is not None and kernel_metric.code != L2:  # dot products weigh the cue, not the rows
        cue_scale *= weights
    unit, limit = cue_rule
    return RecallPlan(views, records, list(record_columns), metric_fields(kernel_metric), weights, cue_scale,
                      bool(unit), float(limit))


@kernel
def _similarity(d, code):
    """Higher for closer: 1 - cosine distance (clipped: f16 rounding can carry
    a unit vector's dot past 1), 1 - ip distance, 1 / (1 + euclidean)."""
    d = np.float64(d)
    if code == L2:
        return 1.0 / (1.0 + np.sqrt(max(d, 0.0)))
    if code == COSINE:
        return min(1.0, max(-1.0, 1.0 - d))
    return 1.0 - d


@kernel
def _gather_texts(records, rows, n, text):
    """Copy the ids and texts of rows[:n] side by side into `text`, pointing
    their start/split/end there; returns the bytes copied, or -1 (rows
    untouched) when they do not fit or a row's end lies past its arena."""
    size = 0
    for i in range(n):
        s = rows[i, ROW_REF] >> 32
        if not (0 <= rows[i, ROW_START] <= rows[i, ROW_SPLIT] <= rows[i, ROW_END]
                <= records[s, R_ARENA_BYTES]):
            return -1
        size += rows[i, ROW_END] - rows[i, ROW_START]
    if size > text.shape[0]:
        return -1
    at = 0
    for i in range(n):
        start = rows[i, ROW_START]
        end = rows[i, ROW_END]
        arena = carray(pointer_to(records[rows[i, ROW_REF] >> 32, R_ARENA], np.uint8), end)
        text[at:at + end - start] = arena[start:end]
        rows[i, ROW_SPLIT] += at - start
        rows[i, ROW_START] = at
        at += end - start
        rows[i, ROW_END] = at
    return at


@kernel
def _recall(table, records, like, src, bits, exponent, unit, limit, cue_scale, k, ef, gen_max, scan,
            fields, threshold, search_scratch, outputs, beacon, budget_ns, linger_ns):
    """Check and scale the cue into the scratch's qbuf, search the space
    (announced in the beacon: cpu.announce_recall), and gather the rows
    whose similarity reaches `threshold` (best first: a prefix) into
    `outputs`' rows and values, and their ids and texts into its text
    buffer if they fit. Returns (cue check reason, rows kept, text bytes
    gathered or -1)."""
    sc = Scratch(*search_scratch)
    metric = metric_from(fields)
    seg_d, seg_i, out_d, out_ref, rows, values, text = outputs
    _, reason = _check_store(src, bits, exponent, unit, limit, cue_scale, False, sc.qbuf)
    if reason != ROW_OK:
        return reason, 0, 0
    stamp = announce_recall(beacon, budget_ns)
    n = _search_space(table, like, sc.qbuf, k, ef, np.uint64(gen_max), scan, metric, sc, seg_d, seg_i,
                      out_d, out_ref)
    recall_searched(beacon, stamp, linger_ns)
    for i in range(n):
        sim = _similarity(out_d[i], metric.code)
        if sim < threshold:
            n = i
            break
        ref = out_ref[i]
        s = ref >> 32
        slot = ref & _LOW32
        cap = table[s, T_CAPACITY]
        text_end = carray(pointer_to(records[s, R_TEXT_END], np.int64), cap)
        start = text_end[slot - 1] if slot > 0 else 0
        rows[i, ROW_REF] = ref
        rows[i, ROW_START] = start
        rows[i, ROW_SPLIT] = start + carray(pointer_to(records[s, R_ID_LEN], np.int32), cap)[slot]
        rows[i, ROW_END] = text_end[slot]
        rows[i, ROW_GENERATION] = np.int64(carray(pointer_to(table[s, T_GENS], np.uint64), cap)[slot])
        values[i, VALUE_SIMILARITY] = sim
        values[i, VALUE_CONFIDENCE] = carray(pointer_to(records[s, R_CONFIDENCE], np.float32), cap)[slot]
        values[i, VALUE_WHEN] = carray(pointer_to(records[s, R_WHEN], np.float64), cap)[slot]
    return reason, n, _gather_texts(records, rows, n, text)


def recall(p: RecallPlan, cue: np.ndarray, k: int, ef: int, gen_max: int, scan: bool, threshold: float,
           rs: RecallScratch, beacon: np.ndarray = _NO_BEACON, budget_ns: int = 0,
           linger_ns: int = 0) -> tuple[int, np.ndarray, np.ndarray, str | bytes | None]:
    """(cue check reason, rows, values, texts) of the best k rows of
    generation <= gen_max with similarity >= threshold, best first. `cue`:
    one row, float32 or f16 bits [1, dim]; `rs` sized for the views and ef
    >= k. The rows and values are views of rs's buffers: read them before
    its next recall. `texts`: the rows' ids and texts as a str whose
    characters are its bytes (all ASCII), else as bytes; None if they were
    not gathered (the rows then point into their segments' arenas). The
    search is announced in `beacon` (a writable one-element int64 array:
    engine/beacon.py) for budget_ns, then for linger_ns after it ends."""
    views = p.views
    if (cue.shape != (1, views.dim) or not 1 <= k <= ef <= rs.ef or rs.capacity < views.capacity
            or rs.dim != views.dim):
        raise ValueError(f"recall needs a [1, {views.dim}] cue, 1 <= k <= ef and scratch for ef "
                         f"and {views.capacity} nodes")
    if beacon.shape != (1,) or beacon.dtype != np.int64:
        raise ValueError("the beacon is a one-element int64 array")
    if cue.dtype == np.uint16:  # f16 bits from the wire: widened here, so the kernel has one cue type
        cue = cue.view(np.float16).astype(np.float32)
    elif cue.dtype != np.float32 or not cue.flags.c_contiguous:
        raise ValueError("recall needs a C-contiguous float32 or f16-bits cue")
    # The bits without vectors.source_bits' checks, which the caller's
    # vectors_matrix has made (microseconds of every recall). Python numbers: Numba
    # types them in C, and never compiles another specialisation for them.
    reason, n, gathered = _recall(views.table, p.records, views.like, cue, cue.view(np.uint32), F32_EXPONENT,
                                  p.unit, p.limit, p.cue_scale, int(k), int(ef), int(gen_max), bool(scan),
                                  p.metric, float(threshold), rs.search, rs.outputs, beacon, int(budget_ns),
                                  int(linger_ns))
    texts = None
    if gathered >= 0:
        texts = rs.text[:gathered].tobytes()
        if texts.isascii():  # character offsets are byte offsets: one decode, then slices
            texts = texts.decode("ascii")
    return int(reason), rs.rows[:n], rs.values[:n], texts
