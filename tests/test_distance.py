import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from llvmlite import binding as llvm

from engram_shm.errors import DimensionMismatch, InvalidArgument
from engram_shm.kernels.distance import distances, distances_of, int16_cue_max, int16_cue_width
from engram_shm.kernels.policy import ROW_FACTOR_CODES, metric_of

import naive

METRICS = ["cosine", "ip", "l2"]
values = st.floats(-8, 8, allow_nan=False, width=32)


@st.composite
def store_and_query(draw):
    dim = draw(st.integers(1, 97))
    n = draw(st.integers(1, 20))
    store = draw(arrays(np.float32, (n, dim), elements=values))
    if draw(st.booleans()):  # zero rows and duplicates are legal kernel input
        store[draw(st.integers(0, n - 1))] = 0
        store[-1] = store[0]
    q = draw(arrays(np.float32, (dim,), elements=values))
    return store, q


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@given(data=store_and_query())
def test_distances_match_naive(metric, dtype, data):
    store, q = data
    if dtype == "f16":
        store = store.astype(np.float16).view(np.uint16)
    got = distances(store, q, metric)
    want = naive.distances(store, q, metric)
    x = naive.as_f32(store)
    # f32 accumulation: error bounded by 1e-5 of the terms' magnitude
    scale = np.maximum(1.0, (np.abs(x) * np.abs(q)).sum(axis=1) + ((x - q) ** 2).sum(axis=1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale.max())


def test_unit_vectors_to_1e_5():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for metric in METRICS:
        for store in (x, x.astype(np.float16).view(np.uint16)):
            np.testing.assert_allclose(distances(store, x[7], metric),
                                       naive.distances(store, x[7], metric), atol=1e-5)


def test_bad_shapes_are_refused():
    store = np.zeros((3, 4), np.float32)
    with pytest.raises(DimensionMismatch):
        distances(store, np.zeros(5, np.float32), "l2")
    with pytest.raises(InvalidArgument):
        distances(store.astype(np.float64), np.zeros(4, np.float32), "l2")
    with pytest.raises(InvalidArgument):
        distances(store, np.zeros(4, np.float64), "l2")


@pytest.mark.parametrize("metric", METRICS)
@given(data=store_and_query(), draw=st.data())
def test_int8_distances_are_in_the_data_units(metric, data, draw):
    """int8 rows (codes c and a factor F per row) stand for F * c * scales /
    127; with a cue in code units (times 127 / scales) the distance is that
    of the decoded rows to the decoded cue."""
    store, q = data
    scales = draw.draw(arrays(np.float32, store.shape[1:], elements=st.floats(0.0625, 20, width=32)))
    factors = draw.draw(arrays(np.float32, store.shape[:1], elements=st.floats(0, 4, width=32)))
    codes = np.clip(np.rint(store * (127 / scales)), -127, 127)
    rows = naive.int8_rows(codes, factors)
    cue = (q * (127 / scales)).astype(np.float32)
    got = distances(rows, cue, metric, scales)
    x = codes * factors[:, None].astype(np.float64) * (scales / 127)
    qd = cue.astype(np.float64) * (scales / 127)
    want = naive.distances(x, qd, metric)
    bound = np.maximum(1.0, (np.abs(x) * np.abs(qd)).sum(axis=1) + ((x - qd) ** 2).sum(axis=1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * bound.max())


def test_an_int8_store_is_codes_then_a_factor():
    """Rows narrower than a factor are refused; the dimension is the codes'."""
    with pytest.raises(InvalidArgument):
        distances(np.zeros((2, ROW_FACTOR_CODES), np.int8), np.zeros(0, np.float32), "l2",
                  np.ones(0, np.float32))
    with pytest.raises(DimensionMismatch):
        distances(np.zeros((2, 8), np.int8), np.zeros(8, np.float32), "l2", np.ones(8, np.float32))


# Compiles the distance kernel into a fresh cache (code loaded from a cache
# cannot be inspected) and tells what Numba was set to and whether the
# kernel's sums use 512-bit registers (LLVM fills memory with them under
# either preference).
VECTOR_WIDTH = """
import json, numba, numpy as np
from engram_shm.kernels import distance
distance.distances(np.ones((4, 64), np.uint16), np.ones(64, np.float32), "cosine")
asm = distance._distances.inspect_asm(distance._distances.signatures[0])
sums = [line for line in asm.splitlines() if "vfmadd" in line]
print(json.dumps({"features": numba.config.CPU_FEATURES, "zmm": any("zmm" in line for line in sums)}))
"""


def _vector_width(cache_dir, **numba_env) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    env.update(NUMBA_CACHE_DIR=str(cache_dir), **numba_env)
    out = subprocess.run([sys.executable, "-c", VECTOR_WIDTH], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_kernels_use_512_bit_registers_where_the_host_has_avx512_unless_the_user_sets_the_features(tmp_path):
    host = llvm.get_host_cpu_features().flatten()
    avx512 = "+avx512f" in host.split(",")
    ours = _vector_width(tmp_path / "ours")
    assert ours["zmm"] is avx512
    assert ours["features"] == (host + ",-prefer-256-bit" if avx512 else None)
    theirs = _vector_width(tmp_path / "theirs", NUMBA_CPU_FEATURES=host)
    assert theirs == {"features": host, "zmm": False}


def int16_cue(values: np.ndarray, factor: float) -> np.ndarray:
    """An int16 cue as hnsw._load_cue makes one: the elements, then the
    float32 factor in two int16 slots (a one-row matrix)."""
    row = np.zeros((1, int16_cue_width(len(values))), np.int16)
    row[0, :len(values)] = values
    row[0, len(values):] = np.array([factor], np.float32).view(np.int16)
    return row


def code_distances(store: np.ndarray, rows: np.ndarray, cue: np.ndarray, metric: str,
                   scales: np.ndarray) -> np.ndarray:
    kernel_metric, _weights = metric_of(metric, scales)  # _weights: referenced until the kernel returns
    out = np.empty(len(rows), np.float32)
    distances_of(store, rows, len(rows), cue, kernel_metric, out)
    return out


def naive_code_distances(codes, factors, rows, cue_values, cue_factor, unit):
    """1 - the exact integer dot products times the rows' factors, the cue's and the unit."""
    sums = codes[rows].astype(np.int64) @ np.asarray(cue_values, np.int64)
    return 1.0 - sums * factors[rows].astype(np.float64) * cue_factor * unit, sums


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@given(data=st.data())
def test_int8_codes_and_an_int16_cue_make_the_exact_integer_sums(metric, data):
    # Dimensions around and below the multiply-add's lanes (8 to 32): the
    # vector loop's rows, then the elements it leaves; 1 to 9 rows: blocks of
    # four and the single rows after them.
    dim = data.draw(st.integers(1, 100))
    n = data.draw(st.integers(1, 12))
    codes = data.draw(arrays(np.int8, (n, dim), elements=st.integers(-127, 127)))
    factors = data.draw(arrays(np.float32, n, elements=st.floats(0.125, 4, width=32)))
    top = int16_cue_max(dim)
    cue_values = data.draw(arrays(np.int16, dim, elements=st.integers(-top, top)))
    rows = data.draw(arrays(np.int32, data.draw(st.integers(1, 9)), elements=st.integers(0, n - 1)))
    scales = data.draw(arrays(np.float32, dim, elements=st.floats(0.125, 4, width=32)))
    unit = metric_of(metric, scales)[0].unit
    got = code_distances(naive.int8_rows(codes, factors), rows, int16_cue(cue_values, 0.5), metric, scales)
    want, sums = naive_code_distances(codes, factors, rows, cue_values, 0.5, unit)
    # float32 products of an exact sum: error bounded by 1e-6 of the term
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(1.0, np.abs(1.0 - want).max()))


@pytest.mark.parametrize("dim", [384, 768, 1000, 4096])
def test_the_largest_int16_cue_never_carries_a_sum_past_int32(dim):
    codes = np.full((4, dim), 127, np.int8)
    codes[1] = -127
    cue_values = np.full(dim, int16_cue_max(dim), np.int16)
    rows = np.arange(4, dtype=np.int32)
    scales = np.ones(dim, np.float32)
    factors = np.ones(4, np.float32)
    got = code_distances(naive.int8_rows(codes, factors), rows, int16_cue(cue_values, 1.0), "ip", scales)
    want, sums = naive_code_distances(codes, factors, rows, cue_values, 1.0, metric_of("ip", scales)[0].unit)
    assert np.abs(sums).max() < 2**31
    top = int16_cue_max(dim)
    assert top == 32767 or 127 * (top + 1) * dim >= 2**31  # the widest cue that fits
    np.testing.assert_allclose(1.0 - got, 1.0 - want, rtol=1e-6)


# Compiles the code distances into a fresh cache for the instruction set
# Numba is given and checks them against exact sums.
CODE_SUMS = """
import json, sys, numpy as np
sys.path.insert(0, %r)
import naive, test_distance as t
rng = np.random.default_rng(0)
ok = True
for dim in (1, 7, 8, 31, 33, 100, 384):
    codes = rng.integers(-127, 128, (9, dim)).astype(np.int8)
    top = t.int16_cue_max(dim)
    cue = rng.integers(-top, top + 1, dim).astype(np.int16)
    rows = rng.integers(0, 9, 7).astype(np.int32)
    factors = np.ones(9, np.float32)
    store = naive.int8_rows(codes, factors)
    got = t.code_distances(store, rows, t.int16_cue(cue, 1.0), "ip", np.ones(dim, np.float32))
    want, _ = t.naive_code_distances(codes, factors, rows, cue, 1.0, 1 / 127**2)
    ok &= bool(np.allclose(1 - got, 1 - want, rtol=1e-6, atol=1e-6))
print(json.dumps(ok))
"""


@pytest.mark.parametrize("cpu, features", [("haswell", "+avx2,+avx,+sse4.2,+sse2,+fma,+f16c"),
                                           ("generic", "")])
def test_code_sums_are_exact_on_every_instruction_set(tmp_path, cpu, features):
    """AVX2's 256-bit multiply-add, and the IR without one (`generic` on
    x86, as on a CPU that is not x86); the host's is the tests' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    env.update(NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
    out = subprocess.run([sys.executable, "-c", CODE_SUMS % os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert json.loads(out.splitlines()[-1]) is True
