"""Limits and quotas (docs/security.md, "Limits and quotas"): each refused with
its code before anything is stored, logged or allocated, while other clients
keep working; per-key counts and quotas survive restarts."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_shm import Client, Engine
from engram_shm.config import EngineConfig
from engram_shm.errors import InvalidArgument, Oversize, QuotaExceeded, ShmFull, SpaceLimit
from engram_shm.limits import ANONYMOUS, limits_for, memory_ceiling_bytes
from engram_shm.store import checkpoint, shm
from engram_shm.store.catalog import MAX_SPACES, Catalog
from engram_shm.synthetic import clustered
from engram_shm.transport import protocol as p
from engram_shm.transport.front import max_part_bytes
from engram_shm.transport.launch import free_port, running_server
from engram_shm.transport.sessions import MAX_SESSIONS, create_table

from inproc import front_on
from raw import Raw

DIM = 16


def test_config_bounds_are_the_tables_sizes():
    bounds = {f.name: f.metadata.get("hi") for f in dataclasses.fields(EngineConfig)}
    assert bounds["max_sessions"] == bounds["max_sessions_per_key"] == MAX_SESSIONS
    assert bounds["max_spaces"] == bounds["max_spaces_per_key"] == MAX_SPACES


def test_every_key_gets_the_configured_limits():
    c = EngineConfig(max_sessions_per_key=3, max_spaces_per_key=4, max_key_credit=5, key_quota_bytes=1 << 20)
    assert limits_for(c, "alice") == limits_for(c, ANONYMOUS)
    assert dataclasses.astuple(limits_for(c, "alice")) == (3, 4, 5, 1 << 20)


# -- the embedded engine ------------------------------------------------------------------
def engine_blocks_bytes(name: str) -> int:
    """/dev/shm an engine's blocks occupy (touched pages)."""
    return sum(shm.block_bytes(b) for b in shm.list_blocks(name))


def observe_as(engine: Engine, owner: str, space: str, ids, vectors):
    """An observe on behalf of a key (the embedded engine's own calls are anonymous)."""
    with engine._write_lock:
        params, batch = engine.writer.prepare(space, ids, vectors)
        return engine.writer.write(params, batch, owner=owner)[0]


def naive_usage(engine: Engine) -> dict[str, int]:
    """Bytes per space recounted from its segments (the ledger's measure)."""
    used = {}
    for name, w in engine.writer.spaces.items():
        used[name] = sum(s.layout.size + engine.writer.ledger.rows_bytes(
            s.layout.dim, s.layout.dtype, s.accepted, int(s.r.text_end[s.accepted - 1]) if s.accepted else 0)
            for s in w.segments)
    return used


def test_max_dim_refuses_wide_spaces_and_wide_first_batches():
    with Engine(workers=1, max_dim=8) as e:
        with pytest.raises(InvalidArgument) as refusal:
            e.create_space("wide", dim=9)
        assert refusal.value.details["quota"] == "max_dim"
        with pytest.raises(InvalidArgument):
            e.observe("wide", ["a"], np.ones((1, 9)))
        assert e.spaces() == [] and not e.catalog.n_segments
        e.observe("narrow", ["a"], np.ones((1, 8)))


def test_space_counts_in_total_and_per_key():
    with Engine(workers=1, max_spaces=3, max_spaces_per_key=2) as e:
        observe_as(e, "alice", "a1", ["x"], np.ones((1, 4)))
        observe_as(e, "alice", "a2", ["x"], np.ones((1, 4)))
        with pytest.raises(SpaceLimit) as refusal:
            observe_as(e, "alice", "a3", ["x"], np.ones((1, 4)))
        assert refusal.value.details["quota"] == "max_spaces_per_key"
        observe_as(e, "bob", "b1", ["x"], np.ones((1, 4)))  # another key is not held back
        with pytest.raises(SpaceLimit) as refusal:
            observe_as(e, "bob", "b2", ["x"], np.ones((1, 4)))
        assert refusal.value.details["quota"] == "max_spaces"
        assert sorted(e.spaces()) == ["a1", "a2", "b1"]
        observe_as(e, "alice", "a1", ["y"], np.ones((1, 4)))  # existing spaces still take rows
        assert e.stats()["spaces"]["a1"]["owner"] == "alice"


def test_the_memory_ceiling_refuses_a_segment_before_dev_shm_fills():
    base = memory_ceiling_bytes(1.0)
    # 24 MiB beyond what /dev/shm holds now: the ceiling also caps /dev/shm's
    # fill, which other programs (another test run) may share.
    ceiling = shm.total_bytes() - shm.free_bytes() + (24 << 20)
    data = clustered(4096, 128, seed=81)
    with Engine(workers=1, memory_ceiling=ceiling / base, space_quota_bytes=1 << 40,
                key_quota_bytes=1 << 40) as e:
        stored, refusal = 0, None
        for batch in range(200):
            try:
                e.observe("big", [f"{batch}-{i}" for i in range(4096)], data)
                stored += 4096
            except ShmFull as err:
                refusal = err
                break
        assert refusal is not None and refusal.details["quota"] == "memory_ceiling", "never refused"
        assert refusal.details["used"] + refusal.details["needed"] > refusal.details["limit"]
        assert e.writer.ledger.shm_bytes <= ceiling
        assert engine_blocks_bytes(e.name) <= ceiling + e.catalog.block.size
        assert e.stats()["spaces"]["big"]["count"] == stored  # the refused batch left nothing
        assert e.recall("big", data[7], k=1)[0].id.endswith("-7")
        print(f"\nmemory ceiling {ceiling >> 20} MiB: {stored} observations of 128-d, "
              f"{engine_blocks_bytes(e.name) / 2**20:.1f} MiB of /dev/shm, then shm_full")


ops = st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.integers(0, 5), st.integers(1, 300)),
               min_size=1, max_size=25)


@settings(max_examples=25)
@given(ops=ops)
def test_random_creations_and_observations_never_pass_a_quota(ops):
    space_quota, key_quota = 600_000, 1_500_000
    with Engine(workers=1, space_quota_bytes=space_quota, key_quota_bytes=key_quota,
                text_bytes_per_observation=16, max_text_bytes=64, max_id_bytes=16) as e:
        data = clustered(300, DIM, seed=82)
        ledger = e.writer.ledger
        for step, (owner, space, n) in enumerate(ops):
            generation = e.generation
            try:
                observe_as(e, owner, f"{owner}-{space}", [f"{step}-{i}" for i in range(n)], data[:n])
            except QuotaExceeded as refusal:
                d = refusal.details
                assert d["used"] <= d["limit"] < d["used"] + d["needed"], d
                assert e.generation == generation, "a refused batch was stored"
            assert naive_usage(e) == {s: u.bytes for s, u in ledger.spaces.items()}
            assert all(u.bytes <= space_quota for u in ledger.spaces.values())
            for key in ("alice", "bob"):
                owned = sum(u.bytes for s, u in ledger.spaces.items() if ledger.owners[s] == key)
                assert owned == (ledger.keys[key].bytes if key in ledger.keys else 0) <= key_quota


def test_owners_and_quotas_survive_a_restart_from_checkpoint_or_log(tmp_path):
    data = clustered(200, DIM, seed=83)
    config = dict(workers=1, max_spaces_per_key=3, data_dir=str(tmp_path))
    with Engine(**config) as e:
        for i in range(3):
            observe_as(e, "alice", f"a{i}", [f"x{j}" for j in range(50)], data[:50])
        e.observe("anon", ["x"], data[:1])
        usage = e.stats()["keys"]
    assert usage["alice"]["spaces"] == 3 and usage["alice"]["disk_bytes"] > 0
    for source in ("log", "checkpoint"):
        if source == "log":  # hide the checkpoint: the log's SPACE records carry the owners
            for _, path in checkpoint.complete(str(tmp_path / "checkpoints")):
                os.rename(path, path + ".hidden")
        with Engine(**config) as e:
            assert e.recovered.checkpoint is (None if source == "log" else e.recovered.checkpoint)
            assert e.stats()["keys"] == usage, source
            assert [e.stats()["spaces"][f"a{i}"]["owner"] for i in range(3)] == ["alice"] * 3
            with pytest.raises(SpaceLimit):
                observe_as(e, "alice", "a3", ["x"], data[:1])


def test_a_data_directory_from_before_owners_gives_its_spaces_to_anonymous(tmp_path):
    data = clustered(20, DIM, seed=84)
    with Engine(workers=1, data_dir=str(tmp_path)) as e:
        observe_as(e, "alice", "old", [f"x{j}" for j in range(20)], data)
    path = pathlib.Path(checkpoint.complete(str(tmp_path / "checkpoints"))[0][1], checkpoint.MANIFEST)
    manifest = json.loads(path.read_text())
    for space in manifest["spaces"]:
        del space["owner"]
    path.write_text(json.dumps(manifest))
    with Engine(workers=1, data_dir=str(tmp_path)) as e:
        assert e.stats()["spaces"]["old"]["owner"] == ANONYMOUS
        assert e.recall("old", data[3], k=1)[0].id == "x3"


# -- the front, in process, with principals ----------------------------------------------
@pytest.fixture
def front_for():
    """Front(config) in this process; `front.ask(principal, identity, header,
    *payload)` handles one message as that key and returns the reply."""
    made = []

    def make(**options):
        name = f"t-lim-{os.getpid()}-{len(made)}"
        catalog = Catalog.create(name)
        shm.close(create_table(name))
        front = front_on(name, EngineConfig(name=name, **options), catalog)
        made.append((front, catalog))

        def ask(principal, identity, header, *payload):
            front.gate.principal_of = lambda frame: principal  # as if CURVE had said who it is
            front.handle([zmq.Frame(identity), *map(zmq.Frame, p.pack(header, *payload))])
            return front.replies.sock.all[-1]

        front.ask = ask
        return front

    yield make
    for front, catalog in made:
        front.close()
        catalog.close()


def test_session_limits_per_key_and_in_total(front_for):
    front = front_for(max_sessions=4, max_sessions_per_key=2)
    assert [front.ask("alice", b"a", {"op": "init"})["op"] for _ in range(2)] == ["init_ack"] * 2
    refusal = front.ask("alice", b"a", {"op": "init"})
    assert (refusal["code"], refusal["quota"], refusal["key"]) == ("session_limit", "max_sessions_per_key",
                                                                   "alice")
    bob = front.ask("bob", b"b", {"op": "init"})["session"]
    front.ask("carol", b"c", {"op": "init"})
    refusal = front.ask("dave", b"d", {"op": "init"})
    assert (refusal["code"], refusal["quota"]) == ("session_limit", "max_sessions")
    fields, frame = p.vector_payload(np.ones((1, DIM)))
    ack = front.ask("bob", b"b", {"op": "observe_batch", "session": bob, "seq": 1, "space": "s",
                                  "ids": ["x"], **fields}, frame)
    assert ack["op"] == "ack"  # admitted sessions keep working


def test_one_keys_sessions_share_its_credit_and_get_it_back(front_for):
    front = front_for(max_credit=600, max_key_credit=1000)
    a = front.ask("alice", b"a1", {"op": "init"})
    b = front.ask("alice", b"a2", {"op": "init"})
    c = front.ask("alice", b"a3", {"op": "init"})
    assert [r["credit"] for r in (a, b, c)] == [600, 400, 0]
    assert front.ask("bob", b"b", {"op": "init"})["credit"] == 600  # another key has its own
    fields, frame = p.vector_payload(np.ones((1, DIM)))
    refusal = front.ask("alice", b"a3", {"op": "observe_batch", "session": c["session"], "seq": 1,
                                          "space": "s", "ids": ["x"], **fields}, frame)
    assert refusal["code"] == "no_credit"
    front.ask("alice", b"a1", {"op": "close", "session": a["session"], "drain": False})
    front.upkeep()
    status = [m for m in front.replies.sock.all if m["op"] == "status" and m["session"] == c["session"]]
    assert status and status[-1]["credit"] > 0, status  # pushed: the client waits for it
    assert front.key_credit["alice"] == sum(s.credit_held for s in front.sessions.live.values()
                                            if s.principal == "alice") == 1000


def test_key_quota_holds_one_key_while_another_keeps_creating(front_for):
    front = front_for(key_quota_bytes=1 << 20)
    fields, frame = p.vector_payload(np.ones((1, DIM)))
    sessions = {k: front.ask(k, k.encode(), {"op": "init"})["session"] for k in ("alice", "bob")}
    seq = {"alice": 1, "bob": 1}

    def create(key, space):
        reply = front.ask(key, key.encode(), {"op": "observe_batch", "session": sessions[key],
                                               "seq": seq[key], "space": space, "ids": ["x"], **fields},
                          frame)
        seq[key] += reply["op"] == "ack"
        return reply

    replies = [create("alice", f"alice-{i}") for i in range(100)]
    refusals = [r for r in replies if r["op"] == "error"]
    assert refusals and {r["code"] for r in refusals} == {"quota_exceeded"}
    assert refusals[0]["quota"] == "key_quota_bytes" and refusals[0]["limit"] == 1 << 20
    assert front.writer.ledger.keys["alice"].bytes <= 1 << 20
    assert create("bob", "bob-0")["op"] == "ack"
    assert front.stats()["keys"]["alice"]["spaces"] == 100 - len(refusals)


# -- a live server -------------------------------------------------------------------------
QUOTA = 8 << 20


def test_ten_thousand_space_creations_stop_at_the_key_quota_and_survive_a_restart(tmp_path):
    flags = ("--key-quota-bytes", str(QUOTA), "--max-spaces-per-key", "4096", "--max-text-bytes", "1024")
    port = free_port()
    with running_server(*flags, data=str(tmp_path), port=port) as (endpoint, name, proc):
        before = engine_blocks_bytes(name)
        raw, other = Raw(endpoint), Client(endpoint)
        session = raw.ask({"op": "init"})["session"]
        fields, frame = p.vector_payload(np.ones((1, 8)))
        seq, codes = 1, {}
        for i in range(10_000):
            reply = raw.ask({"op": "observe_batch", "session": session, "seq": seq, "space": f"s{i}",
                             "ids": ["x"], **fields}, frame)
            if reply["op"] == "ack":
                seq += 1
            else:
                codes[reply["code"]] = codes.get(reply["code"], 0) + 1
                assert reply["used"] <= reply["limit"] == QUOTA < reply["used"] + reply["needed"]
        grown = engine_blocks_bytes(name) - before
        created = seq - 1
        assert codes == {"quota_exceeded": 10_000 - created}
        assert grown <= QUOTA, f"{grown} bytes of /dev/shm for a quota of {QUOTA}"
        other.observe_batch("s0", ["y"], np.ones((1, 8)))  # into a space already held: no new memory
        assert other.flush() == 1 and other.recall("s0", np.ones(8), k=2)
        usage = other.stats()["keys"][ANONYMOUS]
        print(f"\n10,000 attempts: {created} spaces created, then quota_exceeded; /dev/shm grew by "
              f"{grown / 2**20:.2f} MiB (quota {QUOTA >> 20} MiB: {usage})")
        raw.close()
        other.close()
    with running_server(*flags, data=str(tmp_path), port=port) as (endpoint, name, proc):
        with Client(endpoint) as c:
            stats = c.stats()
            assert stats["keys"][ANONYMOUS] == usage
            assert stats["spaces"]["s1"]["owner"] == ANONYMOUS
            with pytest.raises(QuotaExceeded):  # at once if its refusal is back already, else at the flush
                c.observe_batch("one-more", ["z"], np.ones((1, 8)))
                c.flush()


@pytest.fixture(scope="module")
def limited_server():
    with running_server("--max-sessions-per-key", "3", "--max-spaces-per-key", "2", "--max-dim", "64",
                        "--max-frame-bytes", "65536", "--max-batch", "64", "--max-text-bytes", "1024",
                        "--data", "none") as (endpoint, name, proc):
        yield endpoint


def test_limits_over_the_wire_get_their_codes_and_the_server_keeps_serving(limited_server):
    with Client(limited_server) as worker:  # holds a session and keeps working throughout
        worker.observe_batch("kept", ["k0"], np.ones((1, 8)))
        assert worker.flush() == 1
        raws, replies = [], []  # sessions until the key's third (closed ones count until they expire)
        while not replies or replies[-1]["op"] == "init_ack":
            raws.append(Raw(limited_server))
            replies.append(raws[-1].ask({"op": "init"}))
        assert (replies[-1]["code"], replies[-1]["quota"]) == ("session_limit", "max_sessions_per_key")
        assert worker.stats()["sessions"] == 3
        raw, session = raws[0], replies[0]["session"]

        def batch(seq, space, n, dim):
            fields, frame = p.vector_payload(np.ones((n, dim)))
            return raw.ask({"op": "observe_batch", "session": session, "seq": seq, "space": space,
                            "ids": [f"i{j}" for j in range(n)], **fields}, frame)

        wide = batch(1, "wide", 1, 65)
        assert wide["code"] == "invalid_argument", wide  # past max_dim
        assert batch(1, "second", 1, 8)["op"] == "ack"
        refusal = batch(2, "third", 1, 8)
        assert (refusal["code"], refusal["quota"]) == ("space_limit", "max_spaces_per_key")
        assert batch(2, "second", 65, 8)["code"] == "oversize"  # past max_batch
        assert batch(2, "second", 1, 32768)["code"] == "oversize"  # past max_frame_bytes
        worker.observe_batch("kept", ["k1"], np.ones((1, 8)))
        assert worker.flush() == 2
        for r in raws:
            r.close()


@pytest.fixture(scope="module")
def frame_server():
    with running_server(*FRAME_FLAGS, "--data", "none") as (endpoint, name, proc):
        yield endpoint


FRAME_FLAGS = ("--max-frame-bytes", "65536", "--max-batch", "64", "--max-text-bytes", "1024")


def test_frames_past_max_frame_bytes_get_oversize_and_past_the_socket_bound_are_dropped(frame_server):
    raw = Raw(frame_server)
    session = raw.ask({"op": "init"})["session"]
    header = {"op": "observe_batch", "session": session, "seq": 1, "space": "f", "ids": ["big"],
              "dtype": "f32"}
    just_over = 65536 // 4 + 16  # one vector a little past max_frame_bytes
    reply = raw.ask({**header, "shape": [1, just_over]}, np.ones(just_over, np.float32).tobytes())
    assert reply["code"] == "oversize"
    config = EngineConfig(max_frame_bytes=65536, max_batch=64, max_text_bytes=1024)
    past = max_part_bytes(config) // 4 + 16  # past the socket's per-frame bound: libzmq drops the peer
    raw.send({**header, "shape": [1, past]}, np.ones(past, np.float32).tobytes())
    assert raw.reply(timeout=2) is None
    assert raw.ask({"op": "ping"})["op"] == "pong"  # the DEALER reconnected; the server is up
    with Client(frame_server) as c:
        with pytest.raises(Oversize):  # the client refuses to send what would be dropped or refused
            c.observe_batch("f", ["huge"], np.ones((1, just_over)))
        data = clustered(64, 512, seed=85)  # 128 KiB of f32: two frames under max_frame_bytes
        c.observe_batch("f", [f"m{i}" for i in range(64)], data)
        assert c.flush() == 64
        assert c.recall("f", data[5], k=1)[0].id == "m5"
    raw.close()
