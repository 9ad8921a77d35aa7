"""Scaling benchmark: one hot space, and the same data over many spaces, indexed by 1 and 2 workers.

    python -m bench scaling [--n 30000] [--dim 768] [--dtype f16] [--workers 1,2] [--spaces 1,8] [--quick]

The same observations go to one space, or in chunks (of 4096, or n/spaces
if smaller) taken in turn to each of `--spaces` spaces, with strong recalls (10/s, of a random space)
running while indexing goes on. Prints one JSON object per (spaces, worker
count) (bench, spaces, workers, insert_per_s, and the recall latencies
measured while indexing), then a table per spaces with the ratio to one
worker. The insert rate is end to end: observe everything, then wait until
the graphs hold it all.
"""

from __future__ import annotations

import time

import numpy as np

from engram_shm import Engine
from engram_shm.synthetic import clustered

from .report import emit, parser, percentiles_ms, table

RECALL_EVERY_S = 0.1
CHUNK = 4096


def run(data: np.ndarray, workers: int, dtype: str, spaces: int) -> dict:
    n, dim = data.shape
    ids = [str(i) for i in range(n)]
    names = [f"s{j}" for j in range(spaces)]
    rng = np.random.default_rng(workers)
    latencies = []
    with Engine(workers=workers, worker_mode="process", ring_capacity=n, dtype=dtype) as engine:
        for name in names:
            engine.create_space(name, dim=dim)
        start = time.perf_counter()
        step = max(1, min(CHUNK, n // spaces))  # every space gets a chunk at least
        for chunk, lo in enumerate(range(0, n, step)):
            engine.observe(names[chunk % spaces], ids[lo:lo + step], data[lo:lo + step])
        while not engine.wait_indexed(RECALL_EVERY_S):
            cue = data[rng.integers(0, n)]
            t = time.perf_counter()
            engine.recall(names[rng.integers(0, spaces)], cue, k=10)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
    return {"bench": "scaling", "spaces": spaces, "workers": workers, "n": n, "dim": dim, "dtype": dtype,
            "insert_per_s": round(n / elapsed, 1),
            "segments": sum(stats["spaces"][name]["segments"] for name in names),
            "recalls_while_indexing": len(latencies), **percentiles_ms(latencies, "recall")}


COLUMNS = [("spaces", "spaces", "d"), ("workers", "workers", "d"), ("n", "n", "d"), ("dim", "dim", "d"),
           ("dtype", "dtype", ""),
           ("insert/s", "insert_per_s", ".0f"), ("x 1st", "x insert_per_s", ".2f"),
           ("segments", "segments", "d"), ("recall p50 ms", "recall_p50_ms", ".2f"),
           ("p99 ms", "recall_p99_ms", ".2f")]


def main(argv=None, prog="python -m bench scaling") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    ap.add_argument("--spaces", default="1,8", help="space counts to spread the data over, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (3000 x 64) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim = 3000, 64
    data = clustered(args.n, args.dim, clusters=max(10, args.n // 10), spread=1.0, seed=args.seed)
    print(f"# seed {args.seed}: {args.n} x {args.dim} clustered unit vectors", flush=True)
    rows = []
    for spaces in map(int, args.spaces.split(",")):
        group = [emit(run(data, int(w), args.dtype, spaces)) for w in args.workers.split(",")]
        print(table(f"scaling benchmark, {spaces} space(s)", group, COLUMNS))
        rows += group
    return rows


if __name__ == "__main__":
    main()
