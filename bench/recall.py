"""Recall latency and queries/s of a served space at each `--n`, idle and under sustained ingestion.

    python -m bench recall [--n 100000,1000000] [--dim 768] [--clients 1,4] [--seconds 5]
                           [--ingest-seconds 20] [--load 0.7] [--ef-construction 32] [--quick]

One `engram-shm serve` (its defaults: a data directory with its log and
checkpoints, fsync=interval, two index workers, one recall reader per core,
ef_search 64; sessions kept an hour idle, as the producer waits up to
half an hour for merges) holds a space of f16 vectors for each `--n`,
unit-norm around (largest n)/100 random centres: each size is measured on
a space of its own, so that the ingestion at one size does not grow the
next. A space grows by streaming through `engram_shm.Client` (batches of
256, the server's backpressure pacing it) to its n, and the fill is part of
the run: its accepted rate, and the rate it was
indexed at (from the first row sent to the last indexed), which is the rate
indexing keeps up with. The graphs are built with `--ef-construction` 32, not
the engine's 100: at 100 two cores index 768-d rows at about 600-700/s (1M
in some 25 minutes), at 32 about three times as fast; a recall's cost is set
by ef_search and the number of segments more than by the build's beam.

At each size, once everything is indexed and compaction has merged what the
fill left (no merge for 3 s, past the server's compaction_idle_s of 2 s):
- idle: `--clients` processes at a time each recall (k=10, held-out cues)
  back to back for `--seconds` with consistency "strong", then as long with
  "indexed", all clients in step; queries/s is all clients' recalls in the
  period. Through `engram_shm.Client` (via=client), and the same with each
  process reading the server's shared memory with `engram_shm.attach`
  (via=attach): the `Reader` and kernel the embedded `Engine` recalls with,
  without the transport and the server's reader processes, and on the same
  space, so that no second 1M build is needed for an embedded figure.
- ingest: a producer (this process) streams batches of 256 (made before
  the round, so that making them takes no core from the engine) at `--load`
  (0.7) times the fill's indexed rate for 2 x `--ingest-seconds`, while
  one client recalls ten times a second, "strong" and "indexed" in turn
  (each sees the same ingestion, the merges it starts included), and in
  the same period one process recalls as often via attach, half a period
  after each client recall (20 recalls a second in all, a light load
  beside the ingestion; one period, so that the space grows by rate x 2 x
  ingest-seconds, not twice that). The
  unindexed window's peak (sampled 4 times a second) tells whether indexing
  kept up; rows after is the space's size when the ingestion ended.

Clients are processes of their own (in sessions of their own, as other
applications would be), so that no GIL serialises them; on a machine with
few cores they share the cores with the server. They start once the space
exists (as many as the most `--clients`, for each way in) and serve every
round at every size, each round after a few untimed recalls of its space. Prints JSON
lines (bench, via, n, dim, phase, consistency, clients, queries_per_s,
recall_p50_ms, recall_p99_ms, ingest_per_s, ef_construction, segments,
indexed_per_s, off_cpu_p99_ms: the part of a recall its thread spent off
the CPU, waiting for a core or, through a client, for the server...), then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time

import numpy as np

from engram_shm import Client, attach
from engram_shm.errors import UnknownSession
from engram_shm.transport.launch import running_server

from .report import emit, parser, percentiles_ms, table

K = 10
BATCH = 256
CHUNK = 4096
CUES = 256
CONSISTENCIES = ("strong", "indexed")
INGEST_RECALLS_PER_S = 10.0
STATS_PERIOD_S = 0.25
START_S = 1.0  # from telling the clients when to start to their start: room for the producer to get going
WARM = 4  # recalls (untimed) before each round
SESSION_IDLE_S = 3600.0  # the producer's session outlasts the wait for merges and the rounds after it
REST_TIMEOUT_S = SESSION_IDLE_S / 2  # the longest wait for a space's merges (minutes at 1M)
AT_REST_S = 3.0  # no merge for this long: past the server's compaction_idle_s (2 s) and its 0.5 s look


def space_of(n: int) -> str:
    """The space measured at size n."""
    return f"recall-{n}"


class Observations:
    """The stream of observations `o0, o1, ...`: unit vectors around fixed
    random centres, generated a chunk at a time (a 1M x 768 float32 array
    would be 3 GB), the same for a seed whatever the sizes asked."""

    def __init__(self, dim: int, clusters: int, seed: int):
        self.dim, self.seed, self.sent = dim, seed, 0
        self.centres = np.random.default_rng([seed, 0]).normal(size=(clusters, dim)).astype(np.float32)
        self.chunk_no, self.chunk = -1, np.zeros((0, dim), np.float32)
        self.made: dict[int, np.ndarray] = {}  # chunks made ahead of their use

    def rows(self, n: int, stream: int, chunk_no: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, chunk_no])
        x = self.centres[rng.integers(0, len(self.centres), n)]
        x += rng.normal(size=(n, self.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def spec(self) -> str:
        """What makes the same stream in another process: dim,clusters,seed."""
        return f"{self.dim},{len(self.centres)},{self.seed}"

    def cues(self, client: int) -> np.ndarray:
        """Held-out rows of the same distribution, different for each client."""
        return self.rows(CUES, 2, client)

    def make_ahead(self, n: int) -> None:
        """Make the chunks of the next n observations now, so that streaming
        them later costs the producer no random numbers: on a machine of few
        cores, those would take a core from the engine and its recalls."""
        for chunk_no in range(self.sent // CHUNK, (self.sent + n) // CHUNK + 1):
            if chunk_no not in self.made:
                self.made[chunk_no] = self.rows(CHUNK, 1, chunk_no)

    def take(self, n: int) -> tuple[list[str], np.ndarray]:
        """The next n observations (at most to the end of the current chunk
        of CHUNK: fewer than n there)."""
        chunk_no, at = divmod(self.sent, CHUNK)
        if chunk_no != self.chunk_no:
            made = self.made.pop(chunk_no, None)
            self.chunk_no, self.chunk = chunk_no, self.rows(CHUNK, 1, chunk_no) if made is None else made
        vectors = self.chunk[at:at + n]
        ids = [f"o{i}" for i in range(self.sent, self.sent + len(vectors))]
        self.sent += len(vectors)
        return ids, vectors


# -- the recalling clients: processes of their own -------------------------------------

def timed(recall, cues: np.ndarray, consistencies: tuple[str, ...], begin: float, end: float,
          per_s: float) -> dict[str, list[tuple[float, float]]]:
    """Recalls from `begin` to `end` (monotonic clock, the same in every
    process), back to back or `per_s` a second, taking the consistencies in
    turn; the latency of each in seconds, and the part of it the recalling
    thread spent off its CPU (waiting: for a core, or a client for the server)."""
    latencies = {consistency: [] for consistency in consistencies}
    time.sleep(max(0.0, begin - time.monotonic()))
    next_at, done = begin, 0
    while time.monotonic() < end:
        consistency = consistencies[done % len(consistencies)]
        start, cpu = time.perf_counter(), time.thread_time()
        recall(cues[done % len(cues)], consistency)
        took = time.perf_counter() - start
        latencies[consistency].append((took, max(0.0, took - (time.thread_time() - cpu))))
        done += 1
        if per_s:
            next_at += 1.0 / per_s
            time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
    return latencies


def client(argv: list[str]) -> None:
    """A recalling process: connects (or attaches), warms up and says
    `ready`; then for each order it reads (JSON: the space, the monotonic
    time to start at, seconds, recalls a second or 0 for back to back) warms
    up on the space,
    recalls with each consistency in turn for `seconds` and prints their
    latencies as JSON. Ends when its input does."""
    via, target, number = argv[0], argv[1], int(argv[2])
    dim, clusters, seed = (int(x) for x in argv[3].split(","))
    cues = Observations(dim, clusters, seed).cues(number)
    with contextlib.ExitStack() as stack:
        if via == "client":
            c = Client(target, timeout=60)

            def close():
                # A client idle longer than the server's session_idle_s (between
                # the sizes of a full run) has lost its session; recalls need none.
                with contextlib.suppress(UnknownSession):
                    c.close(drain=False)
            stack.callback(close)

            def recall(space, cue, consistency):
                return c.recall(space, cue, k=K, consistency=consistency)
        else:
            reader = stack.enter_context(attach(target))

            def recall(space, cue, consistency):
                return reader.recall(space, cue, k=K, consistency=consistency)
        print("ready", flush=True)
        for line in sys.stdin:
            order = json.loads(line)
            of_space = functools.partial(recall, order["space"])
            for cue in cues[-WARM:]:  # the connection, the kernels, the reader's views of the space
                of_space(cue, "strong")
            at, seconds, per_s = order["at"], order["seconds"], order["per_s"]
            if order["mixed"]:
                out = timed(of_space, cues, CONSISTENCIES, at, at + seconds, per_s)
            else:
                out = {consistency: timed(of_space, cues, (consistency,), at + i * seconds,
                                          at + (i + 1) * seconds, per_s)[consistency]
                       for i, consistency in enumerate(CONSISTENCIES)}
            print(json.dumps(out), flush=True)


class Recallers:
    """`count` recalling processes of one kind (via client or attach),
    started once and given rounds to run; the first `clients` of them run a
    round. Closing ends them (killed if they do not)."""

    def __init__(self, count: int, via: str, target: str, data: Observations):
        self.via, self.procs = via, []
        try:
            for number in range(count):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench", "recall", "--client", via, target, str(number),
                     data.spec()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    start_new_session=True))
            for proc in self.procs:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a {via} recall process did not start (exit code {proc.wait()})")
        except BaseException:
            self.close()
            raise

    def start(self, space: str, clients: int, seconds: float, per_s: float = 0.0, at: float | None = None,
              mixed: bool = False) -> None:
        """Start a round of `clients` on `space`: each consistency for `seconds` in
        turn, or with `mixed` all of them for `seconds`, one recall of each
        in turn; all in step from `at` (monotonic; default START_S from now)."""
        at = time.monotonic() + START_S if at is None else at
        order = json.dumps({"space": space, "at": at, "seconds": seconds, "per_s": per_s, "mixed": mixed})
        for proc in self.procs[:clients]:
            proc.stdin.write(order + "\n")
            proc.stdin.flush()

    def results(self, clients: int, seconds: float) -> dict[str, dict]:
        """The round's recalls per consistency: all clients' latencies
        pooled, their count and rate."""
        outs = []
        for proc in self.procs[:clients]:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a {self.via} recall process failed (exit code {proc.wait()})")
            outs.append(json.loads(line))
        pooled = {}
        for consistency in CONSISTENCIES:
            latencies = [s for out in outs for s in out[consistency]]
            pooled[consistency] = {"recalls": len(latencies),
                                   "queries_per_s": round(len(latencies) / seconds, 1),
                                   **percentiles_ms([took for took, _ in latencies], "recall"),
                                   **percentiles_ms([off for _, off in latencies], "off_cpu")}
        return pooled

    def round(self, space: str, clients: int, seconds: float) -> dict[str, dict]:
        self.start(space, clients, seconds)
        return self.results(clients, seconds)

    def close(self) -> list[int]:
        """End the processes; their exit codes."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [proc.returncode for proc in self.procs]

    def __enter__(self) -> "Recallers":
        return self

    def __exit__(self, *exc) -> None:
        codes = self.close()
        if exc[0] is None and any(codes):
            raise RuntimeError(f"{self.via} recall processes exited with {codes}")


# -- the producer: this process --------------------------------------------------------

def space_stats(producer: Client, space: str) -> dict:
    return producer.stats()["spaces"][space]


def wait_indexed(producer: Client, space: str) -> None:
    while (stats := space_stats(producer, space))["indexed"] < stats["count"]:
        time.sleep(0.1)


def wait_at_rest(producer: Client, space: str, idle_s: float) -> dict:
    """Wait until the space is wholly indexed and no merge has run for
    `idle_s` (longer than the server's compaction_idle_s, after which an
    idle space's last merge starts): the space as a stream leaves it."""
    quiet_since, deadline = None, time.monotonic() + REST_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = space_stats(producer, space)
        if stats["indexed"] < stats["count"] or stats["compacting"]:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= idle_s:
            return stats
        time.sleep(0.1)
    raise RuntimeError(f"{space} did not come to rest within {REST_TIMEOUT_S:.0f} s: {stats}")


def fill(producer: Client, space: str, data: Observations, n: int) -> dict:
    """Stream the first n observations into the space, then wait until all
    are indexed: the rate accepted, and the rate indexed (first row sent to
    the last indexed)."""
    added = n - data.sent
    began = time.perf_counter()
    while data.sent < n:
        producer.observe_batch(space, *data.take(min(CHUNK, n - data.sent)))
    producer.flush()
    accepted = time.perf_counter() - began
    wait_indexed(producer, space)
    indexed = time.perf_counter() - began
    return {"added": added, "fill_s": round(indexed, 1), "fill_per_s": round(added / accepted, 1),
            "indexed_per_s": round(added / indexed, 1)}


def ingest(producer: Client, space: str, data: Observations, rate: float, until: float) -> dict:
    """Batches of BATCH at `rate` observations a second until `until`
    (monotonic); the rate achieved and the window's peak."""
    began = time.monotonic()
    sent, window, next_stats = 0, 0, began
    while time.monotonic() < until:
        ids, vectors = data.take(BATCH)
        producer.observe_batch(space, ids, vectors)
        sent += len(ids)
        if time.monotonic() >= next_stats:
            window = max(window, space_stats(producer, space)["window"])
            next_stats += STATS_PERIOD_S
        time.sleep(max(0.0, began + sent / rate - time.monotonic()))
    producer.flush()
    return {"ingest_per_s": round(sent / (time.monotonic() - began), 1), "window_peak": window}


# -- the run ---------------------------------------------------------------------------

def at_size(pools: dict[str, Recallers], producer: Client, space: str, data: Observations, n: int,
            filled: dict, args) -> list[dict]:
    """Once the space holds n, all of it indexed and its merges done: an
    idle round by each pool and client count, then one client of each pool
    at once under ingestion."""
    at_rest = wait_at_rest(producer, space, AT_REST_S)
    base = {"bench": "recall", "n": n, "dim": args.dim, "dtype": "f16", "k": K,
            "ef_construction": args.ef_construction, "count": at_rest["count"], **filled}
    rows = []
    for via, pool in pools.items():
        for clients in args.clients:
            pooled = pool.round(space, clients, args.seconds)
            rows += [{**base, "via": via, "phase": "idle", "consistency": consistency, "clients": clients,
                      "seconds": args.seconds, "segments": at_rest["segments"], **pooled[consistency]}
                     for consistency in CONSISTENCIES]
    rate = args.load * filled["indexed_per_s"]
    data.make_ahead(int(rate * len(CONSISTENCIES) * args.ingest_seconds) + BATCH)
    at = time.monotonic() + START_S
    seconds = len(CONSISTENCIES) * args.ingest_seconds
    # The pools take turns within each period: recalls in step would queue
    # behind each other for the cores, a collision independent applications
    # seldom make, and the figure of each would be that of both at once.
    stagger = 1.0 / INGEST_RECALLS_PER_S / len(pools)
    for turn, pool in enumerate(pools.values()):
        pool.start(space, 1, seconds, INGEST_RECALLS_PER_S, at + turn * stagger, mixed=True)
    ingested = ingest(producer, space, data, rate, at + seconds + (len(pools) - 1) * stagger)
    after = space_stats(producer, space)
    for via, pool in pools.items():
        pooled = pool.results(1, seconds)
        rows += [{**base, "via": via, "phase": "ingest", "consistency": consistency, "clients": 1,
                  "seconds": seconds, "segments": after["segments"],
                  "count_after": after["count"], **pooled[consistency],
                  "target_ingest_per_s": round(rate, 1), **ingested}
                 for consistency in CONSISTENCIES]
    return rows


COLUMNS = [("n", "n", "d"), ("rows", "count", "d"), ("rows after", "count_after", "d"),
           ("indexed/s", "indexed_per_s", ".0f"), ("segments", "segments", "d"),
           ("via", "via", ""), ("phase", "phase", ""), ("consistency", "consistency", ""),
           ("clients", "clients", "d"), ("queries/s", "queries_per_s", ".0f"),
           ("p50 ms", "recall_p50_ms", ".2f"), ("p99 ms", "recall_p99_ms", ".2f"),
           ("off-CPU p99 ms", "off_cpu_p99_ms", ".2f"),
           ("ingest/s", "ingest_per_s", ".0f"), ("window peak", "window_peak", "d")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None, prog="python -m bench recall") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=ints, default=[100_000, 1_000_000],
                    help="sizes, comma-separated: a space of each")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--clients", type=ints, default=[1, 4], help="concurrent clients of the idle phase, "
                                                                 "comma-separated")
    ap.add_argument("--seconds", type=float, default=5.0, help="idle: seconds of each consistency")
    ap.add_argument("--ingest-seconds", type=float, default=20.0,
                    help="under ingestion: seconds of each consistency")
    ap.add_argument("--load", type=float, default=0.7,
                    help="ingest rate as a share of the fill's indexed rate")
    ap.add_argument("--ef-construction", type=int, default=32, help="the server's build beam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a small run (5000 x 64, 1 and 2 clients, 2 s phases)")
    ap.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        client(args.client)
        return []
    if args.quick:
        args.n, args.dim, args.clients, args.seconds, args.ingest_seconds = [5000], 64, [1, 2], 2.0, 2.0
    sizes = sorted(args.n)
    from engram_shm.kernels.warm import warm
    warm()  # the server's processes then load the kernels from the cache
    print(f"# seed {args.seed}: sizes {sizes} x {args.dim} f16, ef_construction {args.ef_construction}, "
          f"k={K}, clients {args.clients}", flush=True)
    clusters = max(10, sizes[-1] // 100)
    rows = []
    with running_server("--ef-construction", str(args.ef_construction),
                        "--session-idle-s", str(SESSION_IDLE_S)) as (endpoint, name, _), \
            Client(endpoint, batch_size=BATCH, timeout=300) as producer, contextlib.ExitStack() as stack:
        pools = {}
        for n in sizes:
            space, data = space_of(n), Observations(args.dim, clusters, args.seed)
            filled = fill(producer, space, data, n)
            print(f"# {n}: {filled['added']} observations accepted at {filled['fill_per_s']:.0f}/s, "
                  f"indexed at {filled['indexed_per_s']:.0f}/s ({filled['fill_s']} s)", flush=True)
            for via, target in (("client", endpoint), ("attach", name)):
                if via not in pools:  # started once a space exists, kept for every size
                    pools[via] = stack.enter_context(Recallers(max(args.clients), via, target, data))
            rows += [emit(row) for row in at_size(pools, producer, space, data, n, filled, args)]
        producer.close(drain=False)  # not waiting for the index to catch up
    print(table(f"recall (k={K}, ef_search 64) at {args.dim} dims f16, graphs built with ef_construction "
                f"{args.ef_construction}", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
