"""ANN benchmark: engram_shm against hnswlib and faiss (IndexHNSWFlat), in one
run, on the same unit-norm data, with the same parameters (M=16,
ef_construction=100, ef=64).

    python -m bench.ann [--n 50000] [--data clustered:768,sentence:384]
                        [--dtype f16,int8] [--threads 1,2] [--quick]

Datasets: `clustered` (points around random centres) and `sentence` (the
structure of sentence embeddings: engram_shm.synthetic.sentence_like). For
each thread count, hnswlib builds with add_items(num_threads=T) and
engram_shm with T index writers (faiss, whose HNSW build is one thread, runs
at T=1 only). T writers build T graphs; at T > 1 engram_shm runs twice: as
built, and `+compact` (the graphs merged into one by Engine.compact(), which
the insert rates include). Insert rates are per wall second and per CPU second of the
process (engram_shm's caller thread stores while its writers index, so its
wall rate at one writer may use more than one core: the CPU rate is the
honest "per core" figure). Every system is built at once, a chunk of 4096
rows each in turn (engram_shm's chunk observed, then waited for until
indexed), and kept open; then queries go one at a time, one thread, in
blocks of 50 that every system answers in turn, each block after ten
untimed queries (engram_shm's through Engine.recall with results decoded):
the machine's drift falls on all of them alike. For int8, `codes recall@10` is that of
an exact search over the codes the engine stores (calibrated from the first
batch as a space is): the most a graph over them can find. Prints one JSON
object per system per line, then a table per dataset with ratios to hnswlib
at one thread.
"""

from __future__ import annotations

import os
import time

import numpy as np

from engram_shm.synthetic import clustered, sentence_like

from .report import emit, parser, percentiles_ms, table

M, EF_CONSTRUCTION, EF = 16, 100, 64
CHUNK = 4096  # observations per observe call
# Untimed queries before each block of timed ones. One, the block's first
# query itself, left that query's answer cached (it timed at half the
# others) and the next few paying for the other systems' turn (in a
# throwaway per-position breakdown at 384 dims, all ten of engram_shm's
# slowest 1000 were a block's second to fourth; docs/architecture.md).
WARM_QUERIES = 10


def exact_top10(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ data.T), axis=1)[:, :10]


def recall_at_10(found, exact: np.ndarray) -> float:
    """Share of the exact top-10 the searches found."""
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact.tolist()))
    return round(hits / exact.size, 4)


def codes_recall(data: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> float:
    """recall@10 of the exact search over the int8 codes of `data`, stored
    as an int8 cosine space stores them (scales from its first batch)."""
    from engram_shm.kernels.distance import empty_store
    from engram_shm.kernels.vectors import check_store_rows
    from engram_shm.store import quantization

    scales = quantization.calibrate(data[:CHUNK], "cosine")
    rows = empty_store(*data.shape, np.int8)
    check_store_rows(data, True, np.inf, rows, quantization.codes_per_unit(scales))
    return recall_at_10(exact_top10(quantization.decoded(rows, scales), queries).tolist(), exact)


class Build:
    """One system's index, built a chunk of rows at a time: `add(rows, lo)`
    inserts rows lo.. (ids are row numbers), `finish()` ends the build,
    `search(q)` gives the ids of a query's top 10. Its row holds its name,
    dtype and threads; `interleaved_builds` adds the insert rates."""

    def __init__(self, system: str, dtype: str, threads: int):
        self.row = {"bench": "ann", "system": system, "dtype": dtype, "threads": threads}

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class EngramBuild(Build):
    """As built (compaction off), or `compact`ed: the writers' graphs merged
    into one by `Engine.compact()` after the fill, its time counted in the
    insert rates (system "engram_shm+compact"). Each chunk is observed and
    then waited for until indexed."""

    def __init__(self, data: np.ndarray, dtype: str, threads: int, compact: bool = False):
        from engram_shm import Engine

        super().__init__("engram_shm+compact" if compact else "engram_shm", dtype, threads)
        n, dim = data.shape
        # Segments of n, as hnswlib and faiss build one index: one graph per
        # writer (a hot space opens a segment for each). A space never counts
        # as idle: an idle merge would run in the background while the other
        # builds take their turns, and its time would be charged to them.
        self.engine = Engine(workers=threads, segment_capacity=max(n, 64), first_segment_capacity=max(n, 64),
                             ring_capacity=max(n, 64), dtype=dtype, compaction_capacity=n if compact else 0,
                             compaction_idle_s=1e9, M=M, ef_construction=EF_CONSTRUCTION, ef_search=EF)
        self.compact = compact
        try:
            self.engine.create_space("bench", dim=dim)
        except BaseException:
            self.engine.close()
            raise

    def add(self, rows: np.ndarray, lo: int) -> None:
        self.engine.observe("bench", [str(i) for i in range(lo, lo + len(rows))], rows)
        self.engine.wait_indexed()

    def finish(self) -> None:
        if self.compact:
            self.engine.compact()

    def search(self, q: np.ndarray) -> list[int]:
        return [int(m.id) for m in self.engine.recall("bench", q, k=10)]

    def close(self) -> None:
        self.engine.close()


class HnswlibBuild(Build):
    def __init__(self, data: np.ndarray, threads: int):
        import hnswlib

        super().__init__("hnswlib", "f32", threads)
        self.index = hnswlib.Index("ip", data.shape[1])
        self.index.init_index(len(data), M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
        self.index.set_ef(EF)
        self.threads = threads

    def add(self, rows: np.ndarray, lo: int) -> None:
        self.index.add_items(rows, np.arange(lo, lo + len(rows)), num_threads=self.threads)

    def search(self, q: np.ndarray) -> list[int]:
        return self.index.knn_query(q, 10, num_threads=1)[0][0]


class FaissBuild(Build):
    """IndexHNSWFlat, one thread (its HNSW build is one thread)."""

    def __init__(self, data: np.ndarray):
        import faiss

        super().__init__("faiss", "f32", 1)
        faiss.omp_set_num_threads(1)
        self.index = faiss.IndexHNSWFlat(data.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.hnsw.efSearch = EF

    def add(self, rows: np.ndarray, lo: int) -> None:
        self.index.add(rows)

    def search(self, q: np.ndarray) -> list[int]:
        return self.index.search(q[None, :], 10)[1][0]


def timed(step, *args) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) of step(*args)."""
    wall, cpu = time.perf_counter(), time.process_time()
    step(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_builds(builds: list[Build], data: np.ndarray, data_name: str) -> None:
    """Build every system at once, a chunk of rows each in turn, then
    finish each, adding its insert rates (per wall and per CPU second) to
    its row: as with the queries, the machine's drift then falls on every
    build alike, where builds one after another carried the speed of their
    own minutes and their ratios moved by up to a fifth between runs. Only
    one build runs at any time, so the process's CPU time in a step is that
    build's."""
    n, dim = data.shape
    spent = np.zeros((len(builds), 2))
    for lo in range(0, n, CHUNK):
        for b, build in enumerate(builds):
            spent[b] += timed(build.add, data[lo:lo + CHUNK], lo)
    for b, build in enumerate(builds):
        spent[b] += timed(build.finish)
    for build, (wall_s, cpu_s) in zip(builds, spent):
        build.row.update({"data": data_name, "n": n, "dim": dim, "insert_per_s": round(n / wall_s, 1),
                          "insert_per_cpu_s": round(n / cpu_s, 1)})


def timed_queries(search, queries):
    found, latencies = [], []
    for q in queries:
        start = time.perf_counter()
        ids = search(q)
        latencies.append(time.perf_counter() - start)
        found.append(list(ids))
    return found, latencies


def interleaved_queries(systems: list[Build], queries: np.ndarray, block: int = 50,
                        warm: int = WARM_QUERIES) -> list[tuple[list, list[float]]]:
    """(found, latencies) of each system, asked the queries in blocks of
    `block`, each block of every system in turn, after `warm` untimed
    queries that warm its caches (the ones before the block, cyclically:
    other than those it times): this machine's speed drifts by up to a
    fifth within minutes, and so the drift falls on every system alike
    instead of on whichever was queried at the time, while each still
    answers a stream of queries as it would alone."""
    found = [[] for _ in systems]
    latencies = [[] for _ in systems]
    warm = min(warm, len(queries) - min(block, len(queries)))  # never one the block times
    for lo in range(0, len(queries), block):
        for s, system in enumerate(systems):
            for w in range(lo - warm, lo):
                system.search(queries[w % len(queries)])
            for q in queries[lo:lo + block]:
                start = time.perf_counter()
                ids = system.search(q)
                latencies[s].append(time.perf_counter() - start)
                found[s].append(list(ids))
    return list(zip(found, latencies))


def fill(engine, space: str, data: np.ndarray) -> None:
    """Observe `data` into `space` (ids "0".."n-1") in chunks, and wait until
    all of it is indexed."""
    ids = [str(i) for i in range(len(data))]
    for lo in range(0, len(data), CHUNK):
        engine.observe(space, ids[lo:lo + CHUNK], data[lo:lo + CHUNK])
    engine.wait_indexed()


def dataset(spec: str, n: int, seed: int) -> tuple[str, np.ndarray]:
    """`kind:dim` -> (name, n rows). About ten clustered points per cluster
    with noise as large as the centres: hnswlib's recall@10 at ef=64 is then
    ~0.9, as on real sentence embeddings."""
    kind, _, dim = spec.partition(":")
    dim = int(dim or 768)
    if kind == "clustered":
        return f"clustered-{dim}", clustered(n, dim, clusters=max(10, n // 10), spread=1.0, seed=seed)
    if kind == "sentence":
        return f"sentence-{dim}", sentence_like(n, dim, seed=seed)
    raise SystemExit(f"unknown dataset {kind!r}: clustered or sentence")


COLUMNS = [("system", "system", ""), ("dtype", "dtype", ""), ("threads", "threads", "d"),
           ("insert/s", "insert_per_s", ".0f"), ("insert/cpu-s", "insert_per_cpu_s", ".0f"),
           ("x hnswlib", "x insert_per_cpu_s", ".2f"), ("recall@10", "recall_at_10", ".3f"),
           ("codes recall@10", "codes_recall_at_10", ".3f"),
           ("p50 ms", "query_p50_ms", ".3f"), ("x", "x query_p50_ms", ".2f"),
           ("p99 ms", "query_p99_ms", ".3f"), ("x", "x query_p99_ms", ".2f")]


def main(argv=None, prog="python -m bench ann") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=50_000, help="vectors to insert")
    ap.add_argument("--data", default="clustered:768,sentence:384",
                    help="datasets, kind:dim, comma-separated")
    ap.add_argument("--dtype", default="f16,int8", help="engram_shm storage dtypes, comma-separated")
    ap.add_argument("--threads", default="1,2", help="index threads, comma-separated")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (2000 x 64) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.data = 2000, 100, "clustered:64,sentence:48"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from engram_shm.kernels.warm import warm
    warm()  # compiled kernels come from Numba's disk cache; load them before timing
    rows = []
    for spec in args.data.split(","):
        name, data = dataset(spec.strip(), args.n + args.queries, args.seed)
        data, queries = data[:args.n], data[args.n:]
        exact = exact_top10(data, queries)
        print(f"# seed {args.seed}: {name}, {args.n} unit vectors, {args.queries} held-out queries",
              flush=True)
        systems: list[Build] = []
        try:
            for threads in (int(t) for t in args.threads.split(",")):
                systems.append(HnswlibBuild(data, threads))
                if threads == 1:
                    systems.append(FaissBuild(data))
                for compact in (False, True) if threads > 1 else (False,):
                    systems += [EngramBuild(data, dtype.strip(), threads, compact)
                                for dtype in args.dtype.split(",")]
            interleaved_builds(systems, data, name)
            answers = interleaved_queries(systems, queries)
        finally:
            for system in systems:
                system.close()
        runs, int8_codes_recall = [], None
        for system, (found, latencies) in zip(systems, answers):
            row = {**system.row, "recall_at_10": recall_at_10(found, exact),
                   **percentiles_ms(latencies, "query", 4)}
            if row["system"].startswith("engram_shm") and row["dtype"] == "int8":
                int8_codes_recall = int8_codes_recall or codes_recall(data, queries, exact)
                row["codes_recall_at_10"] = int8_codes_recall
            runs.append(emit(row))
        # The first row, hnswlib at the first thread count, is the base of ratios.
        print(table(f"ann benchmark, {name}", runs, COLUMNS))
        rows += runs
    return rows


if __name__ == "__main__":
    main()
