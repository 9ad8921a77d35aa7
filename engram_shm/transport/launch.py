"""Start a real server process on a free loopback port (tests, benchmarks,
examples): started with the CLI, ready when it answers a ping, stopped with
SIGINT, and killed (its shared memory collected) if it does not stop in time."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..errors import Unauthenticated
from ..store import shm
from ..store.catalog import collect_stale
from .client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*flags: str, workers: int = 2, startup_s: float = 60.0, data: str | None = None,
                   port: int | None = None, preexec_fn=None, env: dict | None = None):
    """Yields (endpoint, engine name, process) of a server run with extra CLI
    flags; on exit stops it and checks its shared memory is gone. `data` is
    its data directory (kept); without, a fresh one is made and removed, so
    servers never share one. `port` reuses an endpoint (a restart); `env`, its
    environment (default: this process's). Its
    metrics are served on a free loopback port unless `flags` say where."""
    port = port or free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    name = f"t-srv-{port}"
    own_data = data is None and "--data" not in flags
    if own_data:
        data = tempfile.mkdtemp(prefix=f"engram-{name}-")
    data_flags = ("--data", data) if data is not None else ()
    metrics_flags = () if "--metrics" in flags else ("--metrics", "127.0.0.1:0")
    # The server's output goes to a file (a pipe nobody reads could block it).
    log_path = os.path.join(tempfile.gettempdir(), f"engram-{name}.log")
    with open(log_path, "a") as log:
        command = ["serve", "--endpoint", endpoint, "--name", name, "--workers", str(workers), *data_flags,
                   *metrics_flags, *flags]
        proc = subprocess.Popen([sys.executable, "-m", "engram_shm.cli", *command],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn, env=env)
    proc.output = lambda: pathlib.Path(log_path).read_text()
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.output()[-3000:]}")
            try:
                with Client(endpoint, timeout=1.0) as c:
                    c.ping()
                break
            except Unauthenticated:  # it answered the handshake: up, with --auth
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield endpoint, name, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # A killed server's children may take a moment to die, and collect_stale
        # never touches the memory of an engine with a live process.
        deadline = time.monotonic() + 10
        collect_stale(name, min_age_s=0)
        while shm.list_blocks(name) and time.monotonic() < deadline:
            time.sleep(0.05)
            collect_stale(name, min_age_s=0)
        if own_data:
            shutil.rmtree(data, ignore_errors=True)
        assert shm.list_blocks(name) == [], f"server {name} left shared memory behind"
