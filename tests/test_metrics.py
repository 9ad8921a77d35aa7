"""A live server's /metrics, parsed with prometheus-client's own parser, holds
what the test did to it: observations accepted per space (spaces past
--metrics-spaces summed as "other"), rejections by reason, recalls in the
latency histogram by consistency, the restart of an index worker killed with
SIGKILL; and `engram-shm stats` / `top` read the same server over the wire,
finding it through ENGRAM_ENDPOINT."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chaos.server import children
from engram_shm import Client, EngineConfig
from engram_shm.auth.gate import check_bind
from engram_shm.errors import DimensionMismatch, InsecureBind, InvalidArgument, NonFiniteValue
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import free_port, running_server

DIM = 16
COUNTS = {"alpha": 300, "beta": 200, "gamma": 120, "delta": 80}  # gamma and delta: past metrics_spaces=2


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with running_server("--metrics", f"127.0.0.1:{port}", "--metrics-spaces", "2",
                        "--recall-workers", "1") as (endpoint, name, proc):
        yield endpoint, name, f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics, name: str, **labels) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def scrape_until(url: str, done, timeout: float = 30.0) -> dict:
    """Scrape until `done(metrics)`; returns those metrics."""
    deadline = time.monotonic() + timeout
    while not done(metrics := scrape(url)):
        assert time.monotonic() < deadline, f"timed out; last scrape: {metrics}"
        time.sleep(0.1)
    return metrics


def test_counts_match_what_was_done(server):
    endpoint, _, url = server
    data = clustered(sum(COUNTS.values()), DIM, seed=91)
    at = 0
    with Client(endpoint) as c:
        for space, n in COUNTS.items():
            c.observe_batch(space, [f"{space}{i}" for i in range(n)], data[at:at + n])
            at += n
        c.flush()
        for _ in range(5):
            c.recall("alpha", data[0], k=3)
        for _ in range(2):
            c.recall("beta", data[400], k=3, consistency="indexed")
    with Client(endpoint) as c, pytest.raises(NonFiniteValue):
        c.observe_batch("alpha", ["n0", "n1", "n2"], np.full((3, DIM), np.nan, np.float32))
        c.flush()
    with Client(endpoint) as c, pytest.raises(DimensionMismatch):
        c.observe_batch("gamma", ["w0", "w1"], np.ones((2, DIM + 1), np.float32))
        c.flush()
    m = scrape(url)
    accepted = "engram_streaming_observations_total"
    assert value(m, accepted, memory_space="alpha", priority="normal") == 300
    assert value(m, accepted, memory_space="beta", priority="normal") == 200
    assert value(m, accepted, memory_space="other", priority="normal") == 200  # gamma + delta
    assert {dict(k)["memory_space"] for k in m[accepted]} == {"alpha", "beta", "other"}
    rejected = "engram_streaming_observations_rejected_total"
    assert value(m, rejected, memory_space="alpha", reason="non_finite") == 3
    assert value(m, rejected, memory_space="other", reason="dim_mismatch") == 2
    recalls = "engram_streaming_recall_latency_seconds_count"
    assert value(m, recalls, consistency="strong") == 5
    assert value(m, recalls, consistency="indexed") == 2
    assert value(m, "engram_streaming_recall_latency_seconds_bucket", consistency="strong", le="+Inf") == 5
    stored = "engram_shm_space_accepted_total"
    assert value(m, stored, memory_space="other") == 200
    # Indexing catches up: the graph counts reach the stored ones, the window empties,
    # and every observation's accept-to-indexed time is in the histogram.
    m = scrape_until(url, lambda s: value(s, "engram_streaming_observation_latency_seconds_count")
                     == sum(COUNTS.values()))
    assert value(m, "engram_shm_space_indexed_total", memory_space="alpha") == 300
    assert value(m, "engram_streaming_queue_depth", memory_space="beta") == 0
    assert sum(m["engram_streaming_batch_size_count"].values()) > 0
    assert value(m, "engram_streaming_active_sessions_total") >= 0
    assert value(m, "engram_shm_wal_written_bytes_total") > 0


def test_a_killed_worker_is_counted_as_restarted(server):
    endpoint, name, url = server
    before = value(scrape(url), "engram_shm_process_restarts_total", process="index-0")
    pid = next(p for p in children(name)["worker"]
               if pathlib.Path(f"/proc/{p}/cmdline").read_text().split("\0")[4] == "0")  # -m module ENGINE 0
    os.kill(pid, signal.SIGKILL)
    m = scrape_until(url, lambda s: value(s, "engram_shm_process_restarts_total", process="index-0") > before
                     and value(s, "engram_shm_process_up", process="index-0") == 1)
    assert value(m, "engram_shm_process_restarts_total", process="index-1") == 0


def test_stats_and_top_find_the_server_through_the_environment(server):
    endpoint, name, _ = server
    env = {**os.environ, "ENGRAM_ENDPOINT": endpoint, "COLUMNS": "200"}  # rich: wide enough for every column
    run = lambda *args: subprocess.run([sys.executable, "-m", "engram_shm.cli", *args], env=env,
                                       capture_output=True, text=True, timeout=60)
    r = run("stats", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["engine"] == name and stats["spaces"]["alpha"]["count"] >= 300
    assert stats["latency"]["recall"]["count"] >= 7
    r = run("stats")
    assert r.returncode == 0 and "alpha" in r.stdout and "recall latency" in r.stdout, r.stderr
    r = run("top", "--count", "1", "--interval", "0.2")
    assert r.returncode == 0 and "accepted/s" in r.stdout and "delta" in r.stdout, r.stderr


def test_metrics_beyond_loopback_need_insecure_and_a_bad_address_is_refused():
    with pytest.raises(InsecureBind):
        check_bind(EngineConfig(metrics="0.0.0.0:9108"))
    assert check_bind(EngineConfig(metrics="0.0.0.0:9108", insecure=True)) is True
    assert check_bind(EngineConfig(metrics="[::1]:0")) is False
    for bad in ("9108", "localhost:port", ":9108", "127.0.0.1:70000"):
        with pytest.raises(InvalidArgument):
            EngineConfig(metrics=bad)
