"""The demo: stream synthetic observations into an embedded engine, recall while
ingesting (every acked observation must be its own top hit at once), then
measure recall quality against brute force and report."""

from __future__ import annotations

import sys
import time

import numpy as np
from tqdm import tqdm

from .config import EngineConfig
from .engine.embedded import Engine
from .kernels.warm import warm
from .synthetic import clustered

TOPICS = ["weather", "music", "code review", "groceries", "travel", "physics", "a meeting",
          "the garden", "a film", "sleep"]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(config: EngineConfig, n: int = 20_000, dim: int = 384, batch: int = 256,
             queries: int = 200) -> dict:
    _say("engram-shm demo: loading kernels (compiles once, then cached) ...")
    warm_s = warm()
    data, cluster = clustered(n + queries, dim, clusters=len(TOPICS), seed=config.seed, labels=True)
    data, held_out = data[:n], data[n:]
    rng = np.random.default_rng(config.seed)
    recall_ms, own_hits, probes = [], 0, 0
    with Engine(config) as engine:
        engine.create_space("demo", dim=dim)
        start = time.perf_counter()
        with tqdm(total=n, unit="obs", desc="streaming", file=sys.stderr) as bar:
            for lo in range(0, n, batch):
                hi = min(n, lo + batch)
                engine.observe("demo", [f"obs-{i}" for i in range(lo, hi)], data[lo:hi],
                               what=[f"observation {i} about {TOPICS[cluster[i]]}" for i in range(lo, hi)])
                probe = int(rng.integers(lo, hi))
                t = time.perf_counter()
                top = engine.recall("demo", data[probe], k=1)
                recall_ms.append((time.perf_counter() - t) * 1e3)
                own_hits += bool(top) and top[0].id == f"obs-{probe}"
                probes += 1
                bar.update(hi - lo)
        ingest_s = time.perf_counter() - start
        _say("indexing the rest ...")
        engine.wait_indexed()
        indexed_s = time.perf_counter() - start
        exact = np.argsort(-(held_out @ data.T), axis=1)[:, :10]
        hits = 0
        for q, want in zip(held_out, exact):
            got = {int(m.id[4:]) for m in engine.recall("demo", q, k=10)}
            hits += len(got & set(want.tolist()))
        example = engine.recall("demo", held_out[0], k=3)
        stats = engine.stats()["spaces"]["demo"]
    report = {
        "observations": n, "dim": dim, "dtype": config.dtype, "workers": config.worker_count,
        "kernels_ready_s": round(warm_s, 2),
        "ingest_per_s": round(n / ingest_s), "all_indexed_after_s": round(indexed_s, 2),
        "own_vector_top_hit_while_ingesting": f"{own_hits}/{probes}",
        "recall_p50_ms": round(float(np.percentile(recall_ms, 50)), 3),
        "recall_p99_ms": round(float(np.percentile(recall_ms, 99)), 3),
        "recall_at_10": round(hits / exact.size, 4),
        "segments": stats["segments"], "shm_mib": round(stats["shm_bytes"] / 2**20, 1),
    }
    print(f"streamed {n} observations of {dim} dims ({config.dtype}) at {report['ingest_per_s']}/s; "
          f"all indexed by {indexed_s:.1f} s with {config.worker_count} index writers")
    print(f"while streaming, each batch's probe was its own top hit {own_hits}/{probes} times "
          f"(recall p50 {report['recall_p50_ms']} ms, p99 {report['recall_p99_ms']} ms)")
    print(f"recall@10 against brute force on {queries} held-out cues: {report['recall_at_10']}")
    print(f"shared memory in use: {report['shm_mib']} MiB in {stats['segments']} segment(s)")
    print(f"top 3 for a held-out cue about {TOPICS[cluster[n]]}:")
    for m in example:
        print(f"  {m.similarity:.3f}  {m.id:<10} {m.what}")
    return report
