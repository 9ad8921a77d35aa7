"""Segments benchmark: what a space's number of graphs costs a recall, and
what compaction wins back (issue 10).

    python -m bench segments [--n 200000] [--data clustered:768] [--writers 2]
                             [--ef 32,64,128] [--ef-construction 100] [--quick]

The same rows, in one embedded engine each way:
- `grown`: streamed into a space with the engine's segment schedule and
  `--writers` index writers, as a hot space grows (a segment per writer,
  each next one larger, up to segment_capacity);
- `one graph`: one segment as large as the data, one writer;
- `compacted`: grown as `grown` with compaction on (the default; `grown` has
  it off), then `Engine.compact()` merges what compaction merges once the
  space is idle; `compact_s` is what that took after the fill.
Then per way and per ef: Engine.recall p50 and p99 (k=10, results decoded,
one query at a time) and recall@10 against exact search, so that latency
can be compared at equal recall; and for `grown`, each segment's own search
time (the kernel alone, p50 at the middle ef), which shows the cost per
graph. Prints JSON lines, then a table.
"""

from __future__ import annotations

import time

import numpy as np

from engram_shm.kernels import hnsw
from engram_shm.store.layout import MAX_LEVEL

from .ann import EF_CONSTRUCTION, M, dataset, exact_top10, fill, recall_at_10, timed, timed_queries
from .report import emit, parser, percentiles_ms, table

K = 10


WAYS = ("one graph", "grown", "compacted")


def build(data: np.ndarray, way: str, writers: int, ef_construction: int):
    """An open engine holding `data` in space "s", all of it indexed, the
    seconds that took, and those compaction took after it (None: not run)."""
    from engram_shm import Engine

    n = len(data)
    options = {"one graph": {"segment_capacity": n, "first_segment_capacity": n, "workers": 1},
               "grown": {"compaction_capacity": 0, "workers": writers},
               "compacted": {"workers": writers}}[way]
    engine = Engine(ring_capacity=max(n, 64), M=M, ef_construction=ef_construction, **options)
    engine.create_space("s", dim=data.shape[1])
    build_s = timed(lambda: fill(engine, "s", data))[0]
    compact_s = timed(engine.compact)[0] if way == "compacted" else None
    return engine, build_s, compact_s


def segment_search_ms(engine, queries: np.ndarray, ef: int) -> list[tuple[int, float]]:
    """(rows, p50 ms of the kernel's search) of each of the space's segments."""
    reader = engine.reader
    index, params = reader.space("s")
    segments, p = reader._plan(index, params.metric)
    views = p.views
    scratch = hnsw.new_scratch(views.capacity, views.dim, views.M, ef, MAX_LEVEL)
    out = []
    for seg in segments:
        v = seg.view
        lat = []
        for q in queries:
            start = time.perf_counter()
            hnsw.search(v.store, v.gens, v.graph, q, K, ef, seg.indexed, 0, 0, engine.generation,
                        params.metric, scratch, seg.scales)
            lat.append(time.perf_counter() - start)
        out.append((seg.accepted, round(float(np.median(lat)) * 1e3, 3)))
    return out


def measure(name: str, data: np.ndarray, queries: np.ndarray, exact: np.ndarray, way: str,
            args) -> list[dict]:
    engine, build_s, compact_s = build(data, way, args.writers, args.ef_construction)
    try:
        segments = engine.stats()["spaces"]["s"]["segments"]
        efs = [int(e) for e in args.ef.split(",")]
        rows = []
        for ef in efs:
            found, lat = timed_queries(
                lambda q, ef=ef: [int(m.id) for m in engine.recall("s", q, k=K, ef=ef)], queries)
            rows.append({"bench": "segments", "data": name, "n": len(data), "dim": data.shape[1],
                         "way": way, "writers": 1 if way == "one graph" else args.writers,
                         "ef_construction": args.ef_construction, "segments": segments,
                         "build_s": round(build_s, 1),
                         "compact_s": None if compact_s is None else round(compact_s, 1), "ef": ef,
                         "recall_at_10": recall_at_10(found, exact),
                         **percentiles_ms(lat, "recall", 3)})
        if way != "one graph":
            rows[len(rows) // 2]["segment_search_ms"] = segment_search_ms(engine, queries, efs[len(efs) // 2])
        return [emit(r) for r in rows]
    finally:
        engine.close()


COLUMNS = [("way", "way", ""), ("segments", "segments", "d"), ("build s", "build_s", ".1f"),
           ("compact s", "compact_s", ".1f"),
           ("ef", "ef", "d"), ("recall@10", "recall_at_10", ".3f"), ("p50 ms", "recall_p50_ms", ".3f"),
           ("p99 ms", "recall_p99_ms", ".3f")]


def main(argv=None, prog="python -m bench segments") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=200_000, help="rows")
    ap.add_argument("--data", default="clustered:768", help="dataset, kind:dim (see bench ann)")
    ap.add_argument("--writers", type=int, default=2, help="index writers of the grown space")
    ap.add_argument("--ef", default="32,64,128", help="search beams, comma-separated")
    ap.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION,
                    help="build beam (at 32, this data set's recall@10 stays under 0.5)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (3000 x 32) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.data, args.queries, args.ef = 3000, "clustered:32", 50, "16,64"
    from engram_shm.kernels.warm import warm
    warm()  # compiled kernels come from Numba's disk cache; load them before timing
    name, data = dataset(args.data, args.n + args.queries, args.seed)
    data, queries = data[:args.n], data[args.n:]
    exact = exact_top10(data, queries)
    print(f"# seed {args.seed}: {name}, {args.n} unit vectors, {args.queries} held-out queries, "
          f"M={M}, ef_construction {args.ef_construction}", flush=True)
    rows = []
    for way in WAYS:
        rows += measure(name, data, queries, exact, way, args)
    for row in rows:
        if "segment_search_ms" in row:
            print(f"# {row['way']}, each segment's own search (rows: p50 ms at ef "
                  f"{row['ef']}): " + ", ".join(f"{n}: {ms}" for n, ms in row["segment_search_ms"]))
    print(table(f"recall over many segments and over one graph, {name}", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
