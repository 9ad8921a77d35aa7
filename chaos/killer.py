"""Process faults at the moments of a schedule: SIGKILL an index worker or the
front (the supervisor restarts it), SIGKILL the whole engine (then start it
again on its data directory and port), or SIGSTOP the front or a worker for
a few seconds, then SIGCONT (a stall, not a death).

Which worker an event hits is its `pick` (a number in [0, 1) drawn with the
schedule) applied to the sorted pids alive at that moment. An event comes at
its time, or SPACING seconds after the previous fault ended if that is later
(a restart of the whole engine may take longer than the gap to the next)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil

from .server import Server

SPACING = 2.0  # seconds between the end of a fault and the next one, at least
# Processes younger than this are spared: the supervisor stops the whole
# engine when a child dies 3 times before it is ready (its guard against a
# crash loop), and a child starts in 1 to 20 s (loading the compiled kernels,
# on a busy machine). docs/chaos.md, "What the suite found".
MIN_AGE_S = 10.0


class Killer(threading.Thread):
    def __init__(self, server: Server, events, started: float):
        super().__init__(name="chaos-killer", daemon=True)
        self.server, self.events, self.started = server, list(events), started
        self.done: list[tuple[float, str, int | None]] = []  # (second, kind, pid hit or None)
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._stopped: list[int] = []  # pids under SIGSTOP

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        try:
            after = 0.0  # when the last fault was over
            for at, kind, pick, seconds in self.events:
                # On time, but never sooner than SPACING after the last fault
                # ended (an engine restart can outlast the next event's time).
                due = max(self.started + at, after + SPACING)
                if self._halt.wait(max(0.0, due - time.monotonic())):
                    break
                self._do(kind, pick, seconds)
                after = time.monotonic()
        except BaseException as e:
            self.error = e
        finally:
            self._cont_all()

    def _do(self, kind: str, pick: float, seconds: float) -> None:
        t = round(time.monotonic() - self.started, 2)
        if kind == "kill_engine":
            pid = self.server.proc.pid
            self.server.restart()
            self.done.append((t, kind, pid))
            return
        role = "front" if kind.endswith("front") else "worker"
        pids = [pid for pid in self.server.pids(role) if _age(pid) >= MIN_AGE_S]
        if not pids:
            self.done.append((t, kind, None))
            return
        pid = pids[int(pick * len(pids))]
        self.done.append((t, kind, pid))
        if kind.startswith("kill"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            self._stopped.append(pid)
            self._halt.wait(seconds)
            os.kill(pid, signal.SIGCONT)
        self._cont_all()

    def _cont_all(self) -> None:
        while self._stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._stopped.pop(), signal.SIGCONT)


def _age(pid: int) -> float:
    """Seconds since the process started (0 if it is gone)."""
    try:
        return time.time() - psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
