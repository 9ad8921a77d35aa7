"""The server's Prometheus collector: every metric is read at scrape time
from what the engine's processes already publish, in shared memory (the
stats block, the catalog, the segment headers, the session table) or in the
server process itself (the supervisor, the checkpointer). Nothing is
recorded for Prometheus on a hot path beyond the stats block's counters.

Label cardinality is bounded: spaces have their own `memory_space` label in
creation order up to `metrics_spaces`, and the later ones are summed as
`other` (so is a space that happens to be named "other": one label value,
one series); workers and processes are as many as the config says; reasons,
levels, priorities and consistencies come from fixed tables. The table of
metrics is in docs/observability.md.
"""

from __future__ import annotations

import collections
import os
import platform
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..config import EngineConfig
from ..engine.directory import SegmentDirectory
from ..store import shm, wal
from ..store.catalog import CHECKPOINT_ERRNO, CHECKPOINT_NS, Catalog
from ..transport.sessions import ACTIVE, CLOSED, PAUSED, R_STATE
from .stats_block import (
    CONSISTENCIES,
    DEFERRED_US,
    LEVELS,
    PRIORITIES,
    REASONS,
    SIZE_BOUNDS,
    STOLEN,
    UTILIZATION,
    WAL_WRITTEN,
    WORKER_HEAD,
    Histogram,
    StatsBlock,
)

OTHER = "other"
SESSION_STATES = {"active": ACTIVE, "paused": PAUSED, "closed": CLOSED}


class EngineCollector(Collector):
    """Collects the engine's metrics. The server gives it everything; parts
    it is not given (no session table, supervisor or checkpointer: an engine
    without them) are left out."""

    def __init__(self, config: EngineConfig, catalog: Catalog, directory: SegmentDirectory,
                 stats: StatsBlock, sessions=None, children: Callable[[], list] | None = None,
                 checkpointer=None, started: float | None = None):
        self.config, self.catalog, self.directory, self.stats = config, catalog, directory, stats
        self.sessions, self.children, self.checkpointer = sessions, children, checkpointer
        self.started = time.time() if started is None else started

    def labels(self) -> list[str]:
        """The memory_space label of each slot of the stats block: the names
        of the first spaces, then "other" (also for slots no space holds yet)."""
        named = min(self.catalog.n_spaces, self.stats.slots - 1)
        return [self.catalog.space(i).name for i in range(named)] + [OTHER] * (self.stats.slots - named)

    def collect(self) -> Iterator:
        labels = self.labels()
        yield from self._front(labels)
        yield from self._spaces(labels)
        yield from self._workers()
        if self.sessions is not None:
            yield from self._sessions()
        if self.children is not None:
            yield from self._processes()
        if self.config.durable:
            yield from self._durability()
        yield from self._machine()

    # -- what the front counts (the stats block) ---------------------------------------------
    def _front(self, labels: list[str]) -> Iterator:
        s = self.stats
        yield _counter("engram_streaming_observations_total", "observations accepted, by space and "
                       "session priority", ("memory_space", "priority"),
                       _by_label(labels, s.accepted, PRIORITIES))
        yield _counter("engram_streaming_observations_rejected_total", "observations refused, by space "
                       "and error code", ("memory_space", "reason"), _by_label(labels, s.rejected, REASONS))
        yield _counter("engram_streaming_backpressure_activations_total", "times a space's pressure rose "
                       "into a level", ("memory_space", "level"), _by_label(labels, s.activations, LEVELS))
        state: dict[tuple, float] = {}
        fill: dict[tuple, float] = {}
        for label, level, ppm in zip(labels, s.level.tolist(), s.fill.tolist()):
            state[(label,)] = max(state.get((label,), 0), level)
            fill[(label,)] = max(fill.get((label,), 0.0), ppm / 1e6)
        yield _gauge("engram_streaming_window_fill", "a space's unindexed window over its limit (the smaller "
                     "of ring_capacity and what a recall scans within window_budget_ms): 1 is full",
                     ("memory_space",), fill)
        yield _gauge("engram_streaming_backpressure_state", "pressure level of a space now: 0 normal, "
                     "1 warning, 2 critical, 3 overloaded (the highest of the spaces summed as other)",
                     ("memory_space",), state)
        yield _histogram("engram_streaming_observation_latency_seconds", "seconds from an observation's "
                         "ack to its being in the graph (seen by the front every 20 ms)", (),
                         {(): s.observe_latency})
        yield _histogram("engram_streaming_recall_latency_seconds", "seconds from a recall's hand-off to "
                         "a reader to its last part, by consistency", ("consistency",),
                         dict(zip([(c,) for c in CONSISTENCIES], s.recall_latency)))

    # -- what shared memory holds (the catalog and the segment headers) ---------------------
    def _spaces(self, labels: list[str]) -> Iterator:
        accepted, indexed, depth, size = (collections.Counter() for _ in range(4))
        for index in range(self.catalog.n_spaces):
            label = (labels[self.stats.slot(index)],)
            for seg in self.directory.of_space(index):
                count, done = seg.accepted, seg.indexed
                accepted[label] += count
                indexed[label] += done
                depth[label] += max(0, count - done)
                size[label] += shm.block_bytes(seg.name)
        yield _counter("engram_shm_space_accepted_total", "observations stored in a space (its segments' "
                       "published counts; survives restarts with the data)", ("memory_space",), accepted)
        yield _counter("engram_shm_space_indexed_total", "observations of a space in its graphs",
                       ("memory_space",), indexed)
        yield _gauge("engram_streaming_queue_depth", "a space's unindexed window: accepted, not yet in "
                     "the graph", ("memory_space",), depth)
        yield _gauge("engram_shm_space_shm_bytes", "bytes of /dev/shm a space's segments occupy",
                     ("memory_space",), size)

    def _workers(self) -> Iterator:
        rows = self.stats.workers
        yield _gauge("engram_streaming_worker_utilization", "share of the last second an index worker "
                     "spent inserting", ("worker_id",),
                     {(str(i),): rows[i, UTILIZATION] / 1e6 for i in range(len(rows))})
        yield _counter("engram_streaming_work_stolen_total", "claims by index workers of segments "
                       "assigned to another worker", (), {(): int(rows[:, STOLEN].sum())})
        yield _counter("engram_streaming_index_deferred_seconds_total", "seconds index workers slept "
                       "while recalls ran (the recall beacon)", (), {(): rows[:, DEFERRED_US].sum() / 1e6})
        merged = Histogram(rows[:, WORKER_HEAD:].sum(axis=0), SIZE_BOUNDS, 1.0)
        yield _histogram("engram_streaming_batch_size", "nodes an index worker inserted per claim of a "
                         "segment", (), {(): merged})

    # -- what the server process knows --------------------------------------------------------
    def _sessions(self) -> Iterator:
        states = self.sessions.rows[:, R_STATE]
        counts = {(name,): int((states == code).sum()) for name, code in SESSION_STATES.items()}
        yield _gauge("engram_streaming_active_sessions_total", "sessions in the active state", (),
                     {(): counts[("active",)]})
        yield _gauge("engram_shm_sessions", "sessions by state (closed ones until they expire)", ("state",),
                     counts)

    def _processes(self) -> Iterator:
        children = self.children()
        yield _counter("engram_shm_process_restarts_total", "restarts of each child process of the "
                       "server by its supervisor", ("process",), {(n,): r for n, r, _ in children})
        yield _gauge("engram_shm_process_up", "1 while a child process runs and is ready", ("process",),
                     {(n,): int(up) for n, _, up in children})

    def _durability(self) -> Iterator:
        header = self.catalog.header
        yield _counter("engram_shm_wal_written_bytes_total", "bytes appended to the write-ahead log",
                       (), {(): int(self.stats.front[WAL_WRITTEN])})
        size = 0
        for path in wal.log_files(os.path.join(self.config.data_dir, "wal")):
            try:
                size += os.path.getsize(path)
            except FileNotFoundError:  # deleted by a checkpoint meanwhile
                continue
        yield _gauge("engram_shm_wal_size_bytes", "bytes of the log's files on disk", (), {(): size})
        yield _histogram("engram_shm_wal_fsync_seconds", "seconds of each fsync of the log", (),
                         {(): self.stats.fsync_latency})
        at = int(header[CHECKPOINT_NS])
        age = time.time() - (at * 1e-9 if at else self.started)
        yield _gauge("engram_shm_checkpoint_age_seconds", "seconds since the last complete checkpoint "
                     "(since the server started, before its first)", (), {(): age})
        yield _gauge("engram_shm_checkpoint_failing", "1 when the last checkpoint failed", (),
                     {(): int(header[CHECKPOINT_ERRNO] != 0)})
        last = self.checkpointer.last if self.checkpointer is not None else None
        if last is not None:
            yield _gauge("engram_shm_checkpoint_duration_seconds", "seconds the last checkpoint took", (),
                         {(): last["seconds"]})

    def _machine(self) -> Iterator:
        yield _gauge("engram_shm_dev_shm_free_bytes", "bytes free in /dev/shm", (), {(): shm.free_bytes()})
        yield _gauge("engram_shm_dev_shm_size_bytes", "size of /dev/shm", (), {(): shm.total_bytes()})
        c = self.config
        info = {"version": __version__, "python": platform.python_version(), "dtype": c.dtype,
                "metric": c.metric, "fsync": c.fsync if c.durable else "none", "auth": c.auth,
                "worker_mode": c.worker_mode, "workers": str(c.worker_count),
                "recall_workers": str(c.recall_worker_count), "metrics_spaces": str(c.metrics_spaces)}
        yield _gauge("engram_shm_build_info", "the engine's version and configuration", tuple(info),
                     {tuple(info.values()): 1})


def _by_label(labels: list[str], table, columns: tuple[str, ...]) -> dict[tuple, int]:
    """Sum a [slot, column] table of the stats block by (label, column name),
    leaving out zeros: a counter appears once it counts something."""
    out: collections.Counter = collections.Counter()
    for label, row in zip(labels, table.tolist()):
        for column, value in zip(columns, row):
            if value:
                out[(label, column)] += value
    return out


def _counter(name: str, doc: str, labels: tuple, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(key, value)
    return family


def _gauge(name: str, doc: str, labels: tuple, values: dict) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(key, value)
    return family


def _histogram(name: str, doc: str, labels: tuple, histograms: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in histograms.items():
        buckets, total, _ = histogram.buckets()
        family.add_metric(list(key), buckets, total)
    return family
