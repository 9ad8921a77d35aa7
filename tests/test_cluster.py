"""The cluster on loopback (docs/cluster.md): one etcd and three nodes started
here on free ports, stopped and removed whatever happens. Routing across
nodes, a move under load, fencing of the old owner, and a node killed and
restarted on its data directory."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from chaos.server import Server
from engram_shm import cli
from engram_shm.cluster import operations
from engram_shm.cluster.client import ClusterClient
from engram_shm.cluster.coord import Coordinator
from engram_shm.cluster.etcd_process import EtcdProcess
from engram_shm.errors import EngramError, Unavailable
from engram_shm.transport.client import Client

DIM = 16
TTL = "3"  # the nodes' lease TTL (s): short, so that the fencing and restart tests are quick


class Nodes:
    """Three cluster nodes (full servers, one index worker each) on one etcd."""

    def __init__(self, etcd: EtcdProcess, count: int = 3):
        self.etcd = etcd
        self.servers = {f"n{i}": Server(["--cluster", etcd.endpoint, "--node", f"n{i}", "--lease-ttl-s", TTL,
                                         "--fsync", "always", "--recall-workers", "1"], dict(os.environ),
                                        workers=1)
                        for i in range(count)}

    def start(self) -> "Nodes":
        for server in self.servers.values():
            server.start()
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def coord(self) -> Coordinator:
        return Coordinator(self.etcd.endpoint)

    def owner(self, space: str) -> str:
        return self.coord().owner(space).node

    def count(self, node: str, space: str) -> int:
        with Client(self.servers[node].endpoint, timeout=10) as c:
            return c.stats()["spaces"].get(space, {}).get("count", 0)

    def stored_ids(self, node: str, space: str) -> list[str]:
        """Every id `node` holds in `space`, once per stored row (read as a move reads them)."""
        out, reply = [], {"cursor": [], "more": True}
        with Client(self.servers[node].endpoint, timeout=10) as c:
            while reply["more"]:
                reply = c.request({"op": "export", "space": space, "cursor": reply["cursor"]})
                out += reply["ids"]
        return out


@pytest.fixture(scope="module")
def nodes():
    """One cluster for the module (starting nodes is most of its time): each
    test uses spaces of its own and leaves every node running."""
    with EtcdProcess() as etcd:
        cluster = Nodes(etcd)
        try:
            yield cluster.start()
        finally:
            cluster.stop()


def rows(prefix: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [f"{prefix}-{i}" for i in range(n)], rng.standard_normal((n, DIM)).astype(np.float32)


def fill(nodes: Nodes, client: ClusterClient, space: str, prefix: str, n: int, seed: int):
    """n rows written into `space` through `client`: (ids, vectors, its owner, another node)."""
    ids, vectors = rows(prefix, n, seed)
    client.observe_batch(space, ids, vectors)
    client.flush()
    owner = nodes.owner(space)
    return ids, vectors, owner, next(node for node in nodes.servers if node != owner)


def assert_recallable(client: ClusterClient, space: str, ids, vectors) -> None:
    """Each id is the top hit of its own vector (through the client)."""
    missing = [i for i, v in zip(ids, vectors) if client.recall(space, v, k=1)[0].id != i]
    assert not missing, f"{len(missing)} of {len(ids)} acked ids of {space} not recalled: {missing[:5]}"


def test_thirty_spaces_land_on_every_node_and_stay_recallable(nodes):
    spaces = {f"space-{i}": rows(f"s{i}", 40, i) for i in range(30)}
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        for space, (ids, vectors) in spaces.items():
            client.observe_batch(space, ids, vectors)
        client.flush()
        owners = {space: nodes.owner(space) for space in spaces}
        assert set(owners.values()) == set(nodes.servers), f"spaces placed on {sorted(set(owners.values()))}"
        for space, (ids, vectors) in spaces.items():
            assert nodes.count(owners[space], space) == len(ids)
            assert_recallable(client, space, ids, vectors)
    # A client that knows one node's address finds the cluster through it.
    # One cue, the best of every space at once: the fan-out finds a space's own row.
    with ClusterClient(nodes.servers["n1"].endpoint, timeout=20) as client:
        ids, vectors = spaces["space-7"]
        best = client.recall_many(list(spaces), vectors[3], k=5)
        assert best[0] == ("space-7", best[0][1]) and best[0][1].id == ids[3]
        assert [m.similarity for _, m in best] == sorted((m.similarity for _, m in best), reverse=True)


def stream(client: ClusterClient, space: str, stop: threading.Event, sent: list, errors: list) -> None:
    """Batches of 50 into `space` until told to stop; the ids sent go to `sent`."""
    rng = np.random.default_rng(11)
    batch = 0
    try:
        while not stop.is_set():
            ids = [f"live-{batch}-{i}" for i in range(50)]
            vectors = rng.standard_normal((50, DIM)).astype(np.float32)
            client.observe_batch(space, ids, vectors)
            sent.append((ids, vectors))
            batch += 1
            time.sleep(0.005)
        client.flush()
    except Exception as e:  # the test fails on it: nothing may reach the caller
        errors.append(e)


def test_a_move_under_load_loses_nothing_and_stores_nothing_twice(nodes):
    space = "moving"
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        ids, vectors, source, target = fill(nodes, client, space, "seed", 3000, 1)
        stop, sent, errors = threading.Event(), [], []
        producer = threading.Thread(target=stream, args=(client, space, stop, sent, errors))
        producer.start()
        time.sleep(1.0)
        report = operations.move(nodes.coord(), space, target)
        time.sleep(1.0)
        stop.set()
        producer.join(60)
        assert not errors, f"the client's caller saw {errors[0]!r}"
        assert report.copied >= 3000 and report.epoch == 2, report
        assert nodes.owner(space) == target
        live_ids = [i for batch, _ in sent for i in batch]
        assert client.redirects >= 1, "the client never followed the move"
        every_id = ids + live_ids
        every_vector = np.concatenate([vectors, *(v for _, v in sent)])
        stored = nodes.stored_ids(target, space)
        assert len(stored) == len(set(stored)), "the new owner stored a row twice"
        assert set(stored) == set(every_id), \
            f"acked but not on the new owner: {sorted(set(every_id) - set(stored))[:5]}"
        assert_recallable(client, space, every_id[::10], every_vector[::10])
        with Client(nodes.servers[source].endpoint, timeout=10) as old:
            with pytest.raises(EngramError) as refused:
                old.recall(space, vectors[0])
            assert refused.value.code == "moved" and refused.value.details["node"] == target
        # And back to where it was: the retired copy there is completed, not doubled.
        assert operations.move(nodes.coord(), space, source).epoch == 3
        stored = nodes.stored_ids(source, space)
        assert len(stored) == len(set(stored)) and set(stored) == set(every_id)
        assert_recallable(client, space, every_id[::25], every_vector[::25])


def refuse_write(endpoint: str, space: str, epoch: int) -> str:
    """The code a write to `space` at `epoch` gets from the node at `endpoint`."""
    with Client(endpoint, timeout=15) as c:
        c.route_fields = {"epoch": epoch}
        ids, vectors = rows("fenced", 5, 99)
        c.observe_batch(space, ids, vectors)
        with pytest.raises(EngramError) as refused:
            c.flush(timeout=15)
        return refused.value.code


def test_the_old_owner_refuses_writes_after_a_move_it_slept_through(nodes):
    """The old owner is stopped (cut off from etcd and from the mover) once it
    froze the space and gave up its tail: the switch happens without it. Woken,
    it still refuses a write at the old epoch."""
    space = "fenced"
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        ids, vectors, source, target = fill(nodes, client, space, "f", 500, 3)
    old = nodes.servers[source]
    supervisor = old.proc.pid
    stopped = []

    def progress(text):
        if "tail" in text and not stopped:
            os.killpg(supervisor, signal.SIGSTOP)  # the whole node: front, workers, lease keepalive
            stopped.append(time.monotonic())

    try:
        report = operations.move(nodes.coord(), space, target, progress=progress)
    finally:
        os.killpg(supervisor, signal.SIGCONT)
    assert stopped and report.epoch == 2
    assert refuse_write(old.endpoint, space, epoch=1) in ("moving", "moved", "unavailable")
    assert nodes.count(target, space) == len(ids)
    assert nodes.count(source, space) == len(ids), "the old owner stored a write after the move"


def test_a_reassign_fences_an_owner_that_lost_its_lease(nodes):
    """An owner stopped past its lease TTL loses the space to `reassign`; woken,
    it refuses the space's writes (its lease lapsed, then the table names
    another node)."""
    space = "orphan"
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        ids, vectors, source, target = fill(nodes, client, space, "o", 100, 4)
    coord = nodes.coord()
    old = nodes.servers[source]
    os.killpg(old.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(EngramError):  # refused while the owner's lease is live
            operations.reassign(coord, space, target)
        deadline = time.monotonic() + 20
        while source in coord.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert source not in coord.members(), "the stopped node's lease did not expire"
        assert operations.reassign(coord, space, target).epoch == 2
    finally:
        os.killpg(old.proc.pid, signal.SIGCONT)
    assert refuse_write(old.endpoint, space, epoch=1) in ("moved", "unavailable")
    assert nodes.count(source, space) == len(ids)


def test_a_killed_node_is_unavailable_then_takes_its_spaces_back(nodes):
    space = "restart"
    with ClusterClient(nodes.etcd.endpoint, timeout=3) as client:
        ids, vectors, owner, other = fill(nodes, client, space, "r", 400, 5)
        server = nodes.servers[owner]
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        with pytest.raises(Unavailable) as unavailable:
            client.recall(space, vectors[0])
        assert unavailable.value.details["node"] == owner
        # Another node never answers for it: `moved` to the owner while its
        # lease lasts, `unavailable` once it lapsed.
        deadline = time.monotonic() + 15
        while owner in nodes.coord().members() and time.monotonic() < deadline:
            time.sleep(0.2)
        with Client(nodes.servers[other].endpoint, timeout=10) as c:
            deadline = time.monotonic() + 10  # its cached members lag etcd by a poll or so
            while True:
                with pytest.raises(EngramError) as refused:
                    c.recall(space, vectors[0])
                assert refused.value.code in ("moved", "unavailable")
                assert refused.value.details["node"] == owner
                if refused.value.code == "unavailable" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert refused.value.code == "unavailable"
        server.kill()  # collects what the killed engine left
        server.start()  # on its data directory: the same node name
        assert nodes.owner(space) == owner
        # The same client gets its answers again once the node's recall
        # readers are up (they load the Numba cache after the front answers).
        deadline = time.monotonic() + 60
        while True:
            try:
                client.recall(space, vectors[0])
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the restarted node never answered a recall"
        assert_recallable(client, space, ids, vectors)


def test_the_cli_drains_a_node_and_shows_the_cluster(nodes, capsys):
    """`engram-shm cluster drain NODE` moves every space off NODE (its rows
    with it); `cluster status --json` shows members, owners, epochs and counts."""
    space_rows = {f"drain-{i}": rows(f"d{i}", 30, 40 + i) for i in range(6)}
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        for space, (ids, vectors) in space_rows.items():
            client.observe_batch(space, ids, vectors)
        client.flush()
    leaving = nodes.owner("drain-0")
    flags = ["--cluster", nodes.etcd.endpoint]
    assert cli.main(["cluster", "drain", leaving, "--json", *flags]) == 0
    moved = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert moved and all(m["source"] == leaving and m["target"] != leaving for m in moved)
    assert cli.main(["cluster", "status", "--json", *flags]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status["members"]) == set(nodes.servers)
    assert not [name for name, s in status["spaces"].items() if s["owner"] == leaving]
    for space, (ids, _) in space_rows.items():
        assert status["spaces"][space]["count"] == len(ids), space
    with ClusterClient(nodes.etcd.endpoint, timeout=20) as client:
        for space, (ids, vectors) in space_rows.items():
            assert_recallable(client, space, ids, vectors)
