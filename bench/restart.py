"""Restart benchmark: how long an engine takes to come back from its data
directory, for spaces of a given size.

    python -m bench.restart [--cases 1000000x128,200000x768] [--tail 0.05] [--quick]

For each case N x DIM a builder process streams N clustered observations
into an embedded engine with that data directory, waits until they are
indexed, checkpoints, streams a further `tail` share of N and dies without
closing (os._exit): the directory then holds a checkpoint and a log tail, as
after a crash. Then, each timed from process start until the server answers
with every observation counted:
- `crash`: `engram-shm serve --data DIR` (loads the checkpoint, replays the
  tail, starts the front and the index workers);
- `clean`: the same server is stopped with SIGINT (drain, last checkpoint)
  and started again: a checkpoint only.
Each also reports the server's own recovery time (its log line), the size of
the newest checkpoint and of the log, and the share of a sample of
observations found as their own top hit. Prints
JSON lines and a table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from engram_shm import Client
from engram_shm.store import checkpoint
from engram_shm.store.catalog import collect_stale
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import free_port

from .report import emit, parser, table

BATCH = 4096
PROBES = 200


def data_for(n: int, dim: int, seed: int) -> np.ndarray:
    return clustered(n, dim, clusters=max(10, n // 10), spread=1.0, seed=seed)


def build(directory: str, n: int, dim: int, tail: int, seed: int, name: str) -> None:
    """The builder process: N observations checkpointed, `tail` more logged
    only, then a crash."""
    from engram_shm import Engine

    data = data_for(n + tail, dim, seed)
    ids = [f"r{i}" for i in range(n + tail)]
    engine = Engine(name=name, data_dir=directory, fsync="never", ring_capacity=n + tail)
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        engine.observe("restart", ids[lo:hi], data[lo:hi])
    engine.wait_indexed()
    engine.checkpoint()
    for lo in range(n, n + tail, BATCH):
        hi = min(n + tail, lo + BATCH)
        engine.observe("restart", ids[lo:hi], data[lo:hi])
    engine.writer.wal.sync()
    os._exit(0)  # a crash: no last checkpoint, the tail only in the log


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def serve_until_ready(directory: str, n: int, log_path: str) -> tuple[subprocess.Popen, str, float]:
    """Start a server on the directory; returns it, its endpoint and the
    seconds until it answered with all n observations counted."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engram_shm.cli", "serve", "--log-level", "INFO",
                                 "--data", directory, "--endpoint", endpoint, "--workers", "2", "--metrics",
                                 "127.0.0.1:0"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {pathlib.Path(log_path).read_text()[-3000:]}")
        try:
            with Client(endpoint, timeout=1.0) as c:
                if c.stats()["spaces"].get("restart", {}).get("count") == n:
                    return proc, endpoint, time.perf_counter() - start
        except Exception:
            pass
        time.sleep(0.02)


def recovered_seconds(log_path: str) -> float | None:
    found = re.findall(r"recovered .* in ([0-9.]+) s", pathlib.Path(log_path).read_text())
    return float(found[-1]) if found else None


def probe(endpoint: str, data: np.ndarray, seed: int) -> float:
    """Share of sampled observations found as their own top hit."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data), min(PROBES, len(data)), replace=False)
    with Client(endpoint) as c:
        hits = sum(c.recall("restart", data[i], k=1)[0].id == f"r{i}" for i in rows)
    return hits / len(rows)


def run_case(n: int, dim: int, tail_share: float, seed: int) -> list[dict]:
    tail = int(n * tail_share)
    total = n + tail
    directory = tempfile.mkdtemp(prefix="engram-restart-")
    name = f"bench-restart-{os.getpid()}"
    log_path = os.path.join(directory, "server.log")
    rows = []
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.restart", "--build", directory, "--n", str(n), "--dim",
                        str(dim), "--tail-rows", str(tail), "--seed", str(seed), "--name", name], check=True)
        collect_stale(name, min_age_s=0)  # the builder's shared memory, left by its crash
        build_s = time.perf_counter() - started
        data = data_for(total, dim, seed)
        base = {"bench": "restart", "n": total, "dim": dim, "build_s": round(build_s, 1)}
        for case in ("crash", "clean"):
            newest = checkpoint.complete(os.path.join(directory, "checkpoints"))[0][1]
            on_disk = {"checkpoint_bytes": du(newest), "wal_bytes": du(os.path.join(directory, "wal"))}
            proc, endpoint, ready = serve_until_ready(directory, total, log_path)
            try:
                hits = probe(endpoint, data, seed)
            finally:
                proc.send_signal(2)
                proc.wait(600)
            rows.append(emit({**base, "case": case, "log_tail": tail if case == "crash" else 0,
                              "ready_s": round(ready, 2), "recovery_s": recovered_seconds(log_path),
                              **on_disk, "own_top_hit": hits}))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


COLUMNS = [("n", "n", "d"), ("dim", "dim", "d"), ("case", "case", ""), ("log tail", "log_tail", "d"),
           ("ready s", "ready_s", ".2f"), ("recovery s", "recovery_s", ".2f"),
           ("checkpoint MB", "checkpoint_mb", ".0f"), ("log MB", "wal_mb", ".0f"),
           ("own top hit", "own_top_hit", ".3f")]


def main(argv=None, prog="python -m bench restart") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--cases", default="1000000x128,200000x768", help="N x DIM, comma-separated")
    ap.add_argument("--tail", type=float, default=0.05, help="share of N logged after the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (20000 x 64) for tests")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tail-rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        build(args.build, args.n, args.dim, args.tail_rows, args.seed, args.name)
    if args.quick:
        args.cases = "20000x64"
    rows = []
    for case in args.cases.split(","):
        n, dim = map(int, case.split("x"))
        print(f"# seed {args.seed}: {n} x {dim} clustered unit vectors, a log tail of {args.tail:.0%}",
              flush=True)
        rows += run_case(n, dim, args.tail, args.seed)
    for r in rows:
        r["checkpoint_mb"], r["wal_mb"] = r["checkpoint_bytes"] / 2**20, r["wal_bytes"] / 2**20
    print(table("restart benchmark", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
