"""Cached kernels compiled from other sources are never loaded: Numba checks
a kernel against its own file only, so `kernels.cache.drop_stale` drops the
cache of every kernel when the digest of the files they are built from
changes (see engram_shm/kernels/cache.py)."""

import json
import subprocess
import sys
import textwrap

from engram_shm.kernels.cache import RECORD, sources, sources_digest

MODULE = textwrap.dedent("""
    import numba

    @numba.njit(cache=True)
    def plus_one(x):
        return x + 1
""")

# Loads the module, optionally drops its stale cache first, runs the kernel
# and tells whether it came from the cache.
RUN = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import cached_kernel
    from engram_shm.kernels.cache import drop_stale
    dropped = drop_stale([cached_kernel], sys.argv[2]) if len(sys.argv) > 2 else None
    assert cached_kernel.plus_one(1) == 2
    print(json.dumps({"dropped": dropped, "hits": sum(cached_kernel.plus_one.stats.cache_hits.values())}))
""")


def run(directory, digest=None) -> dict:
    argv = [sys.executable, "-c", RUN, str(directory), *([digest] if digest else [])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_a_changed_digest_drops_the_cached_kernels_and_a_kept_one_loads_them(tmp_path):
    (tmp_path / "cached_kernel.py").write_text(MODULE)
    assert run(tmp_path) == {"dropped": None, "hits": 0}  # compiled and saved
    assert run(tmp_path)["hits"] == 1  # Numba's own cache at work
    assert run(tmp_path, "one") == {"dropped": 1, "hits": 0}  # no record yet: dropped, compiled again
    assert (tmp_path / "__pycache__" / RECORD).read_text().strip() == "one"
    assert run(tmp_path, "one") == {"dropped": 0, "hits": 1}
    assert run(tmp_path, "two") == {"dropped": 1, "hits": 0}
    assert run(tmp_path, "two") == {"dropped": 0, "hits": 1}


def test_the_digest_covers_the_kernels_and_the_layout_they_read():
    names = {path.name for path in sources()}
    assert {"hnsw.py", "policy.py", "recall.py", "layout.py"} <= names
    assert len(sources_digest(sources())) == 64
    assert sources_digest(sources()) != sources_digest(sources()[1:])
