"""Start a real server process on a free loopback port (tests, benchmarks,
examples): started with the CLI, ready when it answers a ping, stopped with
SIGINT, and killed (its shared memory collected) if it does not stop in time."""

from __future__ import annotations

import concurrent.futures
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

import zmq

from ..engine.lifeline import dying_with_this_thread
from ..errors import Unauthenticated
from ..store import shm
from ..store.catalog import collect_stale
from . import protocol as p
from .client import Client


def _answers(endpoint: str, auth: bool, wait_s: float = 1.0) -> bool:
    """Is the server up? Without auth, a ping on a bare socket: no session,
    so a probe answered late leaves nothing behind (a session would count
    against the key's). With auth a bare socket gets no answer, and a
    Client's refused handshake (Unauthenticated) says the server is up."""
    if auth:
        with contextlib.suppress(Unauthenticated), Client(endpoint, timeout=wait_s) as c:
            c.ping()
        return True
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(p.pack({"op": "ping", "rid": 1}))
        return bool(sock.poll(int(wait_s * 1000)))
    finally:
        sock.close()


# Servers are forked by one thread that lasts as long as this process: the
# death signal comes when the thread that forked a child ends, and a caller's
# thread (a chaos run's killer, restarting the engine) may end long before
# the server it started should.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-spawner")


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
    environment (default: this process's). The server gets SIGTERM (stops
    cleanly) if this process dies first, say a test run killed: it has a
    session of its own, so nothing else would stop it. Its
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
        dies_with_us = dying_with_this_thread(signal.SIGTERM, preexec_fn)
        proc = _SPAWNER.submit(subprocess.Popen, [sys.executable, "-m", "engram_shm.cli", *command],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=dies_with_us, env=env).result()
    proc.output = lambda: pathlib.Path(log_path).read_text()
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.output()[-3000:]}")
            failure = None
            try:
                if _answers(endpoint, auth="--auth" in flags):
                    break
            except Exception as e:  # not listening yet, or a probe that failed: try again
                failure = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {name} did not answer within {startup_s} s") from failure
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
