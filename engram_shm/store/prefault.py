"""Fault in segment pages ahead of the writer, off its thread.

tmpfs allocates a page on its first write: a 256 x 768 f16 batch lands on ~100
fresh pages, and faulting them in on the ingest path cost more than validating
and storing the batch (0.33 ms against 0.08 ms). A background thread keeps a
window of the vectors column populated ahead of each open segment's write
cursor with madvise(MADV_POPULATE_WRITE), called through ctypes so that it
runs without the GIL, in parallel with the writer. Populating changes no byte,
so it is safe next to the writer. Kernels without it (before Linux 5.14) fall
back to faulting on write, as before.

The thread runs with the priority its owner gives it (`setup`, run on the
thread first; the engine's writer: SCHED_IDLE, engine/idle.py): populating
half a window zeroes up to 2,048 pages, milliseconds of kernel time that at
the front's priority came out of the recall readers' share of the cores
(docs/architecture.md, Storage). When no core is free the window falls
behind and the writer faults its own pages, as without the thread.

How far ahead is proportional to what the segment holds: populated pages are
memory spent, and a space that received one observation must not own megabytes
of pages it may never write. The window is the bytes written so far, at least
MIN_WINDOW_BYTES and at most WINDOW_BYTES: a segment filled at a high rate soon
has the full window (256 x 768 f16 batches reach it after 43 batches), while
a trickle has at most max(MIN_WINDOW_BYTES, what it wrote) populated unwritten.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
PAGE = 4096
WINDOW_BYTES = 16 << 20  # populated ahead of the cursor at most
# ... and at least this much (16 pages), so that the first writes of a segment do
# not wake the thread for a page or two each time.
MIN_WINDOW_BYTES = 64 << 10


class Prefaulter:
    def __init__(self, setup: Callable[[], None] = lambda: None):
        self._setup = setup
        try:
            self._madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self._madvise = None
        self._targets: dict[int, tuple[int, int, int]] = {}  # key -> (base, done, target)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def ahead(self, key: int, base: int, used: int, limit: int) -> None:
        """The region [base, base + limit) is written from its start; `used`
        bytes are written. Keep a window past them populated, as large as
        `used` within [MIN_WINDOW_BYTES, WINDOW_BYTES]; refill it when less than
        half of it is left."""
        if self._madvise is None:
            return
        window = min(WINDOW_BYTES, max(MIN_WINDOW_BYTES, used))
        with self._wake:
            _, done, _ = self._targets.get(key, (base, used, used))
            if done - used >= window // 2:
                return
            self._targets[key] = (base, max(done, used), min(limit, used + window))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engram-prefault", daemon=True)
                self._thread.start()
            self._wake.notify()

    def forget(self, key: int) -> None:
        with self._wake:
            self._targets.pop(key, None)

    def _run(self) -> None:
        self._setup()
        while True:
            with self._wake:
                while not self._stop and not any(d < t for _, d, t in self._targets.values()):
                    self._wake.wait()
                if self._stop:
                    return
                key, (base, done, target) = next((k, v) for k, v in self._targets.items() if v[1] < v[2])
            start = (base + done) // PAGE * PAGE  # madvise takes page-aligned addresses
            end = -(-(base + target) // PAGE) * PAGE
            if self._madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
                log.info("MADV_POPULATE_WRITE unavailable (errno %d): pages fault on write",
                         ctypes.get_errno())
                self._madvise = None
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
