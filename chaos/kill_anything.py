"""Chaos: stream into a real server while SIGKILLing its processes (the front
or an index worker) at random moments; afterwards every acked observation
must be there, recallable by its own vector, and indexed.

    python -m chaos.kill_anything [--seconds 20] [--kills 6] [--seed N] [--quick]

Prints one JSON line with what happened and exits 1 if anything acked was
lost. The seed is printed so that a failing run can be repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from engram_shm import Client
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import running_server


def children(name: str) -> dict[str, list[int]]:
    """pids of the server's front and index workers."""
    found = {}
    for role, pattern in (("front", f"engram_shm.transport.front {name} "),
                          ("worker", f"engram_shm.engine.worker {name} ")):
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        found[role] = [int(pid) for pid in out.split()]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.kill_anything", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to stream")
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="6 s, 3 kills (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.kills = 6.0, 3
    seed = random.randrange(2**31) if args.seed is None else args.seed
    rng = random.Random(seed)
    print(f"# seed {seed}", flush=True)
    killed, acked = [], 0
    batches = {}  # batch number -> its vectors (unique ones: own-vector recall is then exact enough)
    with running_server("--ring-capacity", "20000") as (endpoint, name, proc):
        stop = threading.Event()

        def kill_at_random():
            for _ in range(args.kills):
                if stop.wait(rng.uniform(0.3, 2 * args.seconds / args.kills)):
                    return
                pids = children(name)
                role = rng.choice([r for r in pids if pids[r]] or ["none"])
                if role != "none":
                    os.kill(rng.choice(pids[role]), signal.SIGKILL)
                    killed.append(role)

        killer = threading.Thread(target=kill_at_random)
        killer.start()
        with Client(endpoint, batch_size=200, timeout=10) as client:
            deadline = time.monotonic() + args.seconds
            sent = 0
            while time.monotonic() < deadline:
                vectors = batches[sent // 200] = clustered(200, args.dim, clusters=4, seed=seed + sent)
                client.observe_batch("chaos", [f"c{sent + i}" for i in range(200)], vectors)
                sent += 200
            stop.set()
            killer.join()
            acked = client.flush(timeout=120)
            stats = client.stats()["spaces"]["chaos"]
            probe = rng.sample(range(acked), min(300, acked))
            lost = [i for i in probe if f"c{i}" not in
                    {m.id for m in client.recall("chaos", batches[i // 200][i % 200], k=10)}]
            deadline = time.monotonic() + 120
            while client.stats()["spaces"]["chaos"]["indexed"] < acked and time.monotonic() < deadline:
                time.sleep(0.2)
            indexed = client.stats()["spaces"]["chaos"]["indexed"]
    ok = acked == sent and stats["count"] == acked and not lost and indexed == acked
    print(json.dumps({"chaos": "kill_anything", "seed": seed, "sent": sent, "acked": acked,
                      "stored": stats["count"], "indexed": indexed, "killed": killed,
                      "lost_in_probe": lost[:10], "ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
