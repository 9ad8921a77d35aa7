"""An index worker process: attaches to the engine's shared memory and runs one
IndexWriter until told to stop (SIGTERM) or until its engine is gone.

    python -m engram_shm.engine.worker ENGINE WORKER WORKERS INCARNATION

The Supervisor starts it as a fresh interpreter (the `spawn` model, without
re-importing the parent's __main__), after warming the Numba cache so that it
only loads compiled kernels. It reports ready by writing its pid last into its
row of the catalog's worker table.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from ..kernels.warm import freeze, warm
from ..store.catalog import W_INCARNATION, W_PID, W_START, Catalog, process_start
from . import lifeline
from .directory import SegmentDirectory
from .indexer import IndexWriter, token_for

log = logging.getLogger(__name__)

IDLE_MIN_S, IDLE_MAX_S = 0.001, 0.02
ORPHAN_CHECK_S = 1.0
WORKER_NICENESS = 10


def run(engine: str, worker: int, workers: int, incarnation: int) -> None:
    lifeline.bind_to_parent()  # first; the orphan check below only runs while idle
    stop = lifeline.StopRequest()
    os.nice(WORKER_NICENESS)  # the front and recalls come first; indexing takes what is left
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    warm(readers=False)
    freeze()
    catalog = Catalog.attach(engine)
    directory = SegmentDirectory(catalog, writable=True)
    row = catalog.workers[worker]
    writer = IndexWriter(worker, workers, token_for(worker, incarnation), row)
    row[W_INCARNATION] = incarnation
    row[W_START] = process_start(os.getpid())  # with the pid: liveness (Catalog.engine_alive)
    row[W_PID] = os.getpid()  # last: the supervisor's ready signal
    parent = os.getppid()
    idle = IDLE_MIN_S
    checked = time.monotonic()
    try:
        while not stop.requested:
            if writer.step(directory.targets()):
                idle = IDLE_MIN_S
                continue
            now = time.monotonic()
            if now - checked > ORPHAN_CHECK_S:
                checked = now
                if os.getppid() != parent or not catalog.owner_alive():
                    log.warning("index worker %d: engine %s is gone, exiting", worker, engine)
                    break
            time.sleep(idle)
            idle = min(idle * 2, IDLE_MAX_S)
    finally:
        del row, writer  # views of the catalog, released before it is unmapped
        directory.close()
        catalog.close()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("ENGRAM_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name, index, count, incarnation = sys.argv[1], *map(int, sys.argv[2:5])
    run(name, index, count, incarnation)
