"""Scenarios and their fault schedules.

A `Scenario` says which faults to inject and how hard; `schedule(scenario,
seconds, seed)` turns it into a `Schedule`: every timed fault (partitions,
kills, stalls, bursts, clock jumps) with its second, drawn from one
`random.Random(seed)`. The schedule is a pure function of (scenario,
seconds, seed): the same seed gives the same faults at the same moments,
and its `digest` (printed in every summary) says so at a glance. Faults
decided per message (drop, duplicate, delay, reorder) are drawn by the
proxy from streams seeded the same way (chaos/proxy.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from .proxy import NetFaults

KILLS = ("kill_worker", "kill_front", "kill_engine")
STALLS = ("stall_front", "stall_worker")


@dataclass(frozen=True)
class Scenario:
    name: str
    doc: str
    net: NetFaults = field(default_factory=NetFaults)
    partition_every_s: float = 0.0  # one partition per this many seconds (0: none)
    partition_s: tuple[float, float] = (2.0, 4.0)
    every_s: dict = field(default_factory=dict)  # event kind -> one per this many seconds
    stall_s: tuple[float, float] = (1.0, 3.0)
    burst: int = 0  # observations per burst, on top of the steady rate
    burst_every_s: float = 5.0
    skew_s: float = 0.0  # client clocks jump to -skew_s, 0 or +skew_s
    skew_every_s: float = 2.0
    storage: str = ""  # ENGRAM_TEST_FAULTS of the server (engram_shm/faults.py)
    fsync: str = "interval"
    rate: float = 1500.0  # steady observations per second
    visibility_s: float = 60.0  # the bound on ack-to-indexed p99 (a 2-core machine shared with CI)
    server_flags: tuple[str, ...] = ()  # more `serve` options


@dataclass(frozen=True)
class Schedule:
    scenario: str
    seconds: float
    seed: int
    partitions: tuple[tuple[float, float], ...]
    # (second, kind, pick in [0, 1): which process, seconds of a stall)
    events: tuple[tuple[float, str, float, float], ...]
    bursts: tuple[float, ...]
    skews: tuple[tuple[float, float], ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _times(rng: random.Random, n: int, lo: float, hi: float, gap: float) -> list[float]:
    """n sorted times in [lo, hi), at least `gap` apart where there is room."""
    if n <= 0 or hi <= lo:
        return []
    gap = min(gap, (hi - lo) / n)
    for _ in range(100):
        times = sorted(round(rng.uniform(lo, hi), 3) for _ in range(n))
        if all(b - a >= gap for a, b in zip(times, times[1:])):
            return times
    return [round(lo + (hi - lo) * (i + 0.5) / n, 3) for i in range(n)]


def _count(seconds: float, every: float) -> int:
    return max(1, int(seconds / every)) if every else 0


def schedule(sc: Scenario, seconds: float, seed: int) -> Schedule:
    """The faults of a run of `sc` for `seconds`, from `seed`. Timed faults
    fall in [10 %, 85 %] of the run: the engine starts clean and the end
    leaves time to recover before the faults stop."""
    rng = random.Random(f"{sc.name}:{seed}")
    lo, hi = 0.1 * seconds, 0.85 * seconds
    partitions = []
    n = _count(seconds, sc.partition_every_s)
    for t in _times(rng, n, lo, hi, sc.partition_s[1] + 1.0):
        partitions.append((t, round(t + rng.uniform(*sc.partition_s), 3)))
    events = []
    for kind in sorted(sc.every_s):
        gap = 4.0 if kind == "kill_engine" else 1.0
        for t in _times(rng, _count(seconds, sc.every_s[kind]), lo, hi, gap):
            stall = round(rng.uniform(*sc.stall_s), 3) if kind in STALLS else 0.0
            events.append((t, kind, round(rng.random(), 6), stall))
    events.sort()
    bursts = tuple(round(t, 3) for t in _frange(sc.burst_every_s, hi, sc.burst_every_s)) if sc.burst else ()
    skews = tuple((round(t, 3), rng.choice((-sc.skew_s, 0.0, sc.skew_s)))
                  for t in _frange(0.0, seconds, sc.skew_every_s)) if sc.skew_s else ()
    return Schedule(sc.name, seconds, seed, tuple(partitions), tuple(events), bursts, skews)


def _frange(start: float, stop: float, step: float) -> list[float]:
    out, t = [], start
    while t < stop:
        out.append(t)
        t += step
    return out


SCENARIOS = {sc.name: sc for sc in [
    Scenario("baseline", "no faults: the engine and the validators on a clean run"),
    Scenario("delay", "every message either way delayed uniformly in 0-100 ms (in order)",
             net=NetFaults(delay_ms=100.0)),
    Scenario("loss", "1 % of messages either way dropped; clients retry (resume, re-send)",
             net=NetFaults(drop=0.01)),
    Scenario("dup_reorder", "5 % of messages duplicated, 5 % held back 20-80 ms so later ones overtake",
             net=NetFaults(duplicate=0.05, reorder=0.05)),
    Scenario("partition", "the network drops everything for 2-4 s, every 8 s",
             partition_every_s=8.0),
    Scenario("worker_kills", "SIGKILL an index worker every 4 s", every_s={"kill_worker": 4.0}),
    Scenario("front_kills", "SIGKILL the front every 6 s", every_s={"kill_front": 6.0}),
    Scenario("engine_kills", "SIGKILL the whole engine every 8 s and start it again on its data "
             "directory (fsync always)", every_s={"kill_engine": 8.0}, fsync="always"),
    Scenario("compaction", "segments of 1,024 slots, so merges run all the time; SIGKILL the front "
             "and an index worker every 5 s each, in the middle of merges",
             every_s={"kill_front": 5.0, "kill_worker": 5.0},
             server_flags=("--segment-capacity", "1024", "--compaction-idle-s", "0.5")),
    Scenario("stalls", "SIGSTOP the front or a worker for 1-3 s, then SIGCONT, every 5 s",
             every_s={"stall_front": 10.0, "stall_worker": 10.0}),
    Scenario("bursts", "10,000 observations at once every 5 s on top of the steady rate", burst=10_000),
    Scenario("clock_skew", "client timestamps jump to -5 s, 0 or +5 s of the true time every 2 s",
             skew_s=5.0),
    Scenario("storage", "the log's fsync takes 20 ms more, and every 50th log write fails (EIO) "
             "(fsync always)", storage="slow_fsync_ms=20,fail_write_every=50", fsync="always"),
    Scenario("combined", "all of the above at once, the engine killed less often",
             net=NetFaults(delay_ms=50.0, drop=0.01, duplicate=0.02, reorder=0.02),
             partition_every_s=15.0,
             every_s={"kill_worker": 8.0, "kill_front": 12.0, "kill_engine": 20.0, "stall_front": 15.0,
                      "stall_worker": 15.0},
             burst=5_000, skew_s=5.0, storage="slow_fsync_ms=5,fail_write_every=100", fsync="always"),
]}
