import os
import signal
import subprocess
import sys
import time

import pytest

from engram_shm import Engine
from engram_shm.store import shm
from engram_shm.store.catalog import collect_stale
from engram_shm.synthetic import clustered

import naive

N, DIM = 40_000, 96


def wait_for(predicate, timeout=60.0, every=0.001):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def kill_a_worker_mid_insert(e) -> int:
    """SIGKILL a worker while it holds a segment (inside a chunk of inserts),
    then wait for the supervisor to have restarted it."""
    holder = {}

    def someone_inserting():
        for w, pid in zip(e.stats()["writers"], e.supervisor.pids()):
            if w["claimed_segment"] >= 0 and pid is not None and w["pid"] == pid:
                holder.update(worker=w["worker"], pid=pid)
                return True
        return False

    assert wait_for(someone_inserting), "no worker was inserting"
    os.kill(holder["pid"], signal.SIGKILL)
    assert wait_for(lambda: e.supervisor.pids()[holder["worker"]] not in (None, holder["pid"])
                    and e.supervisor.ready_seconds()[holder["worker"]] is not None)
    return holder["pid"]


def test_workers_killed_five_times_during_heavy_indexing_lose_nothing():
    data = clustered(N, DIM, seed=31)
    ids = [f"k{i}" for i in range(N)]
    with Engine(workers=2, worker_mode="process", segment_capacity=8192, ef_construction=200,
                ring_capacity=N) as e:
        e.observe("hot", ids[:N // 2], data[:N // 2])
        killed = []
        for lo in range(N // 2, N, N // 10):  # five more batches, a kill after each
            e.observe("hot", ids[lo:lo + N // 10], data[lo:lo + N // 10])
            killed.append(kill_a_worker_mid_insert(e))
        assert len(set(killed)) == 5
        assert e.wait_indexed(300), "indexing did not complete after the kills"
        stats = e.stats()
        assert sum(w["restarts"] for w in stats["writers"]) == 5
        assert stats["spaces"]["hot"]["indexed"] == N
        for seg in e.directory.segments():
            assert seg.indexed == seg.accepted
            assert naive.graph_violations(seg.graph_r, seg.indexed, 16) == [], seg.name
        misses = [i for i in range(N) if e.recall("hot", data[i], k=1)[0].id != ids[i]]
        assert misses == []


def test_workers_leave_when_their_engine_is_killed():
    script = ("import signal, numpy as np\n"
              "from engram_shm import Engine\n"
              "e = Engine(name='t-orphans', workers=2, worker_mode='process')\n"
              "e.observe('s', 'a', np.ones(4))\n"
              "print(*e.supervisor.pids(), flush=True)\n"
              "signal.pause()\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        p.kill()
        p.wait()

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"

    assert wait_for(lambda: all(gone(pid) for pid in pids), timeout=30)
    collect_stale("t-orphans")
    assert shm.list_blocks("t-orphans") == []


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_one_hot_space_is_indexed_by_every_writer(mode):
    data = clustered(6000, 32, seed=32)
    with Engine(workers=2, worker_mode=mode, ring_capacity=6000) as e:
        e.observe("hot", [str(i) for i in range(6000)], data)
        assert e.wait_indexed(120)
        s = e.stats()
        assert s["spaces"]["hot"]["segments"] >= 2
        assert all(w["inserted"] > 0 for w in s["writers"]), s["writers"]
