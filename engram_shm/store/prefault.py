"""Fault in segment pages ahead of the writer, and map them ahead of the
readers, off their threads.

tmpfs allocates a page on its first write: a 256 x 768 f16 batch lands on ~100
fresh pages, and faulting them in on the ingest path cost more than validating
and storing the batch (0.33 ms against 0.08 ms). A background thread keeps a
window of the vectors column populated ahead of each open segment's write
cursor with madvise(MADV_POPULATE_WRITE), called through ctypes so that it
runs without the GIL, in parallel with the writer. Populating changes no byte,
so it is safe next to the writer. Kernels without it (before Linux 5.14) fall
back to faulting on write, as before.

The thread runs with the priority its owner gives it (`setup`, run on the
thread first; the engine's writer and readers: SCHED_IDLE, engine/idle.py): populating
half a window zeroes up to 2,048 pages, milliseconds of kernel time that at
the front's priority came out of the recall readers' share of the cores
(docs/architecture.md, Storage). When no core is free the window falls
behind and the writer faults its own pages, as without the thread.

Readers (each a process with page tables of its own) fault too: at 768 f16
dims and 6,000 observations/s, each new row costs a reader a third of a page
it has not mapped, and a strong recall reads every row of the window. The
server's readers took 263 to 1,145 minor faults in a recall that answered
in 1.6 to 4.5 ms (one with 945 took 4.41 ms of CPU: up to 4.7 us a fault
on an Emerald Rapids VM), the slowest of 300 recalls under ingestion. A
reader's Prefaulter maps the pages written since (MADV_POPULATE_READ: no
byte changes) between its recalls.

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
from collections.abc import Callable, Hashable

from ..engine.idle import give_way

log = logging.getLogger(__name__)

MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_EINVAL = 22  # errno: the kernel lacks the advice (other errors: a range unmapped since)
PAGE = 4096
WINDOW_BYTES = 16 << 20  # populated ahead of the cursor at most
# ... and at least this much (16 pages), so that the first writes of a segment do
# not wake the thread for a page or two each time.
MIN_WINDOW_BYTES = 64 << 10
# At most this much a call, and the thread gives way between two: a call
# holds the process's mmap lock, which its other threads' mmap and munmap (a
# large NumPy array's) wait for (a reader mapping a 300 MB column in one call
# stalled a recall for 17.9 ms), and the core, which a thread of another
# process may wait for (engine/idle.py, give_way). 256 KiB take 0.14 ms to
# populate for writing, 0.03 ms for reading (Emerald Rapids VM).
CALL_BYTES = 256 << 10


class Prefaulter:
    def __init__(self, setup: Callable[[], None] = lambda: None, advice: int = MADV_POPULATE_WRITE):
        """`advice`: MADV_POPULATE_WRITE for a writer's pages,
        MADV_POPULATE_READ for a read-only mapping's."""
        self._setup = setup
        self._advice = advice
        try:
            self._madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self._madvise = None
        self._targets: dict[Hashable, tuple[int, int, int]] = {}  # key -> (base, done, target)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def ahead(self, key: Hashable, base: int, used: int, limit: int, wrote: bool = True) -> None:
        """The region [base, base + limit) is written from its start; `used`
        bytes are written. Keep a window past them populated, as large as
        `used` within [MIN_WINDOW_BYTES, WINDOW_BYTES]; refill it when less than
        half of it is left. `wrote`: this process wrote the `used` bytes, so
        they are populated here (a reader's are not: from the start)."""
        if self._madvise is None:
            return
        window = min(WINDOW_BYTES, max(MIN_WINDOW_BYTES, used))
        with self._wake:
            _, done, _ = self._targets.get(key, (base, 0, 0))
            if wrote:
                done = max(done, used)
            if done >= min(limit, used + window // 2):
                return
            self._targets[key] = (base, done, min(limit, used + window))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engram-prefault", daemon=True)
                self._thread.start()
            self._wake.notify()

    def pending(self) -> bool:
        """Is some region not populated as far as asked yet?"""
        with self._wake:
            return self._madvise is not None and any(d < t for _, d, t in self._targets.values())

    def forget(self, key: Hashable) -> None:
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
            give_way()
            target = min(target, done + CALL_BYTES)
            start = (base + done) // PAGE * PAGE  # madvise takes page-aligned addresses
            end = -(-(base + target) // PAGE) * PAGE
            if self._madvise(start, end - start, self._advice) != 0:
                errno = ctypes.get_errno()
                if errno == _EINVAL:
                    log.info("madvise(%d) unavailable: pages fault on first use", self._advice)
                    self._madvise = None
                    return
                self.forget(key)  # unmapped under us (a segment its owner closed)
                continue
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
