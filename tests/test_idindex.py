import mmap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram_shm import Engine
from engram_shm.engine.writer import EngineWriter
from engram_shm.errors import DuplicateId, InvalidArgument
from engram_shm.kernels import idindex
from engram_shm.observations import prepare
from engram_shm.store.segment import Segment
from engram_shm.store.space import BURIED
from engram_shm.synthetic import clustered

import naive

U64 = st.integers(0, 2 ** 64 - 1)
# Few distinct hashes, so that entries share hashes (crafted collisions) and
# home positions, besides arbitrary ones.
HASH = st.one_of(st.integers(0, 5), st.sampled_from([2 ** 64 - 1, 2 ** 63, 64, 128]), U64)


def pairs(result):
    rows, refs = result
    return sorted(zip(rows.tolist(), refs.tolist()))


def column(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def entries_held(t: idindex.IdTable) -> int:
    """Entries of the table, and those of its old one not moved yet."""
    return int((t.entries[:, 1] != idindex.EMPTY).sum() + (t.old[int(t.moved[0]):, 1] != idindex.EMPTY).sum())


def check_table(t: idindex.IdTable, ref: naive.IdIndex) -> None:
    cap = t.entries.shape[0]
    assert cap & (cap - 1) == 0 and cap >= idindex.MIN_CAPACITY
    assert int(t.used[0]) == len(ref) == entries_held(t)
    assert 2 * int(t.used[0]) <= cap, "load above 1/2"
    assert t.old.shape[0] == 0 or int(t.moved[0]) < t.old.shape[0] < cap, "an old table kept once moved"
    stored = sorted(ref.refs)
    assert pairs(idindex.lookup(t, column(stored))) == ref.lookup(stored)


segments = st.lists(st.tuples(st.lists(HASH, max_size=60), st.lists(st.booleans(), max_size=60),
                              st.integers(0, 3)), max_size=8)


@given(segments, st.lists(HASH, max_size=20))
def test_insert_and_lookup_match_the_dict_of_lists(batches, query):
    t, ref = idindex.new_table(), naive.IdIndex()
    for number, (hashes, buried, lo) in enumerate(batches):
        id_hash = column(hashes)
        gens = np.arange(1, len(hashes) + 1, dtype=np.uint64)
        gens[np.array(buried[:len(hashes)] + [False] * (len(hashes) - len(buried)), bool)] = BURIED
        lo = min(lo, len(hashes))
        t = idindex.insert_rows(t, id_hash, gens, number, lo, len(hashes))
        ref.insert_rows(id_hash, gens, number, lo, len(hashes))
        check_table(t, ref)
    assert pairs(idindex.lookup(t, column(query))) == ref.lookup(query)


def test_equal_hashes_of_different_refs_are_all_kept_and_found():
    t = idindex.new_table()
    same = column([7] * 40)  # one hash for 40 rows: a chain past the table's first size
    t = idindex.insert_rows(t, same, np.ones(40, np.uint64), 3, 0, 40)
    assert t.entries.shape[0] == 128, "grown by doubling from 64"
    assert pairs(idindex.lookup(t, column([7, 8]))) == [(0, 3 << 32 | s) for s in range(40)]


def test_the_table_grows_by_doubling_and_keeps_every_entry():
    t, ref = idindex.new_table(), naive.IdIndex()
    rng = np.random.default_rng(5)
    caps = []
    for number in range(12):
        hashes = rng.integers(0, 2 ** 64 - 1, 500, dtype=np.uint64, endpoint=True)
        gens = np.ones(500, np.uint64)
        t = idindex.insert_rows(t, hashes, gens, number, 0, 500)
        ref.insert_rows(hashes, gens, number, 0, 500)
        caps.append(t.entries.shape[0])
    assert caps[-1] == idindex.capacity_for(6000) == 16384 and caps == sorted(caps)
    check_table(t, ref)


def test_a_growth_moves_the_old_entries_with_the_batches_that_follow_and_finds_every_id_meanwhile():
    t, ref = idindex.new_table(), naive.IdIndex()
    rng = np.random.default_rng(11)
    hashes = rng.integers(0, 2 ** 64 - 1, 3000, dtype=np.uint64, endpoint=True)
    gens = np.ones(len(hashes), np.uint64)
    moving_batches, growths = 0, 0
    for lo in range(0, len(hashes), 8):
        before, moved_before = t, int(t.moved[0])
        t = idindex.insert_rows(t, hashes, gens, 2, lo, lo + 8)
        ref.insert_rows(hashes, gens, 2, lo, lo + 8)
        if t.entries is not before.entries:  # grown: the full table is now the old one
            growths += 1
            assert t.old is before.entries and t.entries.shape[0] == 2 * before.entries.shape[0]
        elif t.old.shape[0]:  # a batch moves its share, no more
            assert int(t.moved[0]) - moved_before == idindex.MOVE_PER_ROW * 8
        moving_batches += t.old.shape[0] > 0
        check_table(t, ref)  # every id found, in whichever table it is
    assert growths >= 5 and moving_batches >= 60


def test_a_batch_larger_than_the_move_left_finishes_it_first():
    t = idindex.new_table()
    hashes = np.arange(1, 20_001, dtype=np.uint64)
    gens = np.ones(len(hashes), np.uint64)
    t = idindex.insert_rows(t, hashes, gens, 0, 0, 2000)
    t = idindex.insert_rows(t, hashes, gens, 0, 2000, 2100)  # grows: 2,100 > 4,096 / 2
    assert t.old.shape[0] == 4096 and int(t.moved[0]) == 400
    t = idindex.insert_rows(t, hashes, gens, 0, 2100, 20_000)  # past the new table's room too
    # The rest of the first move done, a second growth, and its move done within the batch
    assert t.old.shape[0] == 0 and t.entries.shape[0] == idindex.capacity_for(20_000)
    assert pairs(idindex.lookup(t, hashes)) == [(i, i) for i in range(20_000)]


def test_insert_kernel_reports_a_full_table_instead_of_looping():
    t = idindex.new_table()
    n = t.entries.shape[0] + 1
    status = idindex._insert_rows(t.entries, t.used, t.old, t.moved, np.arange(n, dtype=np.uint64),
                                  np.ones(n, np.uint64), 0, 0, n)
    assert status == idindex.FULL and int(t.used[0]) == t.entries.shape[0]
    assert idindex._lookup(t.entries, t.old, t.moved, column([n + 5]), np.empty(1, np.int64),
                           np.empty(1, np.int64)) == 0  # a full table ends probes too


def test_more_matches_than_queries_are_all_returned():
    t = idindex.insert_rows(idindex.new_table(), column([9] * 5), np.ones(5, np.uint64), 0, 0, 5)
    assert pairs(idindex.lookup(t, column([9]))) == [(0, s) for s in range(5)]


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True),
       st.lists(st.text(max_size=8), min_size=30, max_size=30))
def test_lookup_ids_hashes_each_id_like_the_ingest_kernel(ids, texts):
    batch = prepare(ids, np.ones((len(ids), 2)), texts[:len(ids)], dim=2, metric="l2", dtype="f32")
    hashes = column([naive.fnv1a(i.encode("utf-8")) for i in ids])
    t, ref = idindex.new_table(), naive.IdIndex()
    stored = np.ascontiguousarray(hashes[::2])  # every other id is stored
    gens = np.ones(len(stored), np.uint64)
    t = idindex.insert_rows(t, stored, gens, 1, 0, len(stored))
    ref.insert_rows(stored, gens, 1, 0, len(stored))
    found = pairs(idindex.lookup_ids(t, batch.records, batch.record_ends, batch.id_lens))
    assert found == ref.lookup(hashes)
    assert {row for row, _ in found} >= set(range(0, len(ids), 2))


def test_wrappers_check_their_inputs():
    t = idindex.new_table()
    ones = np.ones(4, np.uint64)
    with pytest.raises(InvalidArgument):
        idindex.insert_rows(t, ones.astype(np.int64), ones, 0, 0, 4)
    with pytest.raises(InvalidArgument):
        idindex.insert_rows(t, ones, ones, 0, 2, 5)
    with pytest.raises(InvalidArgument):
        idindex.lookup(t._replace(entries=t.entries[:48]), ones)
    with pytest.raises(InvalidArgument):
        idindex.lookup(t._replace(old=t.entries), ones)  # an old table as large as the new
    with pytest.raises(InvalidArgument):
        idindex.lookup(t, np.ones(8, np.uint64)[::2])
    with pytest.raises(InvalidArgument):
        idindex.lookup(t, ones.astype(np.float64))
    records = np.frombuffer(b"abcdef", np.uint8)
    with pytest.raises(InvalidArgument):  # an id longer than its record
        idindex.lookup_ids(t, records, np.array([2, 6], np.int64), np.array([3, 1], np.int32))
    with pytest.raises(InvalidArgument):  # records shorter than the ends say
        idindex.lookup_ids(t, records, np.array([2, 9], np.int64), np.array([1, 1], np.int32))
    with pytest.raises(InvalidArgument):  # ends going backwards
        idindex.lookup_ids(t, records, np.array([4, 2], np.int64), np.array([1, 1], np.int32))


# -- the index in the writer ---------------------------------------------------
def restarted(e: Engine) -> EngineWriter:
    """A second writer over an engine's memory, as after its writer died (the
    engine must run with compaction off: its own writer stands still)."""
    fresh = EngineWriter(e.catalog, e.config, e._on_new_segment)
    fresh.recover(e._segments.__getitem__)
    return fresh


def test_a_restarted_writer_refuses_a_resent_id_and_decodes_no_id(monkeypatch):
    data = clustered(700, 8, seed=3)
    with Engine(workers=1, segment_capacity=256, compaction_capacity=0) as e:
        e.observe("s", [f"a{i}" for i in range(600)], data[:600])
        e.observe("t", "a1", data[0])  # ids are unique per space only
        with monkeypatch.context() as m:
            m.setattr(Segment, "ids", lambda *a: pytest.fail("a restart decoded stored ids"))
            fresh = restarted(e)
        assert fresh.spaces["s"].index_ids() == 600 and fresh.spaces["t"].index_ids() == 1
        for ids in (["new", "a599"], ["a0"]):
            params, batch = fresh.prepare("s", ids, data[600:600 + len(ids)])
            with pytest.raises(DuplicateId) as info:
                fresh.write(params, batch)
            assert info.value.details["id"] == ids[-1]
        params, batch = fresh.prepare("s", [f"b{i}" for i in range(100)], data[600:])
        fresh.write(params, batch)
        assert fresh.spaces["s"].find_id("b99") is not None and fresh.spaces["s"].count == 700


def test_buried_ids_are_free_again():
    data = clustered(400, 8, seed=4)
    with Engine(workers=1, segment_capacity=128, compaction_capacity=0) as e:
        e.observe("s", [f"a{i}" for i in range(200)], data[:200])
        params, batch = e.writer.prepare("s", [f"b{i}" for i in range(200)], data[200:])
        e.writer.spaces["s"].append(batch, e.generation + 1)  # published, never committed
        with pytest.raises(DuplicateId):  # the dead writer's index holds them
            e.writer.spaces["s"].check_new_ids(batch)
        fresh = restarted(e)
        w = fresh.spaces["s"]
        assert w.index_ids() == 200 and w.find_id("b0") is None and w.find_id("a199") is not None
        params, batch = fresh.prepare("s", [f"b{i}" for i in range(200)], data[200:])
        fresh.write(params, batch)
        assert w.index_ids() == 400
        seg, slot = w.find_id("b7")
        assert seg.ids(np.array([slot])) == ["b7"] and seg.r.generation[slot] != BURIED


def test_different_ids_with_one_hash_are_both_stored():
    """A real FNV-1a 64 collision is impractical to find, so one is crafted:
    a stored row's id_hash is set to the hash of another id, as if the two
    collided; the restarted writer's index holds that hash for the row."""
    data = clustered(10, 8, seed=5)
    with Engine(workers=1, compaction_capacity=0) as e:
        e.observe("s", ["a", "c"], data[:2])
        w = e.writer.spaces["s"]
        seg, slot = w.find_id("a")
        seg.w.id_hash[slot] = naive.fnv1a(b"b")
        fresh = restarted(e)
        w = fresh.spaces["s"]
        assert w.find_id("a") is None  # looked up under its true hash: the crafted row hides it
        params, batch = fresh.prepare("s", "b", data[2])
        fresh.write(params, batch)  # "b"'s hash is present, but the stored id is "a"
        seg_b, slot_b = w.find_id("b")
        assert seg_b.ids(np.array([slot_b])) == ["b"]
        rows, refs = idindex.lookup(w._id_table, column([naive.fnv1a(b"b")]))
        assert len(refs) == 2, "both rows of the hash are in the index"
        params, batch = fresh.prepare("s", ["d", "b"], data[3:5])
        with pytest.raises(DuplicateId):  # a true match behind the colliding entry
            fresh.write(params, batch)
        assert w.count == 3


def test_rows_appended_to_a_stale_index_are_entered_once():
    data = clustered(150, 8, seed=6)
    with Engine(workers=1) as e:
        e.observe("s", [f"a{i}" for i in range(100)], data[:100])
        w = e.writer.spaces["s"]
        w._id_table = None  # as after `adopt`: rebuilt at the next use
        params, batch = e.writer.prepare("s", [f"b{i}" for i in range(50)], data[100:])
        w.append(batch, e.generation + 1)  # a log replay: appended without a check
        e.catalog.publish_generation(e.generation + 50)
        assert w.index_ids() == 150
        _, refs = idindex.lookup(w._id_table, column([naive.fnv1a(b"b3"), naive.fnv1a(b"a3")]))
        assert len(refs) == 2


def memory_of(a: np.ndarray):
    """What an array's memory belongs to, past the views over it."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_a_large_table_grows_in_its_own_zeroed_mapping_and_keeps_every_entry():
    t = idindex.new_table(200_000)  # 8 MiB: mapped, as NumPy would give it huge pages
    assert t.entries.nbytes >= idindex.HUGE_PAGE_BYTES and isinstance(memory_of(t.entries), mmap.mmap)
    hashes = np.random.default_rng(3).integers(0, 2 ** 64 - 1, 262_400, dtype=np.uint64, endpoint=True)
    gens = np.ones(len(hashes), np.uint64)
    for lo in range(0, len(hashes), 25_600):
        t = idindex.insert_rows(t, hashes, gens, 1, lo, min(lo + 25_600, len(hashes)))
    assert t.old.shape[0] == 524_288 and 0 < int(t.moved[0]) < 524_288, "grown, and moving"
    assert isinstance(memory_of(t.entries), mmap.mmap)
    assert isinstance(memory_of(idindex.new_table(1000).entries), np.ndarray), "a small one from the heap"
    rows, refs = idindex.lookup(t, hashes)
    assert sorted(refs.tolist()) == [1 << 32 | s for s in range(len(hashes))]
