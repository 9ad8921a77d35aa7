"""Cluster benchmark: aggregate ingest with 1, 2 and 3 nodes, and the time of a move.

    python -m bench cluster [--n 60000] [--dim 768] [--spaces 12] [--producers 3]
                            [--nodes 1,2,3] [--move-n 100000] [--quick]

One etcd and the nodes (full servers with a data directory, one index worker
each) run on loopback; the cluster grows one node at a time, and at each size
`--producers` client processes, each with its own ClusterClient, stream their
share of `--n` clustered observations into `--spaces` new spaces (placed over
the live nodes by rendezvous hashing): the same offered load for every node
count. Accepted: observations acked per second, all producers together;
indexed: the rate end to end, until every node's graphs hold everything.
Then a space of `--move-n` observations is moved from its owner to another
node while idle: the move's time, how long writes to the space waited (its
freeze), and the time until the new owner's graphs hold every row.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time

from engram_shm.cluster import operations
from engram_shm.cluster.client import ClusterClient
from engram_shm.cluster.coord import Coordinator
from engram_shm.cluster.etcd_process import EtcdProcess
from engram_shm.synthetic import clustered
from engram_shm.transport.client import Client
from engram_shm.transport.launch import running_server

from .report import emit, parser, table

BATCH = 256


def add_node(stack: contextlib.ExitStack, etcd: str, number: int) -> str:
    """Start node n<number> in `stack`; its endpoint."""
    return stack.enter_context(running_server("--cluster", etcd, "--node", f"n{number}", "--metrics", "off",
                                              "--recall-workers", "1", workers=1))[0]


def produce(etcd: str, spaces: list[str], n: int, dim: int, seed: int, start, done, ready) -> None:
    """A producer process: its own rows into its spaces in turn, batch by batch."""
    data = clustered(n, dim, clusters=max(10, n // 50), spread=1.0, seed=seed)
    ids = [f"{seed}-{i}" for i in range(n)]
    with ClusterClient(etcd, batch_size=BATCH, payload_dtype="f16") as client:
        for space in spaces:  # placed and connected before the clock starts
            client.client(space)
        ready.put(seed)
        start.wait()
        t = time.perf_counter()
        for b, lo in enumerate(range(0, n, BATCH)):
            client.observe_batch(spaces[b % len(spaces)], ids[lo:lo + BATCH], data[lo:lo + BATCH])
        client.flush()
        done.put(time.perf_counter() - t)


def indexed(clients: list[Client]) -> tuple[int, int]:
    """(rows, indexed rows) over every node."""
    rows = done = 0
    for c in clients:
        for s in c.stats()["spaces"].values():
            rows, done = rows + s["count"], done + s["indexed"]
    return rows, done


def wait_indexed(endpoints: list[str], rows: int, timeout: float = 3600) -> None:
    """Poll every node until its graphs hold `rows` in all, over connections
    opened once (a session per poll would load the nodes being measured)."""
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client(e, timeout=30)) for e in endpoints]
        while indexed(clients) != (rows, rows):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {rows} rows indexed after {timeout} s")
            time.sleep(0.2)


def stored(endpoints: list[str]) -> int:
    """Rows over every node, now."""
    with contextlib.ExitStack() as stack:
        return indexed([stack.enter_context(Client(e, timeout=30)) for e in endpoints])[0]


def ingest(etcd: str, endpoints: list[str], n: int, dim: int, spaces: int, producers: int) -> dict:
    """Stream into new spaces of the cluster as it stands."""
    ctx = multiprocessing.get_context("spawn")
    nodes = len(endpoints)
    rows_before = stored(endpoints)
    start, done, ready = ctx.Event(), ctx.Queue(), ctx.Queue()
    names = [f"r{nodes}-space-{i}" for i in range(spaces)]
    share = n // producers
    procs = [ctx.Process(target=produce, args=(etcd, names[p::producers], share, dim, 100 * nodes + p,
                                               start, done, ready))
             for p in range(producers)]
    for proc in procs:
        proc.start()
    for _ in procs:  # every producer has its data and its connections before the clock starts
        ready.get(timeout=600)
    t = time.perf_counter()
    start.set()
    seconds = [done.get(timeout=3600) for _ in procs]
    accepted_s = time.perf_counter() - t
    total = share * producers
    wait_indexed(endpoints, rows_before + total)
    indexed_s = time.perf_counter() - t
    for proc in procs:
        proc.join()
    table = Coordinator(etcd).table()[0]
    owners = {table[name].node for name in names}
    return {"bench": "cluster", "case": "ingest", "nodes": nodes, "n": total, "dim": dim, "spaces": spaces,
            "producers": producers, "nodes_used": len(owners),
            "accepted_per_s": round(total / accepted_s, 1), "indexed_per_s": round(total / indexed_s, 1),
            "slowest_producer_s": round(max(seconds), 3)}


def move(etcd: str, endpoints: list[str], n: int, dim: int) -> dict:
    data = clustered(n, dim, clusters=max(10, n // 50), spread=1.0, seed=7)
    coord = Coordinator(etcd)
    ids = [str(i) for i in range(n)]
    rows_before = stored(endpoints)
    with ClusterClient(coord, batch_size=BATCH, payload_dtype="f16") as client:
        for lo in range(0, n, BATCH):
            client.observe_batch("big", ids[lo:lo + BATCH], data[lo:lo + BATCH])
        client.flush()
    wait_indexed(endpoints, rows_before + n)
    source = coord.owner("big").node
    target = next(node for node in sorted(coord.members()) if node != source)
    t = time.perf_counter()
    report = operations.move(coord, "big", target)
    wait_indexed(endpoints, rows_before + 2 * n)  # the source keeps its (retired) copy
    settled = time.perf_counter() - t
    sample = range(0, n, max(1, n // 200))
    with ClusterClient(coord) as client:
        hits = sum(client.recall("big", data[i], k=1)[0].id == ids[i] for i in sample)
    return {"bench": "cluster", "case": "move", "nodes": len(endpoints), "n": n, "dim": dim,
            "move_s": report.seconds,
            "frozen_s": report.frozen_seconds, "copied": report.copied, "tail": report.tail,
            "indexed_on_target_s": round(settled, 3), "own_top_hit": round(hits / len(sample), 3),
            "epoch": report.epoch}


INGEST_COLUMNS = [("nodes", "nodes", "d"), ("used", "nodes_used", "d"), ("n", "n", "d"), ("dim", "dim", "d"),
                  ("spaces", "spaces", "d"), ("producers", "producers", "d"),
                  ("accepted/s", "accepted_per_s", ".0f"), ("accepted x1", "x accepted_per_s", ".2f"),
                  ("indexed/s", "indexed_per_s", ".0f"), ("indexed x1", "x indexed_per_s", ".2f")]
MOVE_COLUMNS = [("n", "n", "d"), ("dim", "dim", "d"), ("move s", "move_s", ".2f"),
                ("writes waited s", "frozen_s", ".2f"), ("copied", "copied", "d"), ("tail", "tail", "d"),
                ("indexed on target s", "indexed_on_target_s", ".2f"), ("own top hit", "own_top_hit", ".3f")]


def main(argv=None, prog="python -m bench cluster") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--spaces", type=int, default=12)
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3, help="the cluster grows from 1 to this many nodes")
    ap.add_argument("--move-n", type=int, default=100_000, help="observations of the moved space")
    ap.add_argument("--quick", action="store_true", help="a small run (3000 x 32, a move of 2000) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.move_n = 3000, 32, 2000
    with EtcdProcess() as etcd, contextlib.ExitStack() as stack:
        endpoints, rows = [], []
        for number in range(args.nodes):
            endpoints.append(add_node(stack, etcd.endpoint, number))
            rows.append(emit(ingest(etcd.endpoint, endpoints, args.n, args.dim, args.spaces, args.producers)))
        print(table("cluster benchmark, aggregate ingest", rows, INGEST_COLUMNS))
        moved = [emit(move(etcd.endpoint, endpoints, args.move_n, args.dim))]
        print(table("cluster benchmark, a move", moved, MOVE_COLUMNS))
    return rows + moved


if __name__ == "__main__":
    main()
