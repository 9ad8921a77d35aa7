"""What each space and each key holds, and the admission of new spaces,
segments and rows against the limits (docs/security.md, "Limits and quotas").

The measure of a space, in bytes, is cheap and never undercounts memory:
- the shared memory of its segments at their full size (tmpfs may come to
  hold every page of a block, and a segment's size is fixed at creation);
- with a data directory, its rows as the log holds them: per row the vector
  as stored, 24 bytes (timestamp, confidence, id length, record end), and
  its id and text. Checkpoints copy the same rows plus their graph links; the
  directory holds the log tail and up to `checkpoints_kept` of them, so its
  disk use is a small multiple of this, which docs/security.md states.
A key's measure is the sum over the spaces it owns (the principal that
created a space owns it, whoever writes to it later).

Everything is checked before it is logged or allocated; a refusal leaves no
trace. Only the single writer (engine/writer.py) calls this; it is rebuilt
from the catalog and the segments on every start.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from ..config import EngineConfig
from ..errors import QuotaExceeded, ShmFull, SpaceLimit
from ..kernels.distance import stored_width
from ..limits import KeyLimits, limits_for, memory_ceiling_bytes
from ..observations import Batch
from ..store import shm
from ..store.catalog import SpaceParams
from ..store.layout import ARENA_USED, STORAGE
from ..store.segment import Segment

ROW_DISK_BYTES = 24  # per logged row besides its vector and text: f64 when, f32 confidence, i32 + i64 bounds


@dataclass
class Usage:
    shm_bytes: int = 0
    disk_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.shm_bytes + self.disk_bytes


class Ledger:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.ceiling = memory_ceiling_bytes(config.memory_ceiling)
        self.spaces: dict[str, Usage] = {}
        self.owners: dict[str, str] = {}  # space -> the principal that owns it
        self.keys: dict[str, Usage] = collections.defaultdict(Usage)
        self.spaces_of: collections.Counter[str] = collections.Counter()
        self.shm_bytes = 0  # of every segment of the engine
        self.segments = 0  # segments of the engine (each charged once, with its shared memory)
        self.overrides: dict[str, dict] = {}  # per-key limits of the access list (the front sets them)

    def limits(self, principal: str) -> KeyLimits:
        return limits_for(self.config, principal, self.overrides)

    # -- admission: raise before anything is stored -------------------------------
    def admit_space(self, owner: str, shm_bytes: int, disk_bytes: int = 0) -> None:
        """May `owner` create a space whose first segment takes `shm_bytes` and
        whose first rows take `disk_bytes`?"""
        total, cap = len(self.spaces), self.config.max_spaces
        if total >= cap:
            raise SpaceLimit(f"the engine holds its maximum of {cap} spaces (max_spaces)",
                             quota="max_spaces", used=total, limit=cap)
        held, cap = self.spaces_of[owner], self.limits(owner).spaces
        if held >= cap:
            raise SpaceLimit(f"key {owner!r} owns its maximum of {cap} spaces (max_spaces_per_key)",
                             quota="max_spaces_per_key", key=owner, used=held, limit=cap)
        self._admit(Usage(), owner, shm_bytes, disk_bytes)

    def admit(self, space: str, shm_bytes: int = 0, disk_bytes: int = 0) -> None:
        """May `space` take `shm_bytes` more of shared memory (a new segment) and
        `disk_bytes` more of disk (rows)?"""
        self._admit(self.spaces[space], self.owners[space], shm_bytes, disk_bytes)

    def _admit(self, space: Usage, owner: str, shm_bytes: int, disk_bytes: int) -> None:
        needed, cap = shm_bytes + disk_bytes, self.config.space_quota_bytes
        if space.bytes + needed > cap:
            raise QuotaExceeded(f"the space would hold {space.bytes + needed} bytes, past its quota of {cap} "
                                "(space_quota_bytes)", quota="space_quota_bytes", used=space.bytes,
                                needed=needed, limit=cap)
        used, cap = self.keys.get(owner, Usage()).bytes, self.limits(owner).quota_bytes
        if used + needed > cap:
            raise QuotaExceeded(f"key {owner!r} would hold {used + needed} bytes, past its quota of {cap} "
                                "(key_quota_bytes)", quota="key_quota_bytes", key=owner, used=used,
                                needed=needed, limit=cap)
        if shm_bytes:
            self._admit_shm(shm_bytes)

    def _admit_shm(self, size: int) -> None:
        """The engine's segments stay under memory_ceiling of min(/dev/shm, RAM),
        and /dev/shm (shared with every other user) under memory_ceiling full;
        a new segment also counts against max_segments."""
        if self.segments >= self.config.max_segments:
            raise SpaceLimit(f"the engine holds its maximum of {self.config.max_segments} segments "
                             "(max_segments)", quota="max_segments", used=self.segments,
                             limit=self.config.max_segments)
        if self.shm_bytes + size > self.ceiling:
            raise ShmFull(f"the engine's segments would take {self.shm_bytes + size} bytes, past its "
                          f"memory_ceiling of {self.ceiling}", quota="memory_ceiling", used=self.shm_bytes,
                          needed=size, limit=self.ceiling, retry_after_ms=1000)
        total, free = shm.total_bytes(), shm.free_bytes()
        if total - free + size > self.config.memory_ceiling * total:
            raise ShmFull(f"/dev/shm would be more than {self.config.memory_ceiling:.0%} full with a new "
                          f"segment of {size} bytes ({free} free of {total})", quota="memory_ceiling",
                          used=total - free, needed=size, limit=int(self.config.memory_ceiling * total),
                          retry_after_ms=1000)

    # -- accounting: after the fact ------------------------------------------------
    def add_space(self, name: str, owner: str) -> None:
        self.spaces[name] = Usage()
        self.owners[name] = owner
        self.spaces_of[owner] += 1

    def charge(self, space: str, shm_bytes: int = 0, disk_bytes: int = 0) -> None:
        for usage in (self.spaces[space], self.keys[self.owners[space]]):
            usage.shm_bytes += shm_bytes
            usage.disk_bytes += disk_bytes
        self.shm_bytes += shm_bytes
        self.segments += (shm_bytes > 0) - (shm_bytes < 0)  # a segment created, or retired

    def charge_segment(self, space: str, seg: Segment) -> None:
        """Count a segment found in shared memory (a restart): its block and
        the rows it holds."""
        rows = self.rows_bytes(seg.layout.dim, seg.layout.dtype, seg.accepted, int(seg.header[ARENA_USED]))
        self.charge(space, seg.layout.size, rows)

    # -- the measure -----------------------------------------------------------------
    def rows_bytes(self, dim: int, dtype: str, n: int, text_bytes: int) -> int:
        """Disk bytes of n rows (nothing without a data directory)."""
        if not self.config.durable:
            return 0
        return n * (stored_width(dim, STORAGE[dtype]) * STORAGE[dtype].itemsize + ROW_DISK_BYTES) + text_bytes

    def batch_bytes(self, params: SpaceParams, batch: Batch) -> int:
        text_bytes = int(batch.record_ends[-1]) if batch.n else 0
        return self.rows_bytes(params.dim, params.dtype, batch.n, text_bytes)

    def usage(self) -> dict:
        """Bytes and spaces per key, for stats."""
        return {key: {"spaces": self.spaces_of[key], "shm_bytes": u.shm_bytes, "disk_bytes": u.disk_bytes}
                for key, u in self.keys.items()}
