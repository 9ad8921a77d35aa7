"""Authentication (CURVE through ZAP), authorization (acl.toml) and exposure,
against live servers."""

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_shm.auth.acl import Acl
from engram_shm.auth.gate import check_bind, is_local
from engram_shm.auth.keys import KeysDir
from engram_shm.config import EngineConfig
from engram_shm.errors import (
    Forbidden,
    InsecureBind,
    InvalidArgument,
    SessionClosed,
    SpaceLimit,
    Unauthenticated,
    UnknownSession,
)
from engram_shm.synthetic import clustered
from engram_shm.transport.client import Client
from engram_shm.transport.launch import running_server

DIM = 32
ACL = """
[grants.alice]
"team-a/*" = ["observe", "recall"]

[grants.bob]
"team-b/*" = ["observe", "recall"]
"team-a/shared" = ["recall"]

[grants.ops]
"*" = ["admin"]

[grants.erin]
"team-e/*" = ["observe"]

[limits.erin]
spaces = 2
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with --auth curve, keys alice, bob, ops (granted) and carol
    (accepted, no grant); yields (endpoint, data dir, key files, proc)."""
    data = tmp_path_factory.mktemp("secured")
    keys = KeysDir(str(data / "keys"))
    files = {name: keys.new(name) for name in ("alice", "bob", "ops", "carol", "erin")}
    with open(keys.acl, "w") as f:
        f.write(ACL)
    with running_server("--auth", "curve", data=str(data)) as (endpoint, name, proc):
        yield endpoint, str(data), files, keys.server_public_file, proc


def client(secured, who, **options):
    endpoint, _, files, server_key, _ = secured
    return Client(endpoint, client_key=files[who], server_key=server_key, timeout=10, **options)


def keys_cli(data, *args):
    return subprocess.run([sys.executable, "-m", "engram_shm.cli", "keys", *args, "--data", data],
                          capture_output=True, text=True, timeout=60)


def test_a_client_without_a_key_or_with_an_unknown_key_is_refused(secured, tmp_path):
    endpoint, _, _, server_key, _ = secured
    with pytest.raises(Unauthenticated, match="requires authentication"):
        Client(endpoint, timeout=10)
    stranger = KeysDir(str(tmp_path / "elsewhere")).new("mallory")  # a key the server never accepted
    with pytest.raises(Unauthenticated, match="refused this client's key"):
        Client(endpoint, client_key=stranger, server_key=server_key, timeout=10)


def test_a_key_without_grants_is_forbidden(secured):
    with pytest.raises(Forbidden):
        client(secured, "carol")


def test_keys_reach_their_own_spaces_and_nothing_else(secured):
    data = clustered(400, DIM, seed=90)
    with client(secured, "alice") as alice:
        alice.observe_batch("team-a/notes", [f"a{i}" for i in range(200)], data[:200])
        alice.observe_batch("team-a/shared", [f"s{i}" for i in range(100)], data[200:300])
        alice.flush()
        assert alice.recall("team-a/notes", data[7], k=1)[0].id == "a7"
        with pytest.raises(Forbidden):  # nothing of it is stored
            alice.observe_batch("team-b/x", ["nope"], data[300:301])
            alice.flush()
        with pytest.raises(Forbidden):
            alice.recall("team-b/x", data[0])
        assert set(alice.stats()["spaces"]) == {"team-a/notes", "team-a/shared"}
        session = alice.session
    with client(secured, "bob") as bob:
        for space in ("team-a/notes", "team-a/shared"):
            with pytest.raises(Forbidden):
                bob.observe_batch(space, ["b0"], data[300:301])
                bob.flush()
        with pytest.raises(Forbidden):
            bob.recall("team-a/notes", data[7])
        assert bob.recall("team-a/shared", data[250], k=1)[0].id == "s50"  # granted recall only
        with pytest.raises(UnknownSession):  # alice's session id is not bob's to take
            bob._handshake(session)
        bob._handshake(None)
        assert "team-a/notes" not in bob.stats()["spaces"]
    with client(secured, "ops") as ops:
        spaces = ops.stats()["spaces"]
        assert spaces["team-a/notes"]["count"] == 200 and "team-b/x" not in spaces
        ops.checkpoint()
    with client(secured, "alice") as alice:
        with pytest.raises(Forbidden):  # engine-wide operations need admin on "*"
            alice.checkpoint()


def test_revoking_a_key_and_reloading_the_acl_take_effect_without_a_restart(secured, tmp_path):
    endpoint, data, files, server_key, proc = secured
    keys = KeysDir(os.path.join(data, "keys"))
    dave = str(tmp_path / "dave.key_secret")  # the client keeps its pair; revoking deletes the issued copy
    os.replace(keys.new("dave"), dave)
    with open(keys.acl, "a") as f:
        f.write('\n[grants.dave]\n"team-d/*" = ["observe", "recall"]\n')
    assert keys_cli(data, "reload").returncode == 0
    vectors = clustered(200, DIM, seed=91)
    live = Client(endpoint, client_key=dave, server_key=server_key, timeout=10)
    live.observe_batch("team-d/x", [f"d{i}" for i in range(100)], vectors[:100])
    live.flush()
    bob = client(secured, "bob")
    result = keys_cli(data, "revoke", "dave")
    assert result.returncode == 0 and f"pid {proc.pid}" in result.stdout, result.stdout + result.stderr
    with pytest.raises(Unauthenticated):  # the open connection is refused from its next message
        for i in range(100):  # the server may read a few before the reload
            live.observe_batch("team-d/x", [f"late{i}"], vectors[100 + i:101 + i])
            live.flush()
    with pytest.raises(Unauthenticated):  # and a new one at the handshake
        Client(endpoint, client_key=dave, server_key=server_key, timeout=10)
    bob.observe_batch("team-b/y", ["b1"], vectors[150:151])  # others are unaffected
    assert bob.flush() == 1
    # An edited ACL: bob loses team-b, his session is closed, the data stays.
    with open(keys.acl, "w") as f:
        f.write(ACL.replace('"team-b/*" = ["observe", "recall"]\n', ""))
    assert keys_cli(data, "reload").returncode == 0
    with pytest.raises((Forbidden, SessionClosed)):
        for i in range(40):
            bob.observe_batch("team-b/y", [f"b2-{i}"], vectors[151 + i:152 + i])
            bob.flush()
    with client(secured, "ops") as ops:
        spaces = ops.stats()["spaces"]
        assert spaces["team-d/x"]["count"] >= 100 and spaces["team-b/y"]["count"] >= 1
    with open(keys.acl, "w") as f:
        f.write(ACL)
    assert keys_cli(data, "reload").returncode == 0
    live._close_socket()
    bob._close_socket()


def test_the_acl_sets_a_key_s_own_limits(secured):
    vectors = clustered(3, DIM, seed=92)
    with client(secured, "erin") as erin:
        for i in range(2):
            erin.observe_batch(f"team-e/{i}", [f"e{i}"], vectors[i:i + 1])
        erin.flush()
        with pytest.raises(SpaceLimit) as refused:
            erin.observe_batch("team-e/2", ["e2"], vectors[2:3])
            erin.flush()
        assert refused.value.details["quota"] == "max_spaces_per_key" and refused.value.details["limit"] == 2
    with client(secured, "alice") as alice:  # the default (1024) for everyone else
        alice.observe_batch("team-a/third", ["x"], vectors[:1])
        assert alice.flush() == 1


def test_keys_from_the_environment(secured, monkeypatch):
    endpoint, _, files, server_key, _ = secured
    monkeypatch.setenv("ENGRAM_CLIENT_KEY", files["alice"])
    monkeypatch.setenv("ENGRAM_SERVER_KEY", server_key)
    with Client(endpoint, timeout=10) as alice:
        assert alice.ping() > 0
    monkeypatch.delenv("ENGRAM_SERVER_KEY")
    with pytest.raises(InvalidArgument, match="both"):
        Client(endpoint, timeout=10)


def test_a_keyed_client_of_a_server_without_auth_gets_a_clear_error(tmp_path):
    keys = KeysDir(str(tmp_path / "keys"))
    pair = keys.new("alice")
    with running_server("--data", "none") as (endpoint, _, _):
        with pytest.raises(Unauthenticated, match="may not use CURVE"):
            Client(endpoint, client_key=pair, server_key=keys.server_public_file, timeout=10)


def test_an_exposed_bind_needs_auth_or_insecure():
    result = subprocess.run([sys.executable, "-m", "engram_shm.cli", "serve", "--data", "none",
                             "--endpoint", "tcp://0.0.0.0:1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "[insecure_bind]" in result.stderr
    with pytest.raises(InsecureBind):
        check_bind(EngineConfig(endpoint="tcp://*:5555"))
    assert check_bind(EngineConfig(endpoint="tcp://*:5555", insecure=True)) is True
    assert check_bind(EngineConfig(endpoint="tcp://*:5555", auth="curve")) is False
    assert check_bind(EngineConfig()) is False
    for endpoint, local in (("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True),
                            ("tcp://[::1]:5", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5", False),
                            ("tcp://10.1.2.3:5", False), ("tcp://eth0:5", False),
                            ("ws://127.0.0.1:5", False)):
        assert is_local(endpoint) is local, endpoint


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["grants", "limits", "x"]),
                       st.dictionaries(st.text(max_size=8),
                                       st.one_of(st.integers(), st.text(max_size=5),
                                                 st.dictionaries(st.text(max_size=10),
                                                                 st.lists(st.text(max_size=8), max_size=3),
                                                                 max_size=3)),
                                       max_size=3), max_size=2))
def test_a_hostile_acl_is_refused_with_a_code_or_grants_only_what_it_says(data):
    try:
        acl = Acl.parse(data)
    except InvalidArgument:
        return
    for name, grants in acl.grants.items():
        for grant in grants:  # a space each pattern covers: its name, or one past its prefix
            space = grant.pattern[:-1] + "z" if grant.pattern.endswith("*") else grant.pattern
            assert grant.rights <= acl.rights(name, space)
            if name + "-other" not in acl.grants:
                assert acl.rights(name + "-other", space) == frozenset()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab/*", max_size=6), st.text(alphabet="ab/", max_size=6))
def test_a_pattern_matches_its_exact_name_or_its_prefix(pattern, space):
    try:
        acl = Acl.parse({"grants": {"k": {pattern: ["recall"]}}})
    except InvalidArgument:
        assert pattern == "" or "*" in pattern[:-1]
        return
    naive = space.startswith(pattern[:-1]) if pattern.endswith("*") else space == pattern
    assert ("recall" in acl.rights("k", space)) == naive

