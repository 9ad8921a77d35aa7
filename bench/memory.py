"""Memory per observation: what a space of `--n` observations of `--dim`
dimensions with ~100-byte texts occupies in shared memory, in the process and on disk, by storage dtype.

    python -m bench memory [--n 1000000] [--dim 768] [--dtype f16,f32,int8] [--quick]

For each dtype a durable embedded engine (M=16, one index writer per core,
a data directory with the write-ahead log at fsync=interval) takes the
observations, indexes them all and compacts them (`Engine.compact()`: the
space at rest, as compaction leaves an idle space); then it reports:
- shared: the shared memory its blocks occupy (pages actually touched in
  /dev/shm: vectors, graph, ids, texts, catalog), at rest and at its peak
  (sampled every 0.1 s from the first observation on: while a merge is
  built, its sources and the merged segment exist together);
- resident: the process's resident set (VmRSS: its own anonymous pages -
  heap, id index, Numba - plus the shared pages it has mapped and touched),
  and its anonymous pages alone;
- on disk: the write-ahead log at the end of the stream (the checkpoints
  taken meanwhile make its head deletable, so this is its tail), then, after
  a last checkpoint, that checkpoint's size and the whole data directory's
  (it keeps `checkpoints_kept` = 2 checkpoints, and the log's tail);
- bytes per observation (shared) against the floor of vectors plus layer-0
  links.
The graph's size depends on M, not on ef_construction, so the build uses
`--ef-construction` 16 by default to finish sooner. Prints JSON lines, then
a table.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from engram_shm import Engine
from engram_shm.kernels.distance import stored_width
from engram_shm.store.layout import STORAGE

from .report import emit, engine_shm_bytes, mib, parser, self_bytes, table

M = 16
CHUNK = 4096


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def text(i: int, size: int) -> str:
    head = f"observation {i}: "
    return head + "x" * max(0, size - len(head))


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


class PeakSampler:
    """The most shared memory an engine's blocks occupied, sampled in a thread."""

    def __init__(self, engine_name: str, period_s: float = 0.1):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(engine_name, period_s), daemon=True)
        self._thread.start()

    def _sample(self, engine_name: str, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.peak = max(self.peak, engine_shm_bytes(engine_name))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(n: int, dim: int, dtype: str, text_bytes: int, ef_construction: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="engram-memory-") as data_dir, \
            Engine(data_dir=data_dir, dtype=dtype, M=M, ef_construction=ef_construction,
                   ring_capacity=1 << 20) as engine:
        engine.create_space("mem", dim=dim)
        peak = PeakSampler(engine.name)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            engine.observe("mem", [f"m{i}" for i in range(lo, hi)], unit_rows(rng, hi - lo, dim),
                           what=[text(i, text_bytes) for i in range(lo, hi)])
        engine.wait_indexed()
        engine.compact()
        peak.stop()
        shm_bytes = engine_shm_bytes(engine.name)
        rss, anonymous = self_bytes("smaps_rollup", "Rss"), self_bytes("smaps_rollup", "Anonymous")
        segments = engine.stats()["spaces"]["mem"]["segments"]
        wal_bytes = tree_bytes(os.path.join(data_dir, "wal"))
        engine.checkpoint()
        checkpoints = os.path.join(data_dir, "checkpoints")
        newest = max(os.listdir(checkpoints), key=lambda name: int(name.removeprefix("ckpt-")))
        checkpoint_bytes = tree_bytes(os.path.join(checkpoints, newest))
        data_dir_bytes = tree_bytes(data_dir)
    floor = n * (stored_width(dim, STORAGE[dtype]) * STORAGE[dtype].itemsize + (2 * M + 1) * 4)
    return {"bench": "memory", "n": n, "dim": dim, "dtype": dtype, "text_bytes": text_bytes,
            "ef_construction": ef_construction, "segments": segments, "shm_bytes": shm_bytes,
            "shm_peak_bytes": max(peak.peak, shm_bytes),
            "process_rss_bytes": rss, "process_anonymous_bytes": anonymous,
            "wal_bytes": wal_bytes, "checkpoint_bytes": checkpoint_bytes, "data_dir_bytes": data_dir_bytes,
            "shm_bytes_per_observation": round(shm_bytes / n, 1),
            "floor_bytes_per_observation": round(floor / n, 1),
            "disk_bytes_per_observation": round(checkpoint_bytes / n, 1),
            "shm_gib": round(shm_bytes / 2**30, 3), "shm_gb": round(shm_bytes / 1e9, 3)}


COLUMNS = [
    ("dtype", "dtype", ""), ("n", "n", ",d"), ("dim", "dim", "d"), ("segments", "segments", "d"),
    ("shm GB", "shm_gb", ".3f"), ("shm GiB", "shm_gib", ".3f"),
    ("peak GiB", lambda r: r["shm_peak_bytes"] / 2**30, ".3f"),
    ("bytes/obs", "shm_bytes_per_observation", ",.0f"),
    ("floor", "floor_bytes_per_observation", ",.0f"), ("RSS MiB", mib("process_rss_bytes"), ",.0f"),
    ("anon MiB", mib("process_anonymous_bytes"), ",.0f"), ("WAL MiB", mib("wal_bytes"), ",.0f"),
    ("checkpoint MiB", mib("checkpoint_bytes"), ",.0f"), ("data dir MiB", mib("data_dir_bytes"), ",.0f"),
    ("disk bytes/obs", "disk_bytes_per_observation", ",.0f")]


def main(argv=None, prog="python -m bench memory") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="f16,f32,int8")
    ap.add_argument("--text-bytes", type=int, default=100)
    ap.add_argument("--ef-construction", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (20000 x 64) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim = 20_000, 64
    from engram_shm.kernels.warm import warm
    warm()
    rows = [emit(run(args.n, args.dim, dtype.strip(), args.text_bytes, args.ef_construction, args.seed))
            for dtype in args.dtype.split(",")]
    print(table("memory per observation", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
