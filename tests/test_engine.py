import math
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram_shm import Engine, EngramError
from engram_shm.errors import (
    DimensionMismatch,
    DuplicateId,
    EmptyBatch,
    EngineClosed,
    InvalidArgument,
    InvalidInput,
    InvalidText,
    LengthMismatch,
    NonFiniteValue,
    OutOfRange,
    SpaceExists,
    TextTooLong,
    UnknownSpace,
    ZeroVector,
)
from engram_shm.kernels.atomics import compare_and_swap
from engram_shm.store import shm
from engram_shm.store.catalog import collect_stale
from engram_shm.store.layout import WRITER
from engram_shm.synthetic import clustered

DIM = 32


@pytest.fixture(scope="module")
def engine():
    with Engine(workers=2, segment_capacity=4096) as e:
        yield e


@contextmanager
def indexing_held(engine, space):
    """Hold every segment of `space` as if a writer were busy on it, so what is
    observed meanwhile stays in the unindexed window."""
    segments = engine.writer.spaces[space].segments
    engine.wait_indexed(30)
    held = [s for s in segments if compare_and_swap(s.header, WRITER, 0, -7) == 0]
    assert len(held) == len(segments)
    try:
        yield
    finally:
        for s in held:
            compare_and_swap(s.header, WRITER, -7, 0)


def ids(prefix, n):
    return [f"{prefix}-{i}" for i in range(n)]


def test_observe_then_recall_finds_each_own_vector(engine):
    data = clustered(3000, DIM, seed=21)
    for lo in range(0, 3000, 500):
        engine.observe("own", ids("own", 3000)[lo:lo + 500], data[lo:lo + 500],
                       what=[f"text {i}" for i in range(lo, lo + 500)])
    assert engine.wait_indexed(60)
    for i in range(0, 3000, 37):
        top = engine.recall("own", data[i], k=1)[0]
        assert top.id == f"own-{i}" and top.what == f"text {i}"
        assert top.similarity == pytest.approx(1.0, abs=2e-3)


def test_read_your_writes_of_unindexed_observations():
    data = clustered(600, DIM, seed=22)
    # One writer and a first segment that holds everything: one open segment, all of it held below.
    with Engine(workers=1, first_segment_capacity=1024) as engine:
        engine.observe("ryw", ids("old", 100), data[:100])
        with indexing_held(engine, "ryw"):
            engine.observe("ryw", ids("new", 500), data[100:])
            assert engine.stats()["spaces"]["ryw"]["window"] == 500
            for i in range(100, 600, 25):
                assert engine.recall("ryw", data[i], k=1)[0].id == f"new-{i - 100}"
                indexed_only = engine.recall("ryw", data[i], k=5, consistency="indexed")
                assert all(m.id.startswith("old") for m in indexed_only)
        assert engine.wait_indexed(30)
        assert engine.recall("ryw", data[300], k=1, consistency="indexed")[0].id == "new-200"


def test_snapshot_generation_hides_later_observations(engine):
    data = clustered(400, DIM, seed=23)
    engine.observe("snap", ids("a", 200), data[:200])
    g = engine.generation
    engine.observe("snap", ids("b", 200), data[200:])
    for i in range(200, 400, 20):
        found = engine.recall("snap", data[i], k=10, consistency=g)
        assert found and all(m.id.startswith("a-") and m.generation <= g for m in found)
        assert engine.recall("snap", data[i], k=1)[0].id == f"b-{i - 200}"
    with pytest.raises(InvalidArgument):
        engine.recall("snap", data[0], consistency=engine.generation + 1)


def test_results_carry_what_was_observed(engine):
    v = clustered(2, DIM, seed=24)
    engine.observe("fields", "x", v[0], what="naïve café ☕", when=1700000000.5, confidence=0.25)
    engine.observe("fields", ["y"], v[1:], what=[None], when=[1.0], confidence=[1.0])
    m = engine.recall("fields", v[0], k=1)[0]
    assert (m.id, m.what, m.when, m.confidence) == ("x", "naïve café ☕", 1700000000.5, 0.25)
    assert engine.recall("fields", v[1], k=1)[0].what == ""


def test_threshold_and_k(engine):
    data = clustered(50, DIM, seed=25)
    engine.observe("thr", ids("t", 50), data)
    everything = engine.recall("thr", data[0], k=50)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    cosines = dict(zip(ids("t", 50), (unit @ unit[0]).tolist()))
    for m in everything:  # the cosine of the stored (f16) rows, as Python numbers
        assert abs(m.similarity - cosines[m.id]) < 2e-3
        assert all(type(v) is t for v, t in zip(m, (str, float, float, str, float, int)))
    found = engine.recall("thr", data[0], k=50, threshold=0.5)
    assert found == [m for m in everything if m.similarity >= 0.5] and 0 < len(found) < 50
    assert [m.similarity for m in found] == sorted((m.similarity for m in found), reverse=True)
    assert len(engine.recall("thr", data[0], k=7)) == 7
    for bad in ("0.5", float("nan"), True, [0.5]):
        with pytest.raises(InvalidArgument, match="threshold"):
            engine.recall("thr", data[0], threshold=bad)


def test_space_takes_dimension_from_first_observation_and_defaults(engine):
    engine.observe("auto", "a", np.ones(5))
    p = engine.stats()["spaces"]["auto"]
    assert (p["dim"], p["dtype"], p["metric"], p["M"]) == (5, "f16", "cosine", 16)


def test_create_space_options_and_conflicts(engine):
    p = engine.create_space("l2space", dim=4, dtype="f32", metric="l2", M=8, ef_construction=40)
    assert engine.create_space("l2space", dim=4, dtype="f32", metric="l2", M=8,
                               ef_construction=40) == p
    with pytest.raises(SpaceExists):
        engine.create_space("l2space", dim=5, dtype="f32", metric="l2", M=8, ef_construction=40)
    engine.observe("l2space", ["p", "q"], [[0, 0, 0, 0], [3, 4, 0, 0]])
    m = engine.recall("l2space", [3, 4, 0, 0], k=2)
    assert [x.id for x in m] == ["q", "p"]
    assert m[1].similarity == pytest.approx(1 / (1 + 5))
    with pytest.raises(InvalidArgument):
        engine.create_space("bad", dim=4, dtype="f64")
    with pytest.raises(InvalidArgument):
        engine.create_space("bad", dim=0)


GOOD = dict(ids=["g1", "g2"], vectors=np.eye(2, DIM), what=["a", "b"], when=[1.0, 2.0],
            confidence=[0.5, 1.0])
BAD_INPUTS = [
    (dict(vectors=np.eye(2, DIM + 1)), DimensionMismatch),
    (dict(vectors=np.full((2, DIM), np.nan)), NonFiniteValue),
    (dict(vectors=np.where(np.eye(2, DIM) > 0, np.inf, 0)), NonFiniteValue),
    (dict(vectors=np.zeros((2, DIM))), ZeroVector),
    (dict(ids=[], vectors=np.zeros((0, DIM)), what=[], when=[], confidence=[]), EmptyBatch),
    (dict(ids=["g1"]), LengthMismatch),
    (dict(what=["only one"]), LengthMismatch),
    (dict(when=[1.0]), LengthMismatch),
    (dict(what=[b"\xff\xfe", "b"]), InvalidText),
    (dict(what=["\udcff", "b"]), InvalidText),
    (dict(ids=["\ud800", "g2"]), InvalidText),
    (dict(ids=["g1", "g1"]), DuplicateId),
    (dict(ids=["", "g2"]), InvalidArgument),
    (dict(ids=["x" * 300, "g2"]), TextTooLong),
    (dict(ids=[1, 2]), InvalidArgument),
    (dict(confidence=[1.5, 0.2]), OutOfRange),
    (dict(confidence=[np.nan, 0.2]), NonFiniteValue),
    (dict(when=[np.inf, 1.0]), NonFiniteValue),
    (dict(vectors=[["a"] * DIM] * 2), InvalidArgument),
    (dict(vectors=np.ones((2, 2, DIM))), InvalidArgument),
    (dict(vectors=np.ones((2, DIM), complex)), InvalidArgument),
]


@pytest.mark.parametrize("change,error", BAD_INPUTS, ids=[e.__name__ + str(i) for i, (_, e) in
                                                          enumerate(BAD_INPUTS)])
def test_bad_observations_are_refused_and_change_nothing(engine, change, error, request):
    space = "strict-" + request.node.callspec.id
    engine.observe(space, ["base"], np.eye(1, DIM))
    before = (engine.generation, engine.stats()["spaces"][space]["count"])
    with pytest.raises(error) as info:
        engine.observe(space, **{**GOOD, **change})
    assert info.value.code and str(info.value)
    assert (engine.generation, engine.stats()["spaces"][space]["count"]) == before
    assert engine.recall(space, np.eye(1, DIM)[0], k=5)[0].id == "base"


@pytest.mark.parametrize("change,error", BAD_INPUTS[1:4], ids=["nan", "inf", "zero"])
def test_a_refused_first_batch_leaves_no_space_behind(engine, change, error, request):
    space = "never-made-" + request.node.callspec.id
    with pytest.raises(error):
        engine.observe(space, **{**GOOD, **change})
    assert space not in engine.stats()["spaces"]
    engine.observe(space, ["ok"], np.eye(1, DIM + 1))  # the name is free, for any dim
    assert engine.stats()["spaces"][space]["count"] == 1


def test_duplicate_of_a_stored_id_is_refused(engine):
    engine.observe("dups", "same", np.ones(DIM))
    with pytest.raises(DuplicateId) as info:
        engine.observe("dups", ["other", "same"], np.ones((2, DIM)))
    assert info.value.details["id"] == "same"
    assert [m.id for m in engine.recall("dups", np.ones(DIM), k=5)] == ["same"]


def test_bad_recalls(engine):
    engine.observe("rec", "r", np.ones(DIM))
    with pytest.raises(UnknownSpace):
        engine.recall("nowhere", np.ones(DIM))
    for k in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument):
            engine.recall("rec", np.ones(DIM), k=k)
    with pytest.raises(DimensionMismatch):
        engine.recall("rec", np.ones(DIM + 1))
    with pytest.raises(NonFiniteValue):
        engine.recall("rec", np.full(DIM, np.nan))
    with pytest.raises(ZeroVector):
        engine.recall("rec", np.zeros(DIM))
    with pytest.raises(InvalidArgument):
        engine.recall("rec", np.ones(DIM), consistency="eventual")


hostile = st.one_of(st.none(), st.text(max_size=5), st.binary(max_size=5), st.integers(),
                    st.floats(), st.lists(st.one_of(st.text(max_size=3), st.floats(), st.none()),
                                          max_size=3),
                    st.just(np.full((2, DIM), 1e39)), st.just(np.ones((2, DIM), np.float16)))


@given(ids=hostile, vectors=hostile, what=hostile, when=hostile, confidence=hostile)
def test_hostile_input_raises_engram_errors_only(engine, ids, vectors, what, when, confidence):
    before = engine.generation
    try:
        engine.observe("hostile", ids, vectors, what=what, when=when, confidence=confidence)
    except InvalidInput as e:
        assert e.code in {"invalid_argument", "empty_batch", "length_mismatch", "dim_mismatch",
                          "non_finite", "zero_vector", "out_of_range", "invalid_utf8",
                          "text_too_long", "duplicate_id"}
        assert engine.generation == before


cues = st.one_of(hostile, st.lists(st.floats(width=32), min_size=DIM, max_size=DIM),
                 st.lists(st.integers(-2**70, 2**70), min_size=DIM, max_size=DIM),
                 st.lists(st.floats(width=16), min_size=DIM, max_size=DIM).map(
                     lambda v: np.array(v, np.float16)))


@given(cue=cues, k=st.one_of(st.integers(-2, 3), st.floats(), st.none()),
       threshold=st.one_of(st.none(), st.floats(), st.text(max_size=2)))
def test_hostile_cues_raise_engram_errors_only(engine, cue, k, threshold):
    """A recall by any cue, k and threshold answers or raises an input error
    with a stable code; an answer holds at most k rows, best first, all
    reaching the threshold."""
    if "cues" not in engine.stats()["spaces"]:
        engine.observe("cues", ids("c", 8), np.eye(8, DIM) + 0.1)
    try:
        found = engine.recall("cues", cue, k=k, threshold=threshold)
    except InvalidInput as e:
        assert e.code in {"invalid_argument", "length_mismatch", "dim_mismatch", "non_finite",
                          "zero_vector"}
        return
    sims = [m.similarity for m in found]
    assert len(found) <= k and sims == sorted(sims, reverse=True)
    assert threshold is None or all(s >= threshold for s in sims)
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in sims)


def test_concurrent_observers_and_readers():
    data = clustered(4000, DIM, seed=26)
    errors = []
    with Engine(workers=2, segment_capacity=1024) as e:
        def write(t):
            try:
                for lo in range(t * 1000, t * 1000 + 1000, 100):
                    e.observe("busy", ids("w", 4000)[lo:lo + 100], data[lo:lo + 100])
            except Exception as ex:  # reported below
                errors.append(ex)

        def read():
            try:
                for i in range(200):
                    e.recall("busy", data[i % 50], k=5)
            except UnknownSpace:
                pass
            except Exception as ex:
                errors.append(ex)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        threads += [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert e.wait_indexed(60)
        s = e.stats()["spaces"]["busy"]
        assert s["count"] == s["indexed"] == 4000 and s["segments"] >= 4
        misses = [i for i in range(0, 4000, 9) if e.recall("busy", data[i], k=1)[0].id != f"w-{i}"]
        assert not misses


def test_close_removes_shared_memory_and_refuses_calls():
    e = Engine(workers=1)
    e.observe("s", "a", np.ones(4))
    name = e.name
    assert shm.list_blocks(name)
    e.close()
    assert shm.list_blocks(name) == []
    with pytest.raises(EngineClosed):
        e.observe("s", "b", np.ones(4))
    with pytest.raises(EngramError):
        e.recall("s", np.ones(4))
    e.close()  # idempotent


CLOSE_UNDER_RECALLS = """
import sys, threading, time
import numpy as np
from engram_shm import Engine
x = np.random.default_rng(0).normal(size=(20000, 32)).astype(np.float32)
errors = []
for round in range(8):
    e = Engine(workers=1, name=f"{sys.argv[1]}-{round}")
    e.create_space("s", dim=32)
    e.observe("s", [f"i{i}" for i in range(len(x))], x)
    e.wait_indexed()
    started = threading.Barrier(4)
    def recalls():
        started.wait()
        while True:
            try:
                e.recall("s", x[1], k=10, ef=1000)
            except Exception as ex:
                errors.append(type(ex).__name__)
                return
    threads = [threading.Thread(target=recalls) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.1)
    e.close()
    for t in threads:
        t.join()
print(sorted(set(errors)), len(errors))
"""


def test_close_waits_for_recalls_in_other_threads():
    """A recall's kernel reads segments through raw addresses: closing the
    engine under recalls in flight must let them leave first (it unmapped
    their segments under them, and the process crashed), and recalls after it
    fail with EngineClosed. In a subprocess: a crash must fail the test, not
    end pytest."""
    prefix = f"t-close-{os.getpid()}"
    try:
        done = subprocess.run([sys.executable, "-c", CLOSE_UNDER_RECALLS, prefix], capture_output=True,
                              text=True, timeout=300)
    finally:
        for round in range(8):  # what a crashed run left in /dev/shm
            collect_stale(f"{prefix}-{round}", min_age_s=0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "['EngineClosed'] 24"
