"""Who may hold how much: the per-key limits, and the engine's memory ceiling
(docs/security.md, "Limits and quotas").

Every message has a principal: the client's key, or "anonymous" for every
client of a server without authentication (they share its limits). Per-key
limits are looked up through `limits_for` alone, so that an access list can
override them for one key; totals (max_sessions, max_spaces, memory_ceiling)
are the engine's and come from its config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .config import EngineConfig
from .store import shm

ANONYMOUS = "anonymous"  # the principal of every client of a server without authentication
PRINCIPAL_BYTES = 64  # a principal as the session table and the catalog keep it (UTF-8, zero-padded)
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"


@dataclass(frozen=True)
class KeyLimits:
    """What one key may hold over all its sessions and spaces."""
    sessions: int  # sessions (open, paused, or closed until they expire)
    spaces: int  # spaces it owns
    credit: int  # credit outstanding over all its sessions
    quota_bytes: int  # bytes of the spaces it owns (shared memory + disk; see engine/ledger.py)


def limits_for(config: EngineConfig, principal: str, overrides: dict[str, dict] | None = None) -> KeyLimits:
    """The limits of `principal`: the config's per-key limits, with what the
    access list's [limits.NAME] table (`overrides`) sets for that key."""
    base = KeyLimits(config.max_sessions_per_key, config.max_spaces_per_key, config.max_key_credit,
                     config.key_quota_bytes)
    own = (overrides or {}).get(principal)
    return dataclasses.replace(base, **own) if own else base


def memory_bytes() -> int:
    """RAM this process may use: the machine's, or its cgroup's limit if lower."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open(CGROUP_MEMORY_MAX) as f:
            raw = f.read().strip()
    except OSError:
        return ram
    return min(ram, int(raw)) if raw.isdigit() else ram


def memory_ceiling_bytes(fraction: float) -> int:
    """The most shared memory an engine's segments may take: `fraction` of
    the smaller of /dev/shm and RAM (tmpfs pages are RAM: a /dev/shm larger
    than RAM fills it and the OOM killer steps in before tmpfs refuses)."""
    return int(fraction * min(shm.total_bytes(), memory_bytes()))
