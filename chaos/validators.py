"""What a chaos run must prove, each check able to fail on its own.

They run after the faults stop and the clients drained, against the live
engine's shared memory (read-only, `engram_shm.attach`) and what the clients
recorded (chaos/load.py). Each returns a `Check`: its name, ok, the figures
it measured and, when it fails, examples to start debugging from.

| check                 | proves                                                              |
|-----------------------|---------------------------------------------------------------------|
| `no_acked_loss`       | every acked id is stored, and recall by its own vector finds it     |
|                       | (with the timestamp it was sent with)                               |
| `no_duplicates`       | no id is stored twice, and nothing is stored that was not sent      |
| `sequence_continuity` | per session, acks never skip or repeat a sequence number: acked     |
|                       | batches tile 1..last, stored acks never overlap, a resume never     |
|                       | reports less than was acked, and the session closes at the last ack |
| `graph_integrity`     | every segment's graph: links to published nodes, no self or         |
|                       | duplicate links, degree bounds, every node reachable on layer 0     |
| `visibility`          | ack-to-indexed latency: p99 reported, within the scenario's bound   |
| `eventual_recall`     | once faults stop: everything sent is acked, everything stored is    |
|                       | indexed, and graph-only recall finds it                             |
| `counters`            | the engine's `count` (and `indexed`, rows: `count` + `buried`)      |
|                       | agree with the clients' view and its memory                         |
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from engram_shm import attach
from engram_shm.store.graphcheck import graph_violations

from .load import SPACE

EXAMPLES = 5


@dataclass
class Check:
    name: str
    ok: bool
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Stored:
    """The space as shared memory holds it: visible rows only."""
    ids: list[str]
    where: list[tuple[int, int]]  # (segment number, slot) of each id
    indexed: int
    count: int
    segments: list


def read_store(engine) -> Stored:
    """Every visible (committed, not buried) row of SPACE."""
    catalog = engine.catalog
    committed = catalog.committed_generation
    index = next(i for i in range(catalog.n_spaces) if catalog.space(i).name == SPACE)
    ids, where, segments, indexed, count = [], [], [], 0, 0
    for number, seg in enumerate(engine.directory.of_space(index)):
        accepted = seg.accepted
        visible = np.nonzero(seg.r.generation[:accepted] <= committed)[0]
        ids += seg.ids(visible)
        where += [(number, int(slot)) for slot in visible]
        count += accepted
        indexed += seg.indexed
        segments.append(seg)
    return Stored(ids, where, indexed, count, segments)


def _stored_rows(stored: Stored, ids: list[str]) -> np.ndarray:
    """The stored vectors of `ids` (stored ones only) as float32."""
    at = dict(zip(stored.ids, stored.where))
    out = np.empty((len(ids), stored.segments[0].r.vectors.shape[1]), np.float32)
    for row, obs_id in enumerate(ids):
        number, slot = at[obs_id]
        v = stored.segments[number].r.vectors[slot]
        out[row] = v.view(np.float16) if v.dtype == np.uint16 else v
    return out


def no_acked_loss(engine, stored: Stored, acked: dict[str, tuple], sample: int, seed: int) -> Check:
    """acked: id -> (vector, when). Every acked id is stored, with its own
    vector (as sent, unit-normalised and rounded to the storage dtype); recall
    by that vector finds it with its timestamp, for every acked id or for a
    seeded `sample` of them (0: every one)."""
    have = set(stored.ids)
    missing = [i for i in acked if i not in have]
    present = [i for i in acked if i in have]
    wrong_vector = []
    if present:
        sent = np.stack([acked[i][0] for i in present]).astype(np.float32)
        sent /= np.linalg.norm(sent, axis=1, keepdims=True)
        cos = (sent * _stored_rows(stored, present)).sum(axis=1)
        wrong_vector = [present[j] for j in np.nonzero(cos < 0.999)[0][:EXAMPLES]]
        n_wrong = int((cos < 0.999).sum())
    probe = present if sample <= 0 or sample >= len(present) else \
        random.Random(seed).sample(present, sample)
    unfound, wrong_when = [], []
    for obs_id in probe:
        vector, when = acked[obs_id]
        hits = {m.id: m for m in engine.recall(SPACE, vector, k=10)}
        if obs_id not in hits:
            hits = {m.id: m for m in engine.recall(SPACE, vector, k=10, ef=512)}
        if obs_id not in hits:
            unfound.append(obs_id)
        elif abs(hits[obs_id].when - when) > 1e-3:
            wrong_when.append(f"{obs_id}: stored when {hits[obs_id].when}, sent {when}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} acked ids not stored, e.g. {missing[:EXAMPLES]}")
    if wrong_vector:
        problems.append(f"{n_wrong} acked ids stored with another vector, e.g. {wrong_vector}")
    if unfound:
        problems.append(f"{len(unfound)} of {len(probe)} acked ids not recalled by their own vector, "
                        f"e.g. {unfound[:EXAMPLES]}")
    if wrong_when:
        problems.append(f"{len(wrong_when)} timestamps differ, e.g. {wrong_when[:EXAMPLES]}")
    return Check("no_acked_loss", not problems, {"acked": len(acked), "lost": len(missing),
                                                  "vectors_checked": len(present),
                                                  "recalled": f"{len(probe) - len(unfound)}/{len(probe)}"},
                 problems)


def no_duplicates(stored: Stored, sent: set[str]) -> Check:
    seen, twice = set(), []
    for i in stored.ids:
        if i in seen:
            twice.append(i)
        seen.add(i)
    foreign = [i for i in seen if i not in sent]
    problems = []
    if twice:
        problems.append(f"{len(twice)} ids stored more than once, e.g. {twice[:EXAMPLES]}")
    if foreign:
        problems.append(f"{len(foreign)} stored ids were never sent, e.g. {foreign[:EXAMPLES]}")
    return Check("no_duplicates", not problems, {"stored": len(stored.ids), "duplicates": len(twice)},
                 problems)


def sequence_continuity(clients) -> Check:
    """Per client (one session each): the sequence numbers its acked
    observations got tile 1..last with no gap and no repeat; acks that
    stored something (not `duplicate`) never overlap; no resume reports
    less than the client had seen acked; the close reports the last ack."""
    problems = []
    acks_total = 0
    for label, c in clients:
        seqs = sorted(c.acked.values())
        repeats = len(seqs) - len(set(seqs))
        if repeats:
            problems.append(f"{label}: {repeats} sequence numbers acked for two observations")
        expect = list(range(1, len(set(seqs)) + 1))
        if sorted(set(seqs)) != expect:
            gaps = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
            problems.append(f"{label}: acked sequences skip {len(gaps)} numbers, e.g. {gaps[:EXAMPLES]}")
        stored = {}
        for session, lo, hi, duplicate, gen in set(c.acks):  # a reply the network doubled counts once
            acks_total += 1
            if not duplicate:
                stored.setdefault(session, []).append((gen, lo, hi))
        for session, ranges in stored.items():
            ranges.sort()
            top = 0
            for gen, lo, hi in ranges:
                if lo <= top:
                    problems.append(f"{label}: session {session[:8]} stored {lo}..{hi} after {top} "
                                    f"(generation {gen}): a sequence stored twice")
                    break
                top = hi
        for known, server in c.resumes:
            if server < known:
                problems.append(f"{label}: a resume reported last_sequence {server} after {known} "
                                "were acked: the server forgot acked observations")
        if c.closed_at is not None and c.closed_at != c.last_acked:
            problems.append(f"{label}: the session closed at {c.closed_at}, the last ack was {c.last_acked}")
    return Check("sequence_continuity", not problems, {"acks": acks_total}, problems[:20])


def graph_integrity(stored: Stored) -> Check:
    problems, nodes = [], 0
    for seg in stored.segments:
        n = seg.indexed
        nodes += n
        M = seg.layout.M
        bad = graph_violations(seg.graph_r, n, M)
        if bad:
            problems.append(f"{seg.name}: {len(bad)} violations, e.g. {bad[:3]}")
    return Check("graph_integrity", not problems, {"segments": len(stored.segments), "nodes": nodes},
                 problems)


def visibility(latencies: list[float], bound_s: float) -> Check:
    if not latencies:
        return Check("visibility", False, {}, ["no ack was ever reported indexed"])
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))
    figures = {"samples": len(latencies), "p50_ms": round(p50 * 1000, 1), "p99_ms": round(p99 * 1000, 1),
               "max_ms": round(max(latencies) * 1000, 1)}
    problems = [] if p99 <= bound_s else [f"ack-to-indexed p99 {p99:.1f} s exceeds {bound_s} s"]
    return Check("visibility", not problems, figures, problems)


def eventual_recall(engine, stored: Stored, sent: dict[str, tuple], acked: set[str], failed: list,
                    sample: int, seed: int) -> Check:
    """Faults are over and the clients drained: all sent is acked, all stored
    indexed, and the graph alone (consistency="indexed") finds a sample."""
    problems = []
    unacked = [i for i in sent if i not in acked]
    if unacked:
        problems.append(f"{len(unacked)} sent ids never acked, e.g. {unacked[:EXAMPLES]}")
    if failed:
        problems.append(f"{len(failed)} batches refused for good: {[code for code, _ in failed][:EXAMPLES]}")
    if stored.indexed < stored.count:
        problems.append(f"{stored.count - stored.indexed} stored observations not indexed")
    probe = random.Random(seed).sample(sorted(acked), min(sample, len(acked)))
    unfound = [i for i in probe
               if i not in {m.id for m in engine.recall(SPACE, sent[i][0], k=10, consistency="indexed",
                                                       ef=256)}]
    if unfound:
        problems.append(f"{len(unfound)} of {len(probe)} not found by the graph alone, e.g. "
                        f"{unfound[:EXAMPLES]}")
    return Check("eventual_recall", not problems, {"sent": len(sent), "acked": len(acked),
                                                    "graph_recalled": len(probe) - len(unfound)}, problems)


def counters(stats: dict, stored: Stored, acked: set[str]) -> Check:
    space = stats["spaces"].get(SPACE, {})
    count, indexed, buried = space.get("count"), space.get("indexed"), space.get("buried", 0)
    problems = []
    if count != len(acked):
        problems.append(f"the engine counts {count} observations, the clients saw {len(acked)} acked")
    if count != len(stored.ids):
        problems.append(f"the engine counts {count} observations, its memory holds {len(stored.ids)}")
    if indexed != count + buried:  # `indexed` counts rows, buried ones included
        problems.append(f"the engine reports {indexed} rows indexed of {count} observations and "
                        f"{buried} buried rows")
    return Check("counters", not problems, {"count": count, "indexed": indexed, "buried": buried,
                                             "acked": len(acked)}, problems)


def wait_indexed(name: str, timeout: float) -> None:
    """Until every visible row of SPACE is in a graph (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with attach(name) as engine:
            stored = read_store(engine)
            if stored.indexed >= stored.count:
                return
        time.sleep(0.2)
