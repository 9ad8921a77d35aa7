"""One chaos run: start a durable server, put the faulty proxy in front of it
if the scenario has network faults, stream from a steady client (and a burst
client), inject the scheduled process faults, stop every fault, let the
clients drain, validate, and summarise."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from engram_shm import attach, faults
from engram_shm.transport.client import Client

from . import validators as v
from .killer import Killer
from .load import Producer
from .proxy import FaultyProxy
from .schedule import SCENARIOS, schedule
from .server import Server

BUGS = {  # deliberate bugs (engram_shm/faults.py) and the scenario that exposes each
    "ack_before_wal": "engine_kills",
    "drop_one": "baseline",
    "skip_reverse_links": "baseline",
}
DIM = 32
DRAIN_S = 60.0


def run(name: str, seconds: float, seed: int, bug: str | None = None, sample: int = 0,
        log=print) -> tuple[dict, list[v.Check]]:
    """Returns the summary and the checks. `sample`: how many acked ids to
    recall by their own vector (0: every one); `bug`: a fault flag of
    engram_shm/faults.py switched on in the server."""
    sc = SCENARIOS[name]
    plan = schedule(sc, seconds, seed)
    flags = [sc.storage] if sc.storage else []
    if bug:
        flags.append(bug)
    env = dict(os.environ)
    env.pop(faults.ENV, None)
    if flags:
        env[faults.ENV] = ",".join(flags)
        faults.parse(env[faults.ENV])  # a typo fails here, not silently
    log(f"# chaos {name}: {seconds:g} s, seed {seed}, schedule {plan.digest}"
        + (f", faults {env[faults.ENV]}" if flags else ""))
    # One recall reader (the validators recall through shared memory, not the
    # server) and a checkpoint every 5 s, so restarts load one and replay a tail.
    server = Server(["--fsync", sc.fsync, "--ring-capacity", "50000", "--recall-workers", "1",
                     "--checkpoint-interval-s", "5", *sc.server_flags], env)
    proxy = killer = None
    producers: list[Producer] = []
    t0 = time.monotonic()
    try:
        server.start()
        log(f"# server up in {time.monotonic() - t0:.1f} s")
        endpoint = server.endpoint
        if sc.net.active or plan.partitions:
            proxy = FaultyProxy(server.endpoint, sc.net, seed, list(plan.partitions)).start()
            endpoint = proxy.endpoint
        producers.append(Producer("steady", endpoint, DIM, seed, sc.rate, skews=plan.skews))
        if plan.bursts:
            producers.append(Producer("burst", endpoint, DIM, seed, 0.0, bursts=plan.bursts, burst=sc.burst,
                                      skews=plan.skews))
        started = time.monotonic()
        if proxy is not None:
            proxy.started = started
        for p in producers:
            p.start()
        killer = Killer(server, plan.events, started)
        killer.start()
        while time.monotonic() < started + seconds and not any(p.error for p in producers):
            time.sleep(0.1)
        # Faults stop; the clients finish what they have through a clean network.
        killer.stop()
        if proxy is not None:
            proxy.heal()
        for p in producers:
            p.drain_until = time.monotonic() + DRAIN_S
            p.stop_sending.set()
        for p in producers:
            p.join(DRAIN_S + 60)
        errors = [f"{p.label}: {type(p.error).__name__}: {p.error}" for p in producers if p.error]
        errors += [f"killer: {killer.error!r}"] if killer.error else []
        log(f"# drained {time.monotonic() - started - seconds:.1f} s after the faults stopped")
        v.wait_indexed(server.name, 60)
        t1 = time.monotonic()
        checks = validate(server, producers, sc, seed, sample)
        log(f"# validated in {time.monotonic() - t1:.1f} s")
        if errors:
            checks.append(v.Check("clients", False, {}, errors))
        summary = summarise(name, seconds, seed, plan, producers, killer, proxy, server, checks, bug)
        return summary, checks
    finally:
        if killer is not None and killer.is_alive():
            killer.stop()
        if proxy is not None:
            proxy.stop()
        for p in producers:
            p.stop_sending.set()
        server.stop()


def validate(server: Server, producers: list[Producer], sc, seed: int, sample: int) -> list[v.Check]:
    sent = {i: row for p in producers for i, row in p.sent.items()}
    acked_ids = {i for p in producers for i in p.client.acked} if all(p.client for p in producers) else set()
    acked = {i: sent[i] for i in acked_ids if i in sent}
    clients = [(p.label, p.client) for p in producers if p.client is not None]
    latencies = [x for _, c in clients for x in c.visibility]
    failed = [f for _, c in clients for f in c.failed]
    with Client(server.endpoint, timeout=30) as admin:
        stats = admin.stats()
    with attach(server.name) as engine:
        stored = v.read_store(engine)
        return [
            v.no_acked_loss(engine, stored, acked, sample, seed),
            v.no_duplicates(stored, set(sent)),
            v.sequence_continuity(clients),
            v.graph_integrity(stored),
            v.visibility(latencies, sc.visibility_s),
            v.eventual_recall(engine, stored, sent, acked_ids, failed, 300, seed),
            v.counters(stats, stored, acked_ids),
        ]


def summarise(name, seconds, seed, plan, producers, killer, proxy, server, checks, bug) -> dict:
    clients = [p.client for p in producers if p.client is not None]
    refused: dict[str, int] = {}
    for c in clients:
        for code, n in c.refusals.items():
            refused[code] = refused.get(code, 0) + n
    by = {c.name: c for c in checks}
    lat = [x for c in clients for x in c.visibility]
    return {
        "chaos": name, "seconds": seconds, "seed": seed, "schedule": plan.digest, "bug": bug,
        "sent": sum(len(p.sent) for p in producers),
        "acked": sum(len(c.acked) for c in clients),
        "refused": refused, "retried": sum(c.retried for c in clients),
        "timeouts": sum(c.timeouts for c in clients),
        "resumes": sum(len(c.resumes) for c in clients),
        "lost": by["no_acked_loss"].figures.get("lost") if "no_acked_loss" in by else None,
        "duplicates": by["no_duplicates"].figures.get("duplicates") if "no_duplicates" in by else None,
        "visibility_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat else None,
        "faults": {"process": [list(e) for e in killer.done] if killer else [],
                   "network": dict(proxy.counts) if proxy else {}, "engine_starts": server.starts,
                   "bursts": len(plan.bursts), "clock_jumps": sum(1 for _, skew in plan.skews if skew)},
        "checks": {c.name: c.ok for c in checks},
        "failed": [c.name for c in checks if not c.ok],
        "problems": {c.name: c.problems for c in checks if c.problems},
        "figures": {c.name: c.figures for c in checks},
        "ok": all(c.ok for c in checks),
    }


def scenario_table() -> list[dict]:
    return [{"name": sc.name, "doc": sc.doc, **{k: val for k, val in dataclasses.asdict(sc).items()
                                                 if k not in ("name", "doc")}}
            for sc in SCENARIOS.values()]
