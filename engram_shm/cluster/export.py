"""Reading a space's rows out in chunks, for a move (docs/cluster.md).

A cursor is one next slot per segment of the space, in the order the space
made them. A chunk holds the committed rows from the cursor on, up to the
segments' accepted counts at the time of the call: rows below a segment's
accepted count never change, so chunks read while the space takes writes are
exact copies, and reading on from the last cursor later gives exactly what
was written since (the tail)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import quantization
from ..store.segment import Segment


@dataclass
class Chunk:
    ids: list[str]
    what: list[str]
    when: list[float]
    confidence: list[float]
    vectors: np.ndarray  # [n, dim]: float16 for f16 storage, else float32 (int8 decoded)
    cursor: list[int]
    more: bool  # rows past the cursor were already accepted when the chunk was cut


def read_chunk(segments: list[Segment], committed: int, cursor: list[int], limit: int, dim: int,
               dtype: str) -> Chunk:
    cursor = list(cursor) + [0] * (len(segments) - len(cursor))
    rows, vectors, left = [], [], limit
    for number, seg in enumerate(segments):
        start, end = cursor[number], seg.accepted
        if left and end > start:
            stop = min(end, start + left)
            slots = np.arange(start, stop)
            # Committed only; BURIED (a crash's half batch) is above every generation.
            slots = slots[seg.r.generation[start:stop] <= committed]
            rows += seg.rows(slots)
            vectors.append(_decoded(seg, slots, dtype))
            left -= stop - start
            cursor[number] = stop
    more = any(seg.accepted > cursor[number] for number, seg in enumerate(segments))
    out_dtype = np.float16 if dtype == "f16" else np.float32
    matrix = np.concatenate(vectors) if vectors else np.empty((0, dim), out_dtype)
    ids, what, confidence, when, _ = zip(*rows) if rows else ((), (), (), (), ())
    return Chunk(list(ids), list(what), list(when), list(confidence), matrix, cursor, more)


def _decoded(seg: Segment, slots: np.ndarray, dtype: str) -> np.ndarray:
    stored = seg.r.vectors[slots]
    if dtype == "f16":
        return stored.view(np.float16)
    if dtype == "int8":
        return quantization.decoded(stored, seg.scales)
    return stored.astype(np.float32, copy=False)
