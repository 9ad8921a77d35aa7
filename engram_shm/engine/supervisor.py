"""The supervisor of an engine's processes (index workers, and in a server the
front): starts them after warming the Numba cache (so none of them compiles),
watches them, and restarts any that dies, after running its exit hook (an
index worker's releases the segments it had claimed). A child that keeps dying
is restarted with an exponential back-off instead of in a tight loop.

Children are fresh interpreters (`python -m ...`): the `spawn` model without
multiprocessing's re-import of the parent's __main__, which would break
scripts that lack a main guard and slow every start.

Children die with this process (lifeline.py: the pid in ENGRAM_PARENT_PID,
PR_SET_PDEATHSIG). That signal comes when the *thread* that forked a child
exits, so every child is spawned by the watcher thread, which stops its
children before it ends: never by the thread that called `start()`, which may
be a short-lived one (an embedded Engine can be created in any thread).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import EngineConfig
from ..errors import IndexFailed
from ..kernels.warm import warm
from ..store.catalog import W_INCARNATION, W_PID, W_RESTARTS, Catalog
from ..store.segment import Segment
from .idle import remove_idle_cgroup
from .indexer import release_claims, token_for
from .lifeline import PARENT_ENV

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
WATCH_S = 0.05
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 5.0
STABLE_S = 10.0  # a child that lived this long restarts at once
STOP_GRACE_S = 10.0
STARTUP_DEATHS = 3  # deaths of a child never yet ready that fail the start
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ChildSpec:
    """What the supervisor needs to run one kind of child."""
    name: str
    argv: Callable[[int], list[str]]  # incarnation -> command line
    ready: Callable[[int, int], bool]  # (pid, incarnation) -> has it said it is ready?
    on_exit: Callable[[int], None]  # incarnation -> clean up after a death (before the restart)
    # incarnation -> free what it held, once it is stopped for good: one that
    # had to be SIGKILLed at stop may still hold a segment's writer claim,
    # which the last checkpoint would wait for
    release: Callable[[int], None] = lambda incarnation: None


class _Child:
    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.incarnation = 0
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_s: float | None = None
        self.backoff = BACKOFF_MIN_S
        self.restart_at: float | None = None
        self.restarts = 0
        self.ever_ready = False
        self.last_exit: int | None = None
        self.spawn_error: OSError | None = None


def index_worker_specs(catalog: Catalog, config: EngineConfig,
                       segments: Callable[[], list[Segment]]) -> list[ChildSpec]:
    engine, workers, config_json = catalog.engine, config.worker_count, config.to_json()

    def spec(i: int) -> ChildSpec:
        def ready(pid, incarnation):
            row = catalog.workers[i]
            return row[W_INCARNATION] == incarnation and row[W_PID] == pid

        def release(incarnation):
            freed = release_claims(segments(), token_for(i, incarnation))
            if freed:
                log.warning("index worker %d released %d segment(s)", i, freed)

        def on_exit(incarnation):
            catalog.workers[i, W_RESTARTS] += 1
            release(incarnation)

        return ChildSpec(f"index-{i}", lambda inc: ["-m", "engram_shm.engine.worker", engine, str(i),
                                                    str(workers), str(inc), config_json], ready, on_exit,
                         release)

    return [spec(i) for i in range(workers)]


class Supervisor:
    failure = None  # a dead child is restarted, never reported as the engine's failure

    def __init__(self, specs: list[ChildSpec]):
        self._children = [_Child(s) for s in specs]
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_index_workers(cls, catalog: Catalog, config: EngineConfig,
                          segments: Callable[[], list[Segment]]) -> "Supervisor":
        return cls(index_worker_specs(catalog, config, segments))

    def start(self) -> None:
        """Start every child and wait until each is ready. A child that dies
        meanwhile is restarted like any other time; one that keeps dying (a
        crash loop: STARTUP_DEATHS deaths before it was ever ready) fails the
        start with its exit code."""
        warm()
        with self._lock:
            for child in self._children:
                child.restart_at = 0.0  # the watcher spawns it at once (see the module docstring)
        self._watcher = threading.Thread(target=self._watch, name="engram-supervisor", daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with self._lock:
                if all(self._check_ready(c) for c in self._children):
                    return
                looping = [c for c in self._children if c.ever_ready is False
                           and c.restarts >= STARTUP_DEATHS]
            if looping or time.monotonic() > deadline:
                if not looping:
                    why = f"was not ready within {READY_TIMEOUT_S:.0f} s"
                elif looping[0].spawn_error is not None:
                    why = f"could not be started {looping[0].restarts} times ({looping[0].spawn_error})"
                else:
                    why = (f"died {looping[0].restarts} times while starting (last exit code "
                           f"{looping[0].last_exit})")
                self.stop()
                raise IndexFailed(f"{(looping or self._children)[0].spec.name} {why}")
            time.sleep(0.01)

    def _spawn(self, child: _Child) -> None:
        """Start a child; only the watcher thread calls this (PDEATHSIG)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        env[PARENT_ENV] = str(os.getpid())
        child.started = time.monotonic()
        child.ready_s = None
        child.process = subprocess.Popen([sys.executable, *child.spec.argv(child.incarnation)], env=env,
                                         stdin=subprocess.DEVNULL)
        child.spawn_error = None

    def _check_ready(self, child: _Child) -> bool:
        if child.ready_s is None and child.process is not None and \
                child.spec.ready(child.process.pid, child.incarnation):
            child.ready_s = time.monotonic() - child.started
            child.ever_ready = True
        return child.ready_s is not None

    def _watch(self) -> None:
        while True:
            try:
                self._watch_once()
            except Exception:  # the supervisor must outlive any one failure
                log.exception("supervisor: watching the children failed; retrying")
            if self._stopping.wait(WATCH_S):
                return

    def _watch_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._stopping.is_set():  # stop() owns the children now
                return
            for child in self._children:
                if child.process is not None:
                    self._check_ready(child)
                    if child.process.poll() is not None:
                        self._reap(child, now)
                elif child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    try:
                        self._spawn(child)
                    except OSError as e:  # no memory, too many processes: try again later
                        child.spawn_error = e
                        self._back_off(child, now, lived=0.0)
                        log.error("%s could not be started (%s); retrying in %.2f s", child.spec.name,
                                  e, child.restart_at - now)

    def _reap(self, child: _Child, now: float) -> None:
        p, child.process = child.process, None
        child.last_exit = p.returncode
        child.spec.on_exit(child.incarnation)
        child.incarnation += 1
        lived = now - child.started
        self._back_off(child, now, lived)
        log.warning("%s (pid %d) died with exit code %s after %.1f s; restarting", child.spec.name,
                    p.pid, p.returncode, lived)

    @staticmethod
    def _back_off(child: _Child, now: float, lived: float) -> None:
        child.restarts += 1
        child.backoff = BACKOFF_MIN_S if lived > STABLE_S else min(child.backoff * 2, BACKOFF_MAX_S)
        child.restart_at = now + (0.0 if lived > STABLE_S else child.backoff)

    def pids(self) -> list[int | None]:
        """Current pid of each child (None while one is being restarted)."""
        return [c.process.pid if c.process is not None else None for c in self._children]

    def children(self) -> list[tuple[str, int, bool]]:
        """(name, restarts, up: running and ready) of each child, for metrics."""
        with self._lock:
            return [(c.spec.name, c.restarts, c.process is not None and c.ready_s is not None)
                    for c in self._children]

    def ready_seconds(self) -> list[float | None]:
        """How long each child's current incarnation took to become ready."""
        return [c.ready_s for c in self._children]

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every child: SIGTERM, then SIGKILL for any still running after
        `grace_s`. They are stopped before the watcher thread ends: its end
        would SIGKILL the children it spawned (PDEATHSIG), with no grace."""
        with self._lock:
            self._stopping.set()
            stopped = [(c, c.process, c.incarnation) for c in self._children if c.process is not None]
            for c in self._children:
                c.process = c.restart_at = None
        self._terminate([proc for _, proc, _ in stopped], grace_s)
        for child, _, incarnation in stopped:
            child.spec.release(incarnation)
        remove_idle_cgroup()  # the index workers' (idle.py), unless another engine's are in it
        if self._watcher is not None:
            self._watcher.join()

    def stop_child(self, index: int, grace_s: float = STOP_GRACE_S) -> None:
        """Stop one child for good (it is not restarted)."""
        child = self._children[index]
        with self._lock:
            child.restart_at = None
            proc, child.process, incarnation = child.process, None, child.incarnation
        if proc is not None:
            self._terminate([proc], grace_s)
            child.spec.release(incarnation)

    @staticmethod
    def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
