"""The specialisations `warm` compiles are every one the engine runs: a
process whose kernels are frozen after warm-up (as the engine's children
are, by `ready_child`, which also skips Numba's BLAS probe) ingests,
indexes, recalls, checkpoints and recovers every storage dtype and metric
without compiling anything, and without scipy.linalg."""

import os
import subprocess
import sys

import numpy as np
import psutil

from engram_shm import Client
from engram_shm.transport.launch import running_server

SCRIPT = """
import sys
import numpy as np
from engram_shm import Engine, attach
from engram_shm.kernels.warm import ready_child
assert ready_child() > 10
rng = np.random.default_rng(0)
data = rng.normal(size=(600, 24)).astype(np.float32)
with Engine(workers=2, data_dir=sys.argv[1]) as e:
    for dtype in ("f32", "f16", "int8"):
        for metric in ("cosine", "ip", "l2"):
            space = f"{dtype}-{metric}"
            e.create_space(space, dim=24, dtype=dtype, metric=metric)
            e.observe(space, [f"a{i}" for i in range(300)], data[:300])
            e.observe(space, [f"b{i}" for i in range(300)], data[300:].astype(np.float16))
            assert e.recall(space, data[5], k=3, consistency="strong")[0].id == "a5"
    e.wait_indexed()
    with attach(e.name) as r:
        assert r.recall("int8-l2", data[7], k=1, consistency="indexed")[0].id == "a7"
    e.checkpoint()
with Engine(workers=1, data_dir=sys.argv[1]) as e:
    assert e.recall("f16-ip", data[9] * 3, k=1, consistency=e.generation)[0].id == "a9"
from engram_shm.kernels.distance import _distances
from engram_shm.kernels.policy import metric_of
try:  # a shape nothing warmed (float64 rows) is refused, not compiled
    _distances(np.zeros((2, 3)), np.zeros((1, 3), np.float32), metric_of("l2")[0], np.zeros(2, np.float32))
except TypeError:
    assert sys.modules["scipy.linalg"] is None  # blocked, and nothing needed it
    print("ok")

"""


def test_an_engine_runs_on_frozen_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_server_and_its_children_never_map_scipy_linalg():
    """`engram-shm serve` and every child it starts skip Numba's BLAS probe
    (warm.skip_blas_probe): after ingest and recalls, no process of the
    server has scipy.linalg's libraries mapped."""
    rng = np.random.default_rng(1)
    data = rng.normal(size=(500, 16)).astype(np.float32)
    with running_server() as (endpoint, name, proc), Client(endpoint) as c:
        c.observe_batch("s", [f"a{i}" for i in range(500)], data)
        c.flush()
        assert c.recall("s", data[3], k=1)[0].id == "a3"
        server = psutil.Process(proc.pid)
        processes = [server, *server.children(recursive=True)]
        assert len(processes) >= 4  # front, two index workers, recall readers
        for process in processes:
            mapped = {m.path for m in process.memory_maps()}
            assert not [path for path in mapped if f"scipy{os.sep}linalg" in path], process.cmdline()
