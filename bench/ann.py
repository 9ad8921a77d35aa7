"""ANN benchmark: engram_shm against hnswlib and faiss (IndexHNSWFlat), in one
run, on the same clustered unit-norm data, with the same parameters (M=16,
ef_construction=100, ef=64) and one thread each.

    python -m bench.ann [--n 50000] [--dim 768] [--dtype f32,f16] [--quick]

Prints one JSON object per system per line, then a table with ratios to
hnswlib. engram_shm's insert rate is measured end to end through the embedded
engine (observe, then one index thread until everything is in the graph);
queries go through Engine.recall.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from engram_shm.synthetic import clustered

from .report import emit, percentiles_ms, table

M, EF_CONSTRUCTION, EF = 16, 100, 64


def exact_top10(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ data.T), axis=1)[:, :10]


def summarise(system, dtype, n, dim, insert_s, latencies, found, exact) -> dict:
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact.tolist()))
    return {"bench": "ann", "system": system, "n": n, "dim": dim, "dtype": dtype,
            "insert_per_s": round(n / insert_s, 1),
            "recall_at_10": round(hits / exact.size, 4), **percentiles_ms(latencies, "query", 4)}


def timed_queries(search, queries):
    found, latencies = [], []
    for q in queries:
        start = time.perf_counter()
        ids = search(q)
        latencies.append(time.perf_counter() - start)
        found.append(list(ids))
    return found, latencies


def run_engram(data, queries, exact, dtype) -> dict:
    from engram_shm import Engine

    n, dim = data.shape
    ids = [str(i) for i in range(n)]
    # One segment (one graph) of n, as hnswlib and faiss build one index.
    with Engine(workers=1, segment_capacity=max(n, 64), first_segment_capacity=max(n, 64),
                ring_capacity=max(n, 64), dtype=dtype,
                M=M, ef_construction=EF_CONSTRUCTION, ef_search=EF) as engine:
        engine.create_space("bench", dim=dim)
        start = time.perf_counter()
        for lo in range(0, n, 4096):
            engine.observe("bench", ids[lo:lo + 4096], data[lo:lo + 4096])
        engine.wait_indexed()
        insert_s = time.perf_counter() - start
        found, lat = timed_queries(lambda q: [int(m.id) for m in engine.recall("bench", q, k=10)],
                                   queries)
    return summarise("engram_shm", dtype, n, dim, insert_s, lat, found, exact)


def run_hnswlib(data, queries, exact) -> dict:
    import hnswlib

    n, dim = data.shape
    index = hnswlib.Index("ip", dim)
    index.init_index(n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
    index.set_num_threads(1)
    start = time.perf_counter()
    index.add_items(data, np.arange(n), num_threads=1)
    insert_s = time.perf_counter() - start
    index.set_ef(EF)
    found, lat = timed_queries(lambda q: index.knn_query(q, 10, num_threads=1)[0][0], queries)
    return summarise("hnswlib", "f32", n, dim, insert_s, lat, found, exact)


def run_faiss(data, queries, exact) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = data.shape
    index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    start = time.perf_counter()
    index.add(data)
    insert_s = time.perf_counter() - start
    index.hnsw.efSearch = EF
    found, lat = timed_queries(lambda q: index.search(q[None, :], 10)[1][0], queries)
    return summarise("faiss", "f32", n, dim, insert_s, lat, found, exact)


COLUMNS = [("system", "system", ""), ("dtype", "dtype", ""), ("n", "n", "d"), ("dim", "dim", "d"),
           ("insert/s", "insert_per_s", ".0f"), ("x hnswlib", "x insert_per_s", ".2f"),
           ("recall@10", "recall_at_10", ".3f"), ("p50 ms", "query_p50_ms", ".3f"),
           ("p99 ms", "query_p99_ms", ".3f")]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.ann", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="vectors to insert")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="f32,f16", help="engram_shm storage dtypes, comma-separated")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (2000 x 64) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries = 2000, 64, 100
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # About ten points per cluster and noise as large as the centres: hnswlib's
    # recall@10 at ef=64 is then ~0.9, as on real sentence embeddings.
    data = clustered(args.n + args.queries, args.dim, clusters=max(10, args.n // 10), spread=1.0,
                     seed=args.seed)
    data, queries = data[:args.n], data[args.n:]
    exact = exact_top10(data, queries)
    from engram_shm.kernels.warm import warm
    warm()  # compiled kernels come from Numba's disk cache; load them before timing
    print(f"# seed {args.seed}: {args.n} x {args.dim} clustered unit vectors, {args.queries} "
          "held-out queries",
          flush=True)
    rows = [emit(run_hnswlib(data, queries, exact)), emit(run_faiss(data, queries, exact))]
    rows += [emit(run_engram(data, queries, exact, dtype.strip())) for dtype in args.dtype.split(",")]
    print(table("ann benchmark", rows, COLUMNS))  # the first row, hnswlib, is the base of ratios
    return rows


if __name__ == "__main__":
    main()
