import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram_shm.errors import InvalidArgument
from engram_shm.kernels import hnsw, recall
from engram_shm.kernels.distance import distances, empty_store, int16_cue_max, stored_dim
from engram_shm.kernels.policy import ROW_FACTOR_CODES, metric_of
from engram_shm.kernels.rows import draw_levels
from engram_shm.kernels.vectors import ROW_NON_FINITE, ROW_OK, ROW_ZERO, check_store_rows
from engram_shm.observations import checked_rows
from engram_shm.store import quantization
from engram_shm.store.layout import MAX_LEVEL, STABLE_SHIFT
from engram_shm.store.quantization import calibrate, codes_per_unit
from engram_shm.synthetic import clustered

import naive

ANY = np.iinfo(np.uint64).max


def build(data, M=16, ef_c=100, metric="cosine", dtype="f32", chunks=1, seed=7, upto=None):
    """Insert data[:upto] into a fresh graph for all of `data`, in `chunks`
    calls; returns what search needs."""
    n, dim = data.shape
    store = data.astype(np.float32) if dtype == "f32" else data.astype(np.float16).view(np.uint16)
    store = np.ascontiguousarray(store)
    gens = np.arange(1, n + 1, dtype=np.uint64)
    g = hnsw.new_graph(draw_levels(seed, gens, M, MAX_LEVEL), M, MAX_LEVEL)
    sc = hnsw.new_scratch(n, dim, M, max(ef_c, 256), MAX_LEVEL)
    bounds = np.linspace(0, n if upto is None else upto, chunks + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        hnsw.insert(store, gens, g, int(lo), int(hi), ef_c, metric, sc)
    return store, gens, g, sc


def build_int8(data, M=16, ef_c=100, metric="cosine", calibrate_on=None, seed=7, ef=256, insert=True):
    """`data` as int8 codes (scales calibrated on `calibrate_on`, all of
    `data` by default) and a graph of them, inserted unless `insert` is
    False; returns what search needs and the scales."""
    n, dim = data.shape
    scales = calibrate(data if calibrate_on is None else calibrate_on, metric)
    codes = empty_store(n, dim, np.int8)
    check_store_rows(data, metric == "cosine", np.inf, codes, codes_per_unit(scales), metric == "l2")
    gens = np.arange(1, n + 1, dtype=np.uint64)
    g = hnsw.new_graph(draw_levels(seed, gens, M, MAX_LEVEL), M, MAX_LEVEL)
    sc = hnsw.new_scratch(n, dim, M, ef, MAX_LEVEL)
    if insert:
        hnsw.insert(codes, gens, g, 0, n, ef_c, metric, sc, scales)
    return codes, gens, g, sc, scales


def search_all(store, gens, g, sc, queries, k, ef, metric, n_indexed=None, scan=(0, 0), gen_max=ANY):
    n = store.shape[0] if n_indexed is None else n_indexed
    return [hnsw.search(store, gens, g, q, k, ef, n, scan[0], scan[1], gen_max, metric, sc)
            for q in queries]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_recall_at_10_against_brute_force(dtype, metric):
    data = clustered(4200, 48, clusters=40, seed=11)
    base, queries = data[:4000], data[4000:]
    store, gens, g, sc = build(base, metric=metric, dtype=dtype, chunks=3)
    found = [ids for _, ids in search_all(store, gens, g, sc, queries, 10, 64, metric)]
    exact = [naive.exact_knn(store, q, 10, metric) for q in queries]
    r = naive.recall_at_k(found, exact)
    assert r >= 0.95, f"recall@10 {r:.3f} below 0.95 ({dtype}, {metric})"
    assert naive.graph_violations(g, len(base), 16) == []


def test_search_distances_are_exact_and_sorted():
    data = clustered(1000, 32, seed=2)
    store, gens, g, sc = build(data)
    for q in data[:20]:
        d, ids = hnsw.search(store, gens, g, q, 10, 64, 1000, 0, 0, ANY, "cosine", sc)
        assert np.all(np.diff(d) >= 0)
        np.testing.assert_allclose(d, naive.distances(store, q, "cosine")[ids], atol=1e-5)


def test_visit_marks_wrap_and_searches_stay_exact():
    """Visit marks are uint16: past 65,535 searches they are cleared and
    start again, and a search across the wrap finds what a fresh scratch does."""
    data = clustered(1000, 32, seed=3)
    store, gens, g, sc = build(data)
    expected = search_all(store, gens, g, hnsw.new_scratch(1000, 32, 16, 256, MAX_LEVEL), data[:8], 10, 64,
                          "cosine")
    sc.tag[0] = 65532  # the wrap falls within these searches
    found = search_all(store, gens, g, sc, data[:8], 10, 64, "cosine")
    assert sc.tag[0] < 16  # it wrapped
    for (d, ids), (d0, ids0) in zip(found, expected):
        assert list(ids) == list(ids0)
        np.testing.assert_array_equal(d, d0)


@st.composite
def insert_sequences(draw):
    n = draw(st.integers(1, 120))
    dim = draw(st.integers(1, 9))
    M = draw(st.sampled_from([2, 3, 4, 8]))
    kind = draw(st.sampled_from(["random", "duplicates", "few distinct", "with zeros"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.normal(size=(n, dim)).astype(np.float32)
    if kind == "duplicates":
        data[:] = data[0]
    elif kind == "few distinct":
        data = data[rng.integers(0, min(3, n), n)]
    elif kind == "with zeros":
        data[rng.random(n) < 0.3] = 0
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    metric = "l2" if kind == "with zeros" else draw(st.sampled_from(["cosine", "l2", "ip"]))
    if metric == "cosine":
        data /= np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-6)
    return data, M, metric, [0, *cuts, n], draw(st.integers(1, 40))


@given(insert_sequences())
def test_graph_invariants_after_random_insert_sequences(case):
    data, M, metric, cuts, ef_c = case
    n, dim = data.shape
    gens = np.arange(1, n + 1, dtype=np.uint64)
    g = hnsw.new_graph(draw_levels(3, gens, M, MAX_LEVEL), M, MAX_LEVEL)
    sc = hnsw.new_scratch(n, dim, M, ef_c, MAX_LEVEL)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        hnsw.insert(data, gens, g, lo, hi, ef_c, metric, sc)
        assert naive.graph_violations(g, hi, M) == []


@pytest.mark.parametrize("yield_every", [1, 7])
def test_yielding_the_cpu_while_inserting_builds_the_same_graph(yield_every):
    """An index worker's inserts give the core back every few nodes
    (kernels/cpu.py): the graph is the one built without."""
    data = np.random.default_rng(3).normal(size=(300, 24)).astype(np.float32)
    store, gens, plain, sc = build(data, M=8, ef_c=32)
    g = hnsw.new_graph(draw_levels(7, gens, 8, MAX_LEVEL), 8, MAX_LEVEL)
    hnsw.insert(store, gens, g, 0, 150, 32, "cosine", sc, yield_every=yield_every)
    hnsw.insert(store, gens, g, 150, 300, 32, "cosine", sc, yield_every=yield_every)
    for name in ("links0", "upper", "state"):
        np.testing.assert_array_equal(getattr(g, name), getattr(plain, name))


def test_inserts_defer_to_a_recall_in_the_beacon_and_build_the_same_graph():
    """A recall stamps a deadline into the beacon (engine/beacon.py); an insert
    sleeps while it lies ahead, never longer than it worked, and returns the
    time slept: the graph is the one built without."""
    data = np.random.default_rng(4).normal(size=(300, 24)).astype(np.float32)
    store, gens, plain, sc = build(data, M=8, ef_c=32)
    g = hnsw.new_graph(draw_levels(7, gens, 8, MAX_LEVEL), 8, MAX_LEVEL)
    far_ahead = np.array([time.monotonic_ns() + 3_600 * 10**9], np.int64)
    deferred = hnsw.insert(store, gens, g, 0, 300, 32, "cosine", sc, beacon=far_ahead)
    assert deferred > 0
    for name in ("links0", "upper", "state"):
        np.testing.assert_array_equal(getattr(g, name), getattr(plain, name))
    passed = np.array([time.monotonic_ns() - 10**9], np.int64)
    again = hnsw.new_graph(draw_levels(7, gens, 8, MAX_LEVEL), 8, MAX_LEVEL)
    assert hnsw.insert(store, gens, again, 0, 300, 32, "cosine", sc, beacon=passed) == 0.0
    assert hnsw.insert(store, gens, hnsw.new_graph(draw_levels(7, gens, 8, MAX_LEVEL), 8, MAX_LEVEL),
                       0, 300, 32, "cosine", sc) == 0.0


def build_twice(store, M, metric, ef_c, scales=None):
    """The graph of `store` inserted node by node, and the one plain HNSW
    pruning builds (every link against every other): the same inserts with
    every list's stable prefix erased before each."""
    n, dim = store.shape[0], stored_dim(store)
    gens = np.arange(1, n + 1, dtype=np.uint64)
    levels = draw_levels(5, gens, M, MAX_LEVEL)
    graphs = []
    for erase in (False, True):
        g = hnsw.new_graph(levels, M, MAX_LEVEL)
        sc = hnsw.new_scratch(n, dim, M, ef_c, MAX_LEVEL)
        for node in range(n):
            if erase:
                g.links0[:, 0] &= (1 << STABLE_SHIFT) - 1
                g.upper[:, 0] &= (1 << STABLE_SHIFT) - 1
            hnsw.insert(store, gens, g, node, node + 1, ef_c, metric, sc, scales)
        graphs.append(g)
    return graphs


def link_sets(g, n):
    return [[sorted(naive.links(naive.list_of(g, x, layer)))
             for layer in range(int(g.level[x]) + 1)] for x in range(n)]


@given(insert_sequences())
def test_stable_prefixes_keep_the_links_of_plain_pruning(case):
    """Pruning compares a list's stable prefix only with the links added
    since: the graph is the one plain pruning builds."""
    data, M, metric, _, ef_c = case
    fast, plain = build_twice(data, M, metric, ef_c)
    assert link_sets(fast, len(data)) == link_sets(plain, len(data))
    assert naive.graph_violations(fast, len(data), M) == []


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
def test_stable_prefixes_are_used_and_keep_the_links_of_plain_pruning(dtype):
    data = clustered(600, 8, clusters=30, seed=4)
    scales = None
    if dtype == "int8":
        scales = calibrate(data, "cosine")
        store = empty_store(*data.shape, np.int8)
        check_store_rows(data, True, np.inf, store, codes_per_unit(scales))
    else:
        store = checked_rows(data, "cosine", dtype, "rows")
        store = store if dtype == "f32" else store.astype(np.float16).view(np.uint16)
    fast, plain = build_twice(store, 4, "cosine", 32, scales)
    prefixes = [naive.count_word(row)[1] for row in fast.links0]
    assert sum(p > 0 for p in prefixes) > 100  # many lists were pruned, and kept their prefix
    assert link_sets(fast, 600) == link_sets(plain, 600)


@given(insert_sequences(), st.data())
def test_reinsert_after_partial_insert_keeps_invariants(case, draw):
    """A writer killed inside an insert leaves the node with some of its reverse
    links (and perhaps as entry point); the next writer re-inserts it."""
    data, M, metric, _, ef_c = case
    n, dim = data.shape
    if n < 2:
        return
    gens = np.arange(1, n + 1, dtype=np.uint64)
    g = hnsw.new_graph(draw_levels(5, gens, M, MAX_LEVEL), M, MAX_LEVEL)
    sc = hnsw.new_scratch(n, dim, M, ef_c, MAX_LEVEL)
    q = draw.draw(st.integers(1, n - 1))
    hnsw.insert(data, gens, g, 0, q + 1, ef_c, metric, sc)
    # Undo a random subset of the reverse links q received: the state of a
    # crash between q's own list and the last of its neighbours' updates.
    for x in range(q):
        row = g.links0[x]
        ls = naive.links(row)
        if q in ls and g.parent[q] != x and draw.draw(st.booleans()):
            ls.remove(q)
            row[1:1 + len(ls)] = ls
            row[0] = len(ls)
    more = draw.draw(st.integers(q + 1, n))
    hnsw.insert(data, gens, g, q, more, ef_c, metric, sc)
    assert naive.graph_violations(g, more, M) == []


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_every_node_finds_itself_among_duplicates_and_noise(dtype):
    """Also through int8 codes, whose inserts compare int16 cues: rounding
    them must not let a crowd of equal rows take the region's links."""
    rng = np.random.default_rng(0)
    data = clustered(1500, 16, seed=4)
    data[rng.integers(0, 1500, 300)] = data[0]  # heavy duplication
    if dtype == "int8":
        store, gens, g, sc, scales = build_int8(data)
    else:
        store, gens, g, sc = build(data)
        scales = None
    assert naive.graph_violations(g, 1500, 16) == []
    for i in rng.integers(0, 1500, 200):
        cue = data[i] if scales is None else checked_rows(data[i:i + 1], "cosine", "f32", "cue",
                                                           codes_per_unit(scales))[0]
        d, ids = hnsw.search(store, gens, g, cue, 1, 64, 1500, 0, 0, ANY, "cosine", sc, scales)
        if scales is None:
            assert d[0] <= naive.distances(store, data[i], "cosine").min() + 1e-6
        else:  # within the int16 cue's rounding of the float cue's distances
            assert d[0] <= distances(store, cue, "cosine", scales).min() + 1e-4


def test_generation_filter_is_a_snapshot():
    data = clustered(2000, 24, seed=5)
    store, gens, g, sc = build(data)
    for gen_max in (1, 500, 1999):
        mask = gens <= gen_max
        found, exact = [], []
        for q in data[::40]:
            d, ids = hnsw.search(store, gens, g, q, 10, 128, 2000, 0, 0, gen_max, "cosine", sc)
            assert np.all(gens[ids] <= gen_max)
            found.append(ids)
            exact.append(naive.exact_knn(store, q, 10, "cosine", mask))
        assert naive.recall_at_k(found, exact) >= 0.9


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 20), st.integers(0, 2**31))
def test_window_scan_is_exact(lo, width, k, seed):
    rng = np.random.default_rng(seed)
    n = 400
    data = rng.normal(size=(n, 8)).astype(np.float32)
    hi = min(n, lo + width)
    store = data
    gens = rng.permutation(np.arange(1, n + 1)).astype(np.uint64)
    g = hnsw.new_graph(np.zeros(n, np.int32), 4, MAX_LEVEL)
    sc = hnsw.new_scratch(n, 8, 4, 64, MAX_LEVEL)
    q = rng.normal(size=8).astype(np.float32)
    gen_max = int(rng.integers(0, n + 1))
    d, ids = hnsw.search(store, gens, g, q, k, 16, 0, lo, hi, gen_max, "l2", sc)
    mask = np.zeros(n, bool)
    mask[lo:hi] = gens[lo:hi] <= gen_max
    want = naive.exact_knn(store, q, k, "l2", mask)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(d, naive.distances(store, q, "l2")[want], rtol=1e-5, atol=1e-5)


def test_graph_and_window_merge_without_duplicates():
    data = clustered(1000, 16, seed=6)
    store, gens, g, sc = build(data, upto=600)  # [600, 1000) accepted, not indexed
    found, exact = [], []
    for q in data[::50]:
        d, ids = hnsw.search(store, gens, g, q, 10, 64, 600, 600, 1000, ANY, "cosine", sc)
        assert len(set(ids.tolist())) == len(ids)
        found.append(ids)
        exact.append(naive.exact_knn(store, q, 10, "cosine"))
    assert naive.recall_at_k(found, exact) >= 0.95


def test_wrapper_refuses_bad_arguments():
    data = clustered(50, 8)
    store, gens, g, sc = build(data, M=4, ef_c=16)
    with pytest.raises(InvalidArgument):
        hnsw.insert(store, gens, g, 10, 60, 16, "cosine", sc)
    with pytest.raises(InvalidArgument):
        hnsw.search(store, gens, g, data[0], 0, 16, 50, 0, 0, ANY, "cosine", sc)
    with pytest.raises(InvalidArgument):
        hnsw.search(store, gens[:10], g, data[0], 5, 16, 50, 0, 0, ANY, "cosine", sc)


@given(insert_sequences(), st.data())
def test_repair_finishes_a_half_rewritten_list(case, draw):
    """A writer killed while rewriting a list leaves it with duplicates, stale
    entries, perhaps without its pinned edges; the journal names it and the
    next writer repairs it."""
    data, M, metric, _, ef_c = case
    n, dim = data.shape
    gens = np.arange(1, n + 1, dtype=np.uint64)
    g = hnsw.new_graph(draw_levels(9, gens, M, MAX_LEVEL), M, MAX_LEVEL)
    sc = hnsw.new_scratch(n, dim, M, ef_c, MAX_LEVEL)
    hnsw.insert(data, gens, g, 0, n, ef_c, metric, sc)
    node = draw.draw(st.integers(0, n - 1))
    layer = draw.draw(st.integers(0, int(g.level[node])))
    row = naive.list_of(g, node, layer)
    cnt = len(naive.links(row))
    if cnt:
        torn = draw.draw(st.lists(st.sampled_from(naive.links(row)), min_size=cnt, max_size=cnt))
        row[1:1 + cnt] = torn  # some entries lost, some doubled: a rewrite cut short
    g.state[1] = ((layer << 32) | node) + 1
    assert hnsw.repair(g, n, sc)
    assert g.state[1] == 0
    assert naive.graph_violations(g, n, M) == []
    assert not hnsw.repair(g, n, sc)


def _view(store, gens, g, accepted, indexed):
    """A segment's view of a built graph: its entry moves into the header, as
    in a segment, where the kernel reads it."""
    header = np.zeros(64, np.int64)
    header[hnsw.ACCEPTED], header[hnsw.INDEXED] = accepted, indexed
    header[hnsw.MIN_GEN], header[hnsw.MAX_GEN] = gens[0], gens[:accepted].max()
    header[hnsw.ENTRY:hnsw.ENTRY + 2] = g.state
    return hnsw.SegmentView(store, gens, g._replace(state=header[hnsw.ENTRY:hnsw.ENTRY + 2]), header)


@given(st.lists(st.tuples(st.integers(1, 120), st.floats(0, 1)), min_size=1, max_size=4),
       st.integers(1, 12), st.sampled_from(["cosine", "l2"]), st.integers(0, 2**31))
def test_space_search_merges_its_segments_as_the_naive_merge(shapes, k, metric, seed):
    """One kernel call over several segments, each partly indexed with the rest
    scanned, returns the top-k of the per-segment searches merged; with
    nothing indexed it is the exact top-k of every row."""
    rng = np.random.default_rng(seed)
    views, parts, first = [], [], 1
    for n, fraction in shapes:
        data = rng.normal(size=(n, 8)).astype(np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        store, _, g, _ = build(data, M=4, ef_c=16, metric=metric, upto=int(n * fraction))
        gens = np.arange(first, first + n, dtype=np.uint64)
        first += n
        views.append(_view(store, gens, g, n, int(n * fraction)))
        parts.append((store, gens, g, int(n * fraction)))
    q = rng.normal(size=8).astype(np.float32)
    q /= np.linalg.norm(q)
    space = hnsw.SpaceViews(views)
    sc = hnsw.new_scratch(space.capacity, 8, 4, 64, MAX_LEVEL)
    d, refs = hnsw.search_space(space, q, k, 16, first, True, metric, sc)
    merged = []
    for s, (store, gens, g, indexed) in enumerate(parts):
        pd, ids = hnsw.search(store, gens, g, q, k, 16, indexed, indexed, len(store), ANY, metric, sc)
        merged += [(x, (s << 32) | int(i)) for x, i in zip(pd.tolist(), ids)]
    merged.sort()
    np.testing.assert_allclose(d, [x for x, _ in merged[:k]], rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(d) >= 0)
    exact_views = hnsw.SpaceViews([_view(s, gn, g, len(s), 0) for s, gn, g, _ in parts])
    d, refs = hnsw.search_space(exact_views, q, k, 16, first, True, metric, sc)
    rows = np.concatenate([p[0] for p in parts])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts])
    exact = naive.distances(rows, q, metric)
    np.testing.assert_allclose(d, np.sort(exact)[:len(d)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact[offsets[refs >> 32] + (refs & 0xFFFFFFFF)], d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gen_max", [150, 300, 1000])
def test_space_search_filters_a_segment_by_generation_unless_all_of_it_is_in_the_snapshot(gen_max):
    """Rows past the snapshot are left out of a segment that holds some; one
    whose newest row (MAX_GEN) is in the snapshot is searched unfiltered,
    with the same answer."""
    data = clustered(300, 16, seed=5)
    store, gens, g, sc = build(data)
    space = hnsw.SpaceViews([_view(store, gens, g, 300, 200)])  # [200, 300) scanned
    for q in data[::30]:
        d, refs = hnsw.search_space(space, q, 10, 64, gen_max, True, "cosine", sc)
        slots = refs & 0xFFFFFFFF
        assert (gens[slots] <= gen_max).all()
        want_d, want = hnsw.search(store, gens, g, q, 10, 64, 200, 200, 300, gen_max, "cosine", sc)
        assert slots.tolist() == want.tolist()
        np.testing.assert_array_equal(d, want_d)


def test_space_search_leaves_out_segments_past_the_snapshot():
    data = clustered(200, 16, seed=3)
    store, gens, g, sc = build(data)
    later = gens + np.uint64(1000)
    space = hnsw.SpaceViews([_view(store, gens, g, 200, 200), _view(store, later, g, 200, 200)])
    d, refs = hnsw.search_space(space, data[5], 10, 64, 200, True, "cosine", sc)
    assert set((refs >> 32).tolist()) == {0} and (refs & 0xFFFFFFFF)[0] == 5
    with pytest.raises(InvalidArgument):
        hnsw.SpaceViews([_view(store, gens, g, 200, 200), _view(store[:, :8].copy(), gens, g, 200, 200)])
    with pytest.raises(InvalidArgument):  # an entry the kernel would not read
        hnsw.SpaceViews([hnsw.SegmentView(store, gens, g, np.zeros(64, np.int64))])


_LETTERS = ("abcxyz0", "abcxyz0\u00e9\u6587\U0001f600")  # ASCII only; with 2-, 3- and 4-byte UTF-8


def _records(rng, n, ascii=True):
    """Record columns of n rows (text ends, id lengths, confidences, times,
    the arena of their UTF-8 ids and texts) and each row's (id, text)."""
    letters = _LETTERS[0 if ascii else 1]
    pairs = [tuple("".join(rng.choice(list(letters), rng.integers(0, 12))) for _ in "it") for _ in range(n)]
    encoded = [(i.encode(), t.encode()) for i, t in pairs]
    arena = np.frombuffer(b"".join(i + t for i, t in encoded) or b"-", np.uint8)
    columns = (np.cumsum([len(i) + len(t) for i, t in encoded]).astype(np.int64),
               np.array([len(i) for i, _ in encoded], np.int32), rng.random(n).astype(np.float32),
               rng.random(n) * 1e9, arena)
    return columns, pairs


def _decoded(texts, columns, ref, start, split, end):
    """The (id, text) a recall's row points at: in its gathered texts, or
    in its segment's arena."""
    source = columns[ref >> 32][recall.R_ARENA].tobytes() if texts is None else texts
    if type(source) is str:
        return source[start:split], source[split:end]
    return str(source[start:split], "utf-8"), str(source[split:end], "utf-8")


def _similarity(d, metric):
    d = np.asarray(d, np.float64)
    if metric == "l2":
        return 1 / (1 + np.sqrt(np.maximum(d, 0)))
    return np.clip(1 - d, -1, 1) if metric == "cosine" else 1 - d


@given(st.lists(st.integers(1, 80), min_size=1, max_size=3), st.integers(1, 12),
       st.sampled_from(["cosine", "ip", "l2"]), st.sampled_from(["f32", "f16"]),
       st.one_of(st.none(), st.floats(-1.5, 1.5)), st.booleans(), st.booleans(),
       st.sampled_from([0, 40, None]), st.integers(0, 2**31))
def test_one_call_recall_gathers_the_rows_of_the_space_search(sizes, k, metric, dtype, threshold, f16_cue,
                                                               ascii, text_bytes, seed):
    """The recall kernel checks and scales the cue as checked_rows does,
    searches as search_space does, and of each row kept (those reaching the
    threshold: a prefix) gathers its similarity, confidence, time and
    generation, and its id and text: side by side in one buffer when all
    fit (decoded once: a str when ASCII, else bytes), else pointed at in
    its segment's arena."""
    rng = np.random.default_rng(seed)
    views, columns, pairs, first = [], [], [], 1
    for n in sizes:
        data = rng.normal(size=(n, 8)).astype(np.float32)
        if metric == "cosine":
            data /= np.linalg.norm(data, axis=1, keepdims=True)
        store, _, g, _ = build(data, M=4, ef_c=16, metric=metric, dtype=dtype)
        views.append(_view(store, np.arange(first, first + n, dtype=np.uint64), g, n, n))
        cols, segment_pairs = _records(rng, n, ascii)
        columns.append(cols)
        pairs.append(segment_pairs)
        first += n
    space = hnsw.SpaceViews(views)
    sc = hnsw.new_scratch(space.capacity, 8, 4, 64, MAX_LEVEL)
    rs = recall.RecallScratch(space.capacity, 8, 4, 64, MAX_LEVEL)
    if text_bytes is not None:  # a text buffer the answer may not fit
        rs.text = np.empty(text_bytes, np.uint8)
        rs.outputs = (*rs.outputs[:-1], rs.text)
    cue = rng.normal(size=(1, 8)).astype(np.float32)
    cue = cue.astype(np.float16).view(np.uint16) if f16_cue else cue
    p = recall.plan(space, columns, metric, None, 1.0, (metric == "cosine", np.inf))
    reason, rows, values, texts = recall.recall(p, cue, k, 16, first, True,
                                                -np.inf if threshold is None else threshold, rs)
    d, refs = hnsw.search_space(space, checked_rows(cue, metric, "f32", "cue")[0], k, 16, first, True,
                                metric, sc)
    sims = _similarity(d, metric)
    kept = len(sims) if threshold is None else int(np.sum(sims >= threshold))
    assert reason == ROW_OK and sims[:kept].tolist() == sorted(sims[:kept], reverse=True)
    assert rows[:, recall.ROW_REF].tolist() == refs[:kept].tolist()
    np.testing.assert_allclose(values[:, recall.VALUE_SIMILARITY], sims[:kept], rtol=1e-12)
    answer = "".join(i + t for i, t in (pairs[r >> 32][r & 0xFFFFFFFF] for r in refs[:kept].tolist()))
    fits = len(answer.encode()) <= rs.text.shape[0]
    assert type(texts) is ((str if answer.isascii() else bytes) if fits else type(None))
    for (ref, start, split, end, gen), (_, conf, when) in zip(rows.tolist(), values.tolist()):
        s, slot = ref >> 32, ref & 0xFFFFFFFF
        _, _, confidence, times, _ = columns[s]
        assert _decoded(texts, columns, ref, start, split, end) == pairs[s][slot]
        assert (gen, conf, when) == (views[s].gens[slot], confidence[slot], times[slot])


def test_one_call_recall_reports_a_bad_cue_and_weighs_an_int8_one():
    """A cue the space would refuse comes back as the row check's reason; an
    int8 space's cue is put in code units and weighted as search_space's."""
    data = clustered(300, 16, seed=5)
    codes, gens, g, sc, scales = build_int8(data, M=8, ef_c=64, seed=3)
    space = hnsw.SpaceViews([_view(codes, gens, g, 300, 300)])
    per_unit = codes_per_unit(scales)
    p = recall.plan(space, [_records(np.random.default_rng(1), 300)[0]], "cosine", scales, per_unit,
                    (True, np.inf))
    rs = recall.RecallScratch(300, 16, 8, 256, MAX_LEVEL)
    for q in data[:20].reshape(20, 1, 16):
        reason, rows, values, _ = recall.recall(p, q, 10, 64, 300, True, -np.inf, rs)
        cue = checked_rows(q, "cosine", "f32", "cue", per_unit)[0]
        d, refs = hnsw.search_space(space, cue, 10, 64, 300, True, "cosine", sc, scales)
        assert reason == ROW_OK and rows[:, recall.ROW_REF].tolist() == refs.tolist()
        np.testing.assert_allclose(values[:, recall.VALUE_SIMILARITY], _similarity(d, "cosine"), atol=1e-5)
    for bad, why in ((np.full((1, 16), np.nan, np.float32), ROW_NON_FINITE),
                     (np.zeros((1, 16), np.float32), ROW_ZERO)):
        reason, rows, _, _ = recall.recall(p, bad, 10, 64, 300, True, -np.inf, rs)
        assert (reason, len(rows)) == (why, 0)
    # the kernel reads the cue's bits as they lie: only a C-contiguous float32 or f16-bits row
    for wrong in (data[:1].astype(np.float64), np.asfortranarray(np.tile(data[:1], (2, 1)))[:1]):
        with pytest.raises(ValueError, match="C-contiguous"):
            recall.recall(p, wrong, 10, 64, 300, True, -np.inf, rs)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("reach", [1.0, 40.0])
def test_an_int8_search_takes_its_cue_as_int16_within_half_a_unit(metric, reach):
    """A search of int8 codes takes the float cue as an int16 one scaled to
    its largest element (hnsw._int16_query): its exact scan gives every
    row's distance as the float32 cue does (distance.distances) within what
    moving each cue element by half a unit can change, whether the cue lies
    within the calibrated range or `reach` times beyond it."""
    data = clustered(500, 40, clusters=10, seed=3)
    codes, gens, g, sc, scales = build_int8(data, M=8, metric=metric, calibrate_on=data[:200], ef=600,
                                            insert=False)  # the exact scan alone
    per_unit = codes_per_unit(scales)
    kernel_metric, weights = metric_of(metric, scales)
    rows = codes[:, :-ROW_FACTOR_CODES] * quantization.factors(codes)[:, None].astype(np.float64)
    for q in np.random.default_rng(4).normal(size=(10, 40)).astype(np.float32) * reach:
        cue = checked_rows(q.reshape(1, -1), metric, "f32", "cue", per_unit)[0]  # in code units
        want = distances(codes, cue, metric, scales)
        got, ids = hnsw.search(codes, gens, g, cue, 500, 500, 0, 0, 500, ANY, metric, sc, scales)
        weighted = cue.astype(np.float64) * (weights if metric != "l2" else 1.0)
        half = 0.5 * np.abs(weighted).max() / int16_cue_max(40)  # half a unit, in the cue's units
        if metric == "l2":
            bound = (weights * (2 * np.abs(rows - cue) * half + half ** 2)).sum(axis=1)
        else:
            bound = np.abs(rows).sum(axis=1) * half
        bound = bound * kernel_metric.unit + 1e-5 * (1 + np.abs(want))  # and float32 sums
        assert sorted(ids.tolist()) == list(range(500))
        assert (np.abs(got - want[ids]) <= bound[ids]).all()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_int8_graph_recall_against_brute_force_of_the_float_data(metric):
    """A graph over int8 rows (per-dimension scales from the first rows,
    cue in code units) finds the float data's true neighbours, and its
    distances are the float ones within the rows' error bounds
    (quantization.py): a decoded unit row is off by at most e_l2 = E under
    l2 and e_dot = 2E / (1 - E) under cosine, so a unit cue's dot product
    by at most e_dot and a squared distance by e_l2 (2 |q - x| + e_l2)."""
    data = clustered(4200, 48, clusters=40, seed=11)
    base, queries = data[:4000], data[4000:]
    codes, gens, g, sc, scales = build_int8(base, metric=metric, calibrate_on=base[:256])
    half_steps = scales.astype(np.float64) * np.abs(base / scales).max(axis=1, keepdims=True) / 254
    e = np.linalg.norm(half_steps, axis=1)
    found, exact = [], []
    for q in queries:
        cue = checked_rows(q.reshape(1, -1), metric, "f32", "cue", codes_per_unit(scales))[0]  # in code units
        d, ids = hnsw.search(codes, gens, g, cue, 10, 64, 4000, 0, 0, ANY, metric, sc, scales)
        found.append(ids)
        exact.append(naive.exact_knn(base, q, 10, metric))
        true = naive.distances(base, q, metric)[ids]
        bound = 2 * e[ids] / (1 - e[ids]) if metric == "cosine" else e[ids] * (2 * np.sqrt(true) + e[ids])
        assert (np.abs(d - true) <= 1.01 * bound + 1e-6).all()  # 1%: float32 sums
    r = naive.recall_at_k(found, exact)
    assert r >= 0.93, f"int8 recall@10 {r:.3f} below 0.93 ({metric})"
    assert naive.graph_violations(g, 4000, 16) == []
