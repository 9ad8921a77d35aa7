"""The one list of engine options.

`EngineConfig` is frozen; every field has a help text and an `ENGRAM_<FIELD>`
environment variable, and the CLI derives its flags from these fields
(tests/test_config.py pins the two together).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field

from .errors import InvalidArgument

DTYPES = ("f32", "f16", "int8")  # append only: the catalog stores the index
METRICS = ("cosine", "ip", "l2")
WORKER_MODES = ("thread", "process")
FSYNC_POLICIES = ("always", "interval", "never")
AUTH_MODES = ("none", "curve")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
MAX_K = 10_000  # the largest k a recall takes (engine/reader.py): its heaps are sized by k
MAX_EF = 65536  # the widest beam of a recall
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,47}$")


def _opt(default, help: str, **bounds):
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class EngineConfig:
    name: str = _opt("", "engine name; shared memory blocks are named engram_<name>_*; "
                         "empty picks a unique one")
    workers: int = _opt(0, "index writers; 0 means one per core", lo=0, hi=256)
    worker_mode: str = _opt("thread", "index writers as threads of the engine's process "
                                      "(thread) or as supervised worker processes (process)")
    dtype: str = _opt("f16", "default vector storage of new spaces: " + ", ".join(DTYPES))
    metric: str = _opt("cosine", "default metric of new spaces: " + ", ".join(METRICS))
    M: int = _opt(16, "default HNSW links per node per layer (2M on layer 0)", lo=2, hi=64)
    ef_construction: int = _opt(100, "default HNSW beam width while inserting", lo=1, hi=4096)
    ef_search: int = _opt(64, "HNSW beam width of recall (raised to k when k is larger)",
                          lo=1, hi=4096)
    segment_capacity: int = _opt(131072, "observations of the largest shared-memory segment; "
                                         "a space's first segment holds first_segment_capacity and "
                                         "each next one 4x more, up to this", lo=64, hi=1 << 26)
    first_segment_capacity: int = _opt(64, "slots of a space's first segment; each next one has 4x "
                                           "more, up to segment_capacity", lo=16, hi=1 << 26)
    compaction_capacity: int = _opt(1 << 22, "observations of the largest graph compaction merges a "
                                             "space's sealed segments into (docs/architecture.md); "
                                             "0 turns compaction off", lo=0, hi=1 << 30)
    compaction_idle_s: float = _opt(2.0, "seconds without writes after which a space counts as idle: "
                                         "compaction then also merges its open segments, and smaller "
                                         "remainders", lo=0.0, hi=1e9)
    ring_capacity: int = _opt(65536, "bound of a space's accepted-but-unindexed window; "
                                     "observe waits (embedded) or refuses credit (server) beyond it",
                              lo=64, hi=1 << 30)
    window_budget_ms: float = _opt(2.0, "time the exact scan of a space's unindexed window may add to a "
                                        "strong recall: the window is bounded by what one thread scans "
                                        "in it (measured per dim and dtype), as well as by ring_capacity; "
                                        "0 bounds it by ring_capacity alone", lo=0.0, hi=1e6)
    text_bytes_per_observation: int = _opt(256, "average id+text bytes a segment's text arena "
                                                "reserves per observation", lo=16, hi=1 << 20)
    max_text_bytes: int = _opt(65536, "largest text of one observation, in UTF-8 bytes",
                               lo=0, hi=1 << 24)
    max_id_bytes: int = _opt(256, "longest id, in UTF-8 bytes", lo=1, hi=4096)
    seed: int = _opt(0x5EED, "seed of HNSW level draws; builds are reproducible for a seed",
                     lo=0, hi=(1 << 63) - 1)
    endpoint: str = _opt("tcp://127.0.0.1:5555", "ZeroMQ endpoint the server's ROUTER binds")
    max_credit: int = _opt(4096, "credit (observations beyond the last ack) a session gets at "
                                 "normal pressure", lo=1, hi=1 << 24)
    max_batch: int = _opt(4096, "largest batch of one message", lo=1, hi=1 << 20)
    max_frame_bytes: int = _opt(64 << 20, "largest payload frame accepted", lo=1024, hi=1 << 31)
    max_key_credit: int = _opt(262144, "credit one key's sessions may hold together (each also at most "
                                       "max_credit), so that one key cannot claim every window",
                               lo=1, hi=1 << 30)
    max_sessions: int = _opt(4096, "sessions the server holds at once (closed ones until they expire); "
                                   "at most the session table's 4096", lo=1, hi=4096)
    max_sessions_per_key: int = _opt(1024, "sessions one key holds at once (closed ones until they "
                                           "expire)", lo=1, hi=4096)
    max_spaces: int = _opt(4096, "spaces of the engine; at most the catalog's 4096", lo=1, hi=4096)
    max_spaces_per_key: int = _opt(1024, "spaces one key may create (own)", lo=1, hi=4096)
    max_dim: int = _opt(65536, "largest vector dimension of a space", lo=1, hi=65536)
    space_quota_bytes: int = _opt(16 << 30, "bytes one space may take: its segments' shared memory plus, "
                                            "with a data directory, its rows as the log holds them",
                                  lo=1 << 16, hi=1 << 50)
    key_quota_bytes: int = _opt(64 << 30, "bytes the spaces one key owns may take together, counted as "
                                          "space_quota_bytes counts", lo=1 << 16, hi=1 << 50)
    memory_ceiling: float = _opt(0.9, "share of min(/dev/shm size, RAM) the engine's segments may take, "
                                      "and the fill of /dev/shm past which no segment is created",
                                 lo=1e-6, hi=1.0)
    recall_workers: int = _opt(0, "server: reader processes that answer recalls off the ingest loop; "
                                  "0 means one per core", lo=0, hi=256)
    recall_niceness: int = _opt(10, "server: nice increment of the reader processes, so that "
                                    "ingestion wins the CPU; index workers run at 19", lo=0, hi=19)
    recall_inline_share: float = _opt(0.5, "server: share of the front loop's time that small recalls "
                                           "(one part, k <= 100) answered on the loop may take, when "
                                           "nothing else waits for it; the others go to the reader "
                                           "processes; 0: all do",
                                      lo=0.0, hi=1.0)
    recall_concurrency: int = _opt(64, "server: recalls in flight at once, in total; past it a recall "
                                       "is refused with busy", lo=1, hi=1 << 20)
    recall_concurrency_per_key: int = _opt(32, "server: recalls in flight at once per principal "
                                               "(client key); past it a recall is refused with busy",
                                           lo=1, hi=1 << 20)
    max_k: int = _opt(MAX_K, "server: largest k of a recall", lo=1, hi=MAX_K)
    reply_queue_bytes: int = _opt(64 << 20, "server: replies a connection does not read that wait for "
                                            "it, in bytes; past it its sessions are closed with "
                                            "slow_consumer", lo=1 << 16, hi=1 << 40)
    session_idle_s: float = _opt(300.0, "seconds without a message after which a session expires",
                                 lo=0.1, hi=1e9)
    drain_timeout_s: float = _opt(60.0, "on shutdown, how long the server waits for indexing "
                                        "to catch up before stopping", lo=0.0, hi=1e9)
    observe_timeout_s: float = _opt(300.0, "how long an embedded observe waits for a full "
                                           "unindexed window to drain before raising",
                                    lo=0.0, hi=1e9)
    data_dir: str = _opt("", "data directory (write-ahead log and checkpoints); empty or 'none' "
                             "keeps everything in memory only. `serve` defaults to ./engram-data")
    fsync: str = _opt("interval", "when the write-ahead log reaches the disk: always (before each "
                                  "ack, group commit), interval (every fsync_interval_ms in the "
                                  "background), never (left to the OS): " + ", ".join(FSYNC_POLICIES))
    fsync_interval_ms: int = _opt(10, "period of the background fsync under fsync=interval",
                                  lo=1, hi=60_000)
    wal_file_bytes: int = _opt(64 << 20, "size at which the write-ahead log starts a new file",
                               lo=1 << 16, hi=1 << 40)
    checkpoint_wal_bytes: int = _opt(256 << 20, "log written since the last checkpoint that triggers "
                                                "the next one", lo=1 << 16, hi=1 << 50)
    checkpoint_interval_s: float = _opt(300.0, "seconds after which a checkpoint is taken if "
                                               "anything was logged since the last", lo=0.1, hi=1e9)
    auth: str = _opt("none", "client authentication: none, or curve (libzmq CURVE keys checked "
                             "through ZAP against keys_dir; docs/security.md): " + ", ".join(AUTH_MODES))
    keys_dir: str = _opt("", "directory of the server key pair, accepted client keys and the ACL "
                             "(acl.toml); empty means <data_dir>/keys")
    insecure: bool = _opt(False, "allow binding a non-loopback address without authentication "
                                 "(anyone who reaches the port can read and write every space)")
    ws_port: int = _opt(0, "TCP port of the WebSocket bridge serving Engram's JSON stream on /v1/stream "
                           "(Engram's default is 7432); 0 runs no bridge", lo=0, hi=65535)
    ws_host: str = _opt("127.0.0.1", "address the WebSocket bridge binds; a non-loopback one needs "
                                     "--insecure (the bridge has no authentication)")
    ws_heartbeat_s: float = _opt(30.0, "seconds between the bridge's heartbeat messages on each "
                                       "WebSocket connection", lo=0.01, hi=86400.0)
    ws_origins: str = _opt("", "comma-separated browser origins allowed to open a WebSocket besides "
                               "loopback pages (http://127.0.0.1:*, http://localhost:*); * allows any")
    min_credit: int = _opt(256, "credit a normal-priority session gets at critical pressure (one batch)",
                           lo=1, hi=1 << 24)
    max_segments: int = _opt(65536, "shared-memory segments of the engine; at most the catalog's 65536",
                             lo=1, hi=65536)
    metrics: str = _opt("127.0.0.1:9108", "HOST:PORT of the server's Prometheus /metrics endpoint (port 0 "
                                          "picks a free one), or off; a non-loopback host needs --insecure")
    metrics_spaces: int = _opt(32, "spaces with their own memory_space label in metrics, by creation "
                                   "order; the others are summed as memory_space=\"other\"",
                               lo=1, hi=4096)
    log_level: str = _opt("WARNING", "log level of every process: " + ", ".join(LOG_LEVELS))
    log_format: str = _opt("text", "log lines of every process: text, or json (one object per line): "
                                   + ", ".join(LOG_FORMATS))
    checkpoints_kept: int = _opt(2, "complete checkpoints kept (a corrupt newest one falls back to "
                                    "the one before, with the log kept since it)", lo=1, hi=100)
    cluster: str = _opt("", "etcd endpoints (comma-separated, e.g. http://10.0.0.5:2379) of the cluster "
                            "this server joins as a node (docs/cluster.md); empty: a single server. "
                            "Client commands also take any node's tcp://HOST:PORT")
    cluster_name: str = _opt("default", "the cluster's name: its keys live under /engram_shm/<name>/ "
                                        "in etcd")
    advertise: str = _opt("", "the endpoint clients reach this node at (tcp://HOST:PORT); empty: "
                              "--endpoint")
    node: str = _opt("", "this node's name in the cluster; empty: the one kept in <data_dir>/NODE "
                         "(made on the first start), so a restarted node owns its spaces again")
    lease_ttl_s: float = _opt(5.0, "TTL of the node's etcd lease: a node silent this long leaves the "
                                   "cluster, and refuses requests itself a little before", lo=2.0, hi=3600.0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if lo is not None and not (lo <= value <= hi):
                raise InvalidArgument(f"{f.name}={value!r} is outside [{lo}, {hi}]")
        if self.name and not NAME_PATTERN.match(self.name):
            raise InvalidArgument(f"engine name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.worker_mode not in WORKER_MODES:
            raise InvalidArgument(f"worker_mode {self.worker_mode!r} is not one of {WORKER_MODES}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.metric not in METRICS:
            raise InvalidArgument(f"metric {self.metric!r} is not one of {METRICS}")
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidArgument(f"fsync {self.fsync!r} is not one of {FSYNC_POLICIES}")
        if self.auth not in AUTH_MODES:
            raise InvalidArgument(f"auth {self.auth!r} is not one of {AUTH_MODES}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise InvalidArgument(f"log_level {self.log_level!r} is not one of {LOG_LEVELS}")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument(f"log_format {self.log_format!r} is not one of {LOG_FORMATS}")
        if self.metrics != "off":
            metrics_address(self.metrics)  # raises on a malformed one
        if self.node and not NAME_PATTERN.match(self.node):
            raise InvalidArgument(f"node name {self.node!r} must match {NAME_PATTERN.pattern}")
        if self.ws_port and self.auth != "none":
            raise InvalidArgument("the WebSocket bridge cannot authenticate its clients yet: --ws-port "
                                  "needs --auth none (docs/security.md, 'The WebSocket bridge')")

    @property
    def durable(self) -> bool:
        """Whether this engine keeps a data directory."""
        return self.data_dir not in ("", "none")

    @property
    def keys_path(self) -> str:
        """Where the keys and the ACL live ("" when neither keys_dir nor a data
        directory says)."""
        if self.keys_dir:
            return self.keys_dir
        return os.path.join(self.data_dir, "keys") if self.durable else ""

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def recall_worker_count(self) -> int:
        return self.recall_workers or os.cpu_count() or 1

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "EngineConfig":
        """Defaults, then ENGRAM_* variables, then explicit overrides."""
        return cls.layered(environ=environ, flags=overrides)

    @classmethod
    def layered(cls, base: dict | None = None, toml: str | None = None, environ=os.environ,
                flags: dict | None = None) -> "EngineConfig":
        """The one order of precedence, for every command and process: the
        defaults, then `base` (a command's own defaults: serve's data
        directory), then the TOML file, then every ENGRAM_* variable that is
        set (whatever its value: one equal to the default still overrides the
        file), then `flags` (None means not given)."""
        values = dict(base or {})
        if toml:
            values.update(load_toml(toml))
        for f in dataclasses.fields(cls):
            raw = environ.get(env_var(f.name))
            if raw is not None:
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls(**values)

    def to_json(self) -> str:
        """How a child process gets its parent's config (`from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return cls(**json.loads(text))


def load_toml(path: str) -> dict:
    """Options from a TOML file (top level, or an [engram] table), checked
    against the fields."""
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


def metrics_address(value: str) -> tuple[str, int]:
    """(host, port) of a `metrics` option of the form HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics {value!r} must be HOST:PORT (port 0 picks a free one) or off",
                              field="metrics")
    return host.strip("[]"), int(port)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def env_var(field_name: str) -> str:
    return "ENGRAM_" + field_name.upper()


def parse_value(f: dataclasses.Field, raw: str):
    kind = type(f.default)
    if kind is bool:
        if raw.lower() not in _BOOLS:
            raise InvalidArgument(f"{env_var(f.name)}={raw!r} is not a boolean ({'/'.join(_BOOLS)})")
        return _BOOLS[raw.lower()]
    try:
        return kind(raw)
    except ValueError:
        raise InvalidArgument(f"{env_var(f.name)}={raw!r} is not a valid {kind.__name__}") from None
