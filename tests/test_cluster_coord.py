"""The cluster's coordination over etcd (engram_shm/cluster/coord.py), against a
private etcd (engram_shm/cluster/etcd_process.py) started once for the module.
Every test works in a cluster of its own name, so tests share no keys."""

import hashlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import etcd3gw
import pytest
from hypothesis import given
from hypothesis import strategies as st

import engram_shm
from engram_shm.cluster.coord import Coordinator, Owner, TableCache, rendezvous
from engram_shm.cluster.etcd_process import EtcdProcess
from engram_shm.errors import ClusterConflict, Corrupt, Unavailable

EP1, EP2 = "tcp://127.0.0.1:5551", "tcp://127.0.0.1:5552"


@pytest.fixture(scope="module")
def etcd():
    with EtcdProcess() as process:
        pid = process.pid
        yield process
    assert not _alive(pid), f"etcd {pid} outlived stop()"


@pytest.fixture
def coords(etcd, request):
    """Coordinators on this test's own cluster; all of them leave at the end."""
    made = []

    def make(endpoints=None, **kwargs):
        c = Coordinator(endpoints or etcd.endpoint, cluster=request.node.name, **kwargs)
        made.append(c)
        return c
    yield make
    for c in made:
        c.leave()


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def naive_rendezvous(space, nodes):
    scores = {node: int.from_bytes(hashlib.blake2b((node + "\0" + space).encode()).digest()[:8], "big")
              for node in nodes}
    best = max(scores.values())
    return max(node for node, score in scores.items() if score == best)


def raw_client(etcd) -> etcd3gw.Etcd3Client:
    url = urlsplit(etcd.endpoint)
    return etcd3gw.Etcd3Client(host=url.hostname, port=url.port, timeout=2)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- rendezvous -------------------------------------------------------------------

def test_rendezvous_matches_naive_and_a_new_node_only_takes_spaces():
    spaces = [f"space-{i}" for i in range(3000)]
    nodes = [f"node-{i}" for i in range(4)]
    before = {s: rendezvous(s, nodes) for s in spaces}
    assert before == {s: naive_rendezvous(s, nodes) for s in spaces}
    after = {s: rendezvous(s, nodes + ["node-4"]) for s in spaces}
    moved = [s for s in spaces if after[s] != before[s]]
    assert all(after[s] == "node-4" for s in moved), "a space moved between old nodes"
    share = len(moved) / len(spaces)
    assert abs(share - 1 / 5) < 0.03, f"{share:.3f} of the spaces moved to the 5th node, not about 1/5"


@given(st.lists(st.text(min_size=1), min_size=1, max_size=8, unique=True), st.text(), st.randoms())
def test_rendezvous_picks_a_node_whatever_their_order(nodes, space, random):
    winner = rendezvous(space, nodes)
    assert winner in nodes
    shuffled = list(nodes)
    random.shuffle(shuffled)
    assert rendezvous(space, shuffled) == winner == naive_rendezvous(space, nodes)


def test_rendezvous_of_no_node_is_unavailable():
    with pytest.raises(Unavailable):
        rendezvous("s", [])


def test_owner_json_round_trip_and_corrupt_entry():
    owner = Owner("node-é", 7)
    assert Owner.from_json(owner.to_json()) == owner
    assert Owner.from_json(owner.to_json().encode()) == owner
    with pytest.raises(Corrupt):
        Owner.from_json(b'{"owner": "a"}')


# -- membership -------------------------------------------------------------------

def test_join_members_leave(coords):
    c, watcher = coords(), coords()
    c.join("n1", EP1)
    members = watcher.members()
    assert list(members) == ["n1"]
    assert members["n1"]["endpoint"] == EP1 and members["n1"]["pid"] == os.getpid()
    assert abs(members["n1"]["started"] - time.time()) < 60
    assert c.lease_valid()
    c.leave()
    assert not c.lease_valid()
    assert watcher.members() == {}


def test_lease_is_lost_here_before_etcd_drops_it(coords):
    c, watcher = coords(), coords()
    c.join("n1", EP1, ttl=2)
    c.leave(revoke=False)  # no more refreshes: the lease runs out, as a crashed node's
    assert wait_until(lambda: not c.lease_valid(), 2.5)
    assert "n1" in watcher.members(), "etcd dropped the lease before the node counted it lost"
    assert wait_until(lambda: "n1" not in watcher.members(), 4), "the member outlived its lease"


def test_node_joins_again_when_etcd_dropped_its_lease(coords, etcd):
    c, watcher = coords(), coords()
    c.join("n1", EP1, ttl=2)
    client = raw_client(etcd)
    [(_, meta)] = client.get(c.prefix + "members/n1", metadata=True)
    client.post(client.get_url("kv/lease/revoke"), json={"ID": int(meta["lease"])})  # as after a SIGSTOP
    assert "n1" not in watcher.members()
    assert wait_until(lambda: c.rejoins == 1 and "n1" in watcher.members(), 3)
    [(_, again)] = client.get(c.prefix + "members/n1", metadata=True)
    assert again["lease"] != meta["lease"]
    assert c.lease_valid()


NODE = """
import sys
import engram_shm
from engram_shm.cluster.coord import Coordinator
c = Coordinator(sys.argv[1], cluster=sys.argv[2])
c.join("n1", "tcp://127.0.0.1:5551", ttl=2, on_lease_change=lambda valid: print(valid, c.rejoins, flush=True))
print("joined", flush=True)
sys.stdin.read()
c.leave()
"""


def test_node_stopped_past_its_ttl_counts_the_lease_lost_and_joins_again(coords, etcd, request):
    watcher = coords()
    root = os.path.dirname(os.path.dirname(engram_shm.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    node = subprocess.Popen([sys.executable, "-c", NODE, etcd.endpoint, request.node.name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()

    def read():
        for line in node.stdout:
            lines.put(line.strip())
    threading.Thread(target=read, daemon=True).start()
    try:
        assert lines.get(timeout=60) == "joined"
        os.kill(node.pid, signal.SIGSTOP)
        assert wait_until(lambda: "n1" not in watcher.members(), 5), "etcd kept a stopped node's lease"
        os.kill(node.pid, signal.SIGCONT)
        assert [lines.get(timeout=5), lines.get(timeout=5)] == ["False 0", "True 1"]
        assert "n1" in watcher.members()
    finally:
        os.kill(node.pid, signal.SIGCONT)
        node.stdin.close()
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def test_lease_lost_while_etcd_is_paused_and_valid_again_after(coords, etcd):
    changes = []
    c = coords(timeout=0.5)
    c.join("n1", EP1, ttl=2, on_lease_change=changes.append)
    etcd.pause()
    try:
        assert wait_until(lambda: changes == [False], 3), changes
        assert not c.lease_valid()
    finally:
        etcd.resume()
    assert wait_until(lambda: changes == [False, True], 5), changes
    assert c.lease_valid()


# -- the space table --------------------------------------------------------------

def test_concurrent_placers_agree(coords, etcd):
    a, b = coords(), coords()
    a.join("n1", EP1)
    b.join("n2", EP2)
    spaces = [f"space-{i}" for i in range(50)]
    results = {}
    start = threading.Barrier(4)

    def place_all(name, c):
        start.wait(10)
        results[name] = {s: c.place(s) for s in spaces}
    threads = [threading.Thread(target=place_all, args=(f"{c.node}-{i}", c))
               for c in (a, b) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4, "a placer failed or did not finish"
    first = results["n1-0"]
    assert all(r == first for r in results.values()), "placers disagree"
    assert first == {s: Owner(rendezvous(s, ["n1", "n2"]), 1) for s in spaces}
    assert a.table()[0] == first
    versions = {kv["version"] for _, kv in raw_client(etcd).get_prefix(a.prefix + "spaces/")}
    assert versions == {"1"}, "a space entry was written more than once"


def test_a_placer_that_loses_the_race_returns_the_winner(coords, monkeypatch):
    a = coords()
    a.join("n1", EP1)
    a.assign("s", "elsewhere", None)  # the winner's entry
    monkeypatch.setattr(a, "owner", lambda space: None)  # as if read just before the winner wrote
    assert a.place("s") == Owner("elsewhere", 1)


def test_place_needs_a_live_member(coords):
    with pytest.raises(Unavailable, match="no live node"):
        coords().place("s")


def test_transfer_bumps_the_epoch_and_fences_a_stale_owner(coords):
    a, b = coords(), coords()
    a.join("n1", EP1)
    b.join("n2", EP2)
    placed = a.place("s")
    other = "n2" if placed.node == "n1" else "n1"
    _, revision = a.table()
    moved = a.transfer("s", placed, other)
    assert moved == Owner(other, placed.epoch + 1)
    # Sent again (its answer was lost, as on a timeout): it finds its own value and is done.
    assert a.transfer("s", placed, other) == moved
    with pytest.raises(ClusterConflict) as refused:
        b.transfer("s", placed, placed.node)  # still believes the old entry
    assert refused.value.details == {"space": "s", "node": other, "epoch": 2}
    table, later = b.table()
    assert table == {"s": moved} and later > revision
    assert b.owner("s") == moved and b.owner("nothing") is None


def test_assign_creates_or_moves_through_one_transaction(coords):
    a = coords()
    assert a.assign("s", "n3", None) == Owner("n3", 1)
    with pytest.raises(ClusterConflict, match="not None"):
        a.assign("s", "n4", None)
    assert a.assign("s", "n4", Owner("n3", 1)) == Owner("n4", 2)
    with pytest.raises(ClusterConflict, match="not in the table"):
        a.assign("absent", "n4", Owner("n3", 1))


# -- etcd unreachable -------------------------------------------------------------

def test_unreachable_etcd_is_unavailable_naming_the_endpoints():
    endpoints = f"http://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}"
    c = Coordinator(endpoints, timeout=0.5)
    for call in (c.members, c.table, lambda: c.place("s"), lambda: c.join("n1", EP1)):
        with pytest.raises(Unavailable) as error:
            call()
        assert endpoints in str(error.value) and error.value.retryable


def test_stopped_etcd_is_unavailable():
    with EtcdProcess() as own:
        c = Coordinator(own.endpoint, timeout=0.5)
        c.join("n1", EP1)
        pid = own.pid
        own.stop()
        assert not _alive(pid)
        with pytest.raises(Unavailable, match=own.endpoint):
            c.owner("s")
        c.leave()  # best effort: etcd is gone
        assert not c.lease_valid()


def test_failover_to_the_next_endpoint(coords, etcd):
    dead = f"127.0.0.1:{closed_port()}"
    c = coords(f"{dead},{etcd.endpoint.removeprefix('http://')}", timeout=0.5)
    c.join("n1", EP1)
    assert list(c.members()) == ["n1"]
    assert c.place("s") == Owner("n1", 1)


# -- the cache --------------------------------------------------------------------

def test_table_cache_follows_moves_and_keeps_the_table_while_etcd_is_paused(coords, etcd):
    a, b = coords(), coords()
    a.join("n1", EP1)
    b.join("n2", EP2)
    placed = a.place("s")
    cache = TableCache(coords(timeout=0.5), poll_s=0.1).start()
    try:
        assert cache.get("s") == placed and cache.get("other") is None
        assert cache.endpoint_of("n2") == EP2 and cache.endpoint_of("n9") is None
        moved = a.transfer("s", placed, "n2" if placed.node == "n1" else "n1")
        assert wait_until(lambda: cache.get("s") == moved, 1.0), "the cache missed a move"
        etcd.pause()
        try:
            assert wait_until(lambda: cache.stale_since is not None, 3)
            assert cache.get("s") == moved and set(cache.members) == {"n1", "n2"}
            with pytest.raises(Unavailable):
                cache.refresh("s")
        finally:
            etcd.resume()
        assert wait_until(lambda: cache.stale_since is None, 5)
    finally:
        cache.stop()


def test_table_cache_refresh_reads_one_space_now(coords):
    a = coords()
    cache = TableCache(coords())  # not started: only refresh fills it
    assert cache.refresh("s") is None
    a.assign("s", "n1", None)
    assert cache.get("s") is None
    assert cache.refresh("s") == cache.get("s") == Owner("n1", 1)
