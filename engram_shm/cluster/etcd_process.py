"""A private single-member etcd on loopback, for tests and benchmarks.

`EtcdProcess` starts /usr/bin/etcd on free ports with a fresh data directory,
waits until it answers /health, and on `stop()` terminates it and removes the
directory. The etcd dies with the thread that started it (PR_SET_PDEATHSIG, as
engine/lifeline.py explains): a test run killed by a timeout leaves no etcd
behind (its temporary directory may stay, under the `engram-etcd-` prefix).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import requests

from engram_shm.engine.lifeline import dying_with_this_thread

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
BIND_ATTEMPTS = 3  # a free port we picked may be taken before etcd binds it


class EtcdProcess:
    """`with EtcdProcess() as etcd: Coordinator(etcd.endpoint)`."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or shutil.which("etcd") or "/usr/bin/etcd"
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"etcd not found ({self.binary} is not executable): "
                                    "install Debian's etcd-server package (etcd 3.4 or later)")
        self.endpoint = ""
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EtcdProcess:
        self._dir = tempfile.mkdtemp(prefix="engram-etcd-")
        try:
            for _ in range(BIND_ATTEMPTS):
                if self._launch(*_free_ports(2)):
                    return self
                if "address already in use" not in self.log_tail():
                    break
            raise RuntimeError(f"etcd ({self.binary}) exited with code {self._proc.returncode} or did "
                               f"not answer within {START_TIMEOUT_S:.0f} s; its log ends:\n"
                               f"{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, client: int, peer: int) -> bool:
        """Start etcd on these ports; True once it answers, False if it failed
        (exited, or did not answer in time: then it is killed)."""
        self.endpoint = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        data = os.path.join(self._dir, "data")
        shutil.rmtree(data, ignore_errors=True)
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, "--name", "engram", "--data-dir", data,
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                 "--initial-cluster", f"engram={peer_url}", "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-outputs", "stderr", "--log-level", "error"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=dying_with_this_thread())
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                if requests.get(self.endpoint + "/health", timeout=1).json().get("health") == "true":
                    return True
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.1)
        self._kill()
        return False

    @property
    def _log_path(self) -> str:
        return os.path.join(self._dir, "etcd.log")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP: etcd stops answering, as a hung or partitioned server does."""
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT_S; then remove the data directory."""
        if self._proc is not None:
            self._kill()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _kill(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (held open together, so none is picked twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
