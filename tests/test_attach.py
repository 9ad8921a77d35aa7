import json
import os
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engram_shm import Engine, attach
from engram_shm.engine.beacon import LINGER_NS
from engram_shm.errors import Corrupt, EngineClosed, EngineNotFound
from engram_shm.store import shm
from engram_shm.store.catalog import RECALL_UNTIL, ProcessWatch, process_start
from engram_shm.synthetic import clustered

READER = """
import json, sys
import numpy as np
from engram_shm import attach
name, generation = sys.argv[1], int(sys.argv[2])
cues = np.load(sys.argv[3])
with attach(name) as reader:
    print(json.dumps([[m.id for m in reader.recall("s", c, k=10, consistency=generation)]
                      for c in cues]))
"""


def test_attached_process_sees_the_same_ids_at_a_fixed_generation(tmp_path):
    data = clustered(8000, 48, seed=41)
    cues = clustered(8100, 48, seed=41)[8000:]
    np.save(tmp_path / "cues.npy", cues)
    with Engine(workers=2, worker_mode="process") as e:
        e.observe("s", [f"a{i}" for i in range(5000)], data[:5000])
        generation = e.generation
        e.observe("s", [f"b{i}" for i in range(3000)], data[5000:])  # after the snapshot
        assert e.wait_indexed(120)
        mine = [[m.id for m in e.recall("s", c, k=10, consistency=generation)] for c in cues]
        out = subprocess.run([sys.executable, "-c", READER, e.name, str(generation),
                              str(tmp_path / "cues.npy")], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        theirs = json.loads(out)
    assert len(mine) == 100 and all(len(ids) == 10 for ids in mine)
    assert theirs == mine
    assert all(i.startswith("a") for ids in mine for i in ids)


def test_attached_reader_follows_new_data_and_stops_with_the_engine():
    with Engine(workers=1) as e:
        e.observe("s", "first", np.ones(8))
        reader = attach(e.name)
        assert reader.spaces() == ["s"]
        assert reader.recall("s", np.ones(8), k=1)[0].id == "first"
        e.observe("t", ["x", "y"], np.eye(2, 8))  # a new space and segment after attaching
        assert [m.id for m in reader.recall("t", np.eye(2, 8)[1], k=2)] == ["y", "x"]
        assert reader.generation == e.generation == 3
        seg = reader.directory.segments()[0]
        with pytest.raises(ValueError):
            seg.r.vectors[0, 0] = 1  # read-only views
        reader.close()
        assert e.recall("s", np.ones(8), k=1)[0].id == "first"  # the engine's memory stays
        reader = attach(e.name)
    with pytest.raises(EngineClosed):
        reader.recall("s", np.ones(8))
    reader.close()
    with pytest.raises(EngineNotFound):
        attach(e.name)


OWNER = """
import time
import numpy as np
from engram_shm import Engine
engine = Engine(workers=1)
engine.observe("s", "first", np.ones(8))
print(engine.name, flush=True)
time.sleep(120)
"""


def test_an_attached_reader_stops_when_the_engine_is_killed():
    """The engine's process SIGKILLed, with no clean stop recorded: the next
    recall of a reader attached before says the engine has stopped."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    name = None
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "the engine did not start"
        name = proc.stdout.readline().strip()
        with attach(name) as reader:
            assert reader.recall("s", np.ones(8), k=1)[0].id == "first"
            proc.kill()
            proc.wait(30)
            with pytest.raises(EngineClosed, match="has stopped"):
                reader.recall("s", np.ones(8))
    finally:
        proc.kill()
        proc.wait(30)
        for block in shm.list_blocks(name) if name else ():
            shm.unlink(block)


def test_a_process_watch_names_one_process_and_sees_it_exit():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        start = process_start(child.pid)
        watch, wrong = ProcessWatch(child.pid, start), ProcessWatch(child.pid, start - 1)
        assert watch.alive() and not wrong.alive()  # another start: a reused pid
        child.stdin.close()
        child.wait(30)  # reaped: the pid may now be reused, the watch still knows
        assert not watch.alive() and not ProcessWatch(child.pid, start).alive()
        watch.close()
        wrong.close()
    finally:
        child.kill()
        child.wait(30)


def test_an_attached_reader_names_a_segment_removed_behind_the_engine():
    """A LIVE segment whose block someone else removed is reported with a
    stable code, not retried for ever as if a compaction had retired it."""
    with Engine(workers=1) as e:
        e.observe("s", "first", np.ones(8))
        os.unlink(f"/dev/shm/{e.writer.spaces['s'].segments[0].name}")  # the engine keeps its mapping
        reader = attach(e.name)
        try:
            outcome = []
            recall = threading.Thread(target=lambda: outcome.append(_raised(reader.recall, "s", np.ones(8))))
            recall.start()
            recall.join(30)
            assert outcome and isinstance(outcome[0], Corrupt) and "gone from /dev/shm" in str(outcome[0])
        finally:
            reader.close()


def _raised(call, *args):
    try:
        call(*args)
    except Exception as e:
        return e
    return None


def test_every_recall_stamps_the_beacon_the_index_writers_defer_to():
    """A recall, embedded or attached, stamps a deadline into the catalog's
    beacon as it starts and moves it to LINGER_NS past its search's end
    (engine/beacon.py)."""
    data = clustered(500, 16, seed=5)
    with Engine(workers=1) as e:
        e.observe("b", [f"b{i}" for i in range(500)], data)
        with attach(e.name) as reader:
            for recall, catalog in ((e.recall, e.catalog), (reader.recall, reader.catalog)):
                before = time.monotonic_ns()
                recall("b", data[0], k=3)
                after = time.monotonic_ns()
                assert before + LINGER_NS <= catalog.header[RECALL_UNTIL] <= after + LINGER_NS
