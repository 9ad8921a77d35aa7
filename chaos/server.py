"""The engine under test: a real server (`engram-shm serve`) on a data
directory of its own, which the chaos suite can kill whole and start again
on the same directory and port, and whose processes it can find."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile

import psutil

from engram_shm.transport.launch import free_port, running_server

ROLES = {"front": "engram_shm.transport.front", "worker": "engram_shm.engine.worker"}


class Server:
    def __init__(self, flags: list[str], env: dict, workers: int = 2):
        self.flags, self.env, self.workers = flags, env, workers
        self.port = free_port()
        self.data = tempfile.mkdtemp(prefix="engram-chaos-")
        self.starts = 0
        self._stack: contextlib.ExitStack | None = None
        self.endpoint = self.name = self.proc = None

    def start(self) -> None:
        stack = contextlib.ExitStack()
        self.endpoint, self.name, self.proc = stack.enter_context(
            running_server(*self.flags, workers=self.workers, data=self.data, port=self.port, env=self.env))
        self._stack = stack
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL the whole engine (supervisor and children), collect its memory."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._stack.close()  # waits for the children and collects the shared memory

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop it cleanly (SIGINT) and remove its data directory."""
        try:
            if self._stack is not None:
                self._stack.close()
        finally:
            self._stack = None
            shutil.rmtree(self.data, ignore_errors=True)

    def pids(self, role: str) -> list[int]:
        """The live processes of a role (`front`, `worker`)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if ROLES[role] in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child.pid)
        return sorted(found)

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""
