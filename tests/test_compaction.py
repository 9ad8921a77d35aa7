"""Compaction: a space's sealed segments merged into one graph and swapped in
for readers, writers, checkpoints and restarts without a row lost, doubled
or changed."""

import contextlib
import os
import signal
import threading
import time
from collections import namedtuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_shm import Client, Engine
from engram_shm.engine.writer import EngineWriter
from engram_shm.errors import DuplicateId
from engram_shm.store import compaction, shm
from engram_shm.store.catalog import (
    BUILDING,
    FRONT_PID,
    G_STATE,
    LAYOUT_SEQ,
    LIVE,
    RETIRED,
    Catalog,
    segment_name,
)
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import free_port, running_server

import naive
from exports import export_all

Sized = namedtuple("Sized", "accepted")
SMALL = {"segment_capacity": 512, "first_segment_capacity": 64}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=12), st.booleans(), st.integers(2, 20000))
def test_a_merge_takes_two_or_more_sources_within_the_largest_graph(sizes, idle, largest):
    candidates = [Sized(n) for n in sizes]
    chosen = compaction.choose(candidates, idle, largest)
    assert chosen == [] or len(chosen) >= 2
    assert all(any(c is s for s in candidates) for c in chosen)
    assert len({id(c) for c in chosen}) == len(chosen)
    assert sum(c.accepted for c in chosen) <= largest
    assert all(c.accepted > 0 for c in chosen)
    fits = sorted(n for n in sizes if 0 < n < largest)
    if len(fits) >= 2 and sum(fits[:-1]) >= (compaction.IDLE_SHARE if idle else compaction.ACTIVE_SHARE) \
            * fits[-1] and sum(fits) <= largest:
        assert sorted(c.accepted for c in chosen) == fits  # everything into the largest


def test_a_busy_space_merges_into_its_largest_graph_only_when_that_pays_for_the_copy():
    base, small = Sized(1000), Sized(100)
    assert compaction.choose([base, small], idle=False, largest=10_000) == []
    assert compaction.choose([base, small], idle=True, largest=10_000) == [base, small]
    more = [Sized(100) for _ in range(3)]
    assert compaction.choose([base, small, *more], idle=False, largest=10_000)[0] is base
    smalls = [Sized(10 + i) for i in range(compaction.MAX_SMALL)]
    chosen = compaction.choose([Sized(100_000), *smalls], idle=False, largest=1 << 20)
    assert sorted(c.accepted for c in chosen) == [s.accepted for s in smalls]  # among themselves


def engine_blocks(name: str) -> set[str]:
    return {b for b in shm.list_blocks(name) if b[-6:].isdigit()}


def test_a_grown_space_becomes_one_graph_that_finds_every_row_once():
    n, dim = 12_000, 24
    data = clustered(n, dim, seed=201)
    ids = [f"g{i}" for i in range(n)]
    texts = [f"text {i}" for i in range(n)]
    with Engine(workers=2, compaction_idle_s=1e9, **SMALL) as e:
        for lo in range(0, n, 1000):
            e.observe("s", ids[lo:lo + 1000], data[lo:lo + 1000], what=texts[lo:lo + 1000],
                      when=np.arange(lo, lo + 1000, dtype=np.float64))
        generation = e.generation
        before = [[m.id for m in e.recall("s", data[i], k=5, ef=400)] for i in range(0, n, 300)]
        space = e.writer.spaces["s"]
        table = space._id_table
        assert e.compact(120)
        assert len(space.segments) == 1 and space.compactions >= 1
        seg = space.segments[0]
        assert seg.accepted == n and seg.indexed == n and seg.sealed
        assert naive.graph_violations(seg.graph_r, n, 16) == []
        rows = seg.rows(np.arange(n))
        assert sorted(r[0] for r in rows) == sorted(ids)  # each id once
        by_id = {r[0]: r for r in rows}
        stored = seg.r.vectors.view(np.float16).astype(np.float32)
        order = np.array([int(r[0][1:]) for r in rows])
        np.testing.assert_allclose(stored, data[order], atol=2e-3)
        assert all(by_id[f"g{i}"][1] == texts[i] and by_id[f"g{i}"][3] == i for i in range(0, n, 97))
        assert e.generation == generation  # a merge is no write
        assert engine_blocks(e.name) == {seg.name}  # the sources are unlinked
        misses = [i for i in range(n) if e.recall("s", data[i], k=1)[0].id != ids[i]]
        assert misses == []
        after = [[m.id for m in e.recall("s", data[i], k=5, ef=400)] for i in range(0, n, 300)]
        agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(before, after)])
        assert agree >= 0.95, agree
        # The id index followed the rows through every merge, without a
        # rebuild (a stall of the writer as long as the space is large).
        assert space._id_table is table and space.stored_of(ids) == set(ids)
        assert space.find_id("g4321") == (seg, seg.ids(np.arange(n)).index("g4321"))
        with pytest.raises(DuplicateId):  # the id index moved with the rows
            e.observe("s", "g11999", data[0])
        e.observe("s", "late", data[0])
        assert e.recall("s", data[0], k=2)[1].id in ("late", "g0")
        assert e.stats()["spaces"]["s"]["count"] == n + 1


def test_an_idle_space_is_merged_in_the_background_and_an_idle_engine_then_stays_quiet(monkeypatch):
    """A space that goes idle is merged without a call to compact (the
    compaction thread starts the merge and wakes the index writers that
    build it); with no merge in progress that thread looks again only when
    the writer next asks the compaction policy (POLICY_PERIOD_S, 0.5 s),
    not every MAINTAIN_S (20 ms)."""
    n = 3000
    data = clustered(n, 16, seed=7)
    with Engine(workers=2, compaction_idle_s=0.3, **SMALL) as e:
        e.observe("s", [f"b{i}" for i in range(n)], data)
        space = e.writer.spaces["s"]
        assert len(space.segments) > 1
        deadline = time.monotonic() + 60
        while len(space.segments) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(space.segments) == 1 and space.compactions >= 1
        assert [m.id for m in e.recall("s", data[1234], k=1)] == ["b1234"]
        calls = []
        maintain = e.writer.maintain
        monkeypatch.setattr(e.writer, "maintain", lambda *a, **k: calls.append(1) or maintain(*a, **k))
        time.sleep(1.6)
    assert len(calls) <= 5, len(calls)


def test_recalls_during_swaps_see_every_row_exactly_once():
    """Recalls wide enough to return the whole space, in a thread, while the
    writer merges and swaps (twice): never a row twice (a merged segment with
    its sources) nor a row missing (neither)."""
    n, dim = 3000, 8
    data = clustered(n, dim, seed=202)
    problems, answers = [], [0]
    with Engine(workers=2, compaction_idle_s=1e9, segment_capacity=256, first_segment_capacity=64) as e:
        for stored in (2000, n):
            lo = e.stats()["spaces"]["s"]["count"] if stored == n else 0
            e.observe("s", [f"r{i}" for i in range(lo, stored)], data[lo:stored])
            assert e.wait_indexed(60)
            stop = threading.Event()

            def recall_all(stored=stored, stop=stop):
                while not stop.is_set():
                    got = [m.id for m in e.recall("s", data[0], k=stored, ef=stored)]
                    answers[0] += 1
                    if len(got) != len(set(got)) or len(got) != stored:
                        problems.append((stored, len(got), len(set(got))))

            reader = threading.Thread(target=recall_all)
            reader.start()
            try:
                assert e.compact(120)
                time.sleep(0.2)
            finally:
                stop.set()
                reader.join(60)
        assert e.writer.spaces["s"].compactions >= 2
    assert answers[0] >= 6 and problems == [], (answers, problems[:5])


def test_a_compacted_space_comes_back_from_its_checkpoint(tmp_path):
    n, dim = 6000, 16
    data = clustered(n, dim, seed=203)
    ids = [f"c{i}" for i in range(n)]
    with Engine(workers=2, data_dir=str(tmp_path), compaction_idle_s=1e9, **SMALL) as e:
        e.observe("s", ids[:4000], data[:4000])
        assert e.compact(120)
        e.observe("s", ids[4000:], data[4000:])  # after the merge: in open segments and the log
        manifest = e.checkpoint()
        segments = len(e.writer.spaces["s"].segments)
    assert len(manifest["segments"]) == segments
    assert [s["index"] for s in manifest["segments"]] == list(range(segments))
    with Engine(workers=2, data_dir=str(tmp_path), **SMALL) as e:
        assert e.stats()["spaces"]["s"]["count"] == n
        assert e.wait_indexed(60)
        misses = [i for i in range(0, n, 7) if e.recall("s", data[i], k=1)[0].id != ids[i]]
        assert misses == []
        with pytest.raises(DuplicateId):
            e.observe("s", "c10", data[10])


@contextlib.contextmanager
def standing_still(n: int, dim: int, seed: int):
    """An engine whose space "s" holds rows m0..m{n-1} in several segments,
    all indexed, and whose own writer never merges: the test drives it."""
    with Engine(workers=1, compaction_capacity=0, **SMALL) as e:
        e.observe("s", [f"m{i}" for i in range(n)], clustered(n, dim, seed=seed))
        assert e.wait_indexed(60)
        yield e, e.writer.spaces["s"]


def test_a_merge_copies_a_chunk_at_a_time_and_hands_back_once_requests_wait(monkeypatch):
    """A server's loop copies between requests: a step ends after one chunk
    (a bounded number of bytes) when `pending()` says a request waits, and
    copies on to its budget otherwise."""
    monkeypatch.setattr(compaction, "COPY_BYTES", 64 << 10)
    n = 2000
    with standing_still(n, 64, seed=206) as (e, space):
        asked = []

        def pending():
            asked.append(space.merge.slot)
            return True

        assert space.maintain(1 << 20, 0.0, 10.0, pending=pending)
        merge = space.merge
        w = merge.target.w
        chunk = compaction.COPY_BYTES // (w.vectors[0].nbytes + w.links0[0].nbytes)
        assert asked == [chunk] and merge.slot == chunk < n
        merge.step(10.0)  # nothing waits: the whole budget, every row
        assert merge.copied and merge.slot == n


def live_and_building(name: str) -> set[str]:
    cat = Catalog.attach(name)
    try:
        states = cat.segments[:cat.n_segments, G_STATE]
        return {segment_name(name, i) for i, s in enumerate(states.tolist()) if s in (LIVE, BUILDING)}
    finally:
        cat.close()


def test_a_front_killed_during_merges_loses_nothing_and_leaks_no_segment(tmp_path):
    """The front (the writer, which copies rows and swaps) is SIGKILLed again
    and again while merges run; its successors give up or finish what it left,
    and every acked row is there once."""
    n, dim, batch = 24_000, 16, 400
    data = clustered(n, dim, seed=204)
    ids = [f"k{i}" for i in range(n)]
    port = free_port()
    flags = ("--segment-capacity", "1024", "--first-segment-capacity", "64", "--compaction-idle-s", "0.5")
    with running_server(*flags, data=str(tmp_path), port=port) as (endpoint, name, _):
        cat = Catalog.attach(name)
        kills, building_seen = 0, 0
        started = time.monotonic()
        try:
            with Client(endpoint, batch_size=batch, timeout=5) as c:
                for lo in range(0, n, batch):
                    c.observe_batch("s", ids[lo:lo + batch], data[lo:lo + batch])
                    if (lo + batch) % 4000 == 0 and lo + batch < n:
                        c.flush(timeout=60)
                        # Killed as soon as a merge runs (or after a while without one).
                        deadline = time.monotonic() + 3
                        while time.monotonic() < deadline:
                            if c.stats()["spaces"]["s"]["compacting"]:
                                building_seen += 1
                                break
                        os.kill(int(cat.header[FRONT_PID]), signal.SIGKILL)
                        kills += 1
                        print(f"kill {kills} at {time.monotonic() - started:.1f} s")
                c.flush(timeout=120)
                print(f"streamed at {time.monotonic() - started:.1f} s")
                deadline = time.monotonic() + 60
                while c.stats()["spaces"]["s"]["compacting"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)  # the idle merge of the open segments
                stats = c.stats()["spaces"]["s"]
                assert stats["count"] == n, stats
                assert stats["segments"] <= n // 1024 // 2, stats  # merges went on
                rows, _ = export_all(c, "s")
                assert sorted(rows) == sorted(ids)
                np.testing.assert_allclose(np.stack([rows[i][0] for i in ids]), data, atol=2e-3)
                misses = [i for i in range(0, n, 11) if c.recall("s", data[i], k=1)[0].id != ids[i]]
                assert misses == []
            assert engine_blocks(name) == live_and_building(name)  # retired blocks all unlinked
        finally:
            cat.close()
    assert kills == 5 and building_seen >= 3, building_seen
    print(f"{kills} front kills; a merge was in progress at {building_seen} of them; {stats['segments']} "
          f"segments left after {stats['compactions']} merges by the last front")


@pytest.mark.parametrize("died", ["inside the swap", "while building"])
def test_a_writer_restarted_mid_swap_or_mid_build_settles_the_layout(died):
    """A writer that died inside a swap (the merged segment LIVE, its sources
    not yet RETIRED, the sequence odd), or with a merge still BUILDING: its
    successor finishes the one and gives up the other, and unlinks what it
    retires."""
    n = 2000
    with standing_still(n, 8, seed=205) as (e, space):
        assert space.maintain(1 << 20, 0.0, 0.0)  # a merge begins, the copy barely
        merge = space.merge
        cat = e.catalog
        if died == "inside the swap":
            while not merge.done:  # built, not swapped
                merge.step(1.0)
                time.sleep(0.01)
            cat.header[LAYOUT_SEQ] += 1  # odd: killed after the first store of change_states
            cat.segments[merge.index, G_STATE] = LIVE
        fresh = EngineWriter(cat, e.config, e._on_new_segment)
        assert fresh.recover(e._segments.__getitem__) == n
        assert cat.header[LAYOUT_SEQ] % 2 == 0
        retired = merge.source_indexes if died == "inside the swap" else [merge.index]
        states = cat.segments[:cat.n_segments, G_STATE]
        assert [i for i, s in enumerate(states.tolist()) if s == RETIRED] == sorted(retired)
        live = fresh.spaces["s"].segments
        assert sum(s.accepted for s in live) == n
        stored = sorted(i for s in live for i in s.ids(np.arange(s.accepted)))
        assert stored == sorted(f"m{i}" for i in range(n))
        assert all(not os.path.exists(f"/dev/shm/{segment_name(e.name, i)}") for i in retired)
