"""Recall over a space, in any process that maps the engine's shared memory.

A recall reads the committed generation G, takes the space's LIVE segments (one
consistent layout: engine/directory.py), then for each segment its indexed
count n_i and accepted count n_a (in that order; both only grow). It searches
the graph over [0, n_i) and scans [n_i, n_a) exactly, keeping generations <= G,
and merges the segments' top-k. Everything committed before the recall started
is therefore found, indexed or not; readers take no locks.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..config import MAX_EF, MAX_K
from ..errors import InvalidArgument, UnknownSpace
from ..kernels import hnsw
from ..observations import prepare_cue
from ..store.catalog import SpaceParams
from ..store.layout import MAX_LEVEL
from ..store.quantization import codes_per_unit
from ..store.segment import Segment
from .directory import SegmentDirectory

CONSISTENCIES = ("strong", "indexed")


class Memory(NamedTuple):
    """One recalled observation. `similarity` is higher for closer: the cosine
    (or inner product) for those metrics, 1 / (1 + euclidean distance) for l2.
    A named tuple, immutable like a frozen dataclass at a fifth of its
    construction cost (a recall builds k of them)."""
    id: str
    similarity: float
    confidence: float
    what: str
    when: float
    generation: int


@dataclass(frozen=True, slots=True)
class Found:
    """A recall's answer, best first, before its rows are read: for each
    result its reference (segment << 32 | slot, the segment an index into
    `segments`) and similarity. Python lists: an answer has at most k
    results, which numpy would take longer to slice and convert."""
    generation: int
    segments: list[Segment]
    refs: list[int]
    sims: list[float]

    def __len__(self) -> int:
        return len(self.sims)

    def memories(self, lo: int, hi: int) -> list[Memory]:
        """Results lo..hi-1, read from their segments."""
        segments = self.segments
        return [Memory(ident, sim, conf, what, when, gen)
                for ref, sim in zip(self.refs[lo:hi], self.sims[lo:hi])
                for ident, what, conf, when, gen in (segments[ref >> 32].record(ref & 0xFFFFFFFF),)]


def similarities(distances: list[float], metric: str) -> list[float]:
    if metric == "l2":
        return [1.0 / (1.0 + math.sqrt(max(d, 0.0))) for d in distances]
    if metric == "cosine":  # f16 rounding can carry a unit vector's dot past 1
        return [min(1.0, max(-1.0, 1.0 - d)) for d in distances]
    return [1.0 - d for d in distances]


def _same(a: list[Segment], b: list[Segment]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Reader:
    """Recall over the spaces of an engine's catalog and the segments of its
    directory."""

    def __init__(self, directory: SegmentDirectory):
        self.directory = directory
        self.catalog = directory.catalog
        self._spaces: dict[str, tuple[int, SpaceParams]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._views_of: dict[int, tuple[list[Segment], hnsw.SpaceViews, np.ndarray | None, np.ndarray | float]] = {}

    def space(self, name: str) -> tuple[int, SpaceParams]:
        found = self._spaces.get(name)
        if found is None:
            with self._lock:
                for index in range(len(self._spaces), self.catalog.n_spaces):
                    params = self.catalog.space(index)
                    self._spaces[params.name] = (index, params)
            found = self._spaces.get(name)
            if found is None:
                raise UnknownSpace(f"no space named {name!r}", space=name)
        return found

    def _scratch(self, views: hnsw.SpaceViews, ef: int) -> hnsw.Scratch:
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = hnsw.ScratchCache()
        return cache.get(views.capacity, views.dim, views.M, max(ef, 256), MAX_LEVEL)

    def _views(self, index: int) -> tuple[list[Segment], hnsw.SpaceViews | None, np.ndarray | None,
                                          np.ndarray | float]:
        """The space's LIVE segments, their kernel views, the scales of their
        int8 codes and the codes per unit a cue is multiplied by (1 for float
        stores), rebuilt only when its segments changed (one added, or a
        compaction's swap; every segment of a space has its scales). A
        rebuilt set drops the last reference this reader held to retired
        segments."""
        segments = self.directory.of_space(index)
        cached = self._views_of.get(index)
        if cached is None or not _same(cached[0], segments):
            if not segments:
                return segments, None, None, 1.0
            scales = segments[0].scales
            cached = self._views_of[index] = (segments, hnsw.SpaceViews([s.view for s in segments]), scales,
                                              1.0 if scales is None else codes_per_unit(scales))
        return cached

    def drop_retired(self) -> None:
        """Let go of the segments compaction retired since the last recall
        (a process that may sit idle calls this now and then: otherwise it
        holds their memory until it next recalls from their space)."""
        self._views_of = {i: v for i, v in self._views_of.items() if _same(v[0], self.directory.of_space(i))}

    def resolve_generation(self, consistency) -> tuple[int, bool]:
        """(generation bound, whether to scan unindexed windows)."""
        committed = self.catalog.committed_generation
        if isinstance(consistency, (int, np.integer)) and not isinstance(consistency, bool):
            if not 0 <= consistency <= committed:
                raise InvalidArgument(f"snapshot generation {consistency} is not committed "
                                      f"(committed: {committed})")
            return int(consistency), True
        if consistency not in CONSISTENCIES:
            raise InvalidArgument(f"consistency must be one of {CONSISTENCIES} or a generation, "
                                  f"got {consistency!r}")
        return committed, consistency == "strong"

    def recall(self, space: str, cue, k: int = 10, consistency="strong",
               threshold: float | None = None, ef: int = 64) -> tuple[list[Memory], int]:
        """The k most similar observations, best first, and the generation the
        answer is a snapshot of."""
        found = self.find(space, cue, k, consistency, threshold, ef)
        return found.memories(0, len(found)), found.generation

    def find(self, space: str, cue, k: int = 10, consistency="strong",
             threshold: float | None = None, ef: int = 64) -> "Found":
        """The search of `recall`, whose rows are read on demand (a server
        streams a large answer part by part as it reads them)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or not 1 <= ef <= MAX_EF:
            raise InvalidArgument(f"ef must be an integer in [1, {MAX_EF}], got {ef!r}")
        index, params = self.space(space)
        segments, views, scales, per_unit = self._views(index)
        q = prepare_cue(cue, params.dim, params.metric, per_unit)  # int8: in the units of the codes
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                      or math.isnan(threshold)):
            raise InvalidArgument(f"threshold must be a number, got {threshold!r}")
        generation, scan = self.resolve_generation(consistency)
        if views is None:
            return Found(generation, segments, [], [])
        k, ef = int(k), max(int(ef), int(k))
        d, refs = hnsw.search_space(views, q, k, ef, generation, scan, params.metric,
                                    self._scratch(views, ef), scales)
        sims, refs = similarities(d.tolist(), params.metric), refs.tolist()
        if threshold is not None:  # best first: the results kept are a prefix
            n = sum(1 for sim in sims if sim >= threshold)
            sims, refs = sims[:n], refs[:n]
        return Found(generation, segments, refs, sims)

    def close(self) -> None:
        self._spaces.clear()


class Recalls:
    """Recall for engines that hold a `reader` (the embedded engine and attached
    readers share it)."""

    reader: Reader
    ef_search: int = 64

    def _check_open(self) -> None:
        raise NotImplementedError

    def recall(self, space: str, cue, k: int = 10, consistency="strong",
               threshold: float | None = None, ef: int | None = None) -> list[Memory]:
        """The k observations most similar to `cue`, best first.

        consistency: "strong" (default) sees every observation stored before the
        call, indexed or not; "indexed" searches the graph only (fastest; may
        miss the newest); an int generation reads the snapshot at that
        generation. `threshold` drops results below that similarity; `ef` widens
        the graph search (default: the engine's ef_search)."""
        self._check_open()
        memories, _ = self.reader.recall(space, cue, k, consistency, threshold, ef or self.ef_search)
        return memories

    @property
    def generation(self) -> int:
        """The committed generation: every observation up to it is visible."""
        return self.reader.catalog.committed_generation
