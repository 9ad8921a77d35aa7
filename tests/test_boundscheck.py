"""The kernel tests again with Numba's bounds checks on: Numba checks no bounds
by default, and an out-of-bounds write into shared memory would silently
corrupt another process. A separate cache directory keeps the checked builds
apart from the fast ones."""

import os
import subprocess
import sys

PROBE = """
import numba, numpy as np
@numba.njit
def poke(a, i):
    a[i] = 1
try:
    poke(np.zeros(2), 5)
except IndexError:
    print("checked")
"""


def test_kernel_tests_pass_with_bounds_checking(tmp_path):
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.stdout.strip() == "checked", probe.stderr
    here = os.path.dirname(__file__)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(os.path.join(here, f) for f in ("test_heap.py", "test_distance.py", "test_hnsw.py",
                                           "test_idindex.py", "test_store.py", "test_engine.py"))],
        env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
