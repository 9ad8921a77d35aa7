"""The supervisor of an engine's index worker processes: starts them (after
warming the Numba cache, so none of them compiles), watches them, and restarts
any that dies, first releasing the segments it had claimed. A worker that keeps
dying is restarted with an exponential back-off instead of in a tight loop.

Workers are fresh interpreters (`python -m engram_shm.engine.worker`): the
`spawn` model without multiprocessing's re-import of the parent's __main__,
which would break scripts that lack a main guard and slow every start.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from ..errors import IndexFailed
from ..kernels.warm import warm
from ..store.catalog import W_INCARNATION, W_PID, W_RESTARTS, Catalog
from ..store.segment import Segment
from .indexer import release_claims, token_for

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
WATCH_S = 0.05
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 5.0
STABLE_S = 10.0  # a worker that lived this long restarts at once
STOP_GRACE_S = 10.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Slot:
    """One worker position: its current process and history."""

    def __init__(self, worker: int):
        self.worker = worker
        self.incarnation = 0
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_s: float | None = None
        self.backoff = BACKOFF_MIN_S
        self.restart_at: float | None = None


class Supervisor:
    def __init__(self, catalog: Catalog, workers: int, segments: Callable[[], list[Segment]]):
        self.catalog = catalog
        self.engine = catalog.engine
        self.segments = segments
        self._slots = [_Slot(i) for i in range(workers)]
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        """Start every worker and wait until each is ready to index."""
        warm()
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(self._check_ready(s) for s in self._slots):
            dead = [s for s in self._slots if s.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                why = f"exited with code {dead[0].process.returncode}" if dead else \
                    f"was not ready within {READY_TIMEOUT_S:.0f} s"
                raise IndexFailed(f"index worker {(dead or self._slots)[0].worker} {why}")
            time.sleep(0.01)
        self._watcher = threading.Thread(target=self._watch, name="engram-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        slot.started = time.monotonic()
        slot.ready_s = None
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "engram_shm.engine.worker", self.engine, str(slot.worker),
             str(len(self._slots)), str(slot.incarnation)], env=env, stdin=subprocess.DEVNULL)

    def _check_ready(self, slot: _Slot) -> bool:
        if slot.ready_s is None and slot.process is not None:
            row = self.catalog.workers[slot.worker]
            if row[W_INCARNATION] == slot.incarnation and row[W_PID] == slot.process.pid:
                slot.ready_s = time.monotonic() - slot.started
        return slot.ready_s is not None

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            now = time.monotonic()
            for slot in self._slots:
                if slot.process is not None:
                    self._check_ready(slot)
                    if slot.process.poll() is not None:
                        self._reap(slot, now)
                elif slot.restart_at is not None and now >= slot.restart_at:
                    slot.incarnation += 1
                    slot.restart_at = None
                    self._spawn(slot)

    def _reap(self, slot: _Slot, now: float) -> None:
        p, slot.process = slot.process, None
        freed = release_claims(self.segments(), token_for(slot.worker, slot.incarnation))
        self.restarts += 1
        self.catalog.workers[slot.worker, W_RESTARTS] += 1
        lived = now - slot.started
        slot.backoff = BACKOFF_MIN_S if lived > STABLE_S else min(slot.backoff * 2, BACKOFF_MAX_S)
        slot.restart_at = now + (0.0 if lived > STABLE_S else slot.backoff)
        log.warning("index worker %d (pid %d) died with exit code %s after %.1f s; released %d "
                    "segment(s); restarting", slot.worker, p.pid, p.returncode, lived, freed)

    def pids(self) -> list[int | None]:
        """Current pid of each worker (None while one is being restarted)."""
        return [s.process.pid if s.process is not None else None for s in self._slots]

    def ready_seconds(self) -> list[float | None]:
        """How long each worker's current incarnation took to become ready."""
        return [s.ready_s for s in self._slots]

    def stop(self) -> None:
        """Ask every worker to finish its chunk and exit; kill any that does not."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        procs = [s.process for s in self._slots if s.process is not None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("index worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.wait()
        for slot in self._slots:
            slot.process = None
