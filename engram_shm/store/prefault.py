"""Fault in segment pages ahead of the writer, off its thread.

tmpfs allocates a page on its first write: a 256 x 768 f16 batch lands on ~100
fresh pages, and faulting them in on the ingest path cost more than validating
and storing the batch (0.33 ms against 0.08 ms). A background thread keeps a
window of the vectors column populated ahead of each open segment's write
cursor with madvise(MADV_POPULATE_WRITE), from a kernel that runs without the
GIL and in small steps (kernels/pages.py: a long call stalls the writer).
Populating changes no byte, so it is safe next to the writer. Kernels without
it (before Linux 5.14) fall back to faulting on write, as before.
"""

from __future__ import annotations

import logging
import threading

from ..kernels.pages import populate

log = logging.getLogger(__name__)

PAGE = 4096
STEP_BYTES = 64 << 10  # per madvise: bounds how long it holds the mmap lock
WINDOW_BYTES = 16 << 20  # keep this much populated ahead of the cursor
LOW_WATER_BYTES = 8 << 20  # refill when less than this is left


class Prefaulter:
    def __init__(self):
        self._enabled = True
        self._targets: dict[int, tuple[int, int, int]] = {}  # key -> (base, done, target)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def ahead(self, key: int, base: int, used: int, limit: int) -> None:
        """The region [base, base + limit) is written from its start; `used`
        bytes are written. Keep WINDOW_BYTES past them populated."""
        if not self._enabled:
            return
        with self._wake:
            _, done, _ = self._targets.get(key, (base, used, used))
            if done - used >= LOW_WATER_BYTES:
                return
            self._targets[key] = (base, max(done, used), min(limit, used + WINDOW_BYTES))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engram-prefault", daemon=True)
                self._thread.start()
            self._wake.notify()

    def forget(self, key: int) -> None:
        with self._wake:
            self._targets.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not any(d < t for _, d, t in self._targets.values()):
                    self._wake.wait()
                if self._stop:
                    return
                key, (base, done, target) = next((k, v) for k, v in self._targets.items() if v[1] < v[2])
            start = (base + done) // PAGE * PAGE  # madvise takes page-aligned addresses
            end = -(-(base + target) // PAGE) * PAGE
            if populate(start, end, STEP_BYTES) != end:
                log.info("MADV_POPULATE_WRITE refused: pages fault on write")
                self._enabled = False
                return
            with self._wake:
                if key in self._targets:
                    b, d, t = self._targets[key]
                    self._targets[key] = (b, max(d, target), t)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._targets.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
