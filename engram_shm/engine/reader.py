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
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..config import MAX_EF, MAX_K
from ..errors import EngineClosed, InvalidArgument, UnknownSpace
from ..kernels import hnsw
from ..kernels.recall import RECORD_COLUMNS, RecallPlan, RecallScratch, plan
from ..kernels.recall import recall as recall_kernel
from ..kernels.vectors import ROW_OK
from ..observations import checked_rows, raise_bad_row, vector_rule, vectors_matrix
from ..store.catalog import SpaceParams
from ..store.layout import MAX_LEVEL
from ..store.prefault import MADV_POPULATE_READ, Prefaulter
from ..store.quantization import codes_per_unit
from ..store.segment import Segment
from .beacon import BUDGET_NS, LINGER_NS, RecallBeacon
from .directory import SegmentDirectory
from .idle import run_when_idle

CONSISTENCIES = ("strong", "indexed")
_new_tuple = tuple.__new__


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


class Found:
    """A recall's answer, best first, before its ids and texts are decoded:
    per result the fields the kernel gathered (kernels/recall.py) as Python
    lists; the ids and texts it gathered (`texts`: a str of ASCII, sliced
    by the rows' byte offsets, or bytes), or else the space's segments, held
    so that the arenas the rows point into stay mapped (a server streams a
    large answer part by part)."""
    __slots__ = ("generation", "rows", "segments", "texts", "values")

    def __init__(self, generation: int, segments: list[Segment], rows: list[list[int]],
                 values: list[list[float]], texts: str | bytes | None = None):
        self.generation, self.segments, self.rows, self.values = generation, segments, rows, values
        self.texts = texts

    def __len__(self) -> int:
        return len(self.rows)

    def memories(self, lo: int, hi: int) -> list[Memory]:
        """Results lo..hi-1."""
        texts = self.texts
        # tuple.__new__: a named tuple's own __new__ is a Python call, over twice the cost.
        # An ASCII answer's ids and texts are slices of one string, with no
        # decode per row: a loop of its own, not a call per field.
        if type(texts) is str:
            return [_new_tuple(Memory, (texts[start:split], sim, conf, texts[split:end], when, gen))
                    for (_, start, split, end, gen), (sim, conf, when)
                    in zip(self.rows[lo:hi], self.values[lo:hi])]
        segments = self.segments
        return [_new_tuple(Memory, (str(source[start:split], "utf-8"), sim, conf,
                                    str(source[split:end], "utf-8"), when, gen))
                for (ref, start, split, end, gen), (sim, conf, when)
                in zip(self.rows[lo:hi], self.values[lo:hi])
                for source in (segments[ref >> 32].arena if texts is None else texts,)]


class _Column(NamedTuple):
    """A column of a segment, as `Reader._map_ahead` maps it."""
    segment: Segment
    base: int  # address
    row_bytes: int
    nbytes: int


def _columns_read_per_row(segments: list[Segment]) -> list[_Column]:
    """The columns a recall reads for every row it visits, in segment order:
    the vectors and the layer-0 links (the others are bytes a row, or read
    for results only)."""
    return [_Column(s, a.ctypes.data, a.strides[0], a.nbytes)
            for s in segments for a in (s.r.vectors, s.view.graph.links0)]


def _same(a: list[Segment], b: list[Segment]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Reader:
    """Recall over the spaces of an engine's catalog and the segments of its
    directory."""

    def __init__(self, directory: SegmentDirectory):
        self.directory = directory
        self.catalog = directory.catalog
        self.beacon = RecallBeacon(self.catalog)
        self._spaces: dict[str, tuple[int, SpaceParams]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        # per space: the token of the directory layout it was last checked
        # against (not the layout: it would hold other spaces' retired
        # segments), its segments then, their plan and the space's metric
        self._plans: dict[int, tuple[object, list[Segment], RecallPlan | None, str]] = {}
        self._prefault = Prefaulter(run_when_idle, advice=MADV_POPULATE_READ)  # the recalls come first
        # per space: the segments _follow maps ahead, and their columns
        self._followed: dict[int, tuple[list[Segment], list[_Column]]] = {}
        self._growing: dict[int, list[_Column]] = {}  # per space: the columns _map_ahead still follows

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

    def _scratch(self, views: hnsw.SpaceViews, ef: int) -> RecallScratch:
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = hnsw.ScratchCache(RecallScratch)
        return cache.get(views.capacity, views.dim, views.M, max(ef, 256), MAX_LEVEL)

    def _plan(self, index: int, metric: str) -> tuple[list[Segment], RecallPlan | None]:
        """The space's LIVE segments and the recall kernel's plan of them
        (None: no segment yet), rebuilt only when its segments changed (one
        added, or a compaction's swap; every segment of a space has the same
        scales). A rebuilt plan drops the last reference this reader held to
        retired segments."""
        layout = self.directory.layout()
        cached = self._plans.get(index)
        if cached is None or cached[0] != layout.token:  # a layout changed: in this space?
            segments = layout.by_space.get(index, [])
            if cached is None or not _same(cached[1], segments):
                cached = (layout.token, segments, self._new_plan(segments, metric), metric)
            else:
                cached = (layout.token, *cached[1:])
            self._plans[index] = cached
            building = [t.segment for t in layout.targets
                        if t.building and self.catalog.segment_space(t.index) == index]
            self._follow(index, segments + building)
        return cached[1], cached[2]

    def prepare(self) -> None:
        """Take the spaces' current segments now, as a recall would: a process
        that waits for recalls calls this while it waits, so that the first
        recall after a new segment or a compaction's swap finds its plan
        built and its pages mapped (a compaction's merged segment is mapped
        while it is built)."""
        for index, cached in list(self._plans.items()):
            self._plan(index, cached[3])

    @staticmethod
    def _new_plan(segments: list[Segment], metric: str) -> RecallPlan | None:
        if not segments:
            return None
        scales = segments[0].scales
        columns = [tuple(getattr(s.r, name) for name, _ in RECORD_COLUMNS) for s in segments]
        return plan(hnsw.SpaceViews([s.view for s in segments]), columns, metric, scales,
                    1.0 if scales is None else codes_per_unit(scales), vector_rule(metric, "f32"))

    def drop_retired(self) -> None:
        """Let go of the segments compaction retired since the last recall
        (a process that may sit idle calls this now and then: otherwise it
        holds their memory until it next recalls from their space)."""
        kept = {i: p for i, p in self._plans.items() if _same(p[1], self.directory.of_space(i))}
        for index in self._plans.keys() - kept.keys():
            self._follow(index, [])
        self._plans = kept

    def resolve_generation(self, consistency) -> tuple[int, bool]:
        """(generation bound, whether to scan unindexed windows)."""
        committed = self.catalog.committed_generation
        if type(consistency) is str and consistency == "strong":  # the default first: recalls are hot
            return committed, True
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
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                      or math.isnan(threshold)):
            raise InvalidArgument(f"threshold must be a number, got {threshold!r}")
        index, params = self.space(space)
        cue = vectors_matrix(cue, 1, True, params.dim, "cue")
        generation, scan = self.resolve_generation(consistency)
        segments, p = self._plan(index, params.metric)
        if p is None:
            checked_rows(cue, params.metric, "f32", "cue")  # a bad cue fails the same with or without rows
            return Found(generation, segments, [], [])
        k, ef = int(k), max(int(ef), int(k))
        reason, rows, values, texts = recall_kernel(p, cue, k, ef, generation, scan,
                                                    -math.inf if threshold is None else threshold,
                                                    self._scratch(p.views, ef), self.beacon.word, BUDGET_NS,
                                                    LINGER_NS)
        if reason != ROW_OK:
            raise_bad_row(reason, 0, "cue")
        growing = self._growing.get(index)
        if growing:
            self._map_ahead(index, growing)
        return Found(generation, segments, rows.tolist(), values.tolist(), texts)

    def _follow(self, index: int, segments: list[Segment]) -> None:
        """Map ahead the columns of a space's segments (its layout changed:
        the LIVE ones and those a compaction builds), and forget those of the
        segments it no longer has, which may be unmapped."""
        held, columns = self._followed.get(index, ([], []))
        if _same(held, segments):
            return  # another space's layout changed: these are followed already
        now = {id(s) for s in segments}
        for c in columns:
            if id(c.segment) not in now:
                self._prefault.forget(c.base)
        columns = _columns_read_per_row(segments)
        self._followed[index] = (segments, columns)
        self._map_ahead(index, columns)

    def _map_ahead(self, index: int, columns: list["_Column"]) -> None:
        """Have the pages of the columns a recall reads per row mapped into
        this process before a recall reads them (store/prefault.py): what
        the segments hold, and ahead of the rows the open ones receive next.
        Called when the space's plan changes and after each recall (whose
        own faults it cannot save); a column leaves the list once its
        segment is sealed and wholly mapped."""
        growing = []
        for c in columns:
            sealed = c.segment.sealed  # before the count: a sealed segment's count is final
            used = c.segment.accepted * c.row_bytes
            self._prefault.ahead(c.base, c.base, used, used if sealed else c.nbytes, wrote=False)
            if not sealed:
                growing.append(c)
        self._growing[index] = growing

    def close(self) -> None:
        self._prefault.close()
        self._spaces.clear()
        self.beacon.close()


class InFlight:
    """The calls in flight through mappings that a close unmaps: a recall's
    kernel reads segments through raw addresses, so unmapping them under it
    would crash the process. `enter` refuses (with `refuse`, which raises)
    once closing began; `close` waits until the calls in flight have left.
    Calls count under a plain lock (a condition's own `with` is a Python
    call, a microsecond of every recall); only `close` waits on it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._left = threading.Condition(self._lock)
        self._count = 0
        self._closing = False

    def enter(self, refuse: Callable[[], None]) -> None:
        with self._lock:
            if self._closing:
                refuse()
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0 and self._closing:  # only `close` waits: no notify_all per recall
                self._left.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._left.wait_for(lambda: self._count == 0)


class Recalls:
    """Recall for engines that hold a `reader` (the embedded engine and attached
    readers share it) and an `in_flight` gate, which their close shuts before
    it unmaps anything."""

    reader: Reader
    in_flight: InFlight
    ef_search: int = 64

    def _check_open(self) -> None:
        raise NotImplementedError

    def _refuse(self) -> None:
        self._check_open()
        raise EngineClosed("the engine is closing")

    def recall(self, space: str, cue, k: int = 10, consistency="strong",
               threshold: float | None = None, ef: int | None = None) -> list[Memory]:
        """The k observations most similar to `cue`, best first.

        consistency: "strong" (default) sees every observation stored before the
        call, indexed or not; "indexed" searches the graph only (fastest; may
        miss the newest); an int generation reads the snapshot at that
        generation. `threshold` drops results below that similarity; `ef` widens
        the graph search (default: the engine's ef_search)."""
        self.in_flight.enter(self._refuse)
        try:
            self._check_open()
            memories, _ = self.reader.recall(space, cue, k, consistency, threshold, ef or self.ef_search)
        finally:
            self.in_flight.leave()
        return memories

    @property
    def generation(self) -> int:
        """The committed generation: every observation up to it is visible."""
        return self.reader.catalog.committed_generation
