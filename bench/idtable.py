"""Id table growth: how long a batch of new ids waits for the id index
(kernels/idindex.py) as it grows, its entries moved with the batches that
follow a growth, against moved all at once within the batch that grows it.

    python -m bench idtable [--n 1048576] [--batch 256] [--quick]

`--n` random 64-bit id hashes are entered in batches of `--batch`, the way
the front enters each published batch (`idindex.insert_rows`), into a table
grown from empty, twice: as the engine does (`incremental`), and with every
entry moved within the batch that grew the table (`at once`: `_move` of the
whole old table, which costs what a rehash did). Then every table answers
lookups of 65,536 stored hashes in batches of `--batch`. Prints JSON lines
(bench, way, n, batch, growths, slowest_ms: the slowest batch, batch_p99_ms,
total_ms: all batches, lookup_us: one lookup batch) and a table with ratios
to the first row.
"""

from __future__ import annotations

import time

import numpy as np

from engram_shm.kernels import idindex

from .report import emit, parser, table

WAYS = ("at once", "incremental")
LOOKUPS = 65_536


def fill(hashes: np.ndarray, batch: int, at_once: bool) -> tuple[idindex.IdTable, np.ndarray, int]:
    """The table of `hashes` entered batch by batch, each batch's seconds,
    and the number of growths."""
    ones = np.ones(len(hashes), np.uint64)
    t, seconds, growths = idindex.new_table(), [], 0
    for lo in range(0, len(hashes), batch):
        start = time.perf_counter()
        grown = idindex.insert_rows(t, hashes, ones, 0, lo, min(lo + batch, len(hashes)))
        if at_once and grown.old.shape[0]:  # all moved now (the next insert lets the old table go)
            idindex._move(grown.old, grown.moved, grown.entries, grown.old.shape[0])
        seconds.append(time.perf_counter() - start)
        growths += grown.entries is not t.entries
        t = grown
    return t, np.array(seconds), growths


def lookup_us(t: idindex.IdTable, queries: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for lo in range(0, len(queries), batch):
        rows, _ = idindex.lookup(t, queries[lo:lo + batch])
        assert len(rows) >= min(batch, len(queries) - lo), "a stored hash was not found"
    return (time.perf_counter() - start) / -(-len(queries) // batch) * 1e6


COLUMNS = [("way", "way", ""), ("n", "n", "d"), ("batch", "batch", "d"), ("growths", "growths", "d"),
           ("slowest ms", "slowest_ms", ".2f"), ("x", "x slowest_ms", ".2f"),
           ("batch p99 ms", "batch_p99_ms", ".3f"), ("total ms", "total_ms", ".1f"),
           ("x", "x total_ms", ".2f"), ("lookup us", "lookup_us", ".1f")]


def main(argv=None, prog="python -m bench idtable") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=1 << 20, help="ids entered")
    ap.add_argument("--batch", type=int, default=256, help="ids per insert and per lookup")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small run (65,536 ids)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 1 << 16
    rng = np.random.default_rng(args.seed)
    hashes = rng.integers(0, 2 ** 63, args.n, dtype=np.int64).view(np.uint64)
    queries = hashes[rng.integers(0, args.n, LOOKUPS)]
    warm, _, _ = fill(hashes[:4 * args.batch], args.batch, False)  # the kernels loaded before any timing
    lookup_us(warm, hashes[:args.batch], args.batch)
    print(f"# seed {args.seed}: {args.n} random id hashes in batches of {args.batch}", flush=True)
    rows = []
    for way in WAYS:
        t, seconds, growths = fill(hashes, args.batch, way == "at once")
        ms = seconds * 1e3
        rows.append(emit({"bench": "idtable", "way": way, "n": args.n, "batch": args.batch,
                          "growths": growths, "slowest_ms": round(float(ms.max()), 3),
                          "batch_p99_ms": round(float(np.percentile(ms, 99)), 4),
                          "total_ms": round(float(ms.sum()), 1),
                          "lookup_us": round(lookup_us(t, queries, args.batch), 1)}))
    title = f"id table growth, {args.n} ids in batches of {args.batch} (x {rows[0]['way']})"
    print(table(title, rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
