"""Ingest benchmark: engram_shm's accepted rate against the raw transport
ceiling, in one run, on the same messages.

    python -m bench.ingest [--batches 600] [--batch 256] [--dim 768] [--quick]
    python -m bench.ingest --fsync always,interval,never
    python -m bench.ingest --auth
    python -m bench.ingest --metrics [--chunk 10]

The servers keep a data directory (fsync=interval, the default) unless told
otherwise: the figures include the write-ahead log. With --fsync, the same
batches go instead to one server per fsync policy and to a memory-only one,
and the table gives each rate as a ratio to `never`. With --auth, they go to
a server without authentication and to one with `--auth curve` (every frame
encrypted and authenticated by libzmq's CURVE), as a ratio to the former.
With --metrics, the cost of metrics, measured in pairs: the batches go in
chunks, alternately, to a server with `--metrics off` (nothing recorded) and
to one with metrics on whose /metrics is scraped every second (a busier
Prometheus than most), both up at once; then alternately to two fronts in
this process, without and with a stats block (the hot path's recording
alone, timed by the loop thread's own CPU time). Alternating chunks puts
drift in the machine's load on both sides alike; the table gives each rate
as a ratio to its metrics-off twin.

- raw_zmq: a pyzmq ROUTER process that receives the same msgpack batches,
  unpacks the header, copies the vectors out of the frame and acks with
  credit, doing nothing else: the ceiling of the transport.
- raw_zmq_shm: the same loop, which also puts as many bytes as engram_shm
  stores per batch (the vectors at f16: half the frame) into fresh shared
  memory, as storing must: the floor of storing anything. On a VM a new tmpfs
  page costs microseconds to fault in.
- engram_shm: `engram-shm serve` (its front validates, normalises, stores in
  shared memory as f16 and acks; two index workers run meanwhile).
- engram_shm_client: the same server fed through `engram_shm.Client`
  (building its messages from numpy arrays).
- engram_shm_loop_only: not over the network: the same messages handed to
  the front's loop in this process (replies dropped), with the cores to
  itself: the rate a front with cores to spare is bound by.

The first three are driven by one sender that pipelines pre-built messages
and keeps at most the granted credit in flight, as the Client does. While the
engram run streams, a second connection recalls 10 times a second; its
latency is reported. Each row also gives the CPU time per batch of the
receiving process (all its threads: the loop, ZeroMQ's I/O thread, for
engram_shm the front's page prefaulter; index workers not included), of its
loop alone, and of the sending process: on a machine with few cores that all
of them share, it shows where the time goes. Prints JSON lines (bench, system, batch, dim, obs_per_s) and a
table with the ratio to raw_zmq.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import msgpack
import numpy as np
import psutil
import zmq

from engram_shm import Client
from engram_shm.auth.keys import KeysDir, load_pair, load_public
from engram_shm.config import EngineConfig
from engram_shm.kernels.warm import warm
from engram_shm.observability.stats_block import StatsBlock
from engram_shm.store import shm
from engram_shm.store.catalog import Catalog
from engram_shm.synthetic import clustered
from engram_shm.transport import protocol as p
from engram_shm.transport.front import Front
from engram_shm.transport.launch import free_port, running_server
from engram_shm.transport.sessions import SessionTable, create_table

from . import unbounded_window
from .report import emit, parser, percentiles_ms, table

CREDIT = 4096


def raw_server(endpoint: str, store_bytes: int = 0) -> None:
    """The ceiling: receive, unpack, copy the vectors, ack with credit. With
    store_bytes, half of each frame (what f16 storage of the vectors takes) is
    also copied into fresh shared memory: what putting the stored bytes into
    new tmpfs pages costs here."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    block = shm.create(f"engram_bench-raw-{os.getpid()}_000000", store_bytes) if store_bytes else None
    at = 0
    while True:
        frames = sock.recv_multipart(copy=False)
        header = msgpack.unpackb(frames[1].buffer, raw=False)
        if header["op"] == "init":
            sock.send_multipart([frames[0].bytes, msgpack.packb({"op": "init_ack", "session": "raw",
                                                                  "limit": CREDIT, "credit": CREDIT})])
            continue
        if header["op"] == "stop":
            break
        n, dim = header["shape"]
        vectors = np.frombuffer(frames[2].buffer, np.float32).reshape(n, dim).copy()
        if block is not None:
            stored = np.ndarray((n, dim), np.uint16, buffer=block.buf, offset=at)
            stored[:] = vectors.view(np.uint16)[:, :dim]
            at += stored.nbytes
            del stored
        end = header["seq"] + n - 1
        sock.send_multipart([frames[0].bytes, msgpack.packb(
            {"op": "ack", "rid": header["rid"], "from": header["seq"], "to": end,
             "credit": CREDIT, "limit": end + CREDIT, "rows": len(vectors)})])
    if block is not None:
        shm.destroy(block)


def run_raw(batches, store_bytes: int = 0) -> tuple[float, dict]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    raw = subprocess.Popen([sys.executable, "-m", "bench.ingest", "--raw-server", endpoint,
                            "--raw-store-bytes", str(store_bytes)])
    try:
        seconds, cpu = send_all(endpoint, batches, raw.pid)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(endpoint)
        sock.send_multipart(p.pack({"op": "stop"}))
        raw.wait(10)
        sock.close(linger=100)
    finally:
        raw.kill()
    return seconds, cpu


def messages(data: np.ndarray, batch: int) -> list[tuple[dict, bytes]]:
    out = []
    for lo in range(0, len(data), batch):
        rows = data[lo:lo + batch]
        header = {"op": "observe_batch", "space": "ingest",
                  "ids": [f"o{i}" for i in range(lo, lo + len(rows))],
                  "what": ["an observation of the ingest benchmark"] * len(rows), "dtype": "f32",
                  "shape": list(rows.shape)}
        out.append((header, rows.tobytes()))
    return out


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the whole process, of its main thread)."""
    times = process.cpu_times()
    main = next((t.user_time + t.system_time for t in process.threads() if t.id == process.pid), 0.0)
    return times.user + times.system, main


@contextlib.contextmanager
def cpu_per_batch(receiver_pid: int, batches: int):
    """Yields a dict that gets, on exit, the CPU microseconds per batch the
    receiving process (and its main thread: the loop itself, which a machine
    with cores to spare is bound by) and this sending one spent meanwhile."""
    receiver, sender = psutil.Process(receiver_pid), psutil.Process()
    before = cpu_seconds(receiver), cpu_seconds(sender)
    out: dict = {}
    yield out
    (total, main), (sent, _) = [[(b - a) * 1e6 / batches for a, b in zip(t, cpu_seconds(proc))]
                                for proc, t in zip((receiver, sender), before)]
    out.update(receiver_cpu_us_per_batch=round(total), receiver_main_us_per_batch=round(main),
               sender_cpu_us_per_batch=round(sent))


def numbered(batches: list[tuple[dict, bytes]], session: str):
    """Each batch as frames of `session`, numbered from sequence 1, with its
    last sequence: (last, frames)."""
    seq = 1
    for rid, (header, payload) in enumerate(batches):
        n = header["shape"][0]
        yield seq + n - 1, p.pack({**header, "session": session, "seq": seq, "rid": rid}, payload)
        seq += n


def send_all(endpoint: str, batches: list[tuple[dict, bytes]], receiver_pid: int,
             keys: dict | None = None) -> tuple[float, dict]:
    """Pipeline the batches within the granted credit (as the client of
    `keys`, if given). Returns the seconds until all are acked and
    `cpu_per_batch`, both counted from the session's start (the receiver is
    up by then)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        sock.curve_publickey, sock.curve_secretkey = load_pair(keys["client_key"])
        sock.curve_serverkey = load_public(keys["server_key"])
    sock.connect(endpoint)
    sock.send_multipart(p.pack({"op": "init"}))
    ack = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
    session, limit = ack["session"], ack["limit"]
    with cpu_per_batch(receiver_pid, len(batches)) as cpu:
        start = time.perf_counter()
        outgoing = numbered(batches, session)
        waiting, acked = next(outgoing, None), 0
        while acked < len(batches):
            while waiting is not None and waiting[0] <= limit:
                sock.send_multipart(waiting[1], copy=False)
                waiting = next(outgoing, None)
            reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
            if reply["op"] == "ack":
                acked += 1
                limit = max(limit, reply["limit"])
            elif reply["op"] == "status":
                limit = max(limit, reply["limit"])
            elif reply["op"] == "durable":
                pass  # the background fsync caught up
            else:
                raise RuntimeError(f"refused: {reply}")
        elapsed = time.perf_counter() - start
    sock.close()
    return elapsed, cpu


class _LastReply:
    """Stands in for the front's ROUTER socket: keeps the last reply, counts errors."""
    def __init__(self):
        self.last, self.errors = None, 0

    def send_multipart(self, frames, flags=0, copy=True):
        self.last = msgpack.unpackb(frames[1], raw=False)
        self.errors += self.last["op"] == "error"


@contextlib.contextmanager
def in_process_front(batches: list[tuple[dict, bytes]], ring: int, metrics: bool = False, suffix: str = ""):
    """A front in this process, its replies kept by a stand-in socket, and the
    batches as messages of one session of it: yields (front, messages,
    replies). With `metrics`, it records into a stats block as a server's
    front does; without, nothing (--metrics off)."""
    warm()
    name = f"bench-loop-{os.getpid()}{suffix}"
    catalog = Catalog.create(name)
    front = None
    try:
        config = EngineConfig(name=name, ring_capacity=ring, window_budget_ms=0, max_credit=CREDIT)
        stats = StatsBlock.private(config.metrics_spaces, config.worker_count) if metrics else None
        front = Front(config, catalog, SessionTable(create_table(name)), stats)
        front.replies.sock = replies = _LastReply()
        identity = zmq.Frame(b"\0bench")
        front.handle([identity, zmq.Frame(p.pack({"op": "init"})[0])])
        yield front, [[identity, *map(zmq.Frame, frames)]
                      for _, frames in numbered(batches, replies.last["session"])], replies
        if replies.errors:
            raise RuntimeError(f"the front refused {replies.errors} batches: {replies.last}")
    finally:
        if front is not None:
            front.close()
        catalog.close()


def loop_only(batches: list[tuple[dict, bytes]], ring: int) -> tuple[float, dict]:
    """Seconds the front's loop takes over the batches handed to it in this
    process, and its CPU per batch."""
    with in_process_front(batches, ring) as (front, messages, _):
        with cpu_per_batch(os.getpid(), len(batches)) as cpu:
            start = time.perf_counter()
            for message in messages:
                front.handle(message)
            seconds = time.perf_counter() - start
    return seconds, {**cpu, "sender_cpu_us_per_batch": 0}  # no sender


def alternate(n: int, chunk: int, run, clock=time.perf_counter) -> dict[bool, float]:
    """Seconds (of `clock`) of `run(metrics, lo, hi)` over batches [0, n) in
    chunks, each chunk to both sides, the side that goes first alternating:
    drift in the machine's load (other work, a VM's neighbours) falls on both
    sides alike."""
    seconds = {False: 0.0, True: 0.0}
    for k, lo in enumerate(range(0, n, chunk)):
        for metrics in ((False, True) if k % 2 == 0 else (True, False)):
            start = clock()
            run(metrics, lo, min(n, lo + chunk))
            seconds[metrics] += clock() - start
    return seconds


def recall_while(endpoint: str, cue: np.ndarray, stop: threading.Event, out: list,
                 keys: dict | None = None) -> None:
    with Client(endpoint, **(keys or {})) as c:
        while not stop.wait(0.1):
            t = time.perf_counter()
            try:
                c.recall("ingest", cue, k=10, consistency="strong")
            except Exception:
                continue  # the space may not exist for the first tenth of a second
            out.append(time.perf_counter() - t)


def row(system: str, n: int, batch: int, dim: int, seconds: float, **extra) -> dict:
    return {"bench": "ingest", "system": system, "batch": batch, "dim": dim,
            "obs_per_s": round(n / seconds, 1), "observations": n, **extra}


def front_pid(server: subprocess.Popen) -> int:
    return next(c.pid for c in psutil.Process(server.pid).children(recursive=True)
                if "engram_shm.transport.front" in c.cmdline())


COLUMNS = [("system", "system", ""), ("batch", "batch", "d"), ("dim", "dim", "d"),
           ("obs/s", "obs_per_s", ".0f"), ("x raw_zmq", "x obs_per_s", ".2f"),
           ("receiver us/batch", "receiver_cpu_us_per_batch", "d"),
           ("its loop", "receiver_main_us_per_batch", "d"),
           ("sender us/batch", "sender_cpu_us_per_batch", "d")]


def served(system: str, data: np.ndarray, batches, args, *flags: str, keys: dict | None = None,
           data_dir: str | None = None) -> dict:
    """The rate `engram-shm serve` (with `flags`) accepts the batches at, with
    10 recalls a second alongside."""
    n = len(data)
    with running_server("--max-credit", str(CREDIT), *flags, data=data_dir) as (endpoint, _, server):
        latencies, stop = [], threading.Event()
        reader = threading.Thread(target=recall_while, args=(endpoint, data[0], stop, latencies, keys))
        reader.start()
        try:
            seconds, cpu = send_all(endpoint, batches, front_pid(server), keys)
        finally:
            stop.set()
            reader.join()
    return row(system, n, args.batch, args.dim, seconds, **cpu, recalls=len(latencies),
               **percentiles_ms(latencies, "recall"))


SERVER_COLUMNS = [("system", "system", ""), ("obs/s", "obs_per_s", ".0f"), ("x first", "x obs_per_s", ".2f"),
                 ("receiver us/batch", "receiver_cpu_us_per_batch", "d"),
                 ("its loop", "receiver_main_us_per_batch", "d"),
                 ("recall p99 ms", "recall_p99_ms", ".2f")]


def fsync_policies(policies: list[str], data: np.ndarray, batches, args) -> list[dict]:
    """One server per fsync policy on the same batches (each with its own
    data directory), and a memory-only one for reference; the table gives
    each rate as a ratio to `never`'s."""
    window = unbounded_window(2 * len(data) + 1024)
    policies = sorted(policies, key=lambda policy: policy != "never")  # the base row first
    rows = [emit(served(f"engram_shm_fsync_{policy}", data, batches, args, *window, "--fsync", policy))
            for policy in policies]
    rows.append(emit(served("engram_shm_memory_only", data, batches, args, *window, "--data", "none")))
    print(table(f"ingest by fsync policy (x {rows[0]['system']})", rows, SERVER_COLUMNS))
    return rows


def authentication(data: np.ndarray, batches, args) -> list[dict]:
    """The same batches to a server without authentication and to one with
    CURVE (a key granted every space); the table gives the ratio."""
    window = unbounded_window(2 * len(data) + 1024)
    rows = [emit(served("engram_shm_auth_none", data, batches, args, *window))]
    with tempfile.TemporaryDirectory(prefix="engram-bench-auth-") as data_dir:
        keys = KeysDir(os.path.join(data_dir, "keys"))
        client_key = keys.new("bench")
        with open(keys.acl, "w") as f:
            f.write('[grants.bench]\n"*" = ["admin"]\n')
        rows.append(emit(served("engram_shm_auth_curve", data, batches, args, *window, "--auth", "curve",
                                data_dir=data_dir,
                                keys={"client_key": client_key, "server_key": keys.server_public_file})))
    print(table(f"ingest by authentication (x {rows[0]['system']})", rows, SERVER_COLUMNS))
    return rows


@contextlib.contextmanager
def scraping(url: str, period_s: float = 1.0):
    """Scrape `url` every `period_s` in a thread while the block runs (the
    server may not be up yet: a failed scrape is tried again)."""
    stop = threading.Event()

    def scrape():
        while not stop.wait(period_s):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=5).read()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


METRICS_COLUMNS = [("system", "system", ""), ("obs/s", "obs_per_s", ".0f"),
                   ("x metrics off", "x_metrics_off", ".3f")]


def metrics_overhead(data: np.ndarray, batches, args) -> list[dict]:
    """The cost of metrics, paired: the batches go in chunks of `args.chunk`
    alternately to a server with metrics off and one with metrics on (its
    /metrics scraped every second), both running meanwhile, each chunk in a
    session of its own (rates by the wall clock); then alternately to two
    fronts in this process, without and with a stats block (the hot path's
    recording alone; rates by the loop thread's CPU time). Each rate as a
    ratio to its metrics-off twin."""
    ring = 2 * len(data) + 1024
    n, rows = len(data), []

    def report(where: str, seconds: dict[bool, float]) -> None:
        for metrics in (False, True):
            rows.append(emit(row(f"engram_shm{where}_metrics_{'on' if metrics else 'off'}", n, args.batch,
                                 args.dim, seconds[metrics], chunk=args.chunk,
                                 x_metrics_off=round(seconds[False] / seconds[metrics], 4))))

    port = free_port()
    # No backpressure (the ring holds every batch, no scan budget bounds the
    # window): the rate of accepting is measured.
    common = (*unbounded_window(ring), "--max-credit", str(CREDIT))
    with running_server(*common, "--metrics", "off") as (off, _, off_server), \
            running_server(*common, "--metrics", f"127.0.0.1:{port}") as (on, _, on_server), \
            scraping(f"http://127.0.0.1:{port}/metrics"):
        servers = {False: (off, front_pid(off_server)), True: (on, front_pid(on_server))}

        def send(metrics: bool, lo: int, hi: int) -> None:
            endpoint, pid = servers[metrics]
            send_all(endpoint, batches[lo:hi], pid)

        report("", alternate(len(batches), args.chunk, send))
    with in_process_front(batches, ring, False, "-off") as (front_off, off_messages, _), \
            in_process_front(batches, ring, True, "-on") as (front_on, on_messages, _):
        fronts = {False: (front_off, off_messages), True: (front_on, on_messages)}

        def handle(metrics: bool, lo: int, hi: int) -> None:
            front, messages = fronts[metrics]
            for message in messages[lo:hi]:
                front.handle(message)

        # The loop's own CPU time: what recording adds to it, not when this
        # thread was off the CPU while the machine was busy.
        report("_loop_only", alternate(len(batches), args.chunk, handle, time.thread_time))
    print(table("ingest with metrics off and on, alternating chunks", rows, METRICS_COLUMNS))
    return rows


def main(argv=None, prog="python -m bench ingest") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (20 batches x 64 dims)")
    ap.add_argument("--fsync", help="instead: the server's accepted rate under each of these fsync "
                                    "policies (comma-separated: always,interval,never) and memory-only, "
                                    "as ratios to never")
    ap.add_argument("--auth", action="store_true", help="instead: the server's accepted rate without "
                                                        "authentication and with CURVE, as a ratio")
    ap.add_argument("--metrics", action="store_true", help="instead: the rate with metrics off and on "
                                                           "(served and in-process), as ratios")
    ap.add_argument("--chunk", type=int, default=10, help="--metrics: batches sent to one side before the "
                                                          "other")
    ap.add_argument("--raw-server", help=argparse.SUPPRESS)
    ap.add_argument("--raw-store-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw_server:
        raw_server(args.raw_server, args.raw_store_bytes)
        return []
    if args.quick:
        args.batches, args.dim = 20, 64
    n = args.batches * args.batch
    data = clustered(n, args.dim, seed=args.seed)
    batches = messages(data, args.batch)
    print(f"# {args.batches} batches of {args.batch} x {args.dim} float32 observations", flush=True)
    if args.fsync:
        return fsync_policies(args.fsync.split(","), data, batches, args)
    if args.auth:
        return authentication(data, batches, args)
    if args.metrics:
        return metrics_overhead(data, batches, args)

    rows = []
    for system, store_bytes in (("raw_zmq", 0), ("raw_zmq_shm", n * args.dim * 2)):
        seconds, cpu = run_raw(batches, store_bytes)
        rows.append(emit(row(system, n, args.batch, args.dim, seconds, **cpu)))

    window = unbounded_window(2 * n + 1024)  # no backpressure: the rate of accepting is measured
    rows.append(emit(served("engram_shm", data, batches, args, *window)))
    with running_server(*window, "--max-credit", str(CREDIT)) as (endpoint, _, server):
        with Client(endpoint, batch_size=args.batch, timeout=120) as c:
            ids = [f"o{i}" for i in range(n)]
            with cpu_per_batch(front_pid(server), len(batches)) as cpu:
                start = time.perf_counter()
                c.observe_batch("ingest", ids, data)
                c.flush()
                seconds = time.perf_counter() - start
            rows.append(emit(row("engram_shm_client", n, args.batch, args.dim, seconds, **cpu)))
    seconds, cpu = loop_only(batches, 2 * n + 1024)
    rows.append(emit(row("engram_shm_loop_only", n, args.batch, args.dim, seconds, **cpu)))
    print(table("ingest benchmark", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
