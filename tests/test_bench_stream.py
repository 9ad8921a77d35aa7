import os
import subprocess
import sys

from test_bench import quick

# The systems at n=2000, then the slow peers at --peer-n 300 after engram_shm on the same rows.
RUNS = [("engram_shm", 2000), ("engram_shm_server", 2000), ("hnswlib", 2000), ("chromadb", 2000),
        ("engram_shm", 300), ("qdrant_local", 300), ("milvus_lite", 300)]
FIELDS = {"bench", "machine", "date", "system", "data", "n", "dim", "batch", "probes", "insert_per_s",
          "found_own_top_hit", "ingest_recall_p50_ms", "ingest_recall_p99_ms", "time_until_searchable_s",
          "time_until_indexed_s", "recall_at_10", "query_p50_ms", "query_p99_ms", "peak_memory_mib", "index",
          "queries", "run_s", "cpu_s"}


def test_stream_quick_runs_every_system_on_the_same_protocol():
    out, rows = quick("stream")
    assert [(r["system"], r["n"]) for r in rows] == RUNS
    for r in rows:
        assert set(r) >= FIELDS, (r["system"], FIELDS - set(r))
        assert r["bench"] == "stream" and r["dim"] == 64 and r["batch"] == 256, r
        assert r["insert_per_s"] > 0 and r["peak_memory_mib"] > 0, r
        assert 0 <= r["found_own_top_hit"] <= 1 and 0 <= r["recall_at_10"] <= 1, r
        assert r["ingest_recall_p99_ms"] >= r["ingest_recall_p50_ms"] > 0, r
        assert r["query_p99_ms"] >= r["query_p50_ms"] > 0, r
        assert r["time_until_indexed_s"] >= r["time_until_searchable_s"] > 0, r
    # Every observation engram_shm acked is recallable at once (strong
    # consistency), and its graphs find the neighbours afterwards.
    for r in (r for r in rows if r["system"].startswith("engram_shm")):
        assert r["found_own_top_hit"] == 1.0, r
        assert r["recall_at_10"] >= 0.9, r
        assert r["shm_mib"] > 0 and r["window_limit"] > 0, r
    assert rows[1]["server_peak_mib"] > 0 and rows[1]["peak_memory_mib"] > rows[1]["server_peak_mib"]
    assert out.count("ratios to engram_shm") == 2 and "n=300" in out


def test_stream_fails_with_the_stderr_of_a_system_that_failed(tmp_path):
    # An hnswlib that cannot be imported, in the child that runs it.
    (tmp_path / "hnswlib.py").write_text("raise ImportError('planted by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    proc = subprocess.run([sys.executable, "-m", "bench", "stream", "--quick", "--systems", "hnswlib"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "hnswlib failed" in proc.stderr and "planted by the test" in proc.stderr, proc.stderr
