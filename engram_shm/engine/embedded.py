"""The embedded engine: the local Python binding.

`Engine` owns an engine's shared memory (catalog and segments), writes
observations into it, indexes them in background threads (the Numba kernels
release the GIL, so one thread per core indexes in parallel), and recalls.
Other local processes can map the same memory with `engram_shm.attach(name)`.

With `data_dir`, the engine is durable (docs/durability.md): it takes the
directory's lock, loads its newest checkpoint and replays its log before it
opens, logs every batch before `observe` returns (fsynced first under
fsync="always"), checkpoints in the background and once more on `close()`.
Without, everything lives in shared memory only and goes with the engine.

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
from dataclasses import asdict

from ..config import EngineConfig
from ..errors import EngineClosed, IndexFailed, InvalidArgument, Overloaded
from ..store.catalog import (
    W_BUSY_NS,
    W_CLAIMED,
    W_INSERTED,
    W_PID,
    W_RESTARTS,
    WAL_LSN,
    Catalog,
    SpaceParams,
)
from ..store.datadir import DataDir
from ..store.segment import Segment
from ..store.wal import WalWriter
from . import recovery, release
from .checkpointer import Checkpointer, durability_stats
from .directory import SegmentDirectory
from .reader import InFlight, Memory, Reader, Recalls
from .supervisor import Supervisor
from .threads import IndexThreads
from .writer import POLICY_PERIOD_S, Ack, EngineWriter

log = logging.getLogger(__name__)

POLL_S = 0.01  # how often waits re-check counters that worker processes advance
MAINTAIN_S = 0.02  # period of the background compaction step while a merge is in progress


class Engine(Recalls):
    """An engine in this process. Use as a context manager, or call `close()`:
    closing stops the index writers and removes the shared memory.

    Index writers are threads by default; with worker_mode="process" they are
    worker processes under a Supervisor that restarts any that dies."""

    def __init__(self, config: EngineConfig | None = None, *, data_dir: str | None = None, **options):
        if config is not None and options:
            raise InvalidArgument("pass either a config or options, not both")
        self.config = config if config is not None else EngineConfig.from_env(**options)
        if data_dir is not None:
            self.config = dataclasses.replace(self.config, data_dir=str(data_dir))
        self.ef_search = self.config.ef_search
        self.name = self.config.name or f"e{os.getpid()}-{secrets.token_hex(4)}"
        self.datadir = DataDir(self.config.data_dir, f"engine {self.name}") if self.config.durable else None
        try:
            self.catalog = Catalog.create(self.name)
        except BaseException:
            self.datadir and self.datadir.close()
            raise
        self._segments: list[Segment] = []
        self._finalizer = weakref.finalize(self, _release, self.catalog, self._segments, self.datadir)
        self.directory = SegmentDirectory(self.catalog, self._segments.__getitem__)
        self.reader = Reader(self.directory)
        self.in_flight = InFlight()
        self.writer = EngineWriter(self.catalog, self.config, self._on_new_segment, self._on_retired)
        self._write_lock = threading.Lock()
        self._progress = threading.Condition()
        self._stop = False
        self.checkpointer = None
        self._compactor: threading.Thread | None = None
        self.recovered: recovery.Recovered | None = None
        try:
            if self.datadir is not None:
                self._open_data_dir()
            n = self.config.worker_count
            if self.config.worker_mode == "process":
                self.supervisor = Supervisor.for_index_workers(self.catalog, self.config,
                                                               self.directory.segments)
                self._indexing = self.supervisor
            else:
                self.supervisor = None
                self._indexing = IndexThreads(self.catalog, n, self.directory.targets, self._progress)
            self._indexing.start()
            self._compactor = threading.Thread(target=self._compact_in_background,
                                               name=f"engram-{self.name}-compaction", daemon=True)
            self._compactor.start()
        except BaseException:
            self.writer.close()
            self._finalizer()
            raise

    def _open_data_dir(self) -> None:
        """Recover what the directory holds, then log from where it ends."""
        self.recovered = recovery.cold(self.writer, self.datadir, self._on_new_segment,
                                       self._segments.__getitem__)
        log.info("engine %s recovered %s", self.name, self.recovered.summary())
        c = self.config
        self.writer.wal = WalWriter(self.datadir.wal, c.fsync, c.fsync_interval_ms, c.wal_file_bytes,
                                    int(self.catalog.header[WAL_LSN]) + 1, self.catalog.committed_generation)
        self.checkpointer = Checkpointer(self.catalog, self.datadir, c, self.directory.live,
                                         checkpoint_lsn=self.recovered.checkpoint_lsn)
        self.checkpointer.start()

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
        if self._compactor is not None:
            self._compactor.join()
        with self._write_lock:  # let an observe in flight finish
            self._indexing.stop()
            if self.checkpointer is not None:
                self.checkpointer.stop()
                try:
                    self.checkpointer.checkpoint()
                except OSError as e:  # the log still holds everything
                    log.error("engine %s: the checkpoint on close failed (%s); the next start "
                              "replays the log", self.name, e)
        self.in_flight.close()  # recalls in other threads leave before their segments are unmapped
        self.reader.close()
        self.directory.close()
        self.writer.close()
        self._finalizer()

    def checkpoint(self) -> dict:
        """Write a checkpoint now; returns its manifest (number, generation,
        observations, seconds, ...)."""
        self._check_open()
        if self.checkpointer is None:
            raise InvalidArgument("this engine has no data directory (memory only)")
        return self.checkpointer.checkpoint()

    def _check_open(self) -> None:
        if self._stop:
            raise EngineClosed(f"engine {self.name!r} is closed")

    def _on_new_segment(self, index: int, seg: Segment) -> None:
        assert index == len(self._segments)
        self._segments.append(seg)

    def _on_retired(self, index: int, seg: Segment) -> None:
        self._segments[index] = None
        release.later(seg)  # unmapped off the writer's thread, once no recall in flight holds it

    # -- compaction ----------------------------------------------------------------
    def _compact_in_background(self) -> None:
        """Advance merges every MAINTAIN_S while one is in progress, waking
        the index writers that build it; otherwise look again when the
        writer next asks the compaction policy (POLICY_PERIOD_S): an idle
        engine's thread wakes twice a second, not fifty times."""
        busy = False
        while True:
            with self._progress:
                if self._stop:
                    return
                self._progress.wait(MAINTAIN_S if busy else POLICY_PERIOD_S)
            with self._write_lock:
                if self._stop:
                    return
                busy = self.writer.maintain()
            if busy:
                with self._progress:
                    self._progress.notify_all()

    def compact(self, timeout: float | None = None) -> bool:
        """Merge now what compaction merges once a space is idle, and wait
        until every merge is swapped in (recalls and writes go on meanwhile);
        False on timeout. Compaction also runs by itself in the background
        (docs/architecture.md); this is for a bulk load that is done."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.wait_indexed(timeout):  # a merge takes wholly indexed segments
            return False
        while True:
            with self._write_lock:
                self._check_open()
                if not self.writer.maintain(idle_s=0.0):
                    return True
            with self._progress:
                self._raise_failure()
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self._progress.wait(POLL_S)

    # -- spaces ----------------------------------------------------------------
    def create_space(self, name: str, dim: int, dtype: str | None = None, metric: str | None = None,
                     M: int | None = None, ef_construction: int | None = None,
                     seed: int | None = None) -> SpaceParams:
        """Create a space (idempotent for the same parameters). Unset parameters
        take the engine's defaults (f16, cosine, M=16, ef_construction=100)."""
        self._check_open()
        params = self.writer.params(name, dim, dtype, metric, M, ef_construction, seed)
        with self._write_lock:
            return self.writer.create_space(params).params

    def spaces(self) -> list[str]:
        return list(self.writer.spaces)

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
        params, batch = self.writer.prepare(space, ids, vectors, what, when, confidence)
        self._wait_for_room(space, batch.n)
        with self._write_lock:
            self._check_open()
            existing = self.writer.spaces.get(space)
            if existing is not None and existing.params != params:  # created meanwhile
                params, batch = self.writer.prepare(space, ids, vectors, what, when, confidence)
            ack, _ = self.writer.write(params, batch)
            if self.config.fsync == "always" and self.writer.wal is not None:
                self.writer.wal.sync()
        with self._progress:
            self._progress.notify_all()
        return ack

    def _wait_for_room(self, space: str, n: int) -> None:
        writer = self.writer.spaces.get(space)
        if writer is None:
            return
        deadline = time.monotonic() + self.config.observe_timeout_s
        with self._progress:
            while True:
                self._raise_failure()
                if writer.has_room(n):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(
                        f"space {writer.params.name!r} has {writer.window} observations waiting to "
                        f"be indexed (window limit {writer.window_limit}); retry later", retry_after_ms=100)
                self._progress.wait(min(remaining, POLL_S))

    # -- indexing ----------------------------------------------------------------
    def _raise_failure(self) -> None:
        failure = self._indexing.failure
        if failure is not None:
            raise IndexFailed(f"an index writer failed: {failure!r}") from failure

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Block until every stored observation is in the graph; False on
        timeout. (A merge compaction is building does not count: its rows
        are in their own graphs already.)"""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._progress:
            while True:
                self._raise_failure()
                if all(s.backlog == 0 for s in self.directory.live()):
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
        for name, w in list(self.writer.spaces.items()):
            counts = w.stats()
            spaces[name] = {**asdict(w.params), **counts, "owner": self.writer.ledger.owners[name]}
        rows = self.catalog.workers[:self.config.worker_count]
        return {
            "engine": self.name,
            "generation": self.catalog.committed_generation,
            "spaces": spaces,
            "writers": [{"worker": i, "pid": int(r[W_PID]) or None, "inserted": int(r[W_INSERTED]),
                         "busy_s": round(float(r[W_BUSY_NS]) * 1e-9, 3), "restarts": int(r[W_RESTARTS]),
                         "claimed_segment": int(r[W_CLAIMED])}
                        for i, r in enumerate(rows)],
            "durability": durability_stats(self.catalog, self.config),
            "keys": self.writer.ledger.usage(),
        }


def _release(catalog: Catalog, segments: list[Segment], datadir: DataDir | None) -> None:
    """Unmap the segments and remove all of the engine's shared memory (also at
    interpreter exit, for an engine never closed), and release the data
    directory."""
    for seg in segments:
        if seg is not None:
            seg.close()
    segments.clear()
    catalog.close()
    if datadir is not None:
        datadir.close()


__all__ = ["Engine", "Ack", "Memory"]
