"""The single writer of an engine's observation data: its spaces, their
segments and the committed generation. The embedded engine holds one; the
server's front process holds one, and a restarted front rebuilds its state from
the shared memory it finds (`recover`). Not thread-safe: callers serialise.

With a write-ahead log (`wal`), a batch is logged after its rows are written
and before they are published: the log is the commit point. A batch whose
record is whole in the log is committed, whatever a crash left in shared
memory (engine/recovery.py replays it); one that is not was never acked.

The catalog's WAL_LSN is the last record whose every effect is in shared
memory (a batch's rows, its generation and its session's sequence; a
space; a session change, which callers apply before they log it). A
checkpoint reads it first and counts the records up to it as held by what
it copies next; a writer killed between logging and applying leaves WAL_LSN
behind, so that record stays in the log for recovery.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import EngineConfig
from ..errors import InvalidArgument, QuotaExceeded, ShmFull, SpaceExists, SpaceLimit
from ..limits import ANONYMOUS
from ..observations import Batch, Limits, checked_rows, prepare
from ..store import compaction, quantization, shm
from ..store import wal as walfile
from ..store.catalog import (
    BUILDING,
    G_MERGED_INTO,
    G_STATE,
    LIVE,
    RETIRED,
    WAL_LSN,
    Catalog,
    SpaceParams,
    segment_name,
)
from ..store.prefault import Prefaulter
from ..store.segment import Segment
from ..store.space import SegmentSizes, SpaceWriter
from ..store.wal import WalWriter
from .idle import run_when_idle
from .ledger import Ledger
from .window import window_limit

log = logging.getLogger(__name__)

# Compaction: the time one `maintain` call copies rows for, per space (the
# server's front calls it every upkeep, 20 ms), how long a merge a quota
# refused waits before it is tried again, and how often spaces are asked
# whether they need a merge.
MAINTAIN_BUDGET_S = 0.005
MERGE_RETRY_S = 60.0
POLICY_PERIOD_S = 0.5


@dataclass(frozen=True)
class Ack:
    """Observations stored and visible to recall: generations first..last."""
    space: str
    first_generation: int
    last_generation: int

    @property
    def count(self) -> int:
        return self.last_generation - self.first_generation + 1


def check_space_name(name) -> None:
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "replace")) > 128 \
            or not name.isprintable():
        raise InvalidArgument(f"space names are printable str of 1 to 128 UTF-8 bytes, got {name!r}")


class EngineWriter:
    def __init__(self, catalog: Catalog, config: EngineConfig,
                 on_new_segment: Callable[[int, Segment], None],
                 on_retired: Callable[[int, Segment], None] = lambda index, seg: None):
        self.catalog = catalog
        self.config = config
        self.limits = Limits(config.max_id_bytes, config.max_text_bytes)
        self.on_new_segment = on_new_segment
        self.on_retired = on_retired
        self._merge_refused: dict[str, float] = {}  # space -> when a refused merge may be tried again
        self._next_policy = 0.0  # when spaces are next asked whether they need a merge (maintain)
        self.spaces: dict[str, SpaceWriter] = {}
        self.ledger = Ledger(config)
        self.sizes = SegmentSizes(config.segment_capacity, config.text_bytes_per_observation,
                                  config.max_id_bytes + config.max_text_bytes, config.first_segment_capacity)
        self.prefault = Prefaulter(run_when_idle)  # the front and the readers come first
        self.wal: WalWriter | None = None

    def params(self, name: str, dim: int, dtype: str | None = None, metric: str | None = None,
               M: int | None = None, ef_construction: int | None = None,
               seed: int | None = None) -> SpaceParams:
        """Space parameters, unset ones from the engine's defaults, all checked."""
        check_space_name(name)
        top = self.config.max_dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= top:
            raise InvalidArgument(f"dim must be an integer in [1, {top}] (max_dim), got {dim!r}",
                                  field="dim", quota="max_dim", limit=top)
        c = self.config
        probe = dataclasses.replace(c, dtype=dtype or c.dtype, metric=metric or c.metric, M=M or c.M,
                                    ef_construction=ef_construction or c.ef_construction,
                                    seed=c.seed if seed is None else seed)
        return SpaceParams(name, int(dim), probe.dtype, probe.metric, probe.M,
                           probe.ef_construction, probe.seed)

    def create_space(self, params: SpaceParams, owner: str = ANONYMOUS, rows_bytes: int = 0) -> SpaceWriter:
        """The space with these parameters, created for `owner` if new
        (idempotent). A new space is admitted with its first segment and
        `rows_bytes` more (the batch that creates it) against the limits."""
        existing = self._existing(params)
        if existing is not None:
            return existing
        self.ledger.admit_space(owner, self.sizes.layout(0, params).size, rows_bytes)
        lsn = self._log(walfile.SPACE, {**dataclasses.asdict(params), "owner": owner})
        writer = self._add_space(params, owner)
        self._applied(lsn)
        return writer

    def replay_space(self, params: SpaceParams, owner: str) -> None:
        """Create a logged space again (recovery): admitted when it was logged."""
        if self._existing(params) is None:
            self._add_space(params, owner)

    def _existing(self, params: SpaceParams) -> SpaceWriter | None:
        existing = self.spaces.get(params.name)
        if existing is not None and existing.params != params:
            raise SpaceExists(f"space {params.name!r} exists as {dataclasses.asdict(existing.params)}")
        return existing

    def _add_space(self, params: SpaceParams, owner: str) -> SpaceWriter:
        writer = self._space_writer(self.catalog.add_space(params, owner), params)
        self.ledger.add_space(params.name, owner)
        self.spaces[params.name] = writer
        return writer

    def _space_writer(self, index: int, params: SpaceParams) -> SpaceWriter:
        return SpaceWriter(self.catalog, index, params, self.sizes, self.config.worker_count,
                           functools.partial(self._segment_created, params.name), self.prefault,
                           window_limit(self.config, params.dim, params.dtype),
                           functools.partial(self._segment_retired, params.name))

    def _segment_created(self, space: str, index: int, seg: Segment) -> None:
        self.ledger.charge(space, shm_bytes=seg.layout.size)
        self.on_new_segment(index, seg)

    def _segment_retired(self, space: str, index: int, seg: Segment) -> None:
        self.ledger.charge(space, shm_bytes=-seg.layout.size)
        self.on_retired(index, seg)

    def maintain(self, skip=(), budget_s: float = MAINTAIN_BUDGET_S, idle_s: float | None = None,
                 pending: Callable[[], bool] = compaction.nothing_waits) -> bool:
        """Background work between batches: advance compaction in each space
        but those in `skip` (an export reads them by segment), for about
        `budget_s` each, handing back sooner once `pending()` says requests
        wait (a recall's answer then waits for one chunk's copy per space
        with a merge in progress at most).
        Spaces with no merge in progress are asked whether they need one
        every POLICY_PERIOD_S (an engine may hold thousands of
        spaces), or on every call with `idle_s`, which overrides
        compaction_idle_s (0: every space counts as idle). A merge the
        space's or its owner's quota refuses is tried again after
        MERGE_RETRY_S. Returns whether any space had a merge to work on."""
        largest = self.config.compaction_capacity
        if largest == 0:
            return False
        now = time.monotonic()
        ask = idle_s is not None or now >= self._next_policy
        if ask:
            self._next_policy = now + POLICY_PERIOD_S
        idle = self.config.compaction_idle_s if idle_s is None else idle_s
        busy = False
        for name, writer in self.spaces.items():
            if name in skip or self._merge_refused.get(name, 0.0) > now or (writer.merge is None and not ask):
                continue
            try:
                busy |= writer.maintain(largest, idle, budget_s, functools.partial(self.ledger.admit, name),
                                        pending)
            except (QuotaExceeded, ShmFull, SpaceLimit) as e:
                log.warning("space %s: compaction waits: %s", name, e)
                self._merge_refused[name] = now + MERGE_RETRY_S
        return busy

    def prepare(self, space: str, ids, vectors, what=None, when=None,
                confidence=None) -> tuple[SpaceParams, Batch]:
        """Validate observations for `space`; a space that does not exist yet is
        described by the engine's defaults and the batch's dimension."""
        check_space_name(space)
        writer = self.spaces.get(space)
        shape = writer.params if writer else self.params(space, 1)
        batch = prepare(ids, vectors, what, when, confidence, dim=shape.dim if writer else None,
                        metric=shape.metric, dtype=shape.dtype, limits=self.limits)
        return self.params(space, batch.dim) if writer is None else shape, batch

    def write(self, params: SpaceParams, batch: Batch, session: str | None = None,
              seq: int | None = None, owner: str = ANONYMOUS,
              on_commit: Callable[[], None] = lambda: None) -> tuple[Ack, list[tuple[Segment, int]]]:
        """Store a batch prepared for `params`, creating the space for `owner`
        if needed, and log it (with the session and the last sequence it
        covers). The batch, and every segment it opens, is admitted against
        the space's and its owner's quotas first. `on_commit()` records what
        else the batch changes (its session's sequence) once it is published,
        before WAL_LSN counts it. Also returns where it went: (segment, end
        slot) pairs, which are in the graph once each segment's INDEXED
        reaches its end slot."""
        rows_bytes = self.ledger.batch_bytes(params, batch)
        writer = self._existing(params)
        if writer is None:
            # Checked before the space exists: a refused first batch leaves no space behind.
            checked_rows(batch.vectors, params.metric, params.dtype, "vector")
            writer = self.create_space(params, owner, rows_bytes)
        else:
            self.ledger.admit(params.name, disk_bytes=rows_bytes)
        writer.check_new_ids(batch)
        first = self.catalog.committed_generation + 1
        log = None
        logged = []
        if self.wal is not None:
            def log(vectors):
                meta = {"space": params.name, "gen": first, "n": batch.n, "dim": batch.dim,
                        "width": vectors[0].shape[1], "dtype": params.dtype,
                        "scales": quantization.logged(writer.scales),
                        "session": session, "seq": seq,
                        "bytes": int(batch.record_ends[-1])}
                columns = [batch.when, batch.confidence, batch.id_lens, batch.record_ends, batch.records]
                logged.append(self._log(walfile.BATCH, meta, [*vectors, *columns]))
        spans = writer.append(batch, first, log=log,
                              admit=functools.partial(self.ledger.admit, params.name))
        self.ledger.charge(params.name, disk_bytes=rows_bytes)
        self.catalog.publish_generation(first + batch.n - 1)
        on_commit()
        if logged:
            self._applied(logged[0])
        return Ack(params.name, first, first + batch.n - 1), spans

    def replay_batch(self, params: SpaceParams, batch: Batch, first: int, scales: np.ndarray | None) -> None:
        """Store a logged batch again with its own generations and stored
        vectors coded with `scales` (recovery); it is not logged twice."""
        self.spaces[params.name].append(batch, first, stored=True, scales=scales)
        self.ledger.charge(params.name, disk_bytes=self.ledger.batch_bytes(params, batch))
        self.catalog.publish_generation(max(self.catalog.committed_generation, first + batch.n - 1))

    def log_session(self, key: str, state: int, priority: str, principal: str, last_seq: int = 0) -> None:
        """Log a session's state change, already applied to the session table
        (sessions are restored from the log); `last_seq`: a session moved in
        with a space starts there."""
        self._applied(self._log(walfile.SESSION, {
            "key": key, "state": state, "priority": priority, "principal": principal,
            **({"last_seq": last_seq} if last_seq else {})}))

    def _log(self, kind: int, meta: dict, blobs=()) -> int | None:
        """Append a record; its lsn (None without a log)."""
        if self.wal is None:
            return None
        return self.wal.append(kind, meta, blobs, self.catalog.committed_generation)

    def _applied(self, lsn: int | None) -> None:
        """Every effect of the record `lsn` is in shared memory (module docstring)."""
        if lsn is not None:
            self.catalog.header[WAL_LSN] = lsn

    def recover(self, open_segment: Callable[[int], Segment], committed: int | None = None) -> int:
        """Adopt the spaces and segments already in the catalog (a writer
        restarted after a crash); returns the number of visible observations.

        A writer killed inside a batch may have published some of its rows but
        not the batch's generation: those rows were never acked. They are made
        invisible for good (generation = max) and their ids released (each
        space's id index is rebuilt without them), so the client's re-send is
        stored; the committed generation moves past them so no generation is
        handed out twice. `committed` (default: the catalog's) is the
        generation rows past which are buried."""
        for index in range(self.catalog.n_spaces):
            params = self.catalog.space(index)
            self.spaces[params.name] = self._space_writer(index, params)
            self.ledger.add_space(params.name, self.catalog.space_owner(index))
        by_index = {w.index: w for w in self.spaces.values()}
        for seg_index in self._settle_layout():
            seg = open_segment(seg_index)
            space = by_index[self.catalog.segment_space(seg_index)]
            space.adopt(seg, seg_index)
            self.ledger.charge_segment(space.params.name, seg)
        if committed is None:
            committed = self.catalog.committed_generation
        highest = max((w.bury_uncommitted(committed) for w in self.spaces.values()), default=0)
        self.catalog.publish_generation(max(self.catalog.committed_generation, highest))
        for w in self.spaces.values():
            w.index_ids()  # from the id_hash columns, now rather than at the first write
        return sum(w.count for w in self.spaces.values())

    def _settle_layout(self) -> list[int]:
        """Finish what a dead writer's compaction left (recover): a merge it
        did not swap in is given up, one it swapped in retires its sources
        (it died between the two stores of the swap), and the blocks of
        segments retired are unlinked. Returns the LIVE segments' indexes."""
        cat = self.catalog
        rows = cat.segments[:cat.n_segments].copy()
        states, merged_into = rows[:, G_STATE], rows[:, G_MERGED_INTO]
        changes = {}
        for index, state in enumerate(states.tolist()):
            target = int(merged_into[index])
            if state == BUILDING or (state == LIVE and target >= 0 and states[target] == LIVE):
                changes[index] = RETIRED
        cat.change_states(changes)  # also closes a change the dead writer left open
        for index, state in enumerate(cat.segments[:cat.n_segments, G_STATE].tolist()):
            if state == RETIRED:
                shm.unlink(segment_name(cat.engine, index))
        return [i for i, state in enumerate(states.tolist()) if state == LIVE and i not in changes]

    def close(self) -> None:
        """Stop background work (before the segments are unmapped) and close
        the log."""
        self.prefault.close()
        self.spaces.clear()
        if self.wal is not None:
            self.wal.close()
            self.wal = None
