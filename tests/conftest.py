import os

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, settings

from engram_shm.kernels.warm import warm
from engram_shm.store import shm
from engram_shm.store.catalog import OWNER_PID

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("stress", deadline=None, max_examples=3000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Warm the kernel cache once, and fail the session if any engram shared
    memory block it created is still in /dev/shm at the end."""
    before = set(shm.list_blocks())
    warm()
    yield
    left = {engine_of(b) for b in set(shm.list_blocks()) - before}
    ours = sorted(e for e in left if not owned_by_another_run(e))
    assert not ours, f"shared memory of engines left behind: {ours}"


def engine_of(block: str) -> str:
    return block[len(shm.PREFIX):].rsplit("_", 1)[0]


def owned_by_another_run(engine: str) -> bool:
    """An engine whose owner lives outside this process tree: another test run
    on the same machine, whose blocks are not this session's to judge."""
    try:
        with open(f"{shm.SHM_DIR}/{shm.block_name(engine, 'catalog')}", "rb") as f:
            owner = int(np.frombuffer(f.read(8 * (OWNER_PID + 1)), np.int64)[OWNER_PID])
        process = psutil.Process(owner)
        return process.status() != psutil.STATUS_ZOMBIE and \
            os.getpid() not in [p.pid for p in process.parents()] and owner != os.getpid()
    except (OSError, ValueError, IndexError, psutil.Error):
        return False
