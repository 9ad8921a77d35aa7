"""Recall latency under sustained ingestion, on a space that already holds
`--n` observations.

    python -m bench.recall_load [--n 200000] [--dim 768] [--seconds 30] [--quick]

The embedded engine (f16, one index writer per core, default segments)
first takes `--n` observations and indexes them; the rate it indexed at is
the rate it keeps up with. Then a producer streams batches of 256 at
`--load` (default 0.7) times that rate for `--seconds`, while a reader
recalls (k=10, consistency "strong": every acked observation, indexed or
not, ef=64) ten times a second with held-out cues. Reports recall p50/p99
during ingestion and idle, the unindexed window's peak, and the space's
segments. Prints JSON lines, then a table.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from engram_shm import Engine
from engram_shm.synthetic import clustered

from .report import emit, parser, percentiles_ms, table

BATCH = 256


def rows(n: int, dim: int, seed: int) -> np.ndarray:
    return clustered(n, dim, clusters=max(10, n // 10), spread=1.0, seed=seed)


def timed_recalls(engine: Engine, cues: np.ndarray, stop: threading.Event, per_s: float) -> list[float]:
    latencies, i = [], 0
    next_at = time.perf_counter()
    while not stop.is_set():
        next_at += 1.0 / per_s
        time.sleep(max(0.0, next_at - time.perf_counter()))
        start = time.perf_counter()
        engine.recall("load", cues[i % len(cues)], k=10, consistency="strong")
        latencies.append(time.perf_counter() - start)
        i += 1
    return latencies


def run(n: int, dim: int, seconds: float, load: float, seed: int) -> dict:
    base = rows(n, dim, seed)
    cues = rows(200, dim, seed + 1)
    with Engine(ring_capacity=1 << 20) as engine:
        engine.create_space("load", dim=dim)
        start = time.perf_counter()
        for lo in range(0, n, 4096):
            engine.observe("load", [f"b{i}" for i in range(lo, min(n, lo + 4096))], base[lo:lo + 4096])
        engine.wait_indexed()
        rate = n / (time.perf_counter() - start)
        stop = threading.Event()
        idle = []
        reader = threading.Thread(target=lambda: idle.extend(timed_recalls(engine, cues, stop, 10.0)))
        reader.start()
        time.sleep(min(seconds, 5.0))
        stop.set()
        reader.join()

        stop.clear()
        busy, window, sent = [], [0], [0]
        reader = threading.Thread(target=lambda: busy.extend(timed_recalls(engine, cues, stop, 10.0)))
        fresh = rows(4096, dim, seed + 2)
        reader.start()
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            lo = sent[0]
            at = lo % len(fresh)
            engine.observe("load", [f"s{i}" for i in range(lo, lo + BATCH)], fresh[at:at + BATCH])
            sent[0] += BATCH
            window[0] = max(window[0], engine.stats()["spaces"]["load"]["window"])
            time.sleep(max(0.0, began + sent[0] / (load * rate) - time.perf_counter()))
        stop.set()
        reader.join()
        ingest_rate = sent[0] / (time.perf_counter() - began)
        space = engine.stats()["spaces"]["load"]
    return {"bench": "recall_load", "n": n, "dim": dim, "dtype": "f16", "indexed_per_s": round(rate, 1),
            "ingest_per_s": round(ingest_rate, 1), "recalls": len(busy), "window_peak": window[0],
            "segments": space["segments"], **percentiles_ms(busy, "recall", 3),
            **percentiles_ms(idle, "idle_recall", 3)}


COLUMNS = [("n", "n", "d"), ("dim", "dim", "d"), ("indexed/s", "indexed_per_s", ".0f"),
           ("ingest/s", "ingest_per_s", ".0f"), ("segments", "segments", "d"),
           ("window peak", "window_peak", "d"), ("recalls", "recalls", "d"),
           ("p50 ms", "recall_p50_ms", ".2f"), ("p99 ms", "recall_p99_ms", ".2f"),
           ("idle p50", "idle_recall_p50_ms", ".2f"), ("idle p99", "idle_recall_p99_ms", ".2f")]


def main(argv=None, prog="python -m bench recall") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", default="200000", help="observations before ingestion starts, comma-separated")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--load", type=float, default=0.7, help="ingest rate as a share of the indexing rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (5000 x 64, 3 s) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.seconds = "5000", 64, 3.0
    from engram_shm.kernels.warm import warm
    warm()
    out = [emit(run(int(n), args.dim, args.seconds, args.load, args.seed)) for n in args.n.split(",")]
    print(table("recall under sustained ingestion", out, COLUMNS))
    return out


if __name__ == "__main__":
    main()
