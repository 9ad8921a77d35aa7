"""Ramp: offered load from client processes, rising until backpressure engages; nothing acked is lost.

    python -m bench ramp [--levels 10000,50000,100000,200000] [--seconds 20] [--clients 2]
                         [--dim 768] [--batch 256] [--quick]

One `engram-shm serve` with its default settings (two index workers, the
default window bound and credit, a data directory with its write-ahead log
under fsync=interval: the figures include durability). For each offered
rate, `--clients` processes (each its own `engram_shm.Client` session) offer
their share open-loop for `--seconds`: batch i of a client is due at
t0 + i * batch / (rate / clients), whatever happened to batch i - 1. A client
that is behind (its Client blocks while the server grants no credit) hands
the batch over late and keeps the lag; the rate it managed is `sent`.
Vectors are random unit vectors made before the levels: a pool per client,
whose rows come round again rotated by one coordinate more each time, so
every observation's vector is its own (the rotation, a copy of the batch, is
the only work on them in the timed loop); ids are distinct per client. The
levels follow each other as a ramp: each starts with the window the previous
one left (a level whose rate the server cannot sustain starts full, so its
accepted rate is the sustained one).

Per level: offered, sent (handed to the Client), accepted (acked within the
level's seconds), refused (observations in refused messages, by code, each
attempt counted: the Client resends them), indexed (the space's indexed count
from the server's `stats`, sampled every 0.5 s, which also gives the
unindexed window's max and mean and the pressure), the highest pressure level
a client was granted under, how late the clients fell behind schedule, ack
latency p50/p99 (a batch's first send to its ack, every batch of the level),
and recall p50/p99 of 10 strong recalls (k=10) per second from a thread of
this process meanwhile.

Then the check that nothing acked is lost: once the space is indexed (or
`--index-wait` has passed; strong recalls see the window too), the server's
stored count must equal the observations all sessions saw acked, and a
sample of acked ids (`--sample`) must be recalled by their own vectors, as
their own top hit (k=1; a miss is searched again wider, k=100, ef=2048,
before it counts as missing). Prints JSON lines (one
per level and a summary row with acked, stored, lost) and tables, and exits
non-zero if anything acked is missing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import threading
import time

import numpy as np

from engram_shm import Client
from engram_shm.engine import lifeline
from engram_shm.transport.credit import LEVELS
from engram_shm.transport.launch import running_server

from .report import emit, parser, percentiles_ms, table

SPACE = "ramp"
SAMPLE_EVERY_S = 0.5
RECALLS_PER_S = 10.0
NO_DRAIN = ("--drain-timeout-s", "0")
LEAD_S = 0.5  # between a level's command and its start: every process gets ready


class Feed:
    """Distinct unit vectors for any number of observations, made up front: a
    pool of random unit vectors, reused with its coordinates rotated by one
    more place each time round (a rotation of a random vector is nearly
    orthogonal to it). Observation i's vector depends on i alone."""

    def __init__(self, pool: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.pool = rng.standard_normal((pool, dim), dtype=np.float32)
        self.pool /= np.linalg.norm(self.pool, axis=1, keepdims=True)

    def rows(self, lo: int, n: int) -> np.ndarray:
        """The vectors of observations lo .. lo + n - 1."""
        turn, at = divmod(lo, len(self.pool))
        if at + n > len(self.pool):
            head = len(self.pool) - at
            return np.concatenate([self.rows(lo, head), self.rows(lo + head, n - head)])
        rows = self.pool[at:at + n]
        return rows if turn == 0 else np.roll(rows, turn, axis=1)


class TimedClient(Client):
    """`engram_shm.Client`, unchanged in what it does (credit, pipelining,
    back-off, resends), that also records what a benchmark measures: each
    batch's first send and ack (`acks`: (ack time, seconds from its first
    send, observations)), the observations of every refused message by code,
    and the highest pressure level it was granted under. It hooks the
    client's private `_send`, `_on_message` and `_grant`."""

    def __init__(self, *args, **kwargs):
        self.sent_at: dict[str, float] = {}  # a batch's first id -> its first send
        self.acks: list[tuple[float, float, int]] = []
        self.refused: collections.Counter = collections.Counter()
        self.level_max = 0
        super().__init__(*args, **kwargs)

    def _send(self, header: dict, *payload) -> None:
        if header.get("op") == "observe_batch":
            self.sent_at.setdefault(header["ids"][0], time.perf_counter())
        super()._send(header, *payload)

    def _on_message(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "error" and msg.get("rid") in self._by_rid:
            self.refused[msg.get("code")] += self._by_rid[msg["rid"]].n
        before = list(self._queue)  # the client takes acked batches out of this list in place
        super()._on_message(msg)
        if op == "ack":  # the batches an ack took out of the queue are done
            now, left = time.perf_counter(), set(self._queue)
            for b in before:
                if b not in left:
                    self.acks.append((now, now - self.sent_at.pop(b.header["ids"][0]), b.n))

    def _grant(self, msg: dict) -> None:
        super()._grant(msg)
        self.level_max = max(self.level_max, LEVELS.index(self.level))

    def idle_until(self, t: float) -> None:
        """Until perf_counter() reaches t: send what credit allows, read replies
        as they come (so that acks are timed when they arrive)."""
        while (left := t - time.perf_counter()) > 0:
            self._drive()
            self._pump(left)

    def reset(self) -> None:
        self.acks.clear()
        self.refused.clear()
        self.level_max = 0


def ids(prefix: str, lo: int, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(lo, lo + n)]


def offer(client: TimedClient, feed: Feed, prefix: str, at: int, batch: int, rate: float,
          seconds: float, t0: float) -> dict:
    """Offer `rate` observations/s for `seconds` from time.time() t0 on,
    open-loop, starting with observation `at`; then wait for every ack."""
    client.reset()
    start = time.perf_counter() + (t0 - time.time())
    end, interval = start + seconds, batch / rate
    client.idle_until(start)
    acked0, handed, lag = client.last_acked, 0, 0.0  # a late hand-over's lag is kept
    while (due := start + handed / batch * interval) < end:
        client.idle_until(due)
        now = time.perf_counter()
        if now >= end:
            break
        lag = max(lag, now - due)
        client.observe_batch(SPACE, ids(prefix, at + handed, batch), feed.rows(at + handed, batch))
        handed += batch
    client.idle_until(end)
    client.flush()
    return {"handed": handed, "acked_in_time": sum(n for t, _, n in client.acks if t <= end),
            "acked": client.last_acked - acked0,
            "refused": dict(client.refused), "ack_s": [s for _, s, _ in client.acks],
            "lag_s": lag, "level_max": client.level_max}


def own_vectors(client: Client, feed: Feed, prefix: str, handed: int, sample: int, seed: int) -> dict:
    """Recall a sample of this client's observations by their own vectors:
    how many are their own top hit (k=1), how many are found at all."""
    picks = np.random.default_rng(seed).choice(handed, size=min(sample, handed), replace=False)
    top = found = 0
    for i in picks:
        cue, own = feed.rows(int(i), 1)[0], f"{prefix}{i}"
        hit = [m.id for m in client.recall(SPACE, cue, k=1)] == [own]
        top += hit
        found += hit or own in {m.id for m in client.recall(SPACE, cue, k=100, ef=2048)}
    return {"sampled": len(picks), "top_hit": top, "found": found}


def client_process(conn, endpoint: str, number: int, parent: int, args: argparse.Namespace) -> None:
    """One client process: its vectors, its session; it runs the levels it is
    sent (("level", rate, seconds, t0), ("check", sample), ("quit",)) and
    answers each with a dict."""
    os.environ[lifeline.PARENT_ENV] = str(parent)
    lifeline.bind_to_parent()  # dies with the benchmark, however it ends
    feed = Feed(args.pool, args.dim, args.seed + 1 + number)
    prefix, handed = f"c{number}-", 0
    with TimedClient(endpoint, batch_size=args.batch, timeout=60) as client:
        conn.send("ready")
        while True:
            command = conn.recv()
            if command[0] == "level":
                out = offer(client, feed, prefix, handed, args.batch, *command[1:])
                handed += out["handed"]
            elif command[0] == "check":
                out = {"acked": client.last_acked, "handed": handed,
                       **own_vectors(client, feed, prefix, handed, command[1], args.seed + number)}
            else:
                break
            conn.send(out)
        client.close(drain=False)


class Clients:
    """The client processes (spawned, each dies with this process too); on
    exit, told to quit, then killed if they linger."""

    def __init__(self, endpoint: str, args: argparse.Namespace):
        self.endpoint, self.args = endpoint, args
        self.procs, self.conns = [], []

    def __enter__(self) -> "Clients":
        ctx = multiprocessing.get_context("spawn")
        try:
            for number in range(self.args.clients):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=client_process, daemon=True, name=f"ramp-client-{number}",
                                   args=(theirs, self.endpoint, number, os.getpid(), self.args))
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(mine)
            self.answers(120)
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def send(self, *command) -> None:
        for conn in self.conns:
            conn.send(command)

    def answers(self, timeout: float) -> list:
        """One answer from each client, within `timeout` s."""
        deadline, out = time.monotonic() + timeout, []
        for proc, conn in zip(self.procs, self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{proc.name} did not answer within {timeout} s "
                                   f"(exit code {proc.exitcode})")
            out.append(conn.recv())
        return out

    def __exit__(self, *exc) -> None:
        """Tell them to quit; after a failure (they may be mid-level), kill them."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a client that died has no pipe
                conn.send(("quit",))
        for proc in self.procs:
            proc.join(30 if exc[0] is None else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


class Background(threading.Thread):
    """A thread whose exception reaches whoever joins it."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self.work, self.args, self.error = target, args, None

    def run(self) -> None:
        try:
            self.work(*self.args)
        except BaseException as e:  # handed to the joining thread
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def sample_stats(endpoint: str, t0: float, seconds: float, out: list) -> None:
    """The space's figures every SAMPLE_EVERY_S from time t0 to t0 + seconds:
    (time, indexed, window, pressure)."""
    with Client(endpoint, timeout=30) as c:
        for k in range(int(seconds / SAMPLE_EVERY_S) + 1):
            sleep_until(min(t0 + k * SAMPLE_EVERY_S, t0 + seconds))
            space = c.stats()["spaces"][SPACE]
            out.append((time.time(), space["indexed"], space["window"], space["pressure"]))


def recall_meanwhile(endpoint: str, cues: np.ndarray, t0: float, seconds: float, out: list) -> None:
    """RECALLS_PER_S strong recalls (k=10) a second from t0 to t0 + seconds,
    on schedule (a late one does not delay the next's due time)."""
    with Client(endpoint, timeout=30) as c:
        for k in range(int(seconds * RECALLS_PER_S)):
            sleep_until(t0 + k / RECALLS_PER_S)
            if time.time() >= t0 + seconds:  # late recalls ran past the level
                break
            start = time.perf_counter()
            c.recall(SPACE, cues[k % len(cues)], k=10, consistency="strong")
            out.append(time.perf_counter() - start)


def wait_indexed(endpoint: str, timeout: float, name: str = SPACE) -> tuple[dict, bool]:
    """The space's figures once its window is empty, or when `timeout` s
    have passed; and whether it was. (A client of its own: a session left
    idle past the server's idle_timeout_s would expire.)"""
    deadline = time.monotonic() + timeout
    with Client(endpoint, timeout=60) as client:
        while (space := client.stats()["spaces"][name])["window"] and time.monotonic() < deadline:
            time.sleep(0.1)
    return space, space["window"] == 0


def warm_up(endpoint: str, space: str, n: int, dim: int, seed: int) -> int:
    """Create the space with one batch of n (recalls find it from the start);
    returns the observations acked."""
    with Client(endpoint, batch_size=n, timeout=60) as client:
        client.observe_batch(space, ids("warm-", 0, n), Feed(n, dim, seed).pool)
        return client.flush()


def level(clients: Clients, endpoint: str, cues: np.ndarray, rate: float, args) -> dict:
    t0 = time.time() + LEAD_S
    samples, recalls = [], []
    threads = [Background(sample_stats, endpoint, t0, args.seconds, samples),
               Background(recall_meanwhile, endpoint, cues, t0, args.seconds, recalls)]
    for t in threads:
        t.start()
    clients.send("level", rate / args.clients, args.seconds, t0)
    outs = clients.answers(args.seconds + 300)
    for t in threads:
        t.join()
    refused = collections.Counter()
    for out in outs:
        refused.update(out["refused"])
    (t_first, indexed_first, _, _), (t_last, indexed_last, _, _) = samples[0], samples[-1]
    windows = [s[2] for s in samples]
    total = lambda key: sum(out[key] for out in outs)
    per_s = lambda n: round(n / args.seconds, 1)
    return {"bench": "ramp", "level": f"{rate / 1000:g}K/s", "offered_per_s": rate,
            "sent_per_s": per_s(total("handed")), "accepted_per_s": per_s(total("acked_in_time")),
            "refused_per_s": per_s(sum(refused.values())), "refused_by_code": dict(refused),
            "indexed_per_s": round((indexed_last - indexed_first) / (t_last - t_first), 1),
            "window_max": max(windows), "window_mean": round(float(np.mean(windows)), 1),
            "pressure_max": max(s[3] for s in samples),
            "level_max": LEVELS[max(out["level_max"] for out in outs)],
            "lag_max_s": round(max(out["lag_s"] for out in outs), 3),
            **percentiles_ms([s for out in outs for s in out["ack_s"]], "ack"),
            **percentiles_ms(recalls, "recall"), "recalls": len(recalls),
            "acked": total("acked"), "dim": args.dim, "batch": args.batch, "clients": args.clients,
            "seconds": args.seconds}


COLUMNS = [("offered/s", "offered_per_s", ".0f"), ("sent/s", "sent_per_s", ".0f"),
           ("accepted/s", "accepted_per_s", ".0f"), ("refused/s", "refused_per_s", ".0f"),
           ("indexed/s", "indexed_per_s", ".0f"), ("window max", "window_max", "d"),
           ("mean", "window_mean", ".0f"), ("pressure max", "pressure_max", ".2f"),
           ("level max", "level_max", ""), ("lag max s", "lag_max_s", ".2f"),
           ("ack p50 ms", "ack_p50_ms", ".1f"), ("p99", "ack_p99_ms", ".1f"),
           ("recall p50 ms", "recall_p50_ms", ".1f"), ("p99", "recall_p99_ms", ".1f")]
SUMMARY_COLUMNS = [("acked", "acked", "d"), ("stored", "stored", "d"), ("lost", "lost", "d"),
                   ("indexed", "indexed", "d"), ("sampled", "sampled", "d"),
                   ("own top hit", "own_top_hit", ".3f"), ("found", "found", "d")]


def main(argv=None, prog="python -m bench ramp") -> list[dict]:
    ap = parser(__doc__, prog)
    ap.add_argument("--levels", default="10000,50000,100000,200000",
                    help="offered observations per second, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    ap.add_argument("--clients", type=int, default=2, help="client processes sharing each level's load")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--pool", type=int, default=32768, help="vectors each client makes up front")
    ap.add_argument("--sample", type=int, default=200, help="acked ids recalled by their own vectors")
    ap.add_argument("--index-wait", type=float, default=120.0,
                    help="longest wait (s) for the window to drain before the check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a small run (10K and 200K/s, 2 s each, waits for indexing of 15 s at most)")
    args = ap.parse_args(argv)
    if args.quick:  # 768 dims still: their window bound is the smallest, so it drains soonest
        args.levels, args.seconds, args.pool, args.index_wait = "10000,200000", 2.0, 8192, 15.0
    rates = [float(r) for r in args.levels.split(",")]
    print(f"# seed {args.seed}: {args.clients} client processes, batches of {args.batch} x {args.dim} "
          f"random unit vectors, {args.seconds:g} s per level", flush=True)
    rows = []
    # Measured once the check is done: the server's stop need not wait for indexing.
    with running_server(*NO_DRAIN) as (endpoint, _, _), Clients(endpoint, args) as clients:
        warmed = warm_up(endpoint, SPACE, args.batch, args.dim, args.seed)
        cues = Feed(256, args.dim, args.seed + 1000).pool
        for rate in rates:
            rows.append(emit(level(clients, endpoint, cues, rate, args)))
        space, indexed = wait_indexed(endpoint, args.index_wait)
        clients.send("check", -(-args.sample // args.clients))
        checks = clients.answers(300)
        acked = warmed + sum(c["acked"] for c in checks)
        sampled = sum(c["sampled"] for c in checks)
        summary = {"bench": "ramp", "level": "summary", "acked": acked, "stored": space["count"],
                   "lost": acked - space["count"], "indexed": space["indexed"], "indexed_all": indexed,
                   "sampled": sampled, "own_top_hit": round(sum(c["top_hit"] for c in checks) / sampled, 4),
                   "found": sum(c["found"] for c in checks), "dim": args.dim, "batch": args.batch}
        rows.append(emit(summary))
    print(table("ramp: offered load against what is accepted, indexed and recalled", rows[:-1], COLUMNS))
    print(table("ramp: nothing acked is lost", [summary], SUMMARY_COLUMNS))
    if summary["lost"] or summary["found"] < summary["sampled"]:
        raise SystemExit(f"acked observations missing: {summary['lost']} by count, "
                         f"{summary['sampled'] - summary['found']} of {summary['sampled']} sampled ids")
    return rows


if __name__ == "__main__":
    main()
