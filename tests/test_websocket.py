"""The WebSocket bridge against a live server: Engram's JSON stream, field
for field, and its extensions (docs/protocol.md, "WebSocket")."""

import contextlib
import json
import pathlib
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from engram_shm import Client
from engram_shm.auth.gate import check_bind
from engram_shm.config import EngineConfig
from engram_shm.errors import CODES, InsecureBind, InvalidArgument
from engram_shm.synthetic import clustered
from engram_shm.transport import jsonstream as js
from engram_shm.transport.launch import free_port, running_server
from engram_shm.transport.ws_bridge import allowed_origins

DIM = 32
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
REPLY_TIMEOUT_S = 20
UNASKED = ("heartbeat", "durable")  # pushed without a request
PUSHES = (*UNASKED, "status")


@pytest.fixture(scope="module")
def server():
    """(ZeroMQ endpoint, ws:// URL) of a server with a short heartbeat."""
    port = free_port()
    with running_server("--ws-port", str(port), "--ws-heartbeat-s", "0.3") as (endpoint, name, proc):
        yield endpoint, f"ws://127.0.0.1:{port}/v1/stream"


class Ws:
    """A bare WebSocket client speaking the JSON stream by hand."""

    def __init__(self, url):
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(url, max_size=None, compression=None))

    def send(self, msg):
        self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    def recv(self, skip=UNASKED):
        """The next message whose type is not in `skip`."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            if msg["type"] not in skip:
                return msg

    def ask(self, msg, skip=PUSHES):
        self.send(msg)
        return self.recv(skip)

    def init(self, space="default", **fields):
        ack = self.ask({"type": "init", "memory_space_id": space, **fields})
        assert ack["type"] == "init_ack", ack
        self.session = ack["session_id"]
        return ack

    def observation(self, seq, obs_id, vector, **episode):
        return {"type": "observation", "session_id": self.session, "sequence_number": seq,
                "episode": {"id": obs_id, "what": f"text of {obs_id}", "embedding": list(map(float, vector)),
                            **episode}}

    def close(self):
        self.stack.close()


@pytest.fixture
def ws(server):
    client = Ws(server[1])
    yield client
    client.close()


def test_init_ack_is_engrams(ws):
    ack = ws.init(client_buffer_size=1000, enable_backpressure=True)
    assert ack["initial_sequence"] == 0 and isinstance(ack["session_id"], str)
    caps = ack["capabilities"]
    assert caps["supports_backpressure"] is True and caps["supports_snapshot_isolation"] is True
    assert caps["queue_capacity"] > 0 and "max_observations_per_second" in caps
    assert (ack["protocol"], ack["last_sequence"], ack["resumed"]) == (js.VERSION, 0, False)
    assert ack["limit"] > 0


def test_one_observation_is_acked_with_its_episode_id(ws):
    ws.init("single")
    v = clustered(1, DIM, seed=1)[0]
    ack = ws.ask(ws.observation(1, "ep-1", v, encoding_confidence=0.85, when="2024-05-01T12:00:00Z"))
    assert ack["type"] == "ack", ack
    assert (ack["session_id"], ack["sequence_number"], ack["status"], ack["memory_id"]) == \
        (ws.session, 1, "accepted", "ep-1")
    assert RFC3339.match(ack["committed_at"]), ack["committed_at"]
    found = ws.ask({"type": "recall", "memory_space_id": "single", "cue": v.tolist(), "k": 1,
                    "request_id": "r1"})
    assert found["type"] == "recall_result" and found["request_id"] == "r1"
    hit = found["results"][0]
    assert (hit["id"], hit["what"], hit["when"]) == ("ep-1", "text of ep-1", "2024-05-01T12:00:00Z")
    assert hit["confidence"] == pytest.approx(0.85)


def test_ten_observations_are_acked_in_order(ws):
    ws.init("ten")
    data = clustered(10, DIM, seed=2)
    for i in range(10):  # pipelined: all sent before any ack is read
        ws.send(ws.observation(i + 1, f"t{i}", data[i]))
    acks = [ws.recv(skip=PUSHES) for _ in range(10)]
    assert [(a["type"], a["sequence_number"], a["memory_id"]) for a in acks] == \
        [("ack", i + 1, f"t{i}") for i in range(10)]


def test_a_batch_message_is_acked_once_with_every_id(ws):
    ws.init("batch")
    data = clustered(5, DIM, seed=3)
    ack = ws.ask({"type": "observation_batch", "session_id": ws.session, "sequence_number": 1,
                  "episodes": [{"id": f"b{i}", "embedding": data[i].tolist()} for i in range(5)]})
    assert (ack["type"], ack["first_sequence"], ack["sequence_number"], ack["memory_id"]) == \
        ("ack", 1, 5, "b4")
    assert ack["memory_ids"] == [f"b{i}" for i in range(5)]


def test_pause_is_enforced_and_a_refused_observation_keeps_its_number(ws):
    ws.init("paused")
    v = clustered(2, DIM, seed=4)
    status = ws.ask({"type": "flow_control", "session_id": ws.session, "action": "pause"}, skip=UNASKED)
    assert (status["type"], status["state"]) == ("status", "paused")
    err = ws.ask(ws.observation(1, "p0", v[0]))
    assert (err["type"], err["code"], err["retryable"], err["sequence_number"]) == \
        ("error", "session_paused", True, 1)
    status = ws.ask({"type": "flow_control", "session_id": ws.session, "action": "resume"}, skip=UNASKED)
    assert (status["type"], status["state"]) == ("status", "active")
    ack = ws.ask(ws.observation(1, "p0", v[0]))  # number 1 was not consumed by the refusal
    assert (ack["type"], ack["sequence_number"]) == ("ack", 1)
    closed = ws.ask({"type": "close", "session_id": ws.session, "last_sequence": 1}, skip=UNASKED)
    assert (closed["type"], closed["state"], closed["last_sequence"]) == ("status", "closed", 1)
    assert ws.ask(ws.observation(2, "p1", v[1]))["code"] == "session_closed"


def test_observation_before_init_is_an_error(ws):
    err = ws.ask({"type": "observation", "session_id": "nope", "sequence_number": 1,
                  "episode": {"id": "x", "what": "x", "embedding": [0.0] * DIM}})
    assert (err["type"], err["code"], err["session_id"]) == ("error", "not_initialized", None)
    assert isinstance(err["message"], str)


def test_invalid_json_is_an_error_and_the_connection_lives_on(ws):
    err = ws.ask("{not json")
    assert (err["type"], err["code"]) == ("error", "malformed")
    assert ws.ask({"kind": "init"})["code"] == "missing_field"
    assert ws.ask({"type": "subscribe"})["code"] == "unknown_op"
    ws.init()


def test_heartbeats_arrive_before_and_after_init(ws):
    beat = ws.recv(skip=())
    assert beat["type"] == "heartbeat" and beat["session_id"] is None and RFC3339.match(beat["timestamp"])
    ws.init()
    beat = ws.recv(skip=("status", "durable"))
    assert (beat["type"], beat["session_id"]) == ("heartbeat", ws.session)


def test_sequence_gap_duplicate_mismatch_and_wrong_dims(ws):
    ws.init("errors")
    v = clustered(3, DIM, seed=5)
    assert ws.ask(ws.observation(1, "e0", v[0]))["type"] == "ack"
    gap = ws.ask(ws.observation(3, "e2", v[2]))
    assert (gap["code"], gap["expected"], gap["sequence_number"]) == ("sequence_gap", 2, 3)
    dup = ws.ask(ws.observation(1, "e0", v[0]))
    assert (dup["code"], dup["expected"]) == ("duplicate_sequence", 2)
    other = ws.ask({**ws.observation(2, "e1", v[1]), "session_id": "someone-else"})
    assert other["code"] == "session_mismatch"
    dims = ws.ask(ws.observation(2, "e1", v[1][:DIM // 2]))
    assert (dims["type"], dims["code"]) == ("error", "dim_mismatch")
    assert ws.ask(ws.observation(2, "e1", v[1]))["sequence_number"] == 2  # nothing above consumed 2


def test_recall_returns_what_was_streamed(ws, server):
    ws.init("recall")
    data = clustered(300, DIM, seed=6)
    for lo in range(0, 300, 100):
        ack = ws.ask({"type": "observation_batch", "session_id": ws.session, "sequence_number": lo + 1,
                      "episodes": [{"id": f"r{i}", "what": f"r{i}", "embedding": data[i].tolist()}
                                   for i in range(lo, lo + 100)]})
        assert ack["type"] == "ack", ack
    for i in range(0, 300, 7):
        found = ws.ask({"type": "recall", "cue": data[i].tolist(), "k": 5})  # the session's space
        assert found["results"][0]["id"] == f"r{i}"
    ws.send({"type": "recall", "cue": data[0].tolist(), "k": 25, "batch": 10, "request_id": 9})
    parts = [ws.recv(skip=PUSHES) for _ in range(3)]
    assert [(p["part"], p["more"], len(p["results"])) for p in parts] == [(0, True, 10), (1, True, 10),
                                                                         (2, False, 5)]
    assert {p["snapshot_generation"] for p in parts} == {parts[0]["snapshot_generation"]}
    with Client(server[0]) as c:  # the same memory through ZeroMQ
        assert c.recall("recall", data[42], k=1)[0].id == "r42"


def test_resume_after_a_dropped_connection_loses_and_doubles_nothing(server):
    data = clustered(100, DIM, seed=7)
    first = Ws(server[1])
    first.init("resume")
    session = first.session
    for i in range(60):
        first.send(first.observation(i + 1, f"m{i}", data[i]))
    first.recv(skip=PUSHES)  # some acks read, the rest lost with the connection
    first.ws.socket.close()  # dropped, no closing handshake
    second = Ws(server[1])
    ack = second.init("resume", resume_session_id=session)
    assert (ack["session_id"], ack["resumed"]) == (session, True)
    last = ack["last_sequence"]
    assert 1 <= last <= 60
    for i in range(last, 100):
        second.send(second.observation(i + 1, f"m{i}", data[i]))
    acks = [second.recv(skip=PUSHES) for _ in range(last, 100)]
    assert [a.get("sequence_number") for a in acks] == list(range(last + 1, 101)), acks[:3]
    assert {a["type"] for a in acks} == {"ack"}
    second.close()
    with Client(server[0]) as c:
        assert c.stats()["spaces"]["resume"]["count"] == 100  # every one, once
        assert {m.id for m in c.recall("resume", data[99], k=100)} == {f"m{i}" for i in range(100)}


def test_a_flood_meets_backpressure_and_loses_nothing_acked():
    """A small unindexed window (ring 512) and one index worker: a producer
    sending 768-d batches as fast as they are acked sees the backpressure
    and overloaded states, retries what is refused, and every acked
    observation is stored once."""
    n, batch, dim = 6144, 256, 768
    data = clustered(n, dim, seed=8)
    episodes = [json.dumps([{"id": f"f{i}", "embedding": data[i].tolist()} for i in range(lo, lo + batch)])
                for lo in range(0, n, batch)]
    port = free_port()
    with running_server("--ws-port", str(port), "--ring-capacity", "512", workers=1) as (endpoint, _, _):
        ws = Ws(f"ws://127.0.0.1:{port}/v1/stream")
        ws.init("flood")
        states, refusals, acked, k = [], [], [], 0
        while k < len(episodes):
            ws.send(f'{{"type":"observation_batch","session_id":"{ws.session}",'
                    f'"sequence_number":{k * batch + 1},"episodes":{episodes[k]}}}')
            while True:
                msg = ws.recv()
                if msg["type"] == "status":
                    states.append(msg["state"])
                    continue
                break
            if msg["type"] == "ack":
                acked.extend(msg["memory_ids"])
                k += 1
            else:
                assert msg["code"] in ("overloaded", "no_credit") and msg["retryable"], msg
                refusals.append(msg["code"])
                time.sleep(msg.get("retry_after_ms", 20) / 1000)
        ws.close()
        assert "backpressure" in states, states
        assert acked == [f"f{i}" for i in range(n)]
        with Client(endpoint) as c:
            assert c.stats()["spaces"]["flood"]["count"] == n
            for i in range(0, n, 511):
                assert c.recall("flood", data[i], k=1)[0].id == f"f{i}"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=6),
                    max_leaves=30)
FIELDS = ["session_id", "sequence_number", "episode", "episodes", "action", "cue", "k", "batch",
          "consistency", "threshold", "memory_space_id", "request_id", "drain", "generation"]
EPISODE = st.fixed_dictionaries({}, optional={"id": JSON | st.text(max_size=8), "what": JSON,
                                              "when": JSON | st.sampled_from(["2024-01-01T00:00:00Z",
                                                                              "9999-12-31T23:59:59-23:59"]),
                                              "embedding": JSON | st.lists(st.floats(width=32), max_size=40),
                                              "encoding_confidence": JSON})
HOSTILE = st.one_of(
    st.text(max_size=60),
    JSON.map(json.dumps),
    st.builds(lambda kind, fields: json.dumps({"type": kind, **fields}),
              st.sampled_from(sorted(js.CLIENT_TYPES - {"init"}) + ["", "ack", None]),
              st.dictionaries(st.sampled_from(FIELDS), JSON | EPISODE | st.lists(EPISODE, max_size=3)
                              | st.just("SESSION") | st.integers(0, 5), max_size=6)),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=HOSTILE)
def test_hostile_json_is_answered_with_a_code_never_a_crash(ws_hostile, message):
    ws_hostile.send(message.replace('"SESSION"', json.dumps(ws_hostile.session)))
    reply = ws_hostile.recv()  # a status may answer (flow_control, close) or not (a level change)
    assert reply["type"] in js.SERVER_TYPES, reply
    if reply["type"] == "error":
        assert reply["code"] in CODES and reply["code"] != "internal", reply
    ws_hostile.drain()


@pytest.fixture(scope="module")
def ws_hostile(server):
    client = Ws(server[1])
    client.init("hostile")

    def drain():
        """Read until an answer to a probe: the connection is alive and in step."""
        client.send({"type": "recall", "memory_space_id": "no such space", "cue": [1.0],
                     "request_id": "probe"})
        while client.recv(skip=PUSHES).get("request_id") != "probe":
            pass

    client.drain = drain
    yield client
    client.close()


DOC = (pathlib.Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def test_the_document_states_the_websocket_version_and_every_message():
    section = DOC.split("## WebSocket")[1].split("\n## ")[0]
    assert re.search(r"WebSocket version \*\*(\d+\.\d+)\*\*", section).group(1) == js.VERSION
    assert f"- {js.VERSION}:" in section.split("WebSocket changelog:")[1]
    for kind in js.CLIENT_TYPES | js.SERVER_TYPES:
        assert f"`{kind}`" in section, kind


def test_the_bridge_is_refused_with_curve_and_exposed_only_when_insecure():
    with pytest.raises(InvalidArgument, match="WebSocket"):
        EngineConfig(ws_port=7432, auth="curve")
    assert check_bind(EngineConfig(ws_port=7432)) is False
    with pytest.raises(InsecureBind, match=re.escape("ws://0.0.0.0:7432")):
        check_bind(EngineConfig(ws_port=7432, ws_host="0.0.0.0"))
    assert check_bind(EngineConfig(ws_port=7432, ws_host="0.0.0.0", insecure=True)) is True
    assert allowed_origins(EngineConfig(ws_origins="*")) is None
    assert "https://app.example" in allowed_origins(EngineConfig(ws_origins="https://app.example"))


def test_pages_from_other_origins_are_refused(server):
    with pytest.raises(InvalidStatus) as refused, connect(server[1], origin="https://elsewhere.example"):
        pass
    assert refused.value.response.status_code == 403
    with connect(server[1], origin="http://localhost:8000") as ws:
        ws.send(json.dumps({"type": "init"}))
        assert json.loads(ws.recv(timeout=REPLY_TIMEOUT_S))["type"] in ("init_ack", "heartbeat")
    with pytest.raises(InvalidStatus) as missing, connect(server[1].replace("/v1/stream", "/v2/other")):
        pass
    assert missing.value.response.status_code == 404
