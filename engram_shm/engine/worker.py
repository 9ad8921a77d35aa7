"""An index worker process: attaches to the engine's shared memory and runs one
IndexWriter until told to stop (SIGTERM) or until its engine is gone.

    python -m engram_shm.engine.worker ENGINE WORKER WORKERS INCARNATION CONFIG_JSON

The Supervisor starts it as a fresh interpreter (the `spawn` model, without
re-importing the parent's __main__), after warming the Numba cache so that it
only loads compiled kernels. It reports ready by writing its pid last into its
row of the catalog's worker table. Its row of the stats block
(observability/stats_block.py) gets its utilization, steals and the size of
each chunk it inserts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from ..config import EngineConfig
from ..kernels.warm import ready_child
from ..observability import logs
from ..observability.stats_block import DEFERRED_US, STOLEN, UTILIZATION, StatsBlock
from ..store.catalog import W_BUSY_NS, W_INCARNATION, W_PID, W_START, Catalog, process_start
from . import lifeline
from .beacon import beacon_of
from .directory import SegmentDirectory
from .idle import join_idle_cgroup, own_idle_autogroup, run_when_idle
from .indexer import IndexWriter, token_for

log = logging.getLogger(__spec__.name)  # its module's name, also when run with -m

IDLE_MIN_S, IDLE_MAX_S = 0.001, 0.02
ORPHAN_CHECK_S = 1.0
UTILIZATION_S = 1.0  # the window the utilization is measured over


def run(engine: str, worker: int, workers: int, incarnation: int, config: EngineConfig) -> None:
    lifeline.bind_to_parent()  # first; the orphan check below only runs while idle
    stop = lifeline.StopRequest()
    run_when_idle()  # the front and recalls come first; indexing takes what is left
    own_idle_autogroup()  # a session of its own, whose group weighs least ...
    join_idle_cgroup()  # ... and, where it may, an idle cgroup, which yields at once
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    ready_child(readers=False)
    catalog = Catalog.attach(engine)
    directory = SegmentDirectory(catalog, writable=True)
    metrics = StatsBlock.attach(engine, config.metrics_spaces, workers)
    row = catalog.workers[worker]
    writer = IndexWriter(worker, workers, token_for(worker, incarnation), row, beacon_of(catalog))
    row[W_INCARNATION] = incarnation
    row[W_START] = process_start(os.getpid())  # with the pid: liveness (Catalog.engine_alive)
    row[W_PID] = os.getpid()  # last: the supervisor's ready signal
    log.info("index worker %d of %s ready (incarnation %d)", worker, engine, incarnation)
    parent = os.getppid()
    idle = IDLE_MIN_S
    checked = window_at = time.monotonic()
    busy_at, stolen, deferred = int(row[W_BUSY_NS]), 0, 0.0
    try:
        while not stop.requested:
            inserted = writer.step(directory.targets())
            now = time.monotonic()
            if now - window_at >= UTILIZATION_S:
                busy = int(row[W_BUSY_NS])
                metrics.workers[worker, UTILIZATION] = min(1e6, (busy - busy_at) * 1e-3 / (now - window_at))
                busy_at, window_at = busy, now
            if inserted:
                metrics.batch_sizes[worker].observe(inserted)
                metrics.workers[worker, STOLEN] += writer.stolen - stolen
                metrics.workers[worker, DEFERRED_US] += round((writer.deferred_s - deferred) * 1e6)
                stolen, deferred = writer.stolen, writer.deferred_s
                idle = IDLE_MIN_S
                continue
            if now - checked > ORPHAN_CHECK_S:
                checked = now
                if os.getppid() != parent or not catalog.owner_alive():
                    log.warning("index worker %d: engine %s is gone, exiting", worker, engine)
                    break
            time.sleep(idle)
            idle = min(idle * 2, IDLE_MAX_S)
    finally:
        del row, writer  # views of the catalog, released before it is unmapped
        metrics.close()
        directory.close()
        catalog.close()


if __name__ == "__main__":
    name, index, count, incarnation = sys.argv[1], *map(int, sys.argv[2:5])
    settings = EngineConfig.from_json(sys.argv[5])
    logs.configure(settings, f"index-{index}")
    run(name, index, count, incarnation, settings)
