"""Batch: batch size against ingest rate and ack latency, through the Client.

    python -m bench batch [--sizes 1,10,50,100,256,1000] [--n 100000] [--seconds 8] [--dim 768] [--quick]

One `engram-shm serve` (two index workers, a data directory with its
write-ahead log under fsync=interval: the figures include durability) whose
window no scan budget bounds (`bench.unbounded_window`): no backpressure, so
what is measured is the rate of accepting, as in `bench ingest`, while the
index workers run. For each batch size, a fresh session sends `--n`
observations, or what it manages in `--seconds` (which bounds the small
sizes), as fast as the Client goes: it pipelines its batches within the
granted credit (`max_credit`, 4096 observations by default, in flight), so a
batch's ack latency, from its first send to its ack, includes the wait
behind the batches ahead of it. Vectors are random unit vectors made up
front (`bench.ramp.Feed`), ids distinct; the space exists before the first
size (a warm-up batch). The server is stopped once its backlog is indexed or
after `--index-wait` s.

Prints JSON lines (bench, batch, n, dim, obs_per_s from the first send to the
last ack, ack_p50_ms, ack_p99_ms) and a table with each rate as a ratio to
the first row's (batch 1 by default).
"""

from __future__ import annotations

import time

from engram_shm.transport.launch import running_server

from . import unbounded_window
from .ramp import NO_DRAIN, Feed, TimedClient, ids, wait_indexed, warm_up
from .report import emit, parser, percentiles_ms, table

SPACE = "batch"


def run(endpoint: str, feed: Feed, at: int, batch: int, n: int, seconds: float, dim: int) -> dict:
    """Send up to n observations (from observation `at` on) in batches of
    `batch`, within `seconds`; wait for every ack."""
    with TimedClient(endpoint, batch_size=batch, timeout=60) as client:
        handed = 0
        start = time.perf_counter()
        while handed < n and time.perf_counter() - start < seconds:
            client.observe_batch(SPACE, ids("b", at + handed, batch), feed.rows(at + handed, batch))
            handed += batch
        client.flush()
        elapsed = time.perf_counter() - start
        acked, latencies = client.last_acked, [s for _, s, _ in client.acks]
        client.close(drain=False)
    return {"bench": "batch", "batch": batch, "n": acked, "dim": dim, "obs_per_s": round(acked / elapsed, 1),
            **percentiles_ms(latencies, "ack"), "batches": len(latencies), "seconds": round(elapsed, 3)}


COLUMNS = [("batch", "batch", "d"), ("n", "n", "d"), ("obs/s", "obs_per_s", ".0f"),
           ("x first", "x obs_per_s", ".2f"), ("ack p50 ms", "ack_p50_ms", ".2f"),
           ("ack p99 ms", "ack_p99_ms", ".2f"), ("seconds", "seconds", ".2f")]


def main(argv=None, prog="python -m bench batch") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--sizes", default="1,10,50,100,256,1000", help="batch sizes, comma-separated")
    ap.add_argument("--n", type=int, default=100_000, help="observations sent per batch size at most")
    ap.add_argument("--seconds", type=float, default=8.0, help="time per batch size at most")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--pool", type=int, default=16384, help="vectors made up front")
    ap.add_argument("--index-wait", type=float, default=30.0,
                    help="longest wait (s) for the backlog to be indexed before the server stops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (5,000 x 64 dims or 1.5 s per size)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seconds, args.dim, args.pool = 5000, 1.5, 64, 4096
    sizes = [int(s) for s in args.sizes.split(",")]
    feed = Feed(args.pool, args.dim, args.seed)
    print(f"# seed {args.seed}: {args.n} random unit vectors x {args.dim} per batch size at most, "
          f"or {args.seconds:g} s", flush=True)
    # The ring holds everything sent: no backpressure.
    window = unbounded_window(len(sizes) * (args.n + max(sizes)) + 1024)
    rows, at = [], 0
    with running_server(*window, *NO_DRAIN) as (endpoint, _, _):
        warm_up(endpoint, SPACE, 256, args.dim, args.seed + 1)
        for batch in sizes:
            rows.append(emit(run(endpoint, feed, at, batch, args.n, args.seconds, args.dim)))
            at += rows[-1]["n"]
        wait_indexed(endpoint, args.index_wait, SPACE)
    print(table(f"batch size against ingest rate, through the Client, {args.dim} dims "
                f"(x batch {rows[0]['batch']})", rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
