"""Recall over a space, in any process that maps the engine's shared memory.

A recall reads the committed generation G, takes the space's LIVE segments (one
consistent layout: engine/directory.py), then for each segment its indexed
count n_i and accepted count n_a (in that order; both only grow). It searches
the graph over [0, n_i) and scans [n_i, n_a) exactly, keeping generations <= G,
and merges the segments' top-k. Everything committed before the recall started
is therefore found, indexed or not; readers take no locks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..config import MAX_EF, MAX_K
from ..errors import InvalidArgument, UnknownSpace
from ..kernels import hnsw
from ..observations import prepare_cue
from ..store.catalog import SpaceParams
from ..store.layout import MAX_LEVEL
from ..store.quantization import cue_in_codes
from ..store.segment import Segment
from .directory import SegmentDirectory

CONSISTENCIES = ("strong", "indexed")


@dataclass(frozen=True, slots=True)
class Memory:
    """One recalled observation. `similarity` is higher for closer: the cosine
    (or inner product) for those metrics, 1 / (1 + euclidean distance) for l2."""
    id: str
    similarity: float
    confidence: float
    what: str
    when: float
    generation: int


@dataclass(frozen=True, slots=True)
class Found:
    """A recall's answer, best first, before its rows are read: for each
    result its segment (an index into `segments`), slot and similarity."""
    generation: int
    segments: list[Segment]
    seg_of: np.ndarray
    slot_of: np.ndarray
    sims: np.ndarray

    def __len__(self) -> int:
        return len(self.sims)

    def memories(self, lo: int, hi: int) -> list[Memory]:
        """Results lo..hi-1, read from their segments."""
        seg_of, slot_of = self.seg_of[lo:hi], self.slot_of[lo:hi]
        fields = [None] * len(seg_of)
        for s in set(seg_of.tolist()):
            rows = np.nonzero(seg_of == s)[0]
            for row, values in zip(rows, self.segments[s].rows(slot_of[rows])):
                fields[row] = values
        return [Memory(ident, sim, conf, what, when, gen)
                for (ident, what, conf, when, gen), sim in zip(fields, self.sims[lo:hi].tolist())]


def similarity(distance: np.ndarray, metric: str) -> np.ndarray:
    if metric == "l2":
        return 1.0 / (1.0 + np.sqrt(np.maximum(distance, 0.0)))
    if metric == "cosine":  # f16 rounding can carry a unit vector's dot past 1
        return np.clip(1.0 - distance, -1.0, 1.0)
    return 1.0 - distance


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
        self._views_of: dict[int, tuple[list[Segment], hnsw.SpaceViews, float]] = {}

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

    def _views(self, index: int) -> tuple[list[Segment], hnsw.SpaceViews | None, np.ndarray | None]:
        """The space's LIVE segments, their kernel views and the scales of
        their int8 codes, rebuilt only when its segments changed (one added,
        or a compaction's swap; every segment of a space has its scales). A
        rebuilt set drops the last reference this reader held to retired
        segments."""
        segments = self.directory.of_space(index)
        cached = self._views_of.get(index)
        if cached is None or not _same(cached[0], segments):
            if not segments:
                return segments, None, None
            cached = self._views_of[index] = (segments, hnsw.SpaceViews([s.view for s in segments]),
                                              segments[0].scales)
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
        q = prepare_cue(cue, params.dim, params.metric)
        generation, scan = self.resolve_generation(consistency)
        segments, views, scales = self._views(index)
        if views is None:
            return Found(generation, segments, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        k, ef = int(k), max(int(ef), int(k))
        if scales is not None:  # int8: the cue in the units of the space's codes
            q = cue_in_codes(q, scales)
        d, refs = hnsw.search_space(views, q, k, ef, generation, scan, params.metric,
                                    self._scratch(views, ef), scales)
        sims = similarity(d, params.metric)
        if threshold is not None:
            keep = sims >= threshold
            refs, sims = refs[keep], sims[keep]
        return Found(generation, segments, refs >> 32, refs & 0xFFFFFFFF, sims)

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
