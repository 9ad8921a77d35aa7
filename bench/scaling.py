"""Scaling benchmark: one hot space indexed by 1 and by 2 worker processes, on
the same data, with strong recalls (10/s) running while indexing goes on.

    python -m bench.scaling [--n 30000] [--dim 768] [--dtype f16] [--workers 1,2] [--quick]

Prints one JSON object per worker count (bench, workers, insert_per_s, and the
recall latencies measured while indexing), then a table with the ratio to one
worker. The insert rate is end to end: observe everything, then wait until the
graphs hold it all.
"""

from __future__ import annotations

import time

import numpy as np

from engram_shm import Engine
from engram_shm.synthetic import clustered

from .report import emit, parser, percentiles_ms, table

RECALL_EVERY_S = 0.1


def run(data: np.ndarray, workers: int, dtype: str) -> dict:
    n, dim = data.shape
    ids = [str(i) for i in range(n)]
    rng = np.random.default_rng(workers)
    latencies = []
    with Engine(workers=workers, worker_mode="process", ring_capacity=n, dtype=dtype) as engine:
        engine.create_space("hot", dim=dim)
        start = time.perf_counter()
        for lo in range(0, n, 4096):
            engine.observe("hot", ids[lo:lo + 4096], data[lo:lo + 4096])
        while not engine.wait_indexed(RECALL_EVERY_S):
            cue = data[rng.integers(0, n)]
            t = time.perf_counter()
            engine.recall("hot", cue, k=10)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
    return {"bench": "scaling", "workers": workers, "n": n, "dim": dim, "dtype": dtype,
            "insert_per_s": round(n / elapsed, 1),
            "segments": stats["spaces"]["hot"]["segments"],
            "recalls_while_indexing": len(latencies), **percentiles_ms(latencies, "recall")}


COLUMNS = [("workers", "workers", "d"), ("n", "n", "d"), ("dim", "dim", "d"), ("dtype", "dtype", ""),
           ("insert/s", "insert_per_s", ".0f"), ("x 1st", "x insert_per_s", ".2f"),
           ("segments", "segments", "d"), ("recall p50 ms", "recall_p50_ms", ".2f"),
           ("p99 ms", "recall_p99_ms", ".2f")]


def main(argv=None, prog="python -m bench scaling") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (3000 x 64) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim = 3000, 64
    data = clustered(args.n, args.dim, clusters=max(10, args.n // 10), spread=1.0, seed=args.seed)
    print(f"# seed {args.seed}: one space, {args.n} x {args.dim} clustered unit vectors", flush=True)
    rows = [emit(run(data, int(w), args.dtype)) for w in args.workers.split(",")]
    print(table("scaling benchmark", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
