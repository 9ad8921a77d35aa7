"""engram-shm: the command line. Engine options are derived from EngineConfig,
so every option has a flag, an ENGRAM_* variable and the same help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .config import EngineConfig, env_var
from .errors import EngramError


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (also ENGRAM_<OPTION> variables)")
    for f in dataclasses.fields(EngineConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                           default=None, metavar=type(f.default).__name__.upper(),
                           help=f"{f.metadata['help']} [{env_var(f.name)}, default {f.default!r}]")


def config_from(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_env(**{f.name: getattr(args, f.name, None)
                                    for f in dataclasses.fields(EngineConfig)})


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(config_from(args), n=args.n, dim=args.dim, batch=args.batch)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_gc(args) -> int:
    from .store.catalog import collect_stale

    removed = collect_stale(min_age_s=args.min_age)
    for name in removed:
        print(f"removed /dev/shm/{name}")
    print(f"{len(removed)} stale block(s) removed")
    return 0


def cmd_warm(args) -> int:
    from .kernels.warm import warm

    print(f"kernels ready in {warm():.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-shm", description="Streaming memory engine on "
                                     "shared memory, Numba HNSW and ZeroMQ.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stream synthetic observations into an embedded engine, "
                                       "recall while ingesting, and report what it measured")
    demo.add_argument("--n", type=int, default=20_000, help="observations to stream")
    demo.add_argument("--dim", type=int, default=384, help="embedding dimension")
    demo.add_argument("--batch", type=int, default=256, help="observations per batch")
    demo.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_config_flags(demo)
    demo.set_defaults(func=cmd_demo)

    gc = sub.add_parser("gc", help="remove shared memory left by engines that are no longer "
                                   "running (never a running engine's)")
    gc.add_argument("--min-age", type=float, default=10.0,
                    help="seconds an orphan segment must have existed before removal")
    gc.set_defaults(func=cmd_gc)

    warm = sub.add_parser("warm", help="compile the Numba kernels into the on-disk cache")
    warm.set_defaults(func=cmd_warm)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except EngramError as e:
        print(f"engram-shm: error [{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
