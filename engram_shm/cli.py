"""engram-shm: the command line. Engine options are derived from EngineConfig,
so every option has a flag, an ENGRAM_* variable and the same help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import tomllib

import numpy as np

from .config import EngineConfig, env_var
from .errors import EngramError, InvalidArgument


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (also ENGRAM_<OPTION> variables)")
    for f in dataclasses.fields(EngineConfig):
        flags = ["--" + f.name.replace("_", "-")] + (["--data"] if f.name == "data_dir" else [])
        kind = type(f.default)
        shape = {"action": argparse.BooleanOptionalAction} if kind is bool else \
            {"type": kind, "metavar": kind.__name__.upper()}
        group.add_argument(*flags, dest=f.name, default=None, **shape,
                           help=f"{f.metadata['help']} [{env_var(f.name)}, default {f.default!r}]")


def config_from(args: argparse.Namespace) -> EngineConfig:
    """Defaults, then the TOML file (--config), then ENGRAM_* variables, then flags."""
    values = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    env = EngineConfig.from_env()
    defaults = EngineConfig()
    values.update({f.name: getattr(env, f.name) for f in dataclasses.fields(EngineConfig)
                   if getattr(env, f.name) != getattr(defaults, f.name)})
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
                   if getattr(args, f.name, None) is not None})
    return EngineConfig(**values)


def load_toml(path: str) -> dict:
    known = {f.name: f for f in dataclasses.fields(EngineConfig)}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read config file {path}: {e}") from None
    data = data.get("engram", data)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidArgument(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
    for name, value in data.items():
        kind = type(known[name].default)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise InvalidArgument(f"{path}: {name} must be {kind.__name__}, got {value!r}")
    return data


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(config_from(args), n=args.n, dim=args.dim, batch=args.batch)
    if args.json:
        print(json.dumps(report))
    return 0


DEFAULT_DATA_DIR = "./engram-data"


def cmd_serve(args) -> int:
    from .auth.gate import exposed_addresses
    from .transport.server import Server

    config = config_from(args)
    if not config.data_dir:
        config = dataclasses.replace(config, data_dir=DEFAULT_DATA_DIR)
    server = Server(config)
    if server.recovered is not None:
        print(f"recovered {server.recovered.summary()}", flush=True)

    def ready(s):
        where = (f"data in {s.config.data_dir} (fsync {s.config.fsync})" if s.config.durable else
                 "MEMORY ONLY (--data none): nothing survives a stop")
        access = (f"clients need a key (server key {s.server_key_file})" if s.server_key_file else
                  "no authentication")
        stream = f" and ws://{s.config.ws_host}:{s.config.ws_port}/v1/stream" if s.config.ws_port else ""
        print(f"engram-shm serving engine {s.name} on {s.config.endpoint}{stream} "
              f"({s.config.worker_count} index workers); {where}; {access}; Ctrl-C stops", flush=True)
        for address, local in exposed_addresses(s.config):
            if not local:
                print(f"WARNING: --insecure: {address} is open to every machine that reaches it, "
                      "without authentication", file=sys.stderr, flush=True)

    server.serve_forever(ready)
    print("stopped; shared memory removed", flush=True)
    return 0


def cmd_checkpoint(args) -> int:
    from .transport.client import Client

    with Client(args.endpoint, timeout=args.timeout) as client:
        started = time.monotonic()
        generation = client.checkpoint()
    print(f"checkpoint complete at generation {generation} in {time.monotonic() - started:.2f} s")
    return 0


def _keys_config(args) -> EngineConfig:
    """The data and keys directories of `keys` (as `serve` would find them)."""
    return EngineConfig(data_dir=args.data_dir or DEFAULT_DATA_DIR, keys_dir=args.keys_dir or "")


def cmd_keys(args) -> int:
    from .auth.acl import Acl
    from .auth.keys import KeysDir

    config = _keys_config(args)
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


def cmd_observe(args) -> int:
    from tqdm import tqdm

    from .transport.client import Client

    ids, vectors, what, when, confidence = _read_observations(args.file)
    vectors = np.asarray(vectors, dtype=np.float32)
    step = args.batch
    with Client(args.endpoint, priority=args.priority, batch_size=step) as client, \
            tqdm(total=len(ids), unit="obs", desc=f"observe {args.space}", file=sys.stderr) as bar:
        for lo in range(0, len(ids), step):
            sl = slice(lo, lo + step)
            client.observe_batch(args.space, ids[sl], vectors[sl],
                                 what[sl] if what else None, when[sl] if when else None,
                                 confidence[sl] if confidence else None)
            bar.update(min(step, len(ids) - lo))
        last = client.flush()
    print(f"{len(ids)} observations acked (last sequence {last})")
    return 0


def cmd_recall(args) -> int:
    from .transport.client import Client

    cue = np.asarray(json.loads(args.cue) if args.cue.lstrip().startswith("[")
                     else np.load(args.cue), dtype=np.float32)
    with Client(args.endpoint) as client:
        for m in client.recall(args.space, cue, k=args.k, consistency=args.consistency):
            print(json.dumps(dataclasses.asdict(m), ensure_ascii=False))
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

    serve = sub.add_parser("serve", help="run the server: ZeroMQ front, index workers, supervisor")
    serve.add_argument("--config", help="TOML file of engine options (top level or [engram] table)")
    add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    observe = sub.add_parser("observe", help="stream observations from a file to a server")
    observe.add_argument("file", help="JSON lines ({id, vector, what?, when?, confidence?}) or .npz "
                                      "(vectors, ids?, what?, when?, confidence?)")
    observe.add_argument("--space", required=True)
    observe.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    observe.add_argument("--batch", type=int, default=256, help="observations per message")
    observe.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    observe.set_defaults(func=cmd_observe)

    recall = sub.add_parser("recall", help="recall from a server; prints JSON lines, best first")
    recall.add_argument("space")
    recall.add_argument("cue", help="a JSON list of floats, or a .npy file")
    recall.add_argument("--k", type=int, default=10)
    recall.add_argument("--consistency", default="strong", choices=["strong", "indexed"])
    recall.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    recall.set_defaults(func=cmd_recall)

    ckpt = sub.add_parser("checkpoint", help="ask a running server for a checkpoint; returns when "
                                             "it is complete")
    ckpt.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ckpt.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    ckpt.set_defaults(func=cmd_checkpoint)

    keys = sub.add_parser("keys", help="client keys and their access (--auth curve; docs/security.md)")
    keys.add_argument("action", choices=["new", "add", "list", "revoke", "reload"],
                      help="new NAME: make and accept a key pair; add NAME PUBLIC_KEY_FILE: accept a "
                           "client's own key; list; revoke NAME; reload: have the running server read "
                           "the keys and acl.toml again (new, add and revoke reload too)")
    keys.add_argument("name", nargs="?", help="the key's name (new, add, revoke)")
    keys.add_argument("public_key", nargs="?", help="add: the client's public key file")
    keys.add_argument("--data", dest="data_dir", help=f"data directory (default {DEFAULT_DATA_DIR})")
    keys.add_argument("--keys-dir", help="keys directory (default DATA/keys)")
    keys.set_defaults(func=cmd_keys)

    verify = sub.add_parser("verify", help="check a data directory offline (checkpoints, log "
                                           "records, checksums) and report what it holds")
    verify.add_argument("dir")
    verify.add_argument("--json", action="store_true", help="print the whole report as JSON")
    verify.set_defaults(func=cmd_verify)

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
