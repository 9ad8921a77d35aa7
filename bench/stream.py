"""Streaming benchmark: the streaming case of VectorDBBench 2.0 (time until
searchable, time until fully indexed), end to end, against the embedded
engines a Python user would pick instead, on the same data in one run.

    python -m bench stream [--n 20000] [--dim 768] [--peer-n 3000] [--batch 256] [--probes 4]
                           [--queries 200] [--data vectors.npy] [--systems engram_shm,...] [--quick]

Every system gets the same unit vectors (cosine everywhere) in batches of
`--batch`, each insert call timed; right after an insert returns, `--probes`
of that batch's vectors (the same ones for every system) are queried with
k=1, timed ("recall latency during ingestion"), and the share that come back
as their own top hit is `found_own_top_hit`. The clock starts at the first
insert (systems are created and started before): `time_until_searchable_s`
runs to the return of the last insert (every system here can find an
insert's rows once it returned), `time_until_indexed_s` until the system
says everything is in its index; both include the probes. `insert_per_s` is
n over the time spent in insert calls alone. Afterwards `--queries` held-out
vectors of the same distribution (never inserted) are asked one at a time
with k=10: recall@10 against exact neighbours (numpy) and latency p50/p99.

Data: clustered unit vectors by default (about ten per cluster, noise as
large as the centres: engram_shm.synthetic.clustered), or the rows of any
`.npy` with `--data` (normalised; `--queries` random rows held out, the rest
streamed in file order).

Each system runs in a child process of its own, so that its peak memory is
its own and nothing it leaves behind slows the next. Peak memory is the
child's VmHWM (the interpreter, the system's modules, the data it streams:
n x dim x 4 bytes, and the shared-memory pages it touched); for the server,
the child's VmHWM plus the peak, sampled every 0.25 s, of the server's
processes' summed PSS (which counts each shared page, the engine's shared
memory among them, once). In each table the first row, engram_shm embedded,
is the base of the ratios (`x`).

Systems (M=16, ef_construction=100, ef=64 wherever the system takes them):
- engram_shm: `Engine` in this process with its defaults (f16 storage,
  one index writer thread per core, segments growing from 64 slots, no
  data directory). Recalls are consistency "strong": every acked row is
  recallable at once, the rows not yet indexed scanned exactly; `observe`
  waits for indexing when that window is at its limit (`window_limit` in
  the row: what one thread scans in 2 ms). Indexed: `Engine.wait_indexed()`.
- engram_shm_server: `engram-shm serve` with its defaults (one index
  worker and one recall reader per core, a data directory: the
  write-ahead log, fsync every 10 ms) fed by `engram_shm.Client`; an
  insert is `observe_batch` then `flush()`, which returns at the ack.
  Indexed: the server's stats count every row indexed (polled).
- hnswlib: the in-process floor: `add_items` per batch with one thread per
  core; nothing is persisted. Indexed on return.
- chromadb: `PersistentClient` (sqlite and the HNSW files on disk), HNSW
  with the same parameters; `add` puts the rows into the graph before it
  returns. Indexed on return.
- qdrant_local: `QdrantClient(path=...)`, the local mode: exact brute
  force in numpy (no HNSW), every point written to sqlite in its own
  commit. Searchable and indexed on return; exact, so recall is 1.
- milvus_lite: pymilvus `MilvusClient("file.db")` (milvus-lite 3, pure
  Python in this process), `create_collection` quick set-up: AUTOINDEX,
  which is faiss HNSW (M=16, efConstruction=200, ef=64) built per segment
  in the background after a flush; rows not flushed yet (the memtable
  flushes at 128 MiB) are searched exactly, the memtable copied out on
  every search. Consistency Strong: searchable on return. Indexed:
  `flush()`, then the wait for its background index build (milvus-lite's
  describe_index reports every row indexed at any time, so its private
  `Collection._wait_for_bg()` is used, and the segments' indexes checked).

qdrant_local and milvus_lite take the first `--peer-n` rows only: one
sqlite commit per point (15 to 25 ms each on this machine's disk) and a
memtable copied on every search make them take many minutes on more. Fewer rows of the same
distribution are not the same task (recall@10 differs with the rows'
density), so they get a table of their own, after engram_shm embedded on
the same rows. Prints one JSON object per run (with the wall and CPU
seconds of its child process, start-up included), then a table per n.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from .ann import EF, EF_CONSTRUCTION, M, dataset, exact_top10, timed_queries
from .report import emit, engine_shm_bytes, parser, percentiles_ms, self_bytes, table

SPACE = "stream"
SYSTEMS = ("engram_shm", "engram_shm_server", "hnswlib", "chromadb", "qdrant_local", "milvus_lite")
PEERS_AT_PEER_N = ("qdrant_local", "milvus_lite")
CHILD_TIMEOUT_S = 1800
MIB = 2**20


# -- the systems ---------------------------------------------------------------------------

class System:
    """A system under test, created empty for `dim` dimensions (at most `n`
    rows) in a `directory` of its own."""
    index = ""  # what it searches, for the row
    indexed_on_return = True  # every row is in the index when its insert returns

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        """Store the rows under ids lo, lo + 1, ..."""
        raise NotImplementedError

    def search(self, q: np.ndarray, k: int) -> list[int]:
        raise NotImplementedError

    def wait_indexed(self) -> None:
        """Return once every row is in the index (or said to be)."""

    def outside_bytes(self) -> int:
        """Peak memory of its processes besides this one."""
        return 0

    def notes(self) -> dict:
        """Row fields of its own."""
        return {}

    def close(self) -> None:
        pass


class EngramEmbedded(System):
    index = "HNSW per segment + exact scan of the unindexed window, f16"
    indexed_on_return = False

    def __init__(self, dim: int, n: int, directory: str):
        from engram_shm import Engine
        from engram_shm.kernels.warm import warm

        warm()  # the compiled kernels come from Numba's disk cache; load them before the clock
        self.engine = Engine(M=M, ef_construction=EF_CONSTRUCTION, ef_search=EF)
        self.engine.create_space(SPACE, dim=dim)
        self.shm_bytes = 0

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.engine.observe(SPACE, [str(i) for i in range(lo, lo + len(vectors))], vectors)

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return [int(m.id) for m in self.engine.recall(SPACE, q, k=k)]

    def wait_indexed(self) -> None:
        self.engine.wait_indexed()
        self.shm_bytes = engine_shm_bytes(self.engine.name)

    def notes(self) -> dict:
        # VmHWM already counts these pages: the engine and its index writers
        # are this process.
        return {"window_limit": self.engine.stats()["spaces"][SPACE]["window_limit"],
                "shm_mib": round(self.shm_bytes / MIB, 1)}

    def close(self) -> None:
        self.engine.close()


class TreeMemory:
    """Samples the summed PSS of a process and its descendants every
    `period_s` in a thread; `peak` is the largest sum seen."""

    def __init__(self, pid: int, period_s: float = 0.25):
        import psutil

        self.root, self.peak, self.period_s = psutil.Process(pid), 0, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            self.sample()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class EngramServer(System):
    index = "HNSW per segment + exact scan of the unindexed window, f16; WAL fsync 10 ms"
    indexed_on_return = False

    def __init__(self, dim: int, n: int, directory: str):
        from engram_shm import Client
        from engram_shm.transport.launch import running_server

        self.stack = contextlib.ExitStack()
        try:
            endpoint, self.name, server = self.stack.enter_context(running_server(workers=os.cpu_count()))
            self.memory = TreeMemory(server.pid)
            self.stack.callback(self.memory.close)
            self.client = self.stack.enter_context(Client(endpoint, timeout=120))
            self._wait_for_readers()
        except BaseException:
            self.stack.close()
            raise
        self.shm_bytes, self.window_limit = 0, None

    def _wait_for_readers(self, timeout_s: float = 120.0) -> None:
        """The server answers pings before its recall readers are up (the
        first recall would wait for one): wait until every reader said hello."""
        from engram_shm import EngineConfig

        deadline = time.monotonic() + timeout_s
        while len(self.client.stats()["recall"]["readers"]) < EngineConfig().recall_worker_count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server's recall readers were not all up within {timeout_s} s")
            time.sleep(0.1)

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.client.observe_batch(SPACE, [str(i) for i in range(lo, lo + len(vectors))], vectors)
        self.client.flush()  # returns at the ack: stored, logged, recallable

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return [int(m.id) for m in self.client.recall(SPACE, q, k=k)]

    def wait_indexed(self) -> None:

        while True:
            space = self.client.stats()["spaces"][SPACE]
            if space["indexed"] == space["count"]:
                break
            time.sleep(0.01)
        self.window_limit = space["window_limit"]
        self.memory.sample()  # the graphs are whole: the server at its largest
        self.shm_bytes = engine_shm_bytes(self.name)

    def outside_bytes(self) -> int:
        return self.memory.peak

    def notes(self) -> dict:
        return {"window_limit": self.window_limit, "shm_mib": round(self.shm_bytes / MIB, 1),
                "server_peak_mib": round(self.memory.peak / MIB, 1)}

    def close(self) -> None:
        self.stack.close()


class Hnswlib(System):
    index = "HNSW, in memory"

    def __init__(self, dim: int, n: int, directory: str):
        import hnswlib

        self.graph = hnswlib.Index("cosine", dim)
        self.graph.init_index(n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
        self.graph.set_ef(EF)

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.graph.add_items(vectors, np.arange(lo, lo + len(vectors)), num_threads=os.cpu_count())

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return self.graph.knn_query(q, k, num_threads=1)[0][0].tolist()


class Chroma(System):
    index = "HNSW, persisted"

    def __init__(self, dim: int, n: int, directory: str):
        import chromadb

        self.client = chromadb.PersistentClient(path=directory,
                                                settings=chromadb.Settings(anonymized_telemetry=False))
        hnsw = {"space": "cosine", "max_neighbors": M, "ef_construction": EF_CONSTRUCTION, "ef_search": EF}
        self.collection = self.client.create_collection(SPACE, configuration={"hnsw": hnsw},
                                                        embedding_function=None)

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.collection.add(ids=[str(i) for i in range(lo, lo + len(vectors))], embeddings=vectors)

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return [int(i) for i in self.collection.query(query_embeddings=q[None, :], n_results=k)["ids"][0]]


class QdrantLocal(System):
    index = "exact (numpy brute force), persisted in sqlite"

    def __init__(self, dim: int, n: int, directory: str):
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(path=directory)
        self.client.create_collection(SPACE, vectors_config=models.VectorParams(
            size=dim, distance=models.Distance.COSINE))

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.client.upsert(SPACE, points=self.models.Batch(ids=list(range(lo, lo + len(vectors))),
                                                           vectors=vectors))

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return [p.id for p in self.client.query_points(SPACE, query=q, limit=k).points]

    def close(self) -> None:
        self.client.close()


class MilvusLite(System):
    indexed_on_return = False

    def __init__(self, dim: int, n: int, directory: str):
        from pymilvus import MilvusClient

        self.path = os.path.join(directory, "milvus.db")
        self.client = MilvusClient(self.path)
        self.client.create_collection(SPACE, dimension=dim, metric_type="COSINE")
        self.index_type = self.client.describe_index(SPACE, "vector")["index_type"]
        self.index = f"{self.index_type}, not built"

    def insert(self, lo: int, vectors: np.ndarray) -> None:
        self.client.insert(SPACE, [{"id": i, "vector": v} for i, v in enumerate(vectors, lo)])

    def search(self, q: np.ndarray, k: int) -> list[int]:
        return [hit["id"] for hit in self.client.search(SPACE, data=[q], limit=k)[0]]

    def wait_indexed(self) -> None:
        from milvus_lite.server_manager import server_manager_instance

        self.client.flush(SPACE)
        _, db, _ = server_manager_instance._servers[os.path.abspath(self.path)]
        collection = db.get_collection(SPACE)
        collection._wait_for_bg()
        segments = [s for s in collection._segments_snapshot() if s.num_rows]
        missing = [s for s in segments if s.index is None]
        if missing or not segments:
            raise RuntimeError(f"milvus-lite: {len(missing)} of {len(segments)} segments without an index "
                               "after its background build")
        built = ",".join(sorted({type(s.index).__name__ for s in segments}))
        self.index = f"{self.index_type}: {built} per flushed segment, memtable exact"

    def close(self) -> None:
        self.client.close()


ADAPTERS = {"engram_shm": EngramEmbedded, "engram_shm_server": EngramServer, "hnswlib": Hnswlib,
            "chromadb": Chroma, "qdrant_local": QdrantLocal, "milvus_lite": MilvusLite}


# -- one system, in a child process ------------------------------------------------------------


def stream(system, data: np.ndarray, batch: int, probes: int, seed: int) -> dict:
    """Insert `data` in batches, probing each batch right after its insert
    returned; the timings of ingestion."""
    rng = np.random.default_rng(seed)
    insert_s, probe_s, found = 0.0, [], 0
    start = time.perf_counter()
    for lo in range(0, len(data), batch):
        rows = data[lo:lo + batch]
        t = time.perf_counter()
        system.insert(lo, rows)
        insert_s += time.perf_counter() - t
        searchable = time.perf_counter()
        for i in rng.choice(len(rows), min(probes, len(rows)), replace=False):
            t = time.perf_counter()
            top = system.search(rows[i], 1)
            probe_s.append(time.perf_counter() - t)
            found += top[:1] == [lo + int(i)]
    indexed = searchable
    if not system.indexed_on_return:
        system.wait_indexed()
        indexed = time.perf_counter()
    return {"insert_per_s": round(len(data) / insert_s, 1),
            "found_own_top_hit": round(found / len(probe_s), 4),
            **percentiles_ms(probe_s, "ingest_recall"),
            "time_until_searchable_s": round(searchable - start, 3),
            "time_until_indexed_s": round(indexed - start, 3)}


def run_one(name: str, workdir: str, n: int, batch: int, probes: int, seed: int) -> None:
    """The child: stream the first n rows into `name`, query, and write its row
    to workdir/row-NAME-N.json."""
    data = np.load(os.path.join(workdir, f"data-{n}.npy"))
    queries = np.load(os.path.join(workdir, "queries.npy"))
    exact = np.load(os.path.join(workdir, f"exact-{n}.npy"))
    directory = os.path.join(workdir, f"{name}-{n}")
    os.makedirs(directory)
    try:
        system = ADAPTERS[name](data.shape[1], n, directory)
        try:
            row = stream(system, data, batch, probes, seed)
            found, latencies = timed_queries(lambda q: system.search(q, 10), queries)
            peak = self_bytes("status", "VmHWM") + system.outside_bytes()
            notes = {"index": system.index, **system.notes()}
        finally:
            system.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact.tolist()))
    row = {"bench": "stream", "system": name, "n": n, "dim": data.shape[1], "batch": batch, "probes": probes,
           **row, "recall_at_10": round(hits / exact.size, 4), **percentiles_ms(latencies, "query"),
           "peak_memory_mib": round(peak / MIB, 1), "queries": len(queries), **notes}
    with open(os.path.join(workdir, f"row-{name}-{n}.json"), "w") as f:
        json.dump(row, f)


def child(name: str, workdir: str, n: int, args) -> dict:
    """Run one system in a child process; its row (with the wall and CPU
    seconds of the whole child, start-up included, its own processes'
    CPU among them), or SystemExit with its stderr if it failed."""
    command = [sys.executable, "-m", "bench.stream", "--one", name, "--workdir", workdir, "--n", str(n),
               "--batch", str(args.batch), "--probes", str(args.probes), "--seed", str(args.seed)]
    began, cpu = time.perf_counter(), children_cpu_s()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except BaseException as e:  # let the child clean up (its servers, its files) first
        if not isinstance(e, KeyboardInterrupt):  # (a ^C reached the child as well)
            proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode != 0:
        raise SystemExit(f"stream: {name} failed (exit code {proc.returncode}); its stderr:\n{stderr}")
    with open(os.path.join(workdir, f"row-{name}-{n}.json")) as f:
        return {**json.load(f), "run_s": round(time.perf_counter() - began, 1),
                "cpu_s": round(children_cpu_s() - cpu, 1)}


def unwind(signum, frame) -> None:
    """On SIGTERM, exit through every `finally`, so that children and servers
    are stopped and files removed; a second SIGTERM does not cut that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(128 + signum)


def children_cpu_s() -> float:
    """CPU seconds of this process's children that ended (and of theirs that
    they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the run ---------------------------------------------------------------------------------

def load(path: str, n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a .npy, normalised: `queries` random ones held out, then the
    first n of the rest in file order."""
    x = np.load(path).astype(np.float32, copy=False)
    if x.ndim != 2:
        raise SystemExit(f"--data {path}: expected (rows, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    held = np.zeros(len(x), bool)
    held[np.random.default_rng(seed).choice(len(x), queries, replace=False)] = True
    return x[~held][:n], x[held]


def plan(systems: list[str], n: int, peer_n: int) -> list[list[tuple[str, int]]]:
    """(system, n) runs in groups, a table each: the systems at n; then, if
    peer_n is fewer, the slow peers at peer_n, after engram_shm (if chosen) on
    the same rows, so that each table compares systems on the same data."""
    slow = [s for s in systems if s in PEERS_AT_PEER_N and peer_n < n]
    groups = [[(s, n) for s in systems if s not in slow]]
    if slow:
        groups.append([(s, peer_n) for s in ["engram_shm"] * ("engram_shm" in systems) + slow])
    return [g for g in groups if g]


COLUMNS = [("system", "system", ""), ("n", "n", "d"), ("insert/s", "insert_per_s", ".0f"),
           ("x", "x insert_per_s", ".2f"), ("own top hit", "found_own_top_hit", ".3f"),
           ("ingest recall p50 ms", "ingest_recall_p50_ms", ".2f"), ("p99", "ingest_recall_p99_ms", ".2f"),
           ("searchable s", "time_until_searchable_s", ".1f"), ("indexed s", "time_until_indexed_s", ".1f"),
           ("x", "x time_until_indexed_s", ".2f"), ("recall@10", "recall_at_10", ".3f"),
           ("query p50 ms", "query_p50_ms", ".2f"), ("x", "x query_p50_ms", ".2f"),
           ("p99", "query_p99_ms", ".2f"), ("peak MiB", "peak_memory_mib", ".0f"),
           ("x", "x peak_memory_mib", ".2f")]


def main(argv=None, prog="python -m bench stream") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=20_000, help="vectors to stream")
    ap.add_argument("--dim", type=int, default=768, help="dimensions of the synthetic data")
    ap.add_argument("--peer-n", type=int, default=3000,
                    help="vectors streamed into " + " and ".join(PEERS_AT_PEER_N) + " (at most --n)")
    ap.add_argument("--batch", type=int, default=256, help="vectors per insert call")
    ap.add_argument("--probes", type=int, default=4,
                    help="vectors of each batch queried right after its insert")
    ap.add_argument("--queries", type=int, default=200, help="held-out queries after ingestion")
    ap.add_argument("--data", help="a .npy of vectors (rows) instead of the synthetic data")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run, comma-separated, in order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (2000 x 64, slow peers at 300)")
    ap.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, unwind)
    if args.one:
        run_one(args.one, args.workdir, args.n, args.batch, args.probes, args.seed)
        return []
    if args.quick:
        args.n, args.dim, args.peer_n, args.queries = 2000, 64, 300, 100
    for flag in ("n", "peer_n", "batch", "probes", "queries"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}: choose from {', '.join(SYSTEMS)}")

    if args.data:
        data, queries = load(args.data, args.n, args.queries, args.seed)
        name = os.path.basename(args.data)
    else:
        name, rows = dataset(f"clustered:{args.dim}", args.n + args.queries, args.seed)
        data, queries = rows[:args.n], rows[args.n:]
    groups = plan(systems, len(data), min(args.peer_n, len(data)))
    print(f"# seed {args.seed}: {name}, {len(data)} x {data.shape[1]} unit vectors in batches of "
          f"{args.batch}, {args.probes} probes per batch, {len(queries)} held-out queries; "
          + "; ".join(f"n={g[0][1]}: " + ", ".join(s for s, _ in g) for g in groups), flush=True)
    out = []
    with tempfile.TemporaryDirectory(prefix="engram-bench-stream-") as workdir:
        np.save(os.path.join(workdir, "queries.npy"), queries)
        for n in {n for g in groups for _, n in g}:
            np.save(os.path.join(workdir, f"data-{n}.npy"), data[:n])
            np.save(os.path.join(workdir, f"exact-{n}.npy"), exact_top10(data[:n], queries))
        tables = []
        for group in groups:
            rows = [emit({**child(system, workdir, n, args), "data": name}) for system, n in group]
            title = f"streaming benchmark, {name}, n={group[0][1]}, ratios to {rows[0]['system']}"
            tables.append(table(title, rows, COLUMNS))
            out += rows
    print("\n\n".join(tables))
    return out


if __name__ == "__main__":
    main()
