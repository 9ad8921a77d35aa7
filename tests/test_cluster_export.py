"""A space's rows out of one server and into another, as a move does
(docs/cluster.md), without etcd: `export` reads every committed row exactly
once by its cursor, also while writes go on; an `import` stores each id once
however often it is sent; `adopt` hands a session over with its sequence."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from engram_shm.errors import EngramError
from engram_shm.transport.client import Client
from engram_shm.transport.launch import running_server

from exports import export_all

DIM = 24


@pytest.fixture(scope="module")
def two_servers():
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_server(workers=1))[0] for _ in range(2)]


def sample(n: int, seed: int, prefix: str):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i}" for i in range(n)]
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    what = [f"text {i} é" for i in range(n)]
    when = (1.7e9 + rng.random(n) * 1000).tolist()
    confidence = rng.random(n).astype(np.float32).tolist()
    return ids, vectors, what, when, confidence


def test_export_reads_every_row_once_with_its_fields(two_servers):
    source, _ = two_servers
    ids, vectors, what, when, confidence = sample(1500, 1, "e")
    with Client(source) as client:
        client.observe_batch("ex", ids, vectors, what, when, confidence)
        client.flush()
        rows, _ = export_all(client, "ex", limit=97)  # odd chunks cross batch and segment edges
    assert sorted(rows) == sorted(ids)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # as cosine f16 stores them
    for row, obs_id in enumerate(ids):
        vector, text, stamp, conf = rows[obs_id]
        np.testing.assert_allclose(vector, unit[row], atol=2e-3, err_msg=obs_id)
        assert (text, stamp) == (what[row], when[row])
        assert conf == pytest.approx(confidence[row], abs=1e-6)


def test_the_cursor_reads_on_with_exactly_what_was_written_since(two_servers):
    source, _ = two_servers
    first = sample(700, 2, "a")
    later = sample(900, 3, "b")
    with Client(source) as client:
        client.observe_batch("tail", *first)
        client.flush()
        rows, reply = export_all(client, "tail", limit=256)
        client.observe_batch("tail", *later)
        client.flush()
        tail, _ = export_all(client, "tail", limit=256, cursor=reply["cursor"])
    assert sorted(rows) == sorted(first[0]) and sorted(tail) == sorted(later[0])


def test_an_import_stores_each_id_once_and_adopt_hands_a_session_over(two_servers):
    source, target = two_servers
    ids, vectors, what, when, confidence = sample(600, 4, "m")
    with Client(source) as writer:
        writer.observe_batch("moved", ids, vectors, what, when, confidence)
        writer.flush()
        session, last = writer.session, writer.last_acked
        rows, reply = export_all(writer, "moved", limit=4096, freeze=True)
    assert any(s["key"] == session and s["last_seq"] == last for s in reply["sessions"])
    params = reply["params"]
    sink = Client(target, payload_dtype="f16")
    sink.route_fields = {"import": True, "params": params, "owner": reply["owner"]}
    got = list(rows)
    matrix = np.stack([rows[i][0] for i in got])
    for _ in range(2):  # a move started again sends the same rows
        sink.observe_batch("moved", got, matrix, [rows[i][1] for i in got], [rows[i][2] for i in got],
                           [rows[i][3] for i in got])
        sink.flush()
    sink.request({"op": "adopt", "sessions": reply["sessions"]})
    sink.close(drain=False)
    with Client(target) as reader:
        stats = reader.stats()["spaces"]["moved"]
        assert stats["count"] == len(ids)
        assert reader.recall("moved", vectors[5], k=1)[0].id == ids[5]
        memory = reader.recall("moved", vectors[5], k=1)[0]
        assert (memory.what, memory.when) == (what[5], when[5])
    # The writer's session resumes on the target where it stood on the source.
    resumed = Client(target)
    try:
        resumed.session = session
        resumed.reconnect()
        assert resumed.last_acked == last
    finally:
        resumed.close(drain=False)


def test_export_refuses_bad_requests_with_codes(two_servers):
    source, _ = two_servers
    with Client(source) as client:
        client.observe_batch("bad", ["x"], np.ones((1, DIM), np.float32))
        client.flush()
        for header, code in [({"space": "nope"}, "unknown_space"),
                             ({"space": "bad", "cursor": [-1]}, "wrong_type"),
                             ({"space": "bad", "cursor": "x"}, "wrong_type"),
                             ({"space": "bad", "limit": 0}, "invalid_argument"),
                             ({"space": 3}, "wrong_type")]:
            with pytest.raises(EngramError) as refused:
                client.request({"op": "export", **header})
            assert refused.value.code == code, header
        with pytest.raises(EngramError) as refused:
            client.request({"op": "adopt", "sessions": [{"key": "zz", "last_seq": 1}]})
        assert refused.value.code == "invalid_argument"
        with pytest.raises(EngramError) as refused:
            client.request({"op": "release", "space": "bad"})
        assert refused.value.code == "invalid_argument"  # not a cluster node


def test_a_cluster_node_needs_a_data_directory_and_etcd_endpoints():
    from engram_shm.config import EngineConfig
    from engram_shm.transport.server import Server

    with pytest.raises(EngramError) as refused:
        Server(EngineConfig(cluster="http://127.0.0.1:1", data_dir="none", worker_mode="process"))
    assert refused.value.code == "invalid_argument" and refused.value.details["field"] == "data_dir"
    with pytest.raises(EngramError) as refused:  # a node's address is for clients
        Server(EngineConfig(cluster="tcp://127.0.0.1:1", data_dir="x", worker_mode="process"))
    assert refused.value.details["field"] == "cluster"
