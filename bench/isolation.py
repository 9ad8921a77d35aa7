"""Isolation benchmark: does recall load slow down a producer's acks?

    python -m bench.isolation [--batches 600] [--batch 256] [--dim 768] [--k 10000] [--quick]

One `engram-shm serve` (defaults: two index workers, one recall reader per
core) holds a space of `--base` observations. A producer streams batches of
`batch x dim` through `engram_shm.Client`, one at a time, and times each from
send to ack: first alone, then while two load processes recall from the same
server:
- `heavy`: one client recalling k=`--k` in a loop (each answer streamed in
  parts of 1,000);
- `flood`: one connection keeping `--flood` recalls of k=10 in flight,
  sending a new one as each is answered (refusals with `busy` counted).
The load runs in processes of its own, so that its Python work does not
share the producer's GIL; on a machine with few cores they do share the
cores with the server, as load would. Each phase also reports the CPU each
role used meanwhile, in cores (front, recall readers, index workers, load
processes, the producer). The goal: the producer's ack p99
under load within 2x of alone. The two phases alternate `--rounds` times
(the load started afresh each time), and each phase's figures pool its
rounds: work of other processes on the machine then weighs on both alike.
Prints JSON lines (with the machine and the date) and a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import psutil
import zmq

from engram_shm import Client
from engram_shm.config import EngineConfig
from engram_shm.engine.lifeline import StopRequest
from engram_shm.synthetic import clustered
from engram_shm.transport import protocol as p
from engram_shm.transport.launch import running_server

from . import unbounded_window
from .report import emit, parser, percentiles_ms, table

HEAVY_PART = 1000
LOAD_START_S = 120.0


def heavy(endpoint: str, k: int, dim: int, stop: StopRequest) -> dict:
    """k-sized recalls, one after the other."""
    cues = clustered(64, dim, seed=7)
    done = 0
    with Client(endpoint, timeout=120) as c:
        while not stop.requested:
            c.recall("base", cues[done % len(cues)], k=k, batch=HEAVY_PART)
            done += 1
            if done == 1:
                print("running", flush=True)
    return {"recalls": done}


def flood(endpoint: str, in_flight: int, dim: int, stop: StopRequest) -> dict:
    """`in_flight` small recalls always outstanding on one connection."""
    cues = clustered(64, dim, seed=8)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = answered = busy = 0

    def send():
        nonlocal sent
        fields, frame = p.vector_payload(cues[sent % len(cues)])
        sock.send_multipart(p.pack({"op": "recall", "space": "base", "k": 10, "rid": sent, **fields}, frame))
        sent += 1

    for _ in range(in_flight):
        send()
    while not stop.requested:
        if not sock.poll(100):
            continue
        reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        if reply["op"] == "recall_result" and reply["more"]:
            continue
        if reply["op"] == "error" and reply["code"] != "busy":
            raise RuntimeError(f"flood refused: {reply}")
        busy += reply["op"] == "error"
        answered += reply["op"] == "recall_result"
        if answered == 1:
            print("running", flush=True)
        send()
    sock.close()
    return {"recalls": answered, "busy": busy}


def load(argv: list[str]) -> None:
    """A load process: runs until SIGTERM, then prints what it did as JSON."""
    kind, endpoint, amount, dim = argv[0], argv[1], int(argv[2]), int(argv[3])
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    out = heavy(endpoint, amount, dim, stop) if kind == "heavy" else flood(endpoint, amount, dim, stop)
    print(json.dumps(out), flush=True)


def start_load(kind: str, endpoint: str, amount: int, dim: int, nice: int) -> subprocess.Popen:
    """A load process in a session of its own, as another application would
    be: with the kernel's autogroup scheduling (on by default in desktop and
    many server kernels) CPU is shared between sessions first, so a load in
    the producer's session would slow the producer itself, not the server."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.isolation", "--load", kind, endpoint, str(amount),
                             str(dim)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: os.nice(nice))
    deadline = time.monotonic() + LOAD_START_S
    while proc.stdout.readline().strip() != "running":  # one answer done: the load is on
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {kind} load did not start")
    return proc


def stop_load(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return json.loads(out.strip().splitlines()[-1])


ROLES = (("front", "engram_shm.transport.front"), ("readers", "engram_shm.transport.recall_worker"),
         ("indexers", "engram_shm.engine.worker"), ("load", "bench.isolation --load"))
CPU_ROLES = [role for role, _ in ROLES] + ["producer"]
COUNTS = ("heavy_recalls", "flood_recalls", "flood_busy")


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes by role, the load
    processes', and this one's (the producer)."""
    out = dict.fromkeys(CPU_ROLES, 0.0)
    me = psutil.Process()
    for proc in [*psutil.Process(server_pid).children(recursive=True), *me.children()]:
        try:
            cmdline, times = " ".join(proc.cmdline()), proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        role = next((role for role, pattern in ROLES if pattern in cmdline), None)
        if role is not None:
            out[role] += times.user + times.system
    times = me.cpu_times()
    out["producer"] = times.user + times.system
    return out


def timed(server_pid: int, phase):
    """(phase's result, its seconds, the CPU seconds each role used meanwhile)."""
    before, start = cpu_by_role(server_pid), time.perf_counter()
    result = phase()
    seconds = time.perf_counter() - start
    after = cpu_by_role(server_pid)
    return result, seconds, {role: after[role] - before[role] for role in after}


def stream(client: Client, data: np.ndarray, batch: int, prefix: str) -> list[float]:
    """Send the batches one at a time; the seconds from each send to its ack."""
    latencies = []
    for lo in range(0, len(data), batch):
        ids = [f"{prefix}{lo + i}" for i in range(batch)]
        start = time.perf_counter()
        client.observe_batch("stream", ids, data[lo:lo + batch])
        client.flush()
        latencies.append(time.perf_counter() - start)
    return latencies


COLUMNS = [("phase", "phase", ""), ("batches", "batches", "d"), ("ack p50 ms", "ack_p50_ms", ".2f"),
           ("ack p99 ms", "ack_p99_ms", ".2f"), ("x alone p99", "x ack_p99_ms", ".2f"),
           ("heavy recalls", "heavy_recalls", "d"), ("flood recalls", "flood_recalls", "d"),
           ("busy", "flood_busy", "d"), *((f"cpu {role}", f"cpu_{role}", ".2f") for role in CPU_ROLES)]


def main(argv=None, prog="python -m bench isolation") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--batches", type=int, default=1500, help="batches the producer sends per phase")
    ap.add_argument("--rounds", type=int, default=3, help="the phases alternate this many times, so that "
                                                          "other work on the machine falls on both alike")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--base", type=int, default=20_000, help="observations in the recalled space")
    ap.add_argument("--k", type=int, default=10_000, help="k of the heavy recalls")
    ap.add_argument("--flood", type=int, default=8, help="small recalls the flood keeps in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-nice", type=int, default=0, help="nice increment of the load processes")
    ap.add_argument("--recall-niceness", type=int, default=EngineConfig.recall_niceness,
                    help="the server's --recall-niceness")
    ap.add_argument("--quick", action="store_true", help="a small run (40 batches x 64 dims, k=1000)")
    ap.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load:
        load(args.load)
        return []
    if args.quick:
        args.batches, args.rounds, args.dim, args.base, args.k = 40, 1, 64, 2000, 1000
    per_round = args.batches // args.rounds * args.batch
    data = clustered(2 * args.rounds * per_round, args.dim, seed=args.seed)
    print(f"# seed {args.seed}: {args.batches} batches of {args.batch} x {args.dim} per phase in "
          f"{args.rounds} rounds; recalls over {args.base} observations, heavy k={args.k}, flood "
          f"{args.flood} in flight", flush=True)
    phases = {phase: {"latencies": [], "seconds": 0.0, "cpu": collections.Counter(),
                      "counts": collections.Counter()} for phase in ("alone", "recalls")}
    with running_server(*unbounded_window(len(data) + args.base + 1024), "--recall-niceness",
                        str(args.recall_niceness)) as (endpoint, _, server), \
            Client(endpoint, batch_size=args.batch, timeout=120) as producer:
        producer.observe_batch("base", [f"b{i}" for i in range(args.base)],
                               clustered(args.base, args.dim, seed=args.seed + 1))
        producer.flush()
        while len(producer.stats()["recall"]["readers"]) < EngineConfig().recall_worker_count:
            time.sleep(0.05)  # the server answers before its readers are up
        stream(producer, data[:args.batch * 8], args.batch, "warm")  # the space exists, code paths are hot
        chunks = iter(range(0, len(data), per_round))

        def measure(phase: str) -> None:
            lo = next(chunks)
            latencies, seconds, cpu = timed(server.pid, lambda: stream(producer, data[lo:lo + per_round],
                                                                       args.batch, f"{phase}{lo}-"))
            acc = phases[phase]
            acc["latencies"] += latencies
            acc["seconds"] += seconds
            acc["cpu"].update(cpu)

        for _ in range(args.rounds):
            measure("alone")
            loads = [start_load("heavy", endpoint, args.k, args.dim, args.load_nice),
                     start_load("flood", endpoint, args.flood, args.dim, args.load_nice)]
            try:
                measure("recalls")
            finally:
                heavy_done, flood_done = [stop_load(proc) for proc in loads]
            while producer.stats()["recall"]["in_flight"]:  # recalls the loads left are not the next alone's
                time.sleep(0.05)
            phases["recalls"]["counts"].update(heavy_recalls=heavy_done["recalls"], flood_recalls=flood_done[
                "recalls"], flood_busy=flood_done["busy"])
        producer.close(drain=False)  # not waiting for the index to catch up
    base = {"bench": "isolation", "batch": args.batch, "dim": args.dim, "rounds": args.rounds,
            "base": args.base, "k": args.k, "flood": args.flood, "load_nice": args.load_nice,
            "recall_niceness": args.recall_niceness}
    rows = [emit({**base, "phase": phase, "batches": len(acc["latencies"]),
                  **percentiles_ms(acc["latencies"], "ack"),
                  **{count: acc["counts"][count] for count in COUNTS},
                  **{f"cpu_{role}": round(acc["cpu"][role] / acc["seconds"], 2) for role in CPU_ROLES}})
            for phase, acc in phases.items()]
    ratio = rows[1]["ack_p99_ms"] / rows[0]["ack_p99_ms"]
    print(table("isolation benchmark", rows, COLUMNS))
    print(f"ack p99 under recall load: {ratio:.2f}x alone (goal: within 2x)")
    return rows


if __name__ == "__main__":
    main()
