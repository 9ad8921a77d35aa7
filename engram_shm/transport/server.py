"""`engram-shm serve`: the server process. It owns the engine's shared memory
(catalog, session table; segments are created by the front), and supervises
the front process and one index worker per core, restarting any that dies.

Shutdown (SIGINT or SIGTERM): the front stops taking observations and exits
(everything it accepted was acked as it went), indexing is given up to
`drain_timeout_s` to catch up, workers stop, and every block of the engine is
removed. A second signal skips the drain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import threading
import time

from ..config import EngineConfig
from ..engine.directory import SegmentDirectory
from ..engine.supervisor import ChildSpec, Supervisor, index_worker_specs
from ..store import shm
from ..store.catalog import FRONT_INCARNATION, FRONT_PID, Catalog
from .sessions import create_table

log = logging.getLogger(__name__)


def default_name(endpoint: str) -> str:
    port = re.search(r":(\d+)$", endpoint)
    return f"srv-{port.group(1)}" if port else "srv"


class Server:
    def __init__(self, config: EngineConfig):
        if not config.name:
            config = dataclasses.replace(config, name=default_name(config.endpoint))
        self.config = config
        self.name = config.name
        self.catalog = Catalog.create(self.name)
        self.directory = SegmentDirectory(self.catalog, writable=True)  # CAS on claims
        self._sessions = None
        try:
            self._sessions = create_table(self.name)
            specs = [self._front_spec()] + index_worker_specs(self.catalog, config.worker_count,
                                                               self.directory.segments)
            self.supervisor = Supervisor(specs)
        except BaseException:
            self._release()
            raise
        self._signals = 0
        self._stop = threading.Event()

    def _front_spec(self) -> ChildSpec:
        config_json = json.dumps(dataclasses.asdict(self.config))

        def ready(pid, incarnation):
            h = self.catalog.header
            return h[FRONT_PID] == pid and h[FRONT_INCARNATION] == incarnation

        def on_exit(incarnation):
            log.warning("the front died; restarting it (sessions and data are in shared memory)")

        return ChildSpec("front", lambda inc: ["-m", "engram_shm.transport.front", self.name,
                                               config_json, str(inc)], ready, on_exit)

    def start(self) -> None:
        self.supervisor.start()
        log.info("engram-shm %s serving on %s with %d index workers", self.name, self.config.endpoint,
                 self.config.worker_count)

    def request_stop(self, signum=None, frame=None) -> None:
        self._signals += 1
        self._stop.set()

    def serve_forever(self, on_ready=lambda server: None) -> None:
        """Run until SIGINT/SIGTERM (or request_stop), then shut down cleanly."""
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        try:
            self.start()
            on_ready(self)
            while not self._stop.wait(0.2):
                pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
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
        self._release()

    def _release(self) -> None:
        self.directory.close()
        if self._sessions is not None:
            shm.close(self._sessions)
            self._sessions = None
        self.catalog.close()
