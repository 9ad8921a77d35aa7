"""When checkpoints are taken, and what they make deletable.

One Checkpointer per engine (in the server process, or in the embedded
engine's): a background thread takes a checkpoint when the log has grown by
`checkpoint_wal_bytes` since the last one, when `checkpoint_interval_s` has
passed since the last one (counted across restarts) with anything logged,
or when asked (`engram-shm checkpoint`, through the catalog's
CHECKPOINT_REQUEST counter); the engine takes a last one on a
clean stop. After each, checkpoints beyond `checkpoints_kept` are removed,
and log files whose records the oldest kept checkpoint holds are deleted.
A failed checkpoint (a full disk) is logged and answered with its errno; the
engine goes on serving, and the next trigger tries again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable

from ..config import EngineConfig
from ..errors import DataDirCorrupt
from ..store import checkpoint, wal
from ..store.catalog import (
    CHECKPOINT_DONE,
    CHECKPOINT_ERRNO,
    CHECKPOINT_GENERATION,
    CHECKPOINT_NS,
    CHECKPOINT_REQUEST,
    WAL_LSN,
    Catalog,
)
from ..store.datadir import DataDir
from ..store.segment import Segment
from .idle import run_when_idle

log = logging.getLogger(__name__)

POLL_S = 0.05
SIZE_POLL_S = 1.0
RETRY_S = 5.0


class Checkpointer:
    def __init__(self, catalog: Catalog, datadir: DataDir, config: EngineConfig,
                 segments: Callable[[], list[Segment]], sessions: Callable[[], list[dict]] = list,
                 checkpoint_lsn: int = 0, when_idle: bool = False):
        """`segments()`: the engine's LIVE segments (SegmentDirectory.live).
        `when_idle`: the thread runs under SCHED_IDLE (idle.run_when_idle), as
        the server's index workers do; not in an embedded engine, whose index
        threads run at the application's priority and would starve it.
        `checkpoint_lsn`: the log position the newest checkpoint holds (0:
        none). The triggers count from that checkpoint, not from this start:
        records replayed at the start are not in it, and an engine restarted
        more often than the interval still takes checkpoints (otherwise every
        restart replays, and indexes again, everything since the last one)."""
        self.catalog = catalog
        self.datadir = datadir
        self.config = config
        self.segments = segments
        self.sessions = sessions
        self.when_idle = when_idle
        self.last: dict | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        taken_ns = int(catalog.header[CHECKPOINT_NS])
        if taken_ns:
            age_s = max(0.0, time.time() - taken_ns * 1e-9)
        else:  # never one: due now if the log holds records (replayed at this start)
            age_s = config.checkpoint_interval_s if catalog.header[WAL_LSN] else 0.0
        self._last_at = time.monotonic() - age_s
        self._last_lsn = checkpoint_lsn
        self._wal_bytes_at = self._wal_bytes()

    def checkpoint(self, stop: Callable[[], bool] = lambda: False) -> dict:
        """Take a checkpoint now (waiting for one in progress); returns its
        manifest. Raises OSError when the disk refuses it, InterruptedError
        when `stop()` turns true while it waits for a segment."""
        with self._lock:
            self._last_at = time.monotonic()
            manifest = checkpoint.take(self.catalog, self.segments, self.sessions,
                                       self.datadir.checkpoints, stop)
            self.last = manifest
            self._last_lsn = manifest["wal_lsn"]
            self.catalog.header[CHECKPOINT_GENERATION] = manifest["generation"]
            self.catalog.header[CHECKPOINT_NS] = time.time_ns()
            self._truncate_log()
            self._wal_bytes_at = self._wal_bytes()
            log.info("checkpoint %d: %d observations at generation %d in %.2f s", manifest["number"],
                     manifest["observations"], manifest["generation"], manifest["seconds"])
            return manifest

    def _truncate_log(self) -> None:
        """Remove old checkpoints, then the log files the oldest kept one
        covers: a file goes once the next file started after every record in
        it was committed at or before that checkpoint's generation and lsn."""
        oldest = checkpoint.prune(self.datadir.checkpoints, self.config.checkpoints_kept)
        if oldest is None:
            return
        files = wal.log_files(self.datadir.wal)
        heads = [wal.file_head(path) for path in files]
        for path, following in zip(files, heads[1:]):
            if following is None:
                break
            first_lsn, start_generation = following
            if first_lsn - 1 > oldest["wal_lsn"] or start_generation > oldest["generation"]:
                break
            os.unlink(path)

    def _wal_bytes(self) -> int:
        total = 0
        for path in wal.log_files(self.datadir.wal):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                total += os.path.getsize(path)
        return total

    # -- the background thread --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engram-checkpointer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.when_idle:
            run_when_idle()
        sized_at = 0.0
        retry_at = 0.0
        while not self._stop.wait(POLL_S):
            header = self.catalog.header
            asked = int(header[CHECKPOINT_REQUEST])
            due = asked > int(header[CHECKPOINT_DONE])
            now = time.monotonic()
            if not due and now >= retry_at:
                logged = int(header[WAL_LSN]) > self._last_lsn
                due = logged and now - self._last_at >= self.config.checkpoint_interval_s
                if not due and logged and now - sized_at >= SIZE_POLL_S:
                    sized_at = now
                    due = self._wal_bytes() - self._wal_bytes_at >= self.config.checkpoint_wal_bytes
            if not due:
                continue
            code = 0
            try:
                self.checkpoint(self._stop.is_set)
            except InterruptedError:
                return
            except (OSError, DataDirCorrupt) as e:
                code = getattr(e, "errno", None) or errno.EIO
                retry_at = now + RETRY_S
                log.error("checkpoint failed (%s); the engine keeps serving from memory and its log",
                          e)
            except Exception:
                code = errno.EIO
                retry_at = now + RETRY_S
                log.exception("checkpoint failed")
            header[CHECKPOINT_ERRNO] = code
            header[CHECKPOINT_DONE] = max(asked, int(header[CHECKPOINT_DONE]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def durability_stats(catalog: Catalog, config: EngineConfig) -> dict:
    """Where the engine's durability stands, for stats and metrics."""
    if not config.durable:
        return {"data_dir": None}
    h = catalog.header
    at = int(h[CHECKPOINT_NS])
    return {"data_dir": os.path.abspath(config.data_dir), "fsync": config.fsync, "wal_lsn": int(h[WAL_LSN]),
            "checkpoint_generation": int(h[CHECKPOINT_GENERATION]),
            "checkpoint_age_s": round(time.time() - at * 1e-9, 3) if at else None,
            "checkpoint_errno": int(h[CHECKPOINT_ERRNO])}
