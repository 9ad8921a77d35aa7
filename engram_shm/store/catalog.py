"""The engine catalog: one shared-memory block `engram_<engine>_catalog` that
lets any local process find an engine's spaces and segments.

| region   | dtype | shape                 | writer  | meaning                              |
|----------|-------|-----------------------|---------|--------------------------------------|
| header   | int64 | [64]                  | owner   | magic, version, owner pid and start  |
|          |       |                       |         | time, limits; then on its own line:  |
|          |       |                       |         | COMMITTED_GEN, N_SPACES, N_SEGMENTS, |
|          |       |                       |         | STOPPED (1 once the engine closed);  |
|          |       |                       | front   | FRONT_INCARNATION, FRONT_START (its  |
|          |       |                       |         | start time), then FRONT_PID (ready); |
|          |       |                       |         | FRONT_RECOVERING (1 while a front    |
|          |       |                       |         | replays its log over the memory)     |
|          |       |                       | writer  | WAL_LSN, CHECKPOINT_REQUEST,         |
|          |       |                       |         | RECOVERY_FROM, LAYOUT_SEQ (odd while |
|          |       |                       |         | segment states change)               |
|          |       |                       | checkp. | CHECKPOINT_DONE (request answered),  |
|          |       |                       |         | _ERRNO (0 = ok), _GENERATION, _NS    |
|          |       |                       | readers | RECALL_UNTIL, on a line of its own:  |
|          |       |                       |         | the recall beacon (engine/beacon.py) |
| spaces   | int64 | [MAX_SPACES, 8]       | owner   | dim, dtype, metric, M, ef_c, seed,   |
|          |       |                       |         | name length, creation time           |
| names    | uint8 | [MAX_SPACES, 128]     | owner   | space name, UTF-8                    |
| owners   | uint8 | [MAX_SPACES, 64]      | owner   | the principal that created the space |
|          |       |                       |         | (UTF-8, zero-padded; its quotas and  |
|          |       |                       |         | space count charge it)               |
| segments | int64 | [MAX_SEGMENTS, 4]     | writer  | space index, number within the space,|
|          |       |                       |         | state (LIVE, BUILDING, RETIRED), the |
|          |       |                       |         | segment a compaction merges it into  |
|          |       |                       |         | (-1: none)                           |
| workers  | int64 | [MAX_WORKERS, 8]      | worker  | per index writer: pid, incarnation,  |
|          |       |                       |         | nodes inserted, busy ns, heartbeat   |
|          |       |                       |         | ns, claimed segment (-1), restarts   |
|          |       |                       |         | (restarts: written by the supervisor |
|          |       |                       |         | while the worker is down), start     |
|          |       |                       |         | time (written before the pid)        |

Rows are written completely before N_SPACES / N_SEGMENTS count them, and a
generation is published in COMMITTED_GEN only after every observation up to it
is in a published slot: a reader that reads COMMITTED_GEN first and the counts
after sees everything up to that generation.

Segment states change only under LAYOUT_SEQ, a sequence lock: the writer makes
it odd, changes states (a compaction's swap: the merged segment becomes LIVE
and its sources RETIRED), and makes it even. A reader takes the states and the
count of segments between two equal, even reads of it (`layout`), so it never
sees a merged segment together with its sources, nor neither.

Liveness: an engine lives while any of its processes does, its owner, its
front or one of its index workers, each known by pid and start time (a reused
pid is another process). `collect_stale` removes only the blocks of engines
with none left: an orphaned child still maps, and may write, the memory.
"""

from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass

import numpy as np

from ..config import DTYPES, METRICS
from ..errors import Corrupt, EngineInUse, EngineNotFound, SpaceLimit
from ..limits import ANONYMOUS, PRINCIPAL_BYTES
from . import shm

log = logging.getLogger(__name__)

MAGIC_VALUE = 0x454E4752414D4354  # "ENGRAMCT"
VERSION = 3  # 2: the owners region; 3: segment states
MAX_SPACES = 4096
MAX_SEGMENTS = 65536
MAX_WORKERS = 256
NAME_BYTES = 128
(MAGIC, VERSION_WORD, OWNER_PID, OWNER_START, CREATED_NS) = range(5)
COMMITTED_GEN, N_SPACES, N_SEGMENTS, STOPPED = 8, 9, 10, 11
FRONT_PID, FRONT_INCARNATION, FRONT_START = 16, 17, 18  # written by the server's front process
# A restarted front buries the rows its predecessor left uncommitted, moves the
# committed generation past them, then stores their batches again from the log:
# in between, the committed generation counts rows that are not there, and a
# checkpoint taken then would record them as committed and lose them.
FRONT_RECOVERING = 19
# The writer's log position (lsn of its last record whose effects are all in
# shared memory: engine/writer.py) and checkpoint requests (a counter the
# writer bumps); the checkpointer answers on its own line.
WAL_LSN, CHECKPOINT_REQUEST = 20, 21
# The committed generation when the recovering front began: a front that
# finds FRONT_RECOVERING still set (its predecessor died recovering) starts
# over from there, as the generation had moved past rows not yet replayed.
RECOVERY_FROM = 22
LAYOUT_SEQ = 23
CHECKPOINT_DONE, CHECKPOINT_ERRNO, CHECKPOINT_GENERATION, CHECKPOINT_NS = 24, 25, 26, 27
# Written at every recall by any process, attached readers included: alone on
# its cache line, so that those writes do not evict the generation readers load.
RECALL_UNTIL = 32
(S_DIM, S_DTYPE, S_METRIC, S_M, S_EFC, S_SEED, S_NAME_LEN, S_CREATED) = range(8)
(G_SPACE, G_NUMBER, G_STATE, G_MERGED_INTO) = range(4)
# Segment states. EMPTY: a catalog row never published (a checkpoint is loaded
# renumbered, so rows below N_SEGMENTS are never empty). BUILDING: a merged
# segment a compaction fills; index writers work on it, readers do not see it.
# RETIRED: its rows live on in a merged segment (or it was a build that was
# given up); its block is unlinked, and mappings of it go as their users do.
EMPTY, LIVE, BUILDING, RETIRED = range(4)
SEGMENT_COLUMNS = 4
(W_PID, W_INCARNATION, W_INSERTED, W_BUSY_NS, W_HEARTBEAT_NS, W_CLAIMED, W_RESTARTS, W_START) = range(8)


@dataclass(frozen=True)
class SpaceParams:
    name: str
    dim: int
    dtype: str
    metric: str
    M: int
    ef_construction: int
    seed: int


def params_and_owner(entry: dict) -> tuple[SpaceParams, str]:
    """A space's parameters and owner as a checkpoint manifest or a SPACE log
    record keeps them (one written before spaces had owners gives it to the
    anonymous key)."""
    fields = dict(entry)
    owner = fields.pop("owner", ANONYMOUS)
    return SpaceParams(**fields), owner


def _layout():
    header = 64 * 8
    spaces = MAX_SPACES * 8 * 8
    names = MAX_SPACES * NAME_BYTES
    owners = MAX_SPACES * PRINCIPAL_BYTES
    segments = MAX_SEGMENTS * SEGMENT_COLUMNS * 8
    workers = MAX_WORKERS * 8 * 8
    return header, spaces, names, owners, segments, workers


def catalog_name(engine: str) -> str:
    return shm.block_name(engine, "catalog")


def segment_name(engine: str, index: int) -> str:
    return shm.block_name(engine, f"{index:06d}")


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (None if gone, or a
    zombie: it has exited and waits to be reaped): with the pid it identifies a
    process even after the pid is reused."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


class ProcessWatch:
    """Whether one process (pid and start time, as process_start gives) still
    lives, asked as often as every recall of an attached reader: a poll of a
    pidfd is one system call, a read of /proc/<pid>/stat three and a parse.
    The pidfd is opened once and checked against the start time once it is
    open, so it names that process for as long as it is held, however the
    pid is reused. Without pidfds (not Linux 5.3+) each call reads /proc."""

    def __init__(self, pid: int, start: int):
        self.pid, self.start = pid, start
        self._fd = self._poll = None
        self._gone = False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
            return
        except (AttributeError, OSError):  # no pidfds here: read /proc each time
            return
        self._fd = fd
        if process_start(pid) != start:  # the pid names another process, or a zombie
            self._gone = True
            self.close()
            return
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)  # readable once the process has exited

    def alive(self) -> bool:
        if self._gone:
            return False
        if self._poll is None:
            return process_start(self.pid) == self.start
        return not self._poll.poll(0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._poll = None


class Catalog:
    def __init__(self, engine: str, block, owner: bool):
        self.engine = engine
        self.block = block
        self.owner = owner
        h, s, n, o, g, _ = _layout()
        buf = block.buf
        self.header = np.ndarray((64,), np.int64, buffer=buf)
        self.spaces = np.ndarray((MAX_SPACES, 8), np.int64, buffer=buf, offset=h)
        self.names = np.ndarray((MAX_SPACES, NAME_BYTES), np.uint8, buffer=buf, offset=h + s)
        self.owners = np.ndarray((MAX_SPACES, PRINCIPAL_BYTES), np.uint8, buffer=buf, offset=h + s + n)
        self.segments = np.ndarray((MAX_SEGMENTS, SEGMENT_COLUMNS), np.int64, buffer=buf,
                                   offset=h + s + n + o)
        self.workers = np.ndarray((MAX_WORKERS, 8), np.int64, buffer=buf, offset=h + s + n + o + g)

    @classmethod
    def create(cls, engine: str) -> "Catalog":
        name = catalog_name(engine)
        collect_stale(engine)
        try:
            block = shm.create(name, sum(_layout()))
        except FileExistsError:
            raise EngineInUse(f"engine {engine!r} is running (its catalog {name} exists)") from None
        cat = cls(engine, block, owner=True)
        pid = os.getpid()
        cat.header[[OWNER_PID, OWNER_START, CREATED_NS]] = [pid, process_start(pid), time.time_ns()]
        cat.header[VERSION_WORD] = VERSION
        cat.header[MAGIC] = MAGIC_VALUE
        return cat

    @classmethod
    def attach(cls, engine: str) -> "Catalog":
        try:
            block = shm.attach(catalog_name(engine))
        except FileNotFoundError:
            raise EngineNotFound(f"no engine {engine!r} is running on this machine") from None
        except ValueError:  # empty: being sized, or its creator was killed before it was
            raise Corrupt(f"catalog of engine {engine!r} is empty", other_version=False) from None
        header = np.ndarray((2,), np.int64, buffer=block.buf)  # MAGIC, VERSION_WORD
        magic, version = int(header[MAGIC]), int(header[VERSION_WORD])
        del header
        if magic != MAGIC_VALUE or version != VERSION:  # checked first: the layout depends on it
            shm.close(block)
            raise Corrupt(f"catalog of engine {engine!r} has no magic or another version ({version})",
                          other_version=magic == MAGIC_VALUE)
        return cls(engine, block, owner=False)

    # -- generations -------------------------------------------------------
    @property
    def committed_generation(self) -> int:
        return int(self.header[COMMITTED_GEN])

    def publish_generation(self, generation: int) -> None:
        self.header[COMMITTED_GEN] = generation

    # -- spaces --------------------------------------------------------------
    @property
    def n_spaces(self) -> int:
        return int(self.header[N_SPACES])

    def add_space(self, p: SpaceParams, owner: str = ANONYMOUS) -> int:
        index = self.n_spaces
        if index >= MAX_SPACES:
            raise SpaceLimit(f"the engine holds the maximum of {MAX_SPACES} spaces", quota="catalog_spaces",
                             limit=MAX_SPACES)
        raw = p.name.encode("utf-8")
        self.names[index, :len(raw)] = np.frombuffer(raw, np.uint8)
        principal = owner.encode("utf-8")[:PRINCIPAL_BYTES]
        self.owners[index, :len(principal)] = np.frombuffer(principal, np.uint8)
        self.spaces[index] = [p.dim, DTYPES.index(p.dtype), METRICS.index(p.metric), p.M,
                              p.ef_construction, p.seed, len(raw), time.time_ns()]
        self.header[N_SPACES] = index + 1
        return index

    def space(self, index: int) -> SpaceParams:
        row = self.spaces[index]
        name = self.names[index, :row[S_NAME_LEN]].tobytes().decode("utf-8")
        return SpaceParams(name, int(row[S_DIM]), DTYPES[row[S_DTYPE]], METRICS[row[S_METRIC]],
                           int(row[S_M]), int(row[S_EFC]), int(row[S_SEED]))

    def space_owner(self, index: int) -> str:
        return self.owners[index].tobytes().rstrip(b"\0").decode("utf-8", "replace")

    # -- segments ------------------------------------------------------------
    @property
    def n_segments(self) -> int:
        return int(self.header[N_SEGMENTS])

    def reserve_segment(self) -> int:
        """Index for the next segment; it counts once `add_segment` publishes it."""
        index = self.n_segments
        if index >= MAX_SEGMENTS:
            raise SpaceLimit(f"the engine holds the maximum of {MAX_SEGMENTS} segments",
                             quota="catalog_segments", limit=MAX_SEGMENTS)
        return index

    def add_segment(self, index: int, space: int, number: int, state: int = LIVE) -> None:
        self.segments[index] = [space, number, state, -1]
        self.header[N_SEGMENTS] = index + 1

    def segment_space(self, index: int) -> int:
        return int(self.segments[index, G_SPACE])

    def segment_state(self, index: int) -> int:
        return int(self.segments[index, G_STATE])

    def layout(self) -> tuple[int, np.ndarray]:
        """(LAYOUT_SEQ, the state of every published segment), read between
        two equal even reads of the sequence. A writer changes states in a
        few stores, so a reader waits microseconds; one that died in between
        left the sequence odd, and the states are then taken as they stand
        (the merged segment is made LIVE before its sources are RETIRED, so
        at worst rows show twice until its successor settles them)."""
        while True:
            seq = int(self.header[LAYOUT_SEQ])
            states = self.segments[:self.n_segments, G_STATE].copy()
            if seq & 1 == 0 and int(self.header[LAYOUT_SEQ]) == seq:
                return seq, states
            if seq & 1 and self._writer_gone():
                return seq, states
            time.sleep(0)

    def _writer_gone(self) -> bool:
        pid, start = int(self.header[FRONT_PID]), int(self.header[FRONT_START])
        writer_alive = process_start(pid) == start if pid > 0 else self.owner_alive()
        return not writer_alive

    def change_states(self, changes: dict[int, int]) -> None:
        """Set the states of segments (index -> state) under the sequence
        lock, in one step for readers. A writer that died inside a change left
        the sequence odd: its successor's change (recovery settles every
        state) closes it."""
        if self.header[LAYOUT_SEQ] & 1 == 0:
            self.header[LAYOUT_SEQ] += 1
        for index, state in changes.items():
            self.segments[index, G_STATE] = state
        self.header[LAYOUT_SEQ] += 1

    # -- lifetime --------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return bool(self.header[STOPPED])

    def owner_alive(self) -> bool:
        pid, start = int(self.header[OWNER_PID]), int(self.header[OWNER_START])
        return process_start(pid) == start

    def owner_watch(self) -> ProcessWatch:
        """The owner's liveness for frequent asking (ProcessWatch); close it."""
        return ProcessWatch(int(self.header[OWNER_PID]), int(self.header[OWNER_START]))

    def engine_alive(self) -> bool:
        """Whether any process of the engine lives: its owner, its front, or
        one of its index workers (each recorded with its start time)."""
        if self.owner_alive():
            return True
        h = self.header
        rows = self.workers[self.workers[:, W_PID] > 0]
        known = [(h[FRONT_PID], h[FRONT_START]), *zip(rows[:, W_PID], rows[:, W_START])]
        return any(pid > 0 and process_start(int(pid)) == int(start) for pid, start in known)

    def close(self) -> None:
        """Unmap. The owner also removes every block of the engine: segments
        are created by whichever process writes, but their lifetime is the
        catalog's (so a segment orphaned by a crash is removed too)."""
        if self.block is None:
            return
        if self.owner:
            self.header[STOPPED] = 1  # attached readers stop answering from stale memory
        self.header = self.spaces = self.names = self.owners = self.segments = self.workers = None
        block, self.block = self.block, None
        if self.owner:
            for name in shm.list_blocks(self.engine):
                if name != block.name:
                    shm.unlink(name)
            shm.destroy(block)
        else:
            shm.close(block)


def collect_stale(engine: str | None = None, min_age_s: float = 10.0) -> list[str]:
    """Unlink the blocks of engines whose processes are all gone (all engines,
    or one; see `Catalog.engine_alive`). Blocks of a running engine, or of one
    whose owner died but whose front or a worker still runs, are never
    touched; an engine's segments with no catalog are collected once older
    than `min_age_s` (a catalog is always created before its segments and
    removed after them)."""
    removed = []
    blocks = shm.list_blocks(engine)
    catalogs = {b[len(shm.PREFIX):-len("_catalog")] for b in blocks if b.endswith("_catalog")}
    live = set()
    for name in catalogs:
        try:
            cat = Catalog.attach(name)
        except EngineNotFound:
            continue
        except Corrupt as e:
            # No magic yet: perhaps still being created. Another version: only
            # its header is known to us (its owner and front are enough: its
            # workers die with its owner).
            if (e.details["other_version"] and _owner_or_front_alive(name)) or \
                    _age(catalog_name(name)) < min_age_s:
                live.add(name)
            continue
        try:
            if cat.engine_alive():
                live.add(name)
        finally:
            cat.close()
    for block in blocks:
        owner = _engine_of(block)
        if owner is None or owner in live:
            continue
        if owner not in catalogs and _age(block) < min_age_s:
            continue
        if not block.endswith("_catalog") and shm.unlink(block):
            removed.append(block)
    for name in catalogs - live:
        if shm.unlink(catalog_name(name)):
            removed.append(catalog_name(name))
    if removed:
        log.info("collected %d stale shared memory blocks", len(removed))
    return removed


def _owner_or_front_alive(engine: str) -> bool:
    """Liveness from the header words every catalog version has kept in place
    (OWNER_PID/START, FRONT_PID/START), for a catalog of another version."""
    try:
        block = shm.attach(catalog_name(engine))
    except FileNotFoundError:
        return False
    try:
        h = np.ndarray((64,), np.int64, buffer=block.buf).copy()
    finally:
        shm.close(block)
    return any(pid > 0 and process_start(int(pid)) == int(start)
               for pid, start in ((h[OWNER_PID], h[OWNER_START]), (h[FRONT_PID], h[FRONT_START])))


def _engine_of(block: str) -> str | None:
    body = block[len(shm.PREFIX):]
    name, _, suffix = body.rpartition("_")
    if not name or not (suffix in ("catalog", "sessions", "stats") or suffix.isdigit()):
        return None
    return name


def _age(block: str) -> float:
    try:
        return time.time() - os.stat(os.path.join(shm.SHM_DIR, block)).st_mtime
    except FileNotFoundError:
        return float("inf")
