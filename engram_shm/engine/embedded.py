"""The embedded engine: the local Python binding.

`Engine` owns an engine's shared memory (catalog and segments), writes
observations into it, indexes them in background threads (the Numba kernels
release the GIL, so one thread per core indexes in parallel), and recalls.
Other local processes can map the same memory with `engram_shm.attach(name)`.

Confidence is the encoding confidence of an observation, a number in [0, 1]
(default 1.0) supplied by the client and returned with every recall. It does
not change ranking (similarity does) nor visibility; clients use it to weigh
or filter what they recall.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
import weakref
from dataclasses import asdict, dataclass

import numpy as np

from ..config import EngineConfig
from ..errors import EngineClosed, IndexFailed, InvalidArgument, Overloaded, SpaceExists, UnknownSpace
from ..observations import Limits, prepare
from ..store import shm
from ..store.catalog import W_BUSY_NS, W_CLAIMED, W_INSERTED, W_PID, W_RESTARTS, Catalog, SpaceParams
from ..store.segment import Segment
from ..store.space import SpaceWriter
from .directory import SegmentDirectory
from .reader import Memory, Reader, Recalls
from .supervisor import Supervisor
from .threads import IndexThreads

log = logging.getLogger(__name__)

POLL_S = 0.01  # how often waits re-check counters that worker processes advance


@dataclass(frozen=True)
class Ack:
    """Observations stored and visible to recall: generations first..last."""
    space: str
    first_generation: int
    last_generation: int

    @property
    def count(self) -> int:
        return self.last_generation - self.first_generation + 1


class Engine(Recalls):
    """An engine in this process. Use as a context manager, or call `close()`:
    closing stops the index writers and removes the shared memory.

    Index writers are threads by default; with worker_mode="process" they are
    worker processes under a Supervisor that restarts any that dies."""

    def __init__(self, config: EngineConfig | None = None, **options):
        if config is not None and options:
            raise InvalidArgument("pass either a config or options, not both")
        self.config = config if config is not None else EngineConfig.from_env(**options)
        self.ef_search = self.config.ef_search
        self.name = self.config.name or f"e{os.getpid()}-{secrets.token_hex(4)}"
        self._limits = Limits(self.config.max_id_bytes, self.config.max_text_bytes)
        self.catalog = Catalog.create(self.name)
        self._segments: list[Segment] = []
        self._finalizer = weakref.finalize(self, _release, self.catalog, self._segments)
        self.directory = SegmentDirectory(self.catalog, self._segments.__getitem__)
        self.reader = Reader(self.directory)
        self._spaces: dict[str, SpaceWriter] = {}
        self._write_lock = threading.Lock()
        self._progress = threading.Condition()
        self._stop = False
        n = self.config.worker_count
        if self.config.worker_mode == "process":
            self.supervisor = Supervisor(self.catalog, n, self.directory.segments)
            self._indexing = self.supervisor
        else:
            self.supervisor = None
            self._indexing = IndexThreads(self.catalog, n, self.directory.targets, self._progress)
        try:
            self._indexing.start()
        except BaseException:
            self._finalizer()
            raise

    # -- context ---------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop indexing and remove the engine's shared memory."""
        if self._stop:
            return
        with self._progress:
            self._stop = True
            self._progress.notify_all()
        with self._write_lock:  # let an observe in flight finish
            self._indexing.stop()
        self.reader.close()
        self.directory.close()
        self._spaces.clear()
        self._finalizer()

    def _check_open(self) -> None:
        if self._stop:
            raise EngineClosed(f"engine {self.name!r} is closed")

    # -- spaces ----------------------------------------------------------------
    def create_space(self, name: str, dim: int, dtype: str | None = None, metric: str | None = None,
                     M: int | None = None, ef_construction: int | None = None,
                     seed: int | None = None) -> SpaceParams:
        """Create a space (idempotent for the same parameters). Unset parameters
        take the engine's defaults (f16, cosine, M=16, ef_construction=100)."""
        self._check_open()
        c = self.config
        probe = EngineConfig(dtype=dtype or c.dtype, metric=metric or c.metric, M=M or c.M,
                             ef_construction=ef_construction or c.ef_construction,
                             seed=c.seed if seed is None else seed)
        _check_space_name(name)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= 65536:
            raise InvalidArgument(f"dim must be an integer in [1, 65536], got {dim!r}")
        params = SpaceParams(name, int(dim), probe.dtype, probe.metric, probe.M,
                             probe.ef_construction, probe.seed)
        with self._write_lock:
            return self._create_space(params).params

    def _create_space(self, params: SpaceParams) -> SpaceWriter:
        existing = self._spaces.get(params.name)
        if existing is not None:
            if existing.params != params:
                raise SpaceExists(f"space {params.name!r} exists as {asdict(existing.params)}")
            return existing
        index = self.catalog.add_space(params)
        c = self.config
        arena = max(c.segment_capacity * c.text_bytes_per_observation, c.max_id_bytes + c.max_text_bytes)
        writer = SpaceWriter(self.catalog, index, params, c.segment_capacity, arena,
                             c.worker_count, self._on_new_segment)
        self._spaces[params.name] = writer
        return writer

    def _on_new_segment(self, index: int, seg: Segment) -> None:
        assert index == len(self._segments)
        self._segments.append(seg)

    def spaces(self) -> list[str]:
        return list(self._spaces)

    # -- writing -----------------------------------------------------------------
    def observe(self, space: str, ids, vectors, what=None, when=None, confidence=None) -> Ack:
        """Store one observation (`ids` a str, `vectors` 1-D) or a batch (a
        sequence of ids, an (n, dim) array, and optional sequences of texts,
        timestamps and confidences). When it returns, the observations are
        visible to every recall. A space not yet created takes its dimension
        from the vectors and the engine's defaults for the rest.

        When the space's unindexed window is full, waits up to
        `observe_timeout_s` for indexing to catch up, then raises Overloaded."""
        self._check_open()
        _check_space_name(space)
        writer = self._spaces.get(space)
        c = self.config
        shape = writer.params if writer else SpaceParams(space, 0, c.dtype, c.metric, c.M,
                                                         c.ef_construction, c.seed)
        batch = prepare(ids, vectors, what, when, confidence, dim=shape.dim or None,
                        metric=shape.metric, dtype=shape.dtype, limits=self._limits)
        if writer is None:
            with self._write_lock:
                writer = self._spaces.get(space) or self._create_space(
                    dataclasses.replace(shape, dim=batch.dim))
            if writer.params != dataclasses.replace(shape, dim=batch.dim):  # another thread won
                return self.observe(space, ids, vectors, what, when, confidence)
        self._wait_for_room(writer, batch.n)
        with self._write_lock:
            self._check_open()
            writer.check_new_ids(batch.ids)
            first = self.catalog.committed_generation + 1
            writer.append(batch, first)
            self.catalog.publish_generation(first + batch.n - 1)
        with self._progress:
            self._progress.notify_all()
        return Ack(space, first, first + batch.n - 1)

    def _wait_for_room(self, writer: SpaceWriter, n: int) -> None:
        capacity = self.config.ring_capacity
        deadline = time.monotonic() + self.config.observe_timeout_s
        with self._progress:
            while True:
                self._raise_failure()
                window = writer.window
                if window == 0 or window + n <= capacity:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(
                        f"space {writer.params.name!r} has {window} observations waiting to be "
                        f"indexed (ring capacity {capacity}); retry later", retry_after_ms=100)
                self._progress.wait(min(remaining, POLL_S))

    # -- indexing ----------------------------------------------------------------
    def _raise_failure(self) -> None:
        failure = getattr(self._indexing, "failure", None)
        if failure is not None:
            raise IndexFailed(f"an index writer failed: {failure!r}") from failure

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Block until every stored observation is in the graph; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._progress:
            while True:
                self._raise_failure()
                if all(s.backlog == 0 for s in self.directory.segments()):
                    return True
                if self._stop:
                    return False
                remaining = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)

    # -- stats -------------------------------------------------------------------
    def stats(self) -> dict:
        """Counts per space and per index writer, for humans and metrics."""
        spaces = {}
        for name, w in list(self._spaces.items()):
            count, indexed = w.count, w.indexed
            spaces[name] = {
                **asdict(w.params),
                "count": count,
                "indexed": indexed,
                "window": count - indexed,
                "pressure": (count - indexed) / self.config.ring_capacity,
                "segments": len(w.segments),
                "shm_bytes": sum(shm.block_bytes(s.name) for s in w.segments),
            }
        rows = self.catalog.workers[:self.config.worker_count]
        return {
            "engine": self.name,
            "generation": self.catalog.committed_generation,
            "spaces": spaces,
            "writers": [{"worker": i, "pid": int(r[W_PID]) or None, "inserted": int(r[W_INSERTED]),
                         "busy_s": round(float(r[W_BUSY_NS]) * 1e-9, 3), "restarts": int(r[W_RESTARTS]),
                         "claimed_segment": int(r[W_CLAIMED])}
                        for i, r in enumerate(rows)],
        }


def _check_space_name(name) -> None:
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "replace")) > 128 \
            or not name.isprintable():
        raise InvalidArgument(f"space names are printable str of 1 to 128 UTF-8 bytes, got {name!r}")


def _release(catalog: Catalog, segments: list[Segment]) -> None:
    """Unmap the segments and remove all of the engine's shared memory (also at
    interpreter exit, for an engine never closed)."""
    for seg in segments:
        seg.close()
    segments.clear()
    catalog.close()


__all__ = ["Engine", "Ack", "Memory", "UnknownSpace"]
