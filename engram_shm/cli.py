"""engram-shm: the command line. Engine options are derived from EngineConfig,
so every option has a flag, an ENGRAM_* variable and the same help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time

import numpy as np

from .config import EngineConfig, env_var
from .errors import EngramError, InvalidArgument
from .observability import logs

# What a command that talks to a server obeys: one server (endpoint), or a
# cluster (its etcd endpoints, or any node's endpoint: docs/cluster.md).
CLIENT_OPTIONS = ("endpoint", "cluster", "cluster_name", "log_level", "log_format")
LOG_OPTIONS = ("log_level", "log_format")
DEFAULT_DATA_DIR = "./engram-data"
# What `serve` assumes below the file, the environment and the flags: a data
# directory, and index writers as processes (a server has no other kind).
SERVE_DEFAULTS = {"data_dir": DEFAULT_DATA_DIR, "worker_mode": "process"}


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A flag for each option (or for the options `names`), and --config."""
    parser.add_argument("--config", help="TOML file of engine options (top level or [engram] table)")
    group = parser.add_argument_group("engine options (also ENGRAM_<OPTION> variables)")
    for f in dataclasses.fields(EngineConfig):
        if names is not None and f.name not in names:
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["--data"] if f.name == "data_dir" else [])
        kind = type(f.default)
        shape = {"action": argparse.BooleanOptionalAction} if kind is bool else \
            {"type": kind, "metavar": kind.__name__.upper()}
        group.add_argument(*flags, dest=f.name, default=None, **shape,
                           help=f"{f.metadata['help']} [{env_var(f.name)}, default {f.default!r}]")


def config_from(args: argparse.Namespace, base: dict | None = None) -> EngineConfig:
    """Defaults, then `base`, then the TOML file (--config), then ENGRAM_*
    variables, then flags (EngineConfig.layered)."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(EngineConfig)}
    return EngineConfig.layered(base, getattr(args, "config", None), os.environ, flags)


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.settings, n=args.n, dim=args.dim, batch=args.batch)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_serve(args) -> int:
    from .auth.gate import exposed_addresses
    from .kernels.warm import skip_blas_probe
    from .transport.server import Server

    skip_blas_probe()  # this process runs nothing but the server
    server = Server(args.settings)
    if server.recovered is not None:
        print(f"recovered {server.recovered.summary()}", flush=True)

    def ready(s):
        where = (f"data in {s.config.data_dir} (fsync {s.config.fsync})" if s.config.durable else
                 "MEMORY ONLY (--data none): nothing survives a stop")
        access = (f"clients need a key (server key {s.server_key_file})" if s.server_key_file else
                  "no authentication")
        stream = f" and ws://{s.config.ws_host}:{s.config.ws_port}/v1/stream" if s.config.ws_port else ""
        metrics = f"metrics on {s.metrics_url}" if s.metrics_url else "metrics off"
        print(f"engram-shm serving engine {s.name} on {s.config.endpoint}{stream} "
              f"({s.config.worker_count} index workers); {where}; {access}; {metrics}; Ctrl-C stops",
              flush=True)
        for address, local in exposed_addresses(s.config):
            if not local:
                print(f"WARNING: --insecure: {address} is open to every machine that reaches it, "
                      "without authentication", file=sys.stderr, flush=True)

    server.serve_forever(ready)
    print("stopped; shared memory removed", flush=True)
    return 0


def cmd_checkpoint(args) -> int:
    from .transport.client import Client

    with Client(args.settings.endpoint, timeout=args.timeout) as client:
        started = time.monotonic()
        generation = client.checkpoint()
    print(f"checkpoint complete at generation {generation} in {time.monotonic() - started:.2f} s")
    return 0


def cmd_keys(args) -> int:
    from .auth.acl import Acl
    from .auth.keys import KeysDir

    config = args.settings
    keys = KeysDir(config.keys_path)
    if args.action == "new":
        path = keys.new(args.name)
        print(f"key {args.name!r} accepted; its key pair (secret: hand it to the client, then delete "
              f"it here) is {path}\nthe server's public key is {keys.server_public_file}\n"
              f"grant it spaces in {keys.acl}, then `engram-shm keys reload`")
    elif args.action == "add":
        if not args.public_key:
            raise InvalidArgument("keys add NAME PUBLIC_KEY_FILE: the client's public key file is missing")
        print(f"key {args.name!r} accepted from {args.public_key} as {keys.add(args.name, args.public_key)}")
    elif args.action == "list":
        acl = Acl.load(keys.acl)
        for row in keys.listing():
            grants = {g.pattern: sorted(g.rights) for g in acl.grants.get(row["name"], ())}
            print(json.dumps({**row, "grants": grants}))
    elif args.action == "revoke":
        keys.revoke(args.name)
        print(f"key {args.name!r} revoked")
    if args.action in ("reload", "revoke", "new", "add"):
        Acl.load(keys.acl)  # a broken ACL is reported here, not only in the server's log
        print(_signal_server(config, signal.SIGHUP))
    return 0


def _signal_server(config: EngineConfig, signum) -> str:
    """Send `signum` to the server holding the data directory's lock."""
    from .store.datadir import holder_pid

    pid = holder_pid(os.path.join(config.data_dir, "LOCK")) if config.durable else None
    if pid is None:
        return f"no server holds {config.data_dir}: the change applies when one starts (or send it SIGHUP)"
    os.kill(pid, signum)
    return f"the server (pid {pid}) reloads its keys and ACL"


def cmd_verify(args) -> int:
    from .store.verify import verify

    report = verify(args.dir, progress=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else report["summary"])
    return 0 if report["ok"] else 1


def _read_observations(path: str):
    """(ids, vectors, what, when, confidence) from JSON lines or an .npz file."""
    if path.endswith(".npz"):
        data = np.load(path, allow_pickle=False)
        n = len(data["vectors"])
        ids = [str(x) for x in data["ids"]] if "ids" in data else [str(i) for i in range(n)]
        pick = lambda k: data[k].tolist() if k in data else None
        return ids, data["vectors"], pick("what"), pick("when"), pick("confidence")
    ids, vectors, what, when, confidence = [], [], [], [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids.append(str(row["id"]))
                vectors.append(row["vector"])
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgument(f"{path}:{number}: needs a JSON object with id and vector "
                                      f"({e})") from None
            what.append(row.get("what", ""))
            when.append(row.get("when"))
            confidence.append(row.get("confidence", 1.0))
    now = time.time()
    return ids, vectors, what, [now if w is None else w for w in when], confidence


def _client(settings: EngineConfig, **options):
    """A Client of the server at --endpoint, or with --cluster a ClusterClient
    that routes each space to its owner."""
    if settings.cluster:
        from .cluster.client import ClusterClient

        return ClusterClient(settings.cluster, cluster_name=settings.cluster_name, **options)
    from .transport.client import Client

    return Client(settings.endpoint, **options)


def cmd_observe(args) -> int:
    from tqdm import tqdm

    ids, vectors, what, when, confidence = _read_observations(args.file)
    vectors = np.asarray(vectors, dtype=np.float32)
    step = args.batch
    with _client(args.settings, priority=args.priority, batch_size=step) as client, \
            tqdm(total=len(ids), unit="obs", desc=f"observe {args.space}", file=sys.stderr) as bar:
        for lo in range(0, len(ids), step):
            sl = slice(lo, lo + step)
            client.observe_batch(args.space, ids[sl], vectors[sl],
                                 what[sl] if what else None, when[sl] if when else None,
                                 confidence[sl] if confidence else None)
            bar.update(min(step, len(ids) - lo))
        client.flush()
    print(f"{len(ids)} observations acked")
    return 0


def cmd_recall(args) -> int:
    cue = np.asarray(json.loads(args.cue) if args.cue.lstrip().startswith("[")
                     else np.load(args.cue), dtype=np.float32)
    with _client(args.settings) as client:
        for m in client.recall(args.space, cue, k=args.k, consistency=args.consistency):
            print(json.dumps(m._asdict(), ensure_ascii=False))
    return 0


def cmd_stats(args) -> int:
    from .observability.status import print_stats
    from .transport.client import Client

    with Client(args.settings.endpoint) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_stats(stats)
    return 0


def cmd_top(args) -> int:
    from .observability.status import top
    from .transport.client import Client

    with Client(args.settings.endpoint) as client:
        top(client.stats, args.interval, args.count)
    return 0


def cmd_cluster(args) -> int:
    from .cluster import operations
    from .cluster.client import coordinator_for

    if not args.settings.cluster:
        raise InvalidArgument("give the cluster: --cluster ETCD_ENDPOINTS, or any node's tcp://HOST:PORT")
    coord = coordinator_for(args.settings.cluster, args.settings.cluster_name)
    say = lambda text: print(text, file=sys.stderr, flush=True)
    if args.action == "status":
        report = operations.status(coord)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"{len(report['members'])} live member(s), {len(report['spaces'])} space(s) "
              f"(etcd revision {report['revision']})")
        for node, info in sorted(report["members"].items()):
            print(f"  {node:24} {info['endpoint']:28} spaces {info.get('spaces', '?'):>5} "
                  f"{info.get('error', '')}")
        for name, space in report["spaces"].items():
            live = "" if space["live"] else "  (owner not live: unavailable)"
            print(f"  {name:32} {space['owner']:24} epoch {space['epoch']:>4} "
                  f"count {space['count'] if space['count'] is not None else '?':>10}{live}")
        return 0
    usage = {"move": "SPACE NODE", "reassign": "SPACE NODE", "drain": "NODE"}[args.action]
    if len(args.args) != len(usage.split()):
        raise InvalidArgument(f"cluster {args.action} takes {usage}")
    if args.action == "move":
        reports = [operations.move(coord, *args.args, progress=say)]
    elif args.action == "drain":
        reports = operations.drain(coord, args.args[0], progress=say)
    else:
        owner = operations.reassign(coord, *args.args)
        print(f"space {args.args[0]} reassigned to {owner.node} at epoch {owner.epoch}, nothing copied")
        return 0
    for r in reports:
        print(json.dumps(dataclasses.asdict(r)) if args.json else
              f"space {r.space} moved {r.source} -> {r.target} (epoch {r.epoch}): {r.copied:,} rows copied, "
              f"a tail of {r.tail:,}, {r.sessions} session(s); {r.seconds:.2f} s, writes waited "
              f"{r.frozen_seconds:.2f} s")
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
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stream synthetic observations into an embedded engine, "
                                       "recall while ingesting, and report what it measured")
    demo.add_argument("--n", type=int, default=20_000, help="observations to stream")
    demo.add_argument("--dim", type=int, default=384, help="embedding dimension")
    demo.add_argument("--batch", type=int, default=256, help="observations per batch")
    demo.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_config_flags(demo)
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run the server: ZeroMQ front, index workers, supervisor")
    add_config_flags(serve)
    serve.set_defaults(func=cmd_serve, base=SERVE_DEFAULTS)

    observe = sub.add_parser("observe", help="stream observations from a file to a server")
    observe.add_argument("file", help="JSON lines ({id, vector, what?, when?, confidence?}) or .npz "
                                      "(vectors, ids?, what?, when?, confidence?)")
    observe.add_argument("--space", required=True)
    add_config_flags(observe, CLIENT_OPTIONS)
    observe.add_argument("--batch", type=int, default=256, help="observations per message")
    observe.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    observe.set_defaults(func=cmd_observe)

    recall = sub.add_parser("recall", help="recall from a server; prints JSON lines, best first")
    recall.add_argument("space")
    recall.add_argument("cue", help="a JSON list of floats, or a .npy file")
    recall.add_argument("--k", type=int, default=10)
    recall.add_argument("--consistency", default="strong", choices=["strong", "indexed"])
    add_config_flags(recall, CLIENT_OPTIONS)
    recall.set_defaults(func=cmd_recall)

    ckpt = sub.add_parser("checkpoint", help="ask a running server for a checkpoint; returns when "
                                             "it is complete")
    add_config_flags(ckpt, CLIENT_OPTIONS)
    ckpt.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    ckpt.set_defaults(func=cmd_checkpoint)

    keys = sub.add_parser("keys", help="client keys and their access (--auth curve; docs/security.md)")
    keys.add_argument("action", choices=["new", "add", "list", "revoke", "reload"],
                      help="new NAME: make and accept a key pair; add NAME PUBLIC_KEY_FILE: accept a "
                           "client's own key; list; revoke NAME; reload: have the running server read "
                           "the keys and acl.toml again (new, add and revoke reload too)")
    keys.add_argument("name", nargs="?", help="the key's name (new, add, revoke)")
    keys.add_argument("public_key", nargs="?", help="add: the client's public key file")
    add_config_flags(keys, ("data_dir", "keys_dir", *LOG_OPTIONS))
    keys.set_defaults(func=cmd_keys, base={"data_dir": DEFAULT_DATA_DIR})

    verify = sub.add_parser("verify", help="check a data directory offline (checkpoints, log "
                                           "records, checksums) and report what it holds")
    verify.add_argument("dir")
    verify.add_argument("--json", action="store_true", help="print the whole report as JSON")
    add_config_flags(verify, LOG_OPTIONS)
    verify.set_defaults(func=cmd_verify)

    cluster = sub.add_parser("cluster", help="a cluster's members, spaces and moves (docs/cluster.md)")
    cluster.add_argument("action", choices=["status", "move", "drain", "reassign"],
                         help="status; move SPACE NODE: copy the space to NODE and switch its owner; "
                              "drain NODE: move every space off NODE; reassign SPACE NODE: give a space "
                              "whose owner is gone to NODE, copying nothing (what only the old owner "
                              "held is not on NODE)")
    cluster.add_argument("args", nargs="*", help="SPACE NODE (move, reassign), NODE (drain)")
    cluster.add_argument("--json", action="store_true", help="print JSON")
    add_config_flags(cluster, CLIENT_OPTIONS)
    cluster.set_defaults(func=cmd_cluster)

    gc = sub.add_parser("gc", help="remove shared memory left by engines that are no longer "
                                   "running (never a running engine's)")
    gc.add_argument("--min-age", type=float, default=10.0,
                    help="seconds an orphan segment must have existed before removal")
    add_config_flags(gc, LOG_OPTIONS)
    gc.set_defaults(func=cmd_gc)

    warm = sub.add_parser("warm", help="compile the Numba kernels into the on-disk cache")
    add_config_flags(warm, LOG_OPTIONS)
    warm.set_defaults(func=cmd_warm)

    stats = sub.add_parser("stats", help="a running server's figures, one table per part (or --json)")
    stats.add_argument("--json", action="store_true", help="print the server's stats reply as JSON")
    add_config_flags(stats, CLIENT_OPTIONS)
    stats.set_defaults(func=cmd_stats)

    top = sub.add_parser("top", help="a live view of a running server's spaces: counts, window, "
                                     "pressure, rates, latency (Ctrl-C quits)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--count", type=int, default=0, help="refreshes before exiting; 0: until Ctrl-C")
    add_config_flags(top, CLIENT_OPTIONS)
    top.set_defaults(func=cmd_top)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.settings = config_from(args, getattr(args, "base", None))
        logs.configure(args.settings, "serve" if args.command == "serve" else f"cli-{args.command}")
        return args.func(args)
    except EngramError as e:
        print(f"engram-shm: error [{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
