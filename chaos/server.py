"""The engine under test: a real server (`engram-shm serve`) on a data
directory of its own, which the chaos suite can kill whole and start again
on the same directory and port, and whose processes it can find."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile

from engram_shm.transport.launch import free_port, running_server

ROLES = {"front": "engram_shm.transport.front", "worker": "engram_shm.engine.worker"}


def children(name: str) -> dict[str, list[int]]:
    """pids of engine `name`'s front and index workers, by role (found by
    their command lines, whoever started the engine)."""
    found = {}
    for role, module in ROLES.items():
        out = subprocess.run(["pgrep", "-f", f"{module} {name} "], capture_output=True, text=True).stdout
        found[role] = [int(pid) for pid in out.split()]
    return found


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
        return sorted(children(self.name)[role])

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""
