import gc
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engram_shm import Engine
from engram_shm.errors import EngineInUse, ShmFull
from engram_shm.kernels.rows import append_rows, draw_levels
from engram_shm.kernels.vectors import ROW_NON_FINITE, ROW_OK
from engram_shm.observations import prepare
from engram_shm.store import shm
from engram_shm.store.catalog import (
    FRONT_PID,
    FRONT_START,
    OWNER_PID,
    OWNER_START,
    W_PID,
    W_START,
    Catalog,
    SpaceParams,
    catalog_name,
    collect_stale,
    process_start,
    segment_name,
)
from engram_shm.store.layout import ENTRY, MAX_LEVEL, SegmentLayout
from engram_shm.store.prefault import MADV_POPULATE_READ, MIN_WINDOW_BYTES, WINDOW_BYTES, Prefaulter
from engram_shm.store.segment import Segment
from engram_shm.store.space import SegmentSizes, SpaceWriter
from engram_shm.synthetic import clustered

import naive


def _attach_and_exit(name, queue):
    seg = Segment.attach(name)
    queue.put(int(seg.r.generation[0]))
    seg.close()


def test_segment_columns_survive_attach_from_another_process():
    layout = SegmentLayout(capacity=128, dim=6, dtype="f16", M=4, arena_capacity=4096)
    seg = Segment.create("engram_t-store_000001", layout, metric=0, space=3, segment_no=2)
    try:
        seg.w.generation[0] = 42
        assert (seg.r.parent == -1).all() and seg.header[ENTRY] == -1
        with pytest.raises(ValueError):
            seg.r.generation[0] = 1  # reader views are read-only
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_attach_and_exit, args=(seg.name, q))
        p.start()
        assert q.get(timeout=60) == 42
        p.join(60)
        # The child attached and exited: the block must still exist (the resource
        # tracker of Python 3.11 would have unlinked it).
        again = Segment.attach(seg.name)
        assert again.layout == layout and again.r.generation[0] == 42
        again.close()
    finally:
        seg.close()
        shm.unlink(seg.name)
    assert not shm.list_blocks("t-store")


def test_layout_is_aligned_and_within_the_memory_target():
    layout = SegmentLayout(capacity=131072, dim=768, dtype="f16", M=16, arena_capacity=131072 * 100)
    offsets, size = layout.offsets()
    assert all(off % 64 == 0 for off in offsets.values())
    per_observation = size / layout.capacity
    # 1M observations in f16 with ~100 bytes of text must fit in 2 GB.
    assert per_observation * 1_000_000 < 2e9, per_observation


def test_segments_seal_when_their_text_arena_fills():
    with Engine(workers=1, segment_capacity=1024, text_bytes_per_observation=16,
                max_text_bytes=4000) as e:
        texts = [f"{i}:" + "é" * (i % 1500) for i in range(300)]
        vectors = np.random.default_rng(0).normal(size=(300, 8))
        e.observe("texty", [f"t{i}" for i in range(300)], vectors, what=texts)
        s = e.stats()["spaces"]["texty"]
        assert s["segments"] > 1 and s["count"] == 300
        e.wait_indexed(30)
        for i in range(0, 300, 7):
            m = e.recall("texty", vectors[i], k=1)[0]
            assert (m.id, m.what) == (f"t{i}", texts[i])


def test_a_block_closed_under_live_views_leaves_them_the_mapping(caplog):
    """Closing a block whose numpy views live on closes its descriptor and
    logs; the views still read and write the memory, and collecting the
    block raises nothing (SharedMemory's own __del__ raised BufferError
    then, as an unraisable exception)."""
    name = f"engram_test-views-{os.getpid()}"
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        block = shm.create(name, 4096)
        view = np.frombuffer(block.buf, np.int64)  # holds an export of the block's buffer
        view[:] = 7
        fd = block._fd
        shm.close(block)
        assert "still has views" in caplog.text
        with pytest.raises(OSError):
            os.fstat(fd)
        view[3] = 9
        assert view.sum() == 7 * 511 + 9
        del block
        gc.collect()
        assert view[3] == 9 and unraisable == []
        again = shm.attach(name)  # the memory stays the block's, which is still there
        assert np.ndarray((512,), np.int64, buffer=again.buf)[3] == 9
        shm.close(again)
    finally:
        sys.unraisablehook = hook
        shm.unlink(name)


def test_shm_full_is_refused_before_anything_is_written(monkeypatch):
    with Engine(workers=1) as e:
        e.observe("s", "first", np.ones(4))
        monkeypatch.setattr(shm, "free_bytes", lambda: 1024)
        with pytest.raises(ShmFull) as info:
            e.observe("other", "x", np.ones(4))
        assert info.value.retryable
        monkeypatch.undo()
        assert e.recall("s", np.ones(4), k=3)[0].id == "first"
        assert e.generation == 1


def test_an_engine_name_is_used_once():
    with Engine(name="t-once", workers=1):
        with pytest.raises(EngineInUse):
            Engine(name="t-once", workers=1)


def _start_engine_and_hang(name, ready):
    e = Engine(name=name, workers=1)
    e.observe("s", ["a", "b"], np.eye(2, 4))
    ready.set()
    signal.pause()


def test_stale_blocks_of_a_killed_engine_are_collected_and_live_ones_kept():
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_start_engine_and_hang, args=("t-killed", ready))
    p.start()
    with Engine(name="t-alive", workers=1) as alive:
        alive.observe("s", "a", np.ones(4))
        assert ready.wait(60)
        assert not any("t-killed" in b for b in collect_stale())  # alive: untouched
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        left = shm.list_blocks("t-killed")
        assert len(left) >= 2
        removed = collect_stale()
        assert sorted(removed) == sorted(left)
        assert shm.list_blocks("t-killed") == []
        assert alive.recall("s", np.ones(4), k=1)[0].id == "a"
        assert shm.list_blocks("t-alive")


def test_empty_blocks_of_an_engine_killed_while_creating_them_are_collected():
    """SharedMemory creates a block, then sizes it: a process killed between
    the two leaves an empty block (a chaos run's kill did), which cannot be
    mapped. Collection and `unlink` remove it by name all the same, the
    catalog's too once old enough."""
    name = f"t-empty-{os.getpid()}"
    blocks = [segment_name(name, 0), catalog_name(name)]
    try:
        for block in blocks:
            os.close(os.open(os.path.join(shm.SHM_DIR, block), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        assert collect_stale(name, min_age_s=60) == []  # young: perhaps being created now
        assert sorted(collect_stale(name, min_age_s=0)) == sorted(blocks)
        assert shm.list_blocks(name) == []
    finally:
        for block in blocks:
            shm.unlink(block)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.mark.parametrize("role", ["front", "worker"])
def test_an_engine_whose_owner_died_lives_while_its_front_or_a_worker_does(role):
    """An orphaned child still maps (and may write) the engine's memory: nothing
    is collected until it is gone too, and a zombie counts as gone."""
    name = "t-orphan-child"
    owner = _sleeper()
    owner_start = process_start(owner.pid)
    owner.kill()
    owner.wait()
    child = _sleeper()
    cat = Catalog.create(name)
    try:
        shm.close(shm.create(segment_name(name, 0), 4096))
        cat.header[[OWNER_PID, OWNER_START]] = [owner.pid, owner_start]
        if role == "front":
            cat.header[[FRONT_START, FRONT_PID]] = [process_start(child.pid), child.pid]
        else:
            cat.workers[3, [W_START, W_PID]] = [process_start(child.pid), child.pid]
        assert not cat.owner_alive() and cat.engine_alive()
        assert collect_stale(name, min_age_s=0) == []
        assert len(shm.list_blocks(name)) == 2
        child.kill()
        deadline = time.monotonic() + 10
        while process_start(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not cat.engine_alive()  # a zombie (not yet waited for) is dead
        assert sorted(collect_stale(name, min_age_s=0)) == sorted([f"engram_{name}_000000",
                                                                   f"engram_{name}_catalog"])
    finally:
        child.kill()
        child.wait()
        cat.owner = False  # only unmap: the blocks are collected (or removed below)
        cat.close()
        for block in shm.list_blocks(name):
            shm.unlink(block)


def test_levels_are_reproducible_and_geometric():
    gens = np.arange(1, 200001, dtype=np.uint64)
    a = draw_levels(7, gens, 16, MAX_LEVEL)
    np.testing.assert_array_equal(a, naive.levels(7, gens, 16, MAX_LEVEL))
    assert not (a == draw_levels(8, gens, 16, MAX_LEVEL)).all()
    share = (a > 0).mean()
    assert abs(share - 1 / 16) < 0.005, share


def test_space_writer_splits_large_batches_over_open_segments():
    cat = Catalog.create("t-writer")
    segments = []
    try:
        params = SpaceParams("s", 4, "f32", "cosine", 4, 20, 1)
        w = SpaceWriter(cat, cat.add_space(params), params, SegmentSizes(1000, 64, 64), writers=3,
                        on_new_segment=lambda i, s: segments.append(s))
        batch = prepare([f"i{i}" for i in range(2500)], np.ones((2500, 4)), dim=4,
                        metric="cosine", dtype="f32")
        w.append(batch, 1)
        counts = [s.accepted for s in w.segments]
        assert sum(counts) == 2500 and len(counts) >= 3
        assert all(c <= 1000 for c in counts)
        gens = np.concatenate([s.r.generation[:s.accepted] for s in w.segments])
        assert sorted(gens.tolist()) == list(range(1, 2501))
        assert cat.n_segments == len(w.segments)
        assert [segment_name("t-writer", i) for i in range(cat.n_segments)] == [s.name for s in segments]
    finally:
        for s in segments:
            s.close()
        cat.close()


def test_segment_sizes_grow_from_small_to_the_configured_capacity():
    sizes = SegmentSizes(131072, 256, 256 + 65536)
    assert [sizes.capacity(i) for i in range(9)] == \
        [64, 256, 1024, 4096, 16384, 65536, 131072, 131072, 131072]
    assert [SegmentSizes(1000, 256, 1).capacity(i) for i in range(4)] == [64, 256, 1000, 1000]
    params = SpaceParams("s", 8, "f16", "cosine", 16, 100, 1)
    assert sizes.layout(0, params).arena_capacity == 256 + 65536  # one maximal record fits
    assert sizes.layout(4, params).arena_capacity == 16384 * 256
    assert sizes.layout(6, params) == SegmentLayout(131072, 8, "f16", 16, 131072 * 256)


def test_a_growing_space_gets_ever_larger_segments_and_finds_every_observation():
    n = 5000
    data = clustered(n, 32, seed=41)
    ids = [f"g{i}" for i in range(n)]
    with Engine(workers=2, segment_capacity=4096, compaction_capacity=0) as e:  # the schedule alone
        for lo in range(0, n, 500):
            e.observe("grow", ids[lo:lo + 500], data[lo:lo + 500])
        assert e.wait_indexed(120)
        space = e.writer.spaces["grow"]
        capacities = [s.layout.capacity for s in space.segments]
        assert capacities[:4] == [64, 256, 1024, 4096], capacities
        assert capacities == [space.sizes.capacity(i) for i in range(len(capacities))], capacities
        for seg in space.segments:
            again = Segment.attach(seg.name)  # each header carries its own size
            try:
                assert again.layout == seg.layout and again.accepted == seg.accepted
            finally:
                again.close()
            assert not seg.sealed or seg.accepted == seg.layout.capacity, seg.name
            assert seg.indexed == seg.accepted
            assert naive.graph_violations(seg.graph_r, seg.indexed, 16) == [], seg.name
        assert sum(s.accepted for s in space.segments) == n
        misses = [i for i in range(n) if e.recall("grow", data[i], k=1)[0].id != ids[i]]
        assert misses == []


def settled_shm_bytes(engine: str) -> int:
    """/dev/shm bytes an engine's blocks occupy (pages touched), read once the
    background prefaulter has stopped adding pages."""
    last = -1
    for _ in range(200):
        total = sum(shm.block_bytes(b) for b in shm.list_blocks(engine))
        if total == last:
            break
        last = total
        time.sleep(0.05)
    return total


def test_the_prefaulter_populates_ahead_in_proportion_to_what_was_written():
    MiB = 1 << 20
    block = shm.create("engram_t-prefault_000000", 64 * MiB)
    column = np.ndarray((64 * MiB,), np.uint8, buffer=block.buf)
    prefault = Prefaulter()
    try:
        def populated_after(used):
            """Bytes populated once `used` bytes are reported written (the test
            writes none, so only the prefaulter's pages count)."""
            prefault.ahead(1, column.ctypes.data, used, column.nbytes)
            return settled_shm_bytes("t-prefault")

        small = populated_after(4096)
        if small == 0:
            pytest.skip("this kernel has no MADV_POPULATE_WRITE")
        assert small == MIN_WINDOW_BYTES  # the floor, not 16 MiB, past one page written
        assert populated_after(MiB) == small + MiB  # as much again as written
        assert populated_after(32 * MiB) == small + MiB + WINDOW_BYTES  # the ceiling
        assert populated_after(36 * MiB) == small + MiB + WINDOW_BYTES  # over half left: no refill
        assert populated_after(42 * MiB) == small + MiB + 26 * MiB  # refilled to 42 + 16
        assert populated_after(60 * MiB) == small + MiB + 30 * MiB  # never past the column
    finally:
        prefault.close()
        column = None  # the view goes before the block
        shm.destroy(block)


def _minor_faults_reading(column: np.ndarray) -> int:
    """Minor page faults this thread takes reading a byte of every page."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    int(column[::4096].sum())
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_readers_prefaulter_maps_what_was_written_and_a_window_past_it_into_its_own_mapping():
    MiB = 1 << 20
    block = shm.create("engram_t-prefault_000001", 64 * MiB)
    written = np.ndarray((64 * MiB,), np.uint8, buffer=block.buf)
    written[:8 * MiB] = 1  # a writer's rows: pages in /dev/shm, mapped in its mapping only
    readers_block = shm.attach(block.name)  # a mapping of its own, as a reader process has
    column = np.ndarray((64 * MiB,), np.uint8, buffer=readers_block.buf)
    prefault = Prefaulter(advice=MADV_POPULATE_READ)
    try:
        cold = _minor_faults_reading(column[:4 * MiB])  # the first half: faulted as it is read
        prefault.ahead(1, column.ctypes.data, 8 * MiB, column.nbytes, wrote=False)
        deadline = time.monotonic() + 30
        while prefault.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        if settled_shm_bytes("t-prefault") == 8 * MiB:
            pytest.skip("this kernel has no MADV_POPULATE_READ")
        # From the start, not from what was written: a reader wrote nothing.
        assert _minor_faults_reading(column[4 * MiB:8 * MiB]) * 8 <= cold
        # The window past the rows is populated (tmpfs allocates pages a shared
        # mapping reads), as much as a writer's own prefaulter would.
        assert settled_shm_bytes("t-prefault") == 16 * MiB
        assert int(column[:16 * MiB].sum()) == 8 * MiB  # and no byte changed
    finally:
        prefault.close()
        written = column = None  # the views go before the blocks
        shm.close(readers_block)
        shm.destroy(block)


def _populated_by_read_ahead(regions: list[tuple[str, int, int, int]]) -> None:
    """Have a reader's prefaulter take (key, address, used, limit) regions in
    turn, and wait until it has no work left."""
    prefault = Prefaulter(advice=MADV_POPULATE_READ)
    try:
        for key, address, used, limit in regions:
            prefault.ahead(key, address, used, limit, wrote=False)
        deadline = time.monotonic() + 30
        while prefault.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not prefault.pending()
    finally:
        prefault.close()


def test_a_prefaulter_forgets_a_region_unmapped_under_it_and_keeps_going():
    MiB = 1 << 20
    block = shm.create("engram_t-prefault_000003", 4 * MiB)
    column = np.ndarray((4 * MiB,), np.uint8, buffer=block.buf)
    gone = shm.create("engram_t-prefault_000002", 4 * MiB)
    gone_column = np.ndarray((4 * MiB,), np.uint8, buffer=gone.buf)
    try:
        _populated_by_read_ahead([("probe", gone_column.ctypes.data, MiB, 4 * MiB)])
        if settled_shm_bytes("t-prefault") == 0:
            pytest.skip("this kernel has no MADV_POPULATE_READ")
        address, gone_column = gone_column.ctypes.data, None
        shm.destroy(gone)  # unmapped: madvise fails on it with ENOMEM
        # The unmapped region comes first: the prefaulter meets it first.
        _populated_by_read_ahead([("gone", address, MiB, 4 * MiB),
                                  ("here", column.ctypes.data, MiB, column.nbytes)])
        assert settled_shm_bytes("t-prefault") == 2 * MiB  # what was written and as much again
    finally:
        column = gone_column = None
        shm.destroy(block)
        if gone.name in shm.list_blocks():
            shm.destroy(gone)


def test_a_thousand_spaces_of_one_observation_take_kilobytes_each():
    # Every space used to start with a full 131,072-slot segment: ~6.8 MB per
    # space of one 128-d observation, 16 MB at 768-d.
    vectors = np.random.default_rng(5).normal(size=(1000, 768))
    with Engine(workers=2) as e:  # default f16, threads
        for i in range(1000):
            e.observe(f"space-{i}", f"obs-{i}", vectors[i])
        assert e.wait_indexed(60)
        blocks = shm.list_blocks(e.name)
        assert shm.block_name(e.name, "catalog") in blocks and len(blocks) == 1001
        total = settled_shm_bytes(e.name)
        print(f"\n1000 spaces of one 768-d f16 observation: {total / 2**20:.1f} MiB of /dev/shm "
              f"in {len(blocks)} blocks, {total / 1000 / 1024:.1f} KiB per space")
        assert total < 256 * 2**20, f"{total / 2**20:.1f} MiB for 1000 one-observation spaces"
        for i in (0, 500, 999):
            assert e.recall(f"space-{i}", vectors[i], k=1)[0].id == f"obs-{i}"


def test_a_batch_lands_in_the_columns_as_the_naive_write_would():
    data = np.random.default_rng(8).normal(size=(40, 6))
    ident = [f"id{i}" + "ü" * (i % 3) for i in range(40)]  # multi-byte ids hash by their bytes
    batch = prepare(ident, data, what=[f"t{i}é" * (i % 4) for i in range(40)],
                    when=np.arange(40.0), confidence=np.linspace(0, 1, 40), dim=6, metric="cosine",
                    dtype="f16")
    layout = SegmentLayout(capacity=64, dim=6, dtype="f16", M=4, arena_capacity=4096)
    seg = Segment.create("engram_t-rows_000001", layout, metric=0, space=0, segment_no=0)
    try:
        levels = draw_levels(3, np.arange(100, 140, dtype=np.uint64), 4, MAX_LEVEL)
        assert append_rows(seg.w, batch, 100, levels, 10, 40, 5, 7, 2, True, np.inf) == \
            (ROW_OK, 2 + int(levels[10:].sum()))
        c = seg.r
        rows = slice(5, 35)
        want = data[10:] / np.linalg.norm(data[10:], axis=1, keepdims=True)
        np.testing.assert_array_equal(c.vectors[rows].view(np.float16), want.astype(np.float16))
        assert c.generation[rows].tolist() == list(range(110, 140))
        np.testing.assert_array_equal(c.when[rows], np.arange(10.0, 40.0))
        np.testing.assert_allclose(c.confidence[rows], np.linspace(0, 1, 40)[10:], rtol=1e-6)
        assert c.level[rows].tolist() == levels[10:].tolist()
        first = 2 + np.cumsum(levels[10:]) - levels[10:]  # a row per upper layer
        assert c.upper_row[rows].tolist() == np.where(levels[10:] > 0, first, -1).tolist()
        for slot, i in zip(range(5, 35), range(10, 40)):
            start = 7 if slot == 5 else int(c.text_end[slot - 1])
            raw = c.arena[start:c.text_end[slot]].tobytes()
            assert raw == ident[i].encode() + (f"t{i}é" * (i % 4)).encode()
            assert c.id_hash[slot] == naive.fnv1a(ident[i].encode())
        # A NaN in row 25 stops the write there: the other columns stay as they were.
        data[25, 3] = np.nan
        bad = prepare(ident, data, dim=6, metric="cosine", dtype="f16")
        before = c.generation.copy()
        assert append_rows(seg.w, bad, 500, levels, 0, 40, 0, 0, 0, True, np.inf) == (ROW_NON_FINITE, 25)
        np.testing.assert_array_equal(c.generation, before)
    finally:
        seg.close()
        shm.unlink(seg.name)


def test_a_retired_segment_is_unmapped_by_the_release_thread_once_nothing_else_holds_it(monkeypatch):
    """engine/release.py: the segment stays mapped while another reference
    (a recall in flight) holds it, then the process's release thread closes
    it, not the thread that retired it."""
    from engram_shm.engine import release

    name = f"t_release_{os.getpid()}"
    seg = Segment.create(name, SegmentLayout(1024, 16, "f32", 4, 1 << 16), 0, 0, 0)
    closed_by = []
    unmap = shm.close

    def recording_close(block, warn=True):
        closed_by.append(threading.current_thread().name)
        return unmap(block, warn)

    monkeypatch.setattr(shm, "close", recording_close)
    try:
        recall_holds = seg
        release.later(seg)
        del seg
        time.sleep(3 * release.CHECK_S)
        assert closed_by == [] and recall_holds.block is not None, "closed under a recall that holds it"
        del recall_holds
        deadline = time.monotonic() + 10
        while not closed_by and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed_by == ["engram-release"]
    finally:
        shm.unlink(name)
