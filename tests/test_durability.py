"""Durability with real processes: a data directory, its log and checkpoints,
and restarts after clean stops, kills of the whole engine, torn logs,
corrupt checkpoints and a full disk."""

import gc
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from engram_shm import Client, Engine
from engram_shm.config import EngineConfig
from engram_shm.engine import recovery
from engram_shm.engine.writer import EngineWriter
from engram_shm.errors import Corrupt, DataDirInUse, StorageFull
from engram_shm.store import checkpoint, quantization, shm, wal
from engram_shm.store.catalog import FRONT_RECOVERING, WAL_LSN, Catalog, collect_stale
from engram_shm.store.layout import ACCEPTED, LAYOUT_VERSION, UPPER_USED, SegmentLayout, first_upper_rows
from engram_shm.store.segment import Segment
from engram_shm.store.verify import verify
from engram_shm.synthetic import clustered
from engram_shm.transport import protocol as p
from engram_shm.transport.launch import free_port, running_server
from engram_shm.transport.sessions import create_table

import naive
from exports import export_all
from inproc import front_on

DIM = 32
RECALL_SAMPLE = 2000  # acked rows a kill test recalls one by one (export reads them all)


def own_top_hits(recall, space, vectors, ids):
    return [i for i, v in zip(ids, vectors) if recall(space, v, k=1)[0].id != i]


# -- the embedded engine ------------------------------------------------------------
@pytest.mark.parametrize("chunk", [checkpoint.WRITE_CHUNK, 4096])  # one write per column, and many
def test_embedded_engine_comes_back_after_a_clean_close(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(checkpoint, "WRITE_CHUNK", chunk)
    data = clustered(3000, DIM, seed=101)
    ids = [f"e{i}" for i in range(3000)]
    texts = [f"text {i} é" for i in range(3000)]
    when = np.arange(3000, dtype=np.float64) + 1.7e9
    conf = np.linspace(0, 1, 3000)
    with Engine(data_dir=tmp_path, workers=2) as e:
        e.observe("notes", ids[:2000], data[:2000], what=texts[:2000], when=when[:2000],
                  confidence=conf[:2000])
        e.checkpoint()
        e.observe("notes", ids[2000:], data[2000:], what=texts[2000:], when=when[2000:],
                  confidence=conf[2000:])
        assert e.wait_indexed(60)
        generation = e.generation
        before = [e.recall("notes", data[i], k=5, consistency=generation) for i in range(0, 3000, 30)]
    with Engine(data_dir=tmp_path, workers=2) as e:
        assert e.generation == generation
        assert e.recovered.checkpoint is not None and e.recovered.replayed_observations == 0
        after = [e.recall("notes", data[i], k=5, consistency=generation) for i in range(0, 3000, 30)]
        assert after == before  # ids, similarities, texts, timestamps, confidences, generations
        e.observe("notes", "new", data[0] + 1)  # and it goes on from there
        assert e.generation == generation + 1


def test_a_data_directory_has_one_engine(tmp_path):
    with Engine(data_dir=tmp_path, workers=1):
        with pytest.raises(DataDirInUse):
            Engine(data_dir=tmp_path, workers=1)


CRASHER = """
import sys
from engram_shm import Engine
from engram_shm.synthetic import clustered
data = clustered(4000, {dim}, seed=102)
e = Engine(name="{name}", data_dir=sys.argv[1], workers=1, fsync="always", wal_file_bytes=1 << 16,
           checkpoints_kept=2, dtype="{dtype}")
for b, lo in enumerate(range(0, 4000, 500)):
    e.observe("s", [f"c{{i}}" for i in range(lo, lo + 500)], data[lo:lo + 500])
    if b in (1, 4):
        e.checkpoint()
print("done", flush=True)
sys.stdin.read()
"""


def crashed_engine(directory, dtype="f16") -> np.ndarray:
    """An engine that wrote 4000 observations in 8 batches, with checkpoints
    after the 2nd and the 5th, then was SIGKILLed; returns its vectors."""
    name = f"t-crash-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", CRASHER.format(dim=DIM, name=name, dtype=dtype),
                             str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait()
        collect_stale(name, min_age_s=0)  # what the killed engine left in /dev/shm
    return clustered(4000, DIM, seed=102)


def last_batch_record(directory) -> wal.Record:
    files = wal.log_files(os.path.join(directory, "wal"))
    scan, records = wal.scan_file(files[-1])
    return [r for r in records if r.kind == wal.BATCH][-1], files[-1]


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_torn_log_tail_is_cut_and_everything_before_it_recovered(tmp_path, damage):
    data = crashed_engine(tmp_path)
    record, path = last_batch_record(tmp_path)
    assert record.meta["gen"] == 3501
    if damage == "truncated":
        os.truncate(path, record.offset + 100)
    else:
        with open(path, "r+b") as f:
            f.seek(record.offset + 5000)
            byte = f.read(1)
            f.seek(record.offset + 5000)
            f.write(bytes([byte[0] ^ 0xFF]))
    assert not verify(str(tmp_path))["ok"]
    with Engine(data_dir=tmp_path, workers=1) as e:
        assert e.recovered.cut, "the torn record was not reported"
        assert e.stats()["spaces"]["s"]["count"] == 3500
        assert own_top_hits(e.recall, "s", data[:3500:7], [f"c{i}" for i in range(0, 3500, 7)]) == []
        e.observe("s", [f"c{i}" for i in range(3500, 4000)], data[3500:])  # the lost batch, sent again
    assert verify(str(tmp_path))["ok"]


def test_an_int8_space_comes_back_with_its_scales_and_codes(tmp_path):
    """int8 codes are logged as stored and the space's per-dimension scales
    with them: a crashed engine's checkpointed and replayed rows decode as before."""
    data = crashed_engine(tmp_path, "int8")
    with Engine(data_dir=tmp_path, workers=1) as e:
        assert e.recovered.replayed_observations == 1500
        segments = e._segments
        scales = segments[0].scales
        assert all(np.array_equal(s.scales, scales) for s in segments)
        assert 0 < scales.min() < scales.max() <= 1  # one per dimension, at most 1 under cosine
        hits = [e.recall("s", v, k=1)[0] for v in data[::9]]
        assert [h.id for h in hits] == [f"c{i}" for i in range(0, 4000, 9)]
        assert min(h.similarity for h in hits) > 0.99  # a row against its own codes
        e.observe("s", "more", data[0] + 0.5)  # the scale carries on
        assert e.recall("s", data[0] + 0.5, k=1)[0].id == "more"


def test_an_int8_log_record_written_before_rows_had_factors_replays_them_with_factor_1():
    """A BATCH record of layout 4 or before holds int8 rows of `dim` codes
    and no `width`: replayed, they are rows of today with factor 1, which
    decode as they were written."""
    codes = np.array([[1, -2, 3], [127, 0, -127]], np.int8)
    blobs = [codes, np.zeros(2), np.ones(2, np.float32), np.ones(2, np.int32), np.array([2, 4]),
             np.frombuffer(b"a1b2", np.uint8)]
    meta = {"space": "s", "gen": 1, "n": 2, "dim": 3, "dtype": "int8", "session": None, "seq": 0, "bytes": 4,
            "scales": quantization.logged(np.full(3, 0.5, np.float32))}
    body = memoryview(b"".join(blob.tobytes() for blob in blobs))
    batch = recovery._batch(wal.Record(1, wal.BATCH, meta, body, "old.wal", 0))
    assert batch.dim == 3 and batch.ids == ["a", "b"]
    np.testing.assert_array_equal(batch.vectors, quantization.with_unit_factors(codes))
    np.testing.assert_allclose(quantization.decoded(batch.vectors, quantization.from_log(meta)),
                               codes * (0.5 / 127), rtol=1e-6)


@pytest.mark.parametrize("version, dtype", [(1, "int8"), (2, "f16"), (3, "f32"), (4, "int8")])
def test_a_checkpointed_block_of_an_older_layout_loads_at_the_current_one(tmp_path, version, dtype):
    """Blocks of layouts 1 to 4 come back at the current version (whose
    writers put stable prefixes in count words), their columns as written,
    each tall node's upper lists (a row of MAX_LEVEL lists per node before
    version 4) one row per layer and int8 codes with factor 1 (none before
    version 5); a live block of an older layout is refused."""
    names = [f"engram-test-layout-{os.getpid()}-{version}-{i}" for i in range(2)]
    rng = np.random.default_rng(version)
    levels = [0, 2, 0, 1, 3]
    try:
        old = Segment.create(names[0], SegmentLayout(16, 4, dtype, 4, 256, version=version), 0, 0, 0,
                             np.full(4, 0.25, np.float32) if dtype == "int8" else None)
        w = old.w
        w.vectors[:5] = rng.integers(-100, 100, (5, 4)).astype(w.vectors.dtype)
        w.links0[:5, :3] = [[2, 1, 2], [2, 0, 2], [2, 0, 1], [1, 4, 0], [1, 3, 0]]
        w.level[:5] = levels
        upper = {(1, 1): [1, 4], (1, 2): [1, 4], (3, 1): [1, 1], (4, 1): [2, 1, 3], (4, 2): [1, 1],
                 (4, 3): [0]}
        if old.layout.rows_per_layer:
            w.upper_row[:5] = first_upper_rows(np.array(levels))
            old.header[UPPER_USED] = sum(levels)
            for (node, layer), row in upper.items():
                w.upper[w.upper_row[node] + layer - 1, :len(row)] = row
        else:
            w.upper_row[:5] = [-1, 2, -1, 0, 1]  # rows handed out in any order
            for (node, layer), row in upper.items():
                w.upper[w.upper_row[node], layer - 1, :len(row)] = row
        w.text_end[:5] = [2, 4, 6, 8, 10]
        w.id_len[:5] = 1
        old.header[ACCEPTED] = 5
        path = str(tmp_path / "seg.bin")
        size, crc = checkpoint._Image(old).write(path)
        new = checkpoint._load_segment(path, {"file": "seg.bin", "bytes": size, "crc32c": crc}, names[1])
        assert new.layout.version == LAYOUT_VERSION and old.layout.version == version
        for column in ("links0", "text_end", "level"):
            np.testing.assert_array_equal(getattr(new.r, column)[:5], getattr(old.r, column)[:5])
        vectors = old.r.vectors[:5]
        if dtype == "int8":
            vectors = quantization.with_unit_factors(vectors)
            np.testing.assert_array_equal(quantization.factors(new.r.vectors[:5]), np.ones(5, np.float32))
        np.testing.assert_array_equal(new.r.vectors[:5], vectors)
        np.testing.assert_array_equal(new.scales, old.scales)
        assert new.accepted == 5 and new.header[UPPER_USED] == sum(levels)
        for (node, layer), row in upper.items():
            assert naive.list_of(new.graph_r, node, layer)[:len(row)].tolist() == row
        with pytest.raises(Corrupt, match="layout version"):
            Segment.attach(names[0])
    finally:
        for name in names:
            shm.unlink(name)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    data = crashed_engine(tmp_path)
    found = checkpoint.complete(os.path.join(tmp_path, "checkpoints"))
    assert [n for n, _ in found] == [2, 1]
    seg = os.path.join(found[0][1], "seg-000000.bin")
    with open(seg, "r+b") as f:
        f.seek(700)
        f.write(b"\xde\xad\xbe\xef")
    report = verify(str(tmp_path))
    assert not report["ok"] and report["recoverable"] and report["loads_checkpoint"] == 1
    with Engine(data_dir=tmp_path, workers=1) as e:
        assert e.recovered.checkpoint == 1 and e.recovered.skipped_checkpoints
        assert e.stats()["spaces"]["s"]["count"] == 4000
        assert own_top_hits(e.recall, "s", data[::9], [f"c{i}" for i in range(0, 4000, 9)]) == []


def test_an_engine_restarted_past_its_checkpoint_interval_checkpoints_what_it_replayed(tmp_path):
    """The interval counts from the last checkpoint, not from the start, and
    the records replayed at the start count as logged: an engine killed more
    often than the interval still checkpoints (a 10-minute chaos run of engine
    kills never did, so every start replayed and indexed again the whole log)."""
    data = crashed_engine(tmp_path)  # its last checkpoint holds 2500 of 4000
    time.sleep(1.5)
    with Engine(data_dir=tmp_path, workers=1, checkpoint_interval_s=1.0) as e:
        assert e.recovered.checkpoint == 2 and e.recovered.replayed_observations == 1500
        deadline = time.monotonic() + 60
        while e.checkpointer.last is None and time.monotonic() < deadline:
            time.sleep(0.1)  # no write: the replayed records alone are due
        assert e.checkpointer.last is not None, "no checkpoint of the replayed records"
        assert e.checkpointer.last["observations"] == 4000
        assert own_top_hits(e.recall, "s", data[::50], [f"c{i}" for i in range(0, 4000, 50)]) == []


def test_no_checkpoint_is_read_while_a_front_recovers(tmp_path):
    """A restarted front moves the committed generation past the rows its
    predecessor left half-written, then stores their batches again from the
    log: a checkpoint read in between records rows that are not there as
    committed, and a restart from it loses them (a 10-minute chaos run lost an
    acked batch that way). The checkpoint waits until the front is done."""
    data = clustered(500, 16, seed=3)
    with Engine(data_dir=tmp_path, workers=1) as e:
        e.observe("s", [f"r{i}" for i in range(500)], data)
        e.catalog.header[FRONT_RECOVERING] = 1
        taken = []
        thread = threading.Thread(target=lambda: taken.append(e.checkpointer.checkpoint()))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and not taken, "a checkpoint was read while a front was recovering"
        e.catalog.header[FRONT_RECOVERING] = 0
        thread.join(30)
        assert taken and taken[0]["generation"] == e.catalog.committed_generation


def test_verify_reads_a_healthy_directory(tmp_path):
    crashed_engine(tmp_path)
    r = subprocess.run([sys.executable, "-m", "engram_shm.cli", "verify", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout and "checkpoint 2: ok" in r.stdout


# -- the server ------------------------------------------------------------------------
def test_a_resend_after_a_front_died_before_recording_the_sequence_is_acked(tmp_path):
    """The front is killed after it logged and committed a batch but before it
    recorded the session's sequence: the restarted front learns the sequence
    from the log, and the client's re-send is acked, not refused as duplicate."""
    name = f"t-resend-{os.getpid()}"
    config = EngineConfig(name=name, data_dir=str(tmp_path))
    os.makedirs(tmp_path / "wal")
    catalog = Catalog.create(name)
    shm.close(create_table(name))
    try:
        front = front_on(name, config, catalog)
        who = zmq.Frame(b"\0client")
        front.handle([who, zmq.Frame(p.pack({"op": "init"})[0])])
        session = front.replies.sock.all[-1]["session"]
        fields, frame = p.vector_payload(clustered(10, DIM, seed=103))
        header = {"op": "observe_batch", "session": session, "seq": 1, "space": "r",
                  "ids": [f"r{i}" for i in range(10)], **fields}
        message = [who, zmq.Frame(p.pack(header)[0]), zmq.Frame(frame)]
        front.handle(message)
        assert front.replies.sock.all[-1]["op"] == "ack"
        front.sessions.set_last_seq(front.sessions.live[session], 0)  # as if killed before this
        front.close()  # unmaps; shared memory and the log stay as the dead front left them
        restarted = front_on(name, config, catalog)
        restarted.handle([who, zmq.Frame(p.pack({"op": "init", "resume": session})[0])])
        assert restarted.replies.sock.all[-1]["last_sequence"] == 10
        restarted.handle(message)
        reply = restarted.replies.sock.all[-1]
        assert reply["op"] == "ack" and reply.get("duplicate"), reply
        assert restarted.stats()["spaces"]["r"]["count"] == 10
        restarted.close()
    finally:
        catalog.close()


class FrontHarness:
    """Fronts of one engine in this process, run one after another over the
    same shared memory and log, as the supervisor restarts them."""

    def __init__(self, tmp_path, tag: str):
        self.name = f"t-{tag}-{os.getpid()}"
        self.config = EngineConfig(name=self.name, data_dir=str(tmp_path))
        os.makedirs(tmp_path / "wal")
        self.catalog = Catalog.create(self.name)
        shm.close(create_table(self.name))
        self.who = zmq.Frame(b"\0client")

    def front(self):
        return front_on(self.name, self.config, self.catalog)

    def ask(self, front, header: dict, frame=None) -> dict:
        front.handle([self.who, zmq.Frame(p.pack(header)[0]), *([zmq.Frame(frame)] if frame else [])])
        return front.replies.sock.all[-1]

    def batch(self, session: str, seq: int, space: str, ids: list, seed: int) -> tuple[dict, bytes]:
        fields, frame = p.vector_payload(clustered(len(ids), DIM, seed=seed))
        return {"op": "observe_batch", "session": session, "seq": seq, "space": space, "ids": ids,
                **fields}, frame

    def close(self):
        self.catalog.close()


def test_a_checkpoint_never_counts_a_batch_whose_sequence_is_not_recorded(tmp_path):
    """WAL_LSN, which a checkpoint takes as the log position it holds, counts a
    batch only once its session's sequence is recorded too: a front killed in
    between leaves the record past it, so recovery applies it (a checkpoint
    taken meanwhile holds the rows but not the sequence, and the log file
    could go)."""
    h = FrontHarness(tmp_path, "lsn")
    try:
        front = h.front()
        session = h.ask(front, {"op": "init"})["session"]
        assert h.ask(front, *h.batch(session, 1, "l", ["a0", "a1"], 104))["op"] == "ack"
        counted = int(h.catalog.header[WAL_LSN])
        assert counted == front.wal.last_lsn

        def killed(*args):
            raise RuntimeError("killed before the sequence was recorded")

        front.sessions.set_last_seq = killed
        assert h.ask(front, *h.batch(session, 3, "l", ["b0", "b1"], 105))["code"] == "internal"
        assert front.wal.last_lsn == counted + 1  # logged and published
        assert int(h.catalog.header[WAL_LSN]) == counted  # but not counted
        front.close()
    finally:
        h.close()


# The front that "dies" here raises in its constructor with segments mapped;
# their mappings are collected with views still on them (as a dead process's are).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_front_killed_while_recovering_is_followed_by_one_that_recovers_everything(tmp_path):
    """A restarted front buries the rows its predecessor left unpublished and
    moves the committed generation past them before it stores their batches
    again from the log; killed in between, the next front started from the
    moved generation and never stored them: acked (in the log) but gone."""
    h = FrontHarness(tmp_path, "rewarm")
    try:
        front = h.front()
        session = h.ask(front, {"op": "init"})["session"]
        header, frame = h.batch(session, 1, "w", [f"w{i}" for i in range(10)], 106)
        assert h.ask(front, header, frame)["op"] == "ack"
        # As if killed after logging the batch, before publishing its generation:
        h.catalog.publish_generation(0)
        front.sessions.set_last_seq(front.sessions.live[session], 0)
        front.close()

        def killed(*args, **kwargs):
            raise RuntimeError("killed while replaying the log")

        replay = EngineWriter.replay_batch
        EngineWriter.replay_batch = killed
        try:
            with pytest.raises(RuntimeError):
                h.front()
        finally:
            EngineWriter.replay_batch = replay
        gc.collect()  # now, within this test (see its mark)
        assert h.catalog.header[FRONT_RECOVERING] == 1 and h.catalog.committed_generation == 10
        front = h.front()
        assert h.catalog.header[FRONT_RECOVERING] == 0
        assert front.stats()["spaces"]["w"]["count"] == 10
        assert h.ask(front, {"op": "init", "resume": session})["last_sequence"] == 10
        reply = h.ask(front, header, frame)  # the client's re-send
        assert reply["op"] == "ack" and reply["duplicate"], reply
        front.close()
    finally:
        h.close()


def test_a_clean_stop_and_restart_answers_the_same(tmp_path):
    data = clustered(5000, DIM, seed=104)
    ids = [f"s{i}" for i in range(5000)]
    port = free_port()
    with running_server(data=str(tmp_path), port=port) as (endpoint, name, proc):
        with Client(endpoint) as c:
            c.observe_batch("same", ids, data, what=[f"w{i}" for i in range(5000)],
                            when=np.arange(5000.0), confidence=np.linspace(0, 1, 5000))
            c.flush()
            cues = data[::50] + 0.01
            generation = c.stats()["generation"]
            before = [c.recall("same", q, k=10, consistency="snapshot", generation=generation) for q in cues]
        r = subprocess.run([sys.executable, "-m", "engram_shm.cli", "checkpoint", "--endpoint", endpoint],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"checkpoint complete at generation {generation}" in r.stdout, r
    with running_server(data=str(tmp_path), port=port) as (endpoint, name, proc):
        assert "recovered 5000 observations from checkpoint" in proc.output()
        with Client(endpoint) as c:
            after = [c.recall("same", q, k=10, consistency="snapshot", generation=generation) for q in cues]
            assert len(after) == 100 and after == before
            assert after[3][0].what == "w150" and after[3][0].when == 150.0


def stream_while_killing(tmp_path, fsync: str, kills: int, seed: int):
    """Stream with one Client while the whole engine (its process group) is
    SIGKILLed `kills` times at random moments and restarted on the same data
    directory and port; then check that everything is there exactly once,
    with its vector, and that a sample of it is found by recall.
    Returns the kills done; per resume of the client's session, (the
    sequence the client had acked, the sequence the restarted server knew);
    and per kill, how many acked observations the client had not yet been
    told were on disk."""
    rng = random.Random(seed)
    batch, most = 100, 1500
    data = clustered(batch * most, DIM, clusters=200, seed=seed)
    ids = [f"k{i}" for i in range(batch * most)]
    port = free_port()
    resumed, errors, sent, exposed = [], [], [], []
    killing_done, streamed = threading.Event(), threading.Event()
    box = {}

    def stream():
        try:
            c = box["c"] = Client(f"tcp://127.0.0.1:{port}", batch_size=batch, timeout=10)
            handshake = c._handshake

            def watched(resume, timeout=None):
                before = c.last_acked
                handshake(resume, timeout)
                if resume:
                    resumed.append((before, c.last_acked))

            c._handshake = watched
            for lo in range(0, len(ids), batch):
                if killing_done.is_set() and lo >= 20 * batch:
                    break
                c.observe_batch("chaos", ids[lo:lo + batch], data[lo:lo + batch])
                sent.append(lo + batch)
                time.sleep(rng.uniform(0.005, 0.03))
            c.flush(timeout=120)
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            streamed.set()

    cm = running_server("--fsync", fsync, data=str(tmp_path), port=port)
    killed = 0
    try:
        _, _, proc = cm.__enter__()
        streamer = threading.Thread(target=stream)
        streamer.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.5))
            if streamed.is_set():
                break
            c = box.get("c")
            os.killpg(proc.pid, signal.SIGKILL)
            if c is not None:  # acked but not yet reported on disk: what a power cut could take
                exposed.append(c.last_acked - c.durable_seq)
            killed += 1
            cm.__exit__(None, None, None)
            cm = running_server("--fsync", fsync, data=str(tmp_path), port=port)
            _, _, proc = cm.__enter__()
        killing_done.set()
        streamer.join(300)
        assert not errors, errors
        n = sent[-1]
        c = box["c"]
        assert c.last_acked == n
        assert c.stats()["spaces"]["chaos"]["count"] == n  # none stored twice, none lost
        rows, _ = export_all(c, "chaos")  # every acked row once, with its vector
        assert sorted(rows) == sorted(ids[:n])
        # clustered rows are unit vectors, stored as they are under cosine (f16)
        np.testing.assert_allclose(np.stack([rows[i][0] for i in ids[:n]]), data[:n], atol=2e-3)
        probe = sorted(rng.sample(range(n), min(n, RECALL_SAMPLE)))  # and found by recall
        misses = own_top_hits(c.recall, "chaos", data[probe], [ids[i] for i in probe])
        c.close()
        assert misses == [], f"{len(misses)} of {len(probe)} acked observations not found: {misses[:5]}"
        return killed, resumed, exposed
    finally:
        killing_done.set()
        cm.__exit__(None, None, None)


def test_whole_engine_killed_five_times_under_fsync_always_loses_nothing(tmp_path):
    kills, resumed, exposed = stream_while_killing(tmp_path, "always", kills=5, seed=105)
    assert kills == 5
    assert resumed and all(server >= acked for acked, server in resumed), resumed
    assert exposed == [0] * len(exposed)  # every ack came after its fsync
    print(f"fsync=always: {kills} kills, resumes (client acked, server knew): {resumed}")


def test_whole_engine_killed_five_times_under_fsync_interval_loses_nothing_acked(tmp_path):
    kills, resumed, exposed = stream_while_killing(tmp_path, "interval", kills=5, seed=106)
    assert kills == 5
    lost = [max(0, acked - server) for acked, server in resumed]
    # The log reaches the OS before every ack, so killing processes loses
    # nothing; what a power cut could have taken is what was not yet synced.
    print(f"fsync=interval: {kills} kills, acked-but-lost per resume {lost}, acked but not yet "
          f"reported on disk at each kill {exposed}")
    assert lost == [0] * len(lost)


def test_a_full_disk_is_refused_with_a_code_and_nothing_unwritten_is_acked(tmp_path):
    limit = 4 << 20  # files of the server, its log among them, stop growing here (its 3.1 MB
    # catalog block, a file of /dev/shm, must still fit)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    data = clustered(9000, 256, seed=107)  # 4.6 MB of f16 vectors: more than the log may hold
    with running_server("--fsync", "always", "--segment-capacity", "1024", data=str(tmp_path),
                        preexec_fn=small_files) as (endpoint, name, proc):
        front = subprocess.run(["pgrep", "-f", f"engram_shm.transport.front {name}"],
                               capture_output=True, text=True).stdout.split()
        with Client(endpoint, batch_size=250) as c:
            with pytest.raises(StorageFull) as refused:
                c.observe_batch("full", [f"f{i}" for i in range(9000)], data)
                c.flush()
            acked = c.last_acked
            assert 0 < acked < 9000
            # The refused batch is the first one not acked, still queued under its numbers.
            assert refused.value.retryable and refused.value.details["ids"][0] == f"f{acked}"
            assert c.stats()["spaces"]["full"]["count"] == acked  # stored = acked, nothing more
            probe = range(0, acked, 25)
            assert own_top_hits(c.recall, "full", data[probe], [f"f{i}" for i in probe]) == []
            after = subprocess.run(["pgrep", "-f", f"engram_shm.transport.front {name}"],
                                   capture_output=True, text=True).stdout.split()
            assert after == front  # the front did not crash
            with pytest.raises(StorageFull):  # the disk still refuses what is queued: close says so
                c.close()
