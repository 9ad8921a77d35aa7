"""One entry point for every benchmark.

    python -m bench SUBCOMMAND [--quick] [options]
    python -m bench SUBCOMMAND --help

Each subcommand prints JSON lines on stdout, one object per measurement,
stamped with the machine and the date, then a table. `report` runs the suite
(or reads saved JSON lines) and writes docs/benchmarks.md with its plots.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "stream": "the streaming case against milvus-lite, chromadb, qdrant (local) and hnswlib",
    "ramp": "offered load 10K..200K observations/s from client processes: where backpressure engages",
    "recall": "recall latency at 100K and 1M, idle and under ingestion, strong and indexed, many clients",
    "scaling": "one hot space indexed by 1..cores worker processes",
    "batch": "batch size against ingest rate and ack latency",
    "memory": "bytes per observation at 1M: shared, resident and on disk",
    "ann": "build and query against hnswlib and faiss, one thread and two",
    "segments": "recall over a space grown through many segments, compacted, and one graph of the same rows",
    "ingest": "the front's accepted rate against the raw transport ceiling",
    "restart": "recovery time from checkpoint and log",
    "idtable": "the id index's growth: entries moved with the batches against all at once",
    "websocket": "the WebSocket bridge against the ZeroMQ client",
    "isolation": "recall latency while a flood of batches arrives",
    "cluster": "aggregate ingest with 1, 2 and 3 nodes, and the time of a move of a space",
    "report": "run the suite (or read saved JSON lines) and write docs/benchmarks.md",
}

MODULES = {"report": "suite"}  # bench/report.py is what every benchmark prints with


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [__doc__.strip(), "", "subcommands:"]
    lines += [f"  {name.ljust(width)}  {what}" for name, what in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
    module.main(rest, prog=f"python -m bench {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
