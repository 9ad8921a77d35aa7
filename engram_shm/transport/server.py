"""`engram-shm serve`: the server process. It owns the engine's shared memory
(catalog, session table; segments are created by the front), and supervises
the front process, one index worker per core and the recall readers (one per
core by default), restarting any that dies. The front talks to its readers
over an ipc:// socket in a directory private to this server (mode 0700),
which it creates and removes.

With a data directory (the default for `serve`: ./engram-data), the server
holds the directory's lock, brings the engine back from it before any child
starts (engine/recovery.py: newest loadable checkpoint, then the log), and
runs the checkpointer; the front is the log's writer.

Shutdown (SIGINT or SIGTERM): the front stops taking observations and exits
(everything it accepted was acked as it went), indexing is given up to
`drain_timeout_s` to catch up, workers stop, a last checkpoint is taken, and
every block of the engine is removed. A second signal skips the drain.
SIGHUP has the front read its keys and ACL again (docs/security.md).
With `ws_port` set, a third kind of child, the WebSocket bridge
(ws_bridge.py), serves Engram's JSON stream as a client of the front; it is
stopped first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time

from ..auth.gate import check_bind
from ..auth.keys import KeysDir
from ..config import EngineConfig
from ..engine import recovery
from ..engine.checkpointer import Checkpointer
from ..engine.directory import SegmentDirectory
from ..engine.readiness import is_ready
from ..engine.supervisor import ChildSpec, Supervisor, index_worker_specs
from ..engine.writer import EngineWriter
from ..errors import InvalidArgument
from ..observability.collector import EngineCollector
from ..observability.endpoint import MetricsEndpoint
from ..observability.stats_block import StatsBlock
from ..store import shm
from ..store.catalog import FRONT_INCARNATION, FRONT_PID, FRONT_RECOVERING, Catalog
from ..store.datadir import DataDir
from ..store.segment import Segment
from .sessions import SessionTable, create_table

log = logging.getLogger(__name__)


def default_name(endpoint: str) -> str:
    port = re.search(r":(\d+)$", endpoint)
    return f"srv-{port.group(1)}" if port else "srv"


class Server:
    def __init__(self, config: EngineConfig):
        if config.worker_mode != "process":
            raise InvalidArgument("a server's index writers are processes: worker_mode must be process "
                                  "(thread is the embedded engine's)", field="worker_mode")
        if config.cluster.startswith(("tcp://", "ipc://")):
            raise InvalidArgument("serve --cluster takes the etcd endpoints (http://HOST:2379,...), not a "
                                  "node's address", field="cluster")
        if config.cluster and not config.durable:
            raise InvalidArgument("a cluster node needs a data directory (--data): moves and restarts "
                                  "ship and recover its spaces from it", field="data_dir")
        if not config.name:
            config = dataclasses.replace(config, name=default_name(config.endpoint))
        if config.durable:  # children get an absolute path, whatever their cwd
            config = dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir))
        self.exposed = check_bind(config)  # before anything is created
        self.config = config
        self.name = config.name
        self.server_key_file = None
        if config.auth == "curve":
            keys = KeysDir(config.keys_path)
            keys.server_key(create=True)  # made on first use: clients need its public half
            self.server_key_file = keys.server_public_file
        self.datadir = DataDir(config.data_dir, f"server {self.name}") if config.durable else None
        self.catalog = self.directory = self._sessions = self.sessions = self.checkpointer = None
        self.stats: StatsBlock | None = None
        self.metrics: MetricsEndpoint | None = None
        self.recovered: recovery.Recovered | None = None
        self.private_dir: str | None = None
        try:
            self.private_dir = tempfile.mkdtemp(prefix=f"engram-{self.name}-")  # 0700
            backend = f"ipc://{self.private_dir}/recall"
            self.catalog = Catalog.create(self.name)
            if config.metrics != "off":
                self.stats = StatsBlock.create(self.name, config.metrics_spaces, config.worker_count)
            self.directory = SegmentDirectory(self.catalog, writable=True)  # CAS on claims
            self._sessions = create_table(self.name)
            self.sessions = SessionTable(self._sessions)
            if self.datadir is not None:
                self._recover()
            config_json = config.to_json()
            specs = [self._front_spec(config_json, backend),
                     *index_worker_specs(self.catalog, config, self.directory.segments),
                     *self._reader_specs(config_json, backend)]
            self.bridge = len(specs) if config.ws_port else None  # its index among the children
            self.supervisor = Supervisor(specs + ([self._bridge_spec()] if config.ws_port else []))
        except BaseException:
            self._release()
            raise
        self._signals = 0
        self._stop = threading.Event()

    def _recover(self) -> None:
        """Fill the fresh shared memory from the data directory before any
        child starts; the front adopts it as it would after its own crash."""
        loaded: list[Segment] = []

        def keep(index: int, seg: Segment) -> None:
            assert index == len(loaded)
            loaded.append(seg)

        writer = EngineWriter(self.catalog, self.config, keep)
        try:
            self.recovered = recovery.cold(writer, self.datadir, keep, loaded.__getitem__)
            self.sessions.merge(self.recovered.sessions)
        finally:
            writer.close()
            for seg in loaded:
                seg.close()
        log.info("engine %s recovered %s", self.name, self.recovered.summary())
        # When idle: the checkpointer shares the idle class with the index
        # workers, below the front, the readers and the machine's applications.
        self.checkpointer = Checkpointer(self.catalog, self.datadir, self.config, self.directory.live,
                                         self.sessions.snapshot, self.recovered.checkpoint_lsn,
                                         when_idle=True)

    def _front_spec(self, config_json: str, backend: str) -> ChildSpec:
        def ready(pid, incarnation):
            h = self.catalog.header
            return h[FRONT_PID] == pid and h[FRONT_INCARNATION] == incarnation

        def on_exit(incarnation):
            log.warning("the front died; restarting it (sessions and data are in shared memory)")

        return ChildSpec("front", lambda inc: ["-m", "engram_shm.transport.front", self.name,
                                               config_json, str(inc), backend], ready, on_exit)

    def _reader_specs(self, config_json: str, backend: str) -> list[ChildSpec]:
        """The recall readers: the front finds them by their hellos and gives
        up a dead one's recalls itself, so a death needs no clean-up here."""
        def spec(i: int) -> ChildSpec:
            ready_file = os.path.join(self.private_dir, f"reader-{i}.ready")
            argv = ["-m", "engram_shm.transport.recall_worker", self.name, config_json, backend, str(i)]
            return ChildSpec(f"recall-{i}", lambda inc: [*argv, str(inc), ready_file],
                             lambda pid, inc: is_ready(ready_file, pid, inc), lambda inc: None)

        return [spec(i) for i in range(self.config.recall_worker_count)]

    def _bridge_spec(self) -> ChildSpec:
        """The WebSocket bridge: a client of the front, ready once it listens."""
        config_json = self.config.to_json()
        path = os.path.join(self.private_dir, "ws-bridge.ready")

        def on_exit(incarnation):
            log.warning("the WebSocket bridge died; restarting it (its clients resume their sessions)")

        return ChildSpec("ws-bridge", lambda inc: ["-m", "engram_shm.transport.ws_bridge", self.name,
                                                   config_json, str(inc), path],
                         lambda pid, inc: is_ready(path, pid, inc), on_exit)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    def start(self) -> None:
        if self.config.metrics != "off":  # first: a port in use fails the start before any child runs
            collector = EngineCollector(self.config, self.catalog, self.directory, self.stats, self.sessions,
                                        self.supervisor.children, self.checkpointer)
            self.metrics = MetricsEndpoint(collector, self.config.metrics)
        self.supervisor.start()
        if self.checkpointer is not None:
            self.checkpointer.start()
        log.info("engram-shm %s serving on %s with %d index workers and %d recall readers", self.name,
                 self.config.endpoint, self.config.worker_count, self.config.recall_worker_count)

    def reload_access(self, signum=None, frame=None) -> None:
        """SIGHUP: the front reads the keys and the ACL again."""
        front = self.supervisor.pids()[0]
        if front is not None:
            os.kill(front, signal.SIGHUP)

    def request_stop(self, signum=None, frame=None) -> None:
        self._signals += 1
        self._stop.set()

    def serve_forever(self, on_ready=lambda server: None) -> None:
        """Run until SIGINT/SIGTERM (or request_stop), then shut down cleanly."""
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGHUP, self.reload_access)
        try:
            self.start()
            on_ready(self)
            while not self._stop.wait(0.2):
                self.directory.refresh()  # let go of segments compaction retired
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self.bridge is not None:  # first: its clients see the connection close, not a silent front
            self.supervisor.stop_child(self.bridge)
        log.info("shutting down: stopping the front")
        self.supervisor.stop_child(0)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._signals < 2 and time.monotonic() < deadline and \
                any(s.backlog for s in self.directory.segments()):
            time.sleep(0.05)
        left = sum(s.backlog for s in self.directory.segments())
        if left:
            log.warning("stopping with %d observations not yet indexed", left)
        self.supervisor.stop()
        if self.checkpointer is not None and self.catalog.header[FRONT_RECOVERING]:
            self.checkpointer.stop()  # the memory is half recovered: the log has it all
            log.warning("the front died while recovering: no final checkpoint; the next start replays "
                        "the log")
        elif self.checkpointer is not None:
            self.checkpointer.stop()
            try:
                manifest = self.checkpointer.checkpoint()
                log.info("final checkpoint %d: %d observations", manifest["number"],
                         manifest["observations"])
            except OSError as e:  # the log still holds everything
                log.error("the final checkpoint failed (%s); the next start replays the log", e)
        self._release()

    def _release(self) -> None:
        if self.metrics is not None:  # first: it reads everything below
            self.metrics.close()
            self.metrics = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None
        if self.directory is not None:
            self.directory.close()
        if self.sessions is not None:
            self.sessions.close()  # also unmaps the block
            self._sessions = self.sessions = None
        elif self._sessions is not None:
            shm.close(self._sessions)
            self._sessions = None
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        if self.datadir is not None:
            self.datadir.close()
            self.datadir = None
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None
