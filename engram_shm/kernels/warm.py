"""Compile every kernel specialisation the engine uses, or load it from Numba's
on-disk cache, in one process before any worker starts: workers then only load
(Numba's cache is not safe against concurrent compilation of the same entry).

Then the engine's child processes `freeze` their kernels: the specialisations
warmed are the only ones they may run, the eager signatures of pynndescent's
kernels without writing out each type. A call of another shape fails at
once with a TypeError instead of compiling for seconds inside a worker
(tests/test_warm.py runs the engine on frozen kernels)."""

from __future__ import annotations

import sys
import time

import numpy as np
from numba.core.registry import CPUDispatcher

from . import atomics, cpu, distance, heap, hnsw, idindex, ids, recall, rows, scalar, vectors
from .atomics import compare_and_swap
from .cache import drop_stale, sources, sources_digest
from .distance import distances, empty_store
from .ids import fnv1a_range
from .rows import append_rows, draw_levels
from .vectors import check_store_rows

KERNEL_MODULES = (atomics, cpu, distance, heap, hnsw, idindex, ids, recall, rows, scalar, vectors)


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.setflags(write=False)
    return v


def _warm_append(dtype_name: str, dim: int) -> None:
    from ..observations import prepare
    from ..store.layout import MAX_LEVEL, SegmentLayout
    from ..store.segment import Columns

    n = 2
    cols = Columns(*(np.zeros(shape, column_dtype) for column, column_dtype, shape
                     in SegmentLayout(n, dim, dtype_name, 2, 64).columns() if column in Columns._fields))
    levels = draw_levels(0, np.arange(1, n + 1, dtype=np.uint64), 2, MAX_LEVEL)
    for payload in (np.ones((n, dim), np.float32), np.ones((n, dim), np.float16).view(np.uint16)):
        batch = prepare(["a", "b"], payload, dim=dim, metric="cosine", dtype="f32")
        append_rows(cols, batch, 1, levels, 0, n, 0, 0, 0, True, np.inf)


def _warm_recall(views: hnsw.SpaceViews, cue: np.ndarray, scales: np.ndarray | None,
                 max_level: int) -> None:
    """A recall of the space (its kernel takes float32 cues only: f16 bits
    are widened before it)."""
    n = views.capacity
    columns = [tuple(np.zeros(n, dtype) for _, dtype in recall.RECORD_COLUMNS)]
    rs = recall.RecallScratch(n, views.dim, views.M, 8, max_level)
    recall.recall(recall.plan(views, columns, "cosine", scales, 1.0, (True, np.inf)), cue, 2, 4, n, True,
                  -np.inf, rs)


def _warm_ids() -> None:
    """The id index as the space writer uses it: rows entered from a segment's
    read-only columns, a table grown (rehash), a batch's ids looked up, with
    more candidates than ids (a collision: the second pass)."""
    from ..observations import prepare

    batch = prepare(["a", "b"], np.ones((2, 2), np.float32), dim=2, metric="l2", dtype="f32")
    n = idindex.MIN_CAPACITY
    id_hash = np.arange(n, dtype=np.uint64)
    id_hash[:3] = fnv1a_range(batch.records, 0, 1)  # "a", three times
    table = idindex.insert_rows(idindex.new_table(), _readonly(id_hash), _readonly(np.ones(n, np.uint64)),
                                0, 0, n)
    idindex.lookup_ids(table, batch.records, batch.record_ends, batch.id_lens)


def warm(readers: bool = True, check_sources: bool = True) -> float:
    """Seconds it took to make every kernel ready in this process (only the
    writers' when `readers` is False: an index worker never searches).
    `check_sources` first drops cached kernels compiled from other sources
    (cache.py); the engine's children skip it: their parent's warm, which
    they start after, checked."""
    start = time.perf_counter()
    if check_sources:
        drop_stale(KERNEL_MODULES, sources_digest(sources()))
    rng = np.random.default_rng(0)
    from ..store.layout import MAX_LEVEL as max_level
    from ..store.layout import STORAGE

    n, dim, M = 8, 4, 2
    levels = np.array([0, 1, 0, 2, 0, 0, 1, 0])
    gens = np.arange(1, n + 1, dtype=np.uint64)
    for dtype_name, dtype in STORAGE.items():
        data = rng.normal(size=(n, dim)).astype(np.float32)
        store = empty_store(n, dim, dtype)  # rows as a space of this dtype stores them
        check_store_rows(data, False, np.inf, store, 40.0 if dtype == np.int8 else 1.0)
        scales = np.ones(dim, np.float32) if dtype == np.int8 else None  # int8: a WeightedMetric
        g = hnsw.new_graph(levels, M, max_level)
        sc = hnsw.new_scratch(n, dim, M, 8, max_level)
        check_store_rows(data, True, 1.0, np.empty((n, dim), np.float32))  # cues
        hnsw.insert(store, gens, g, 0, n, 4, "cosine", sc, scales)
        g.state[1] = 1  # a journal entry, as a killed writer leaves it
        hnsw.repair(g, n, sc)
        if readers:
            ro = hnsw.Graph(*map(_readonly, g))
            header = np.zeros(64, np.int64)
            header[[hnsw.ACCEPTED, hnsw.INDEXED]] = n
            header[hnsw.ENTRY:hnsw.ENTRY + 2] = g.state
            ro = ro._replace(state=_readonly(header[hnsw.ENTRY:hnsw.ENTRY + 2]))
            view = hnsw.SegmentView(_readonly(store), _readonly(gens), ro, _readonly(header))
            _warm_recall(hnsw.SpaceViews([view]), data[:1], scales, max_level)
            distances(store, data[0], "l2", scales)
        _warm_append(dtype_name, dim)
    _warm_ids()
    word = np.zeros(1, np.int64)
    compare_and_swap(word, 0, 0, 0)
    cpu.recall_searched_now(word, cpu.announce_recall_now(word, 0), 0)  # the beacon of a hand-off
    return time.perf_counter() - start


def freeze() -> int:
    """Let this process run only the kernel specialisations compiled so far
    (call after `warm`); returns how many kernels it froze. Kernels only
    ever called from other kernels have none of their own and need none."""
    frozen = 0
    for module in KERNEL_MODULES:
        for kernel in vars(module).values():
            if isinstance(kernel, CPUDispatcher) and kernel._can_compile and kernel.signatures:
                kernel.disable_compile()
                frozen += 1
    return frozen


def skip_blas_probe() -> None:
    """Spare this process Numba's BLAS probe: when its array-math registry
    loads, Numba imports scipy.linalg to see whether np.dot can use BLAS
    (0.2-0.3 s here, at every start and restart). No kernel calls a
    BLAS-backed function, so the processes that run nothing but the engine
    (the server and its children; never a user's process) block
    scipy.linalg's import before their first kernel: a None entry in
    sys.modules makes the probe's import fail at once, and Numba records no
    BLAS."""
    sys.modules.setdefault("scipy.linalg", None)


def ready_child(readers: bool = True) -> int:
    """Make the kernels of one of the engine's child processes ready without
    the BLAS probe: `warm`, then `freeze`; returns how many it froze."""
    skip_blas_probe()
    warm(readers, check_sources=False)
    return freeze()
