import os

import pytest
from hypothesis import HealthCheck, settings

from engram_shm.kernels.warm import warm
from engram_shm.store import shm

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
    left = set(shm.list_blocks()) - before
    assert not left, f"shared memory left behind: {sorted(left)}"
