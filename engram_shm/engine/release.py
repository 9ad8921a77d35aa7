"""Retired segments are unmapped off the threads that serve.

Unmapping a segment's last mapping frees its memory, and the kernel does
that inside the call: 49-53 ms for a full segment of 131,072 rows of 768-d
f16 (248 MB), 2-10 ms for each other mapping's page tables (a throwaway
timing, 2026-12-05). Which thread drops a segment's last reference is an
accident of timing, and it was the front's loop (every ack and recall
waited) or a recall. So a process hands each segment it retires to
`later`: one daemon thread per process, under SCHED_IDLE (idle.py), holds
them until it holds the only reference (a recall in flight, a reader's plan
may hold one a while longer), then closes them.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ..store.segment import Segment
from .idle import run_when_idle

CHECK_S = 0.05  # how often held segments are looked at while there are any
_OWN = 3  # references to a held segment while it is checked: the list's, the loop's, getrefcount's


class _Releaser:
    def __init__(self):
        self._held: list[Segment] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = None  # the process whose thread runs (a forked child starts its own)

    def later(self, seg: Segment) -> None:
        with self._lock:
            self._held.append(seg)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="engram-release", daemon=True).start()
        self._wake.set()

    def _run(self) -> None:
        run_when_idle()
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._close_free():
                time.sleep(CHECK_S)

    def _close_free(self) -> bool:
        """Close the held segments nothing else references; whether any remain."""
        free, kept = [], []
        with self._lock:
            for seg in self._held:
                (free if sys.getrefcount(seg) <= _OWN else kept).append(seg)
            self._held = kept
        for seg in free:
            seg.close(warn=False)
        return bool(kept)


later = _Releaser().later
