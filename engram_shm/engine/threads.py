"""Index writers as threads of the engine's own process: the insert kernels
release the GIL, so one thread per core indexes in parallel with no process to
start. A thread that fails records the error for the engine to raise."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..store.catalog import Catalog
from .beacon import beacon_of
from .directory import Target
from .indexer import IndexWriter, token_for

log = logging.getLogger(__name__)

# An idle writer looks for work this often: the engine wakes it as rows
# arrive and as a merge starts, so this only bounds a missed wake-up.
IDLE_WAIT_S = 0.25


class IndexThreads:
    def __init__(self, catalog: Catalog, workers: int, targets: Callable[[], list[Target]],
                 progress: threading.Condition):
        self.targets = targets
        self.progress = progress
        self.failure: BaseException | None = None
        self._stop = False
        self._writers = [IndexWriter(i, workers, token_for(i, 0), catalog.workers[i], beacon_of(catalog))
                         for i in range(workers)]
        self._threads = [threading.Thread(target=self._loop, args=(w,), daemon=True,
                                          name=f"engram-index-{w.worker}") for w in self._writers]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _loop(self, writer: IndexWriter) -> None:
        try:
            while not self._stop:
                if writer.step(self.targets()):
                    with self.progress:
                        self.progress.notify_all()
                    continue
                with self.progress:
                    if not self._stop:
                        self.progress.wait(IDLE_WAIT_S)
        except BaseException as e:  # the engine raises it from observe / wait_indexed
            log.exception("index writer %d failed", writer.worker)
            self.failure = e
            with self.progress:
                self.progress.notify_all()

    def stop(self) -> None:
        with self.progress:
            self._stop = True
            self.progress.notify_all()
        for t in self._threads:
            t.join()
        self._writers.clear()
