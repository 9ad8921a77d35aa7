"""Recalls answered by reader processes, off the front's loop, against a real
server: correct answers, limits, strong consistency, a reader's death, and a
client that stops reading (docs/protocol.md, "Recall" and "Replies")."""

import concurrent.futures
import contextlib
import itertools
import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from test_front import Raw, ids

from chaos.server import children
from engram_shm import Client, attach
from engram_shm.errors import CODES
from engram_shm.synthetic import clustered
from engram_shm.transport import protocol as p
from engram_shm.transport.launch import running_server

from naive import exact_knn, recall_at_k

DIM = 32
N = 2000
FRESH_SPACES = itertools.count()


def recall_header(space, cue, rid, k=10, **fields):
    frame_fields, frame = p.vector_payload(np.asarray(cue, np.float32))
    return {"op": "recall", "space": space, "k": k, "rid": rid, **frame_fields, **fields}, frame


def readers(client) -> list[dict]:
    return client.stats()["recall"]["readers"]


def reader_pids(client) -> list[int]:
    return [r["pid"] for r in readers(client)]


def wait_for(what, done, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def stopped(pids):
    """Readers frozen (SIGSTOP): what the front hands them stays in flight."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def server():
    with running_server("--recall-workers", "2", "--max-k", "1000") as (endpoint, name, proc):
        data = clustered(N, DIM, seed=91)
        with Client(endpoint) as c:
            c.observe_batch("iso", ids("i", 0, N), data)
            c.flush()
            wait_for("indexing", lambda: c.stats()["spaces"]["iso"]["indexed"] == N)
            wait_for("both readers", lambda: len(readers(c)) == 2)
        yield endpoint, name, data


@settings(max_examples=25)
@given(row=st.integers(0, N - 1), k=st.integers(1, 300), batch=st.integers(1, 120),
       threshold=st.one_of(st.none(), st.floats(-1.0, 1.0)))
def test_recalls_through_the_readers_are_what_a_local_reader_finds(server, row, k, batch, threshold):
    endpoint, name, data = server
    cue = data[row] + np.float32(0.01)
    with Client(endpoint) as c, attach(name) as local:
        parts = list(c.recall_stream("iso", cue, k=k, batch=batch, threshold=threshold))
        expected = local.recall("iso", cue, k=k, threshold=threshold)  # the same graph, fully indexed
    got = [m for part in parts for m in part]
    assert [m.id for m in got] == [m.id for m in expected]
    np.testing.assert_allclose([m.similarity for m in got], [m.similarity for m in expected], rtol=1e-6)
    assert [len(part) for part in parts[:-1]] == [batch] * (len(parts) - 1)
    assert 0 < len(parts[-1]) <= batch or (len(parts) == 1 and not got)


def test_a_small_recall_is_answered_on_the_loop_and_a_large_one_by_a_reader(server):
    """With nothing else waiting, the front answers a one-part recall of at
    most INLINE_MAX_K rows itself (recalls.py); a streamed one goes to a
    reader. Both answers are the local reader's."""
    endpoint, name, data = server
    with Client(endpoint) as c, attach(name) as local:
        before = c.stats()["recall"]
        small = c.recall("iso", data[5], k=10)
        large = [m for part in c.recall_stream("iso", data[6], k=300, batch=100) for m in part]
        after = c.stats()["recall"]
        assert [m.id for m in small] == [m.id for m in local.recall("iso", data[5], k=10)]
        assert [m.id for m in large] == [m.id for m in local.recall("iso", data[6], k=300)]
    assert (after["recalls"] - before["recalls"], after["inline"] - before["inline"]) == (2, 1)


@pytest.mark.parametrize("behind", ["observe_batch", "recall"])
def test_a_small_recall_stays_on_the_loop_when_a_batch_waits_behind_it(server, behind):
    """The front reads the message behind a small recall (recalls.py,
    front._recall_waits): a batch waits for the answer on the loop, another
    recall sends this one to a reader. The front is frozen while both are
    sent, so that the second waits when the first is handled."""
    endpoint, name, data = server
    raw = Raw(endpoint)
    session = raw.init()["session"]
    with Client(endpoint) as c:
        before = c.stats()["recall"]
        with stopped(children(name)["front"]):
            raw.send(*recall_header("iso", data[7], rid=1))
            if behind == "recall":
                raw.send(*recall_header("iso", data[8], rid=2))
            else:
                raw.batch(session, 1, f"behind-{next(FRESH_SPACES)}", ["b0"], data[:1], rid=2)
            time.sleep(0.2)  # both in the front's receive buffer before it runs again
        replies = {m["rid"]: m for m in (raw.recv(), raw.recv())}
        after = c.stats()["recall"]
    raw.close()
    assert replies[1]["op"] == "recall_result" and replies[1]["results"][0]["id"] == "i7"
    assert replies[2]["op"] == ("ack" if behind == "observe_batch" else "recall_result")
    inline = after["inline"] - before["inline"]
    handed_off = after["recalls"] - before["recalls"] - inline
    # Behind a recall, both go to the readers: the second finds the first in flight there.
    assert (inline, handed_off) == ((1, 0) if behind == "observe_batch" else (0, 2))


def test_recall_at_10_against_brute_force(server):
    endpoint, _, data = server
    cues = data[::97]
    with Client(endpoint) as c:
        found = [np.array([int(m.id[1:]) for m in c.recall("iso", q, k=10)]) for q in cues]
    exact = [exact_knn(data, q / np.linalg.norm(q), 10, "cosine") for q in cues]
    assert recall_at_k(found, exact) >= 0.95, "recall@10 through the readers should be >= 0.95"


def test_k_past_max_k_is_refused_with_its_field(server):
    endpoint, _, data = server
    raw = Raw(endpoint)
    err = raw.ask(*recall_header("iso", data[0], rid=1, k=1001))
    assert (err["op"], err["code"], err["field"], err["rid"]) == ("error", "invalid_argument", "k", 1)
    last = raw.ask(*recall_header("iso", data[0], rid=2, k=1000, batch=1000))
    assert (last["op"], len(last["results"]), last["more"]) == ("recall_result", 1000, False)
    raw.close()


@settings(max_examples=20)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_a_strong_recall_right_after_an_ack_sees_what_was_acked(server, sizes, seed):
    endpoint, _, _ = server
    rng = np.random.default_rng(seed)
    space = f"fresh-{next(FRESH_SPACES)}"
    with Client(endpoint) as c:
        sent = 0
        for n in sizes:
            vectors = rng.normal(size=(n, DIM)).astype(np.float32)
            c.observe_batch(space, ids("f", sent, sent + n), vectors)
            c.flush()  # acked: a recall from now on must see every row
            sent += n
            assert c.recall(space, vectors[-1], k=1)[0].id == f"f{sent - 1}"
            assert len(c.recall(space, vectors[0], k=sent)) == sent  # at most 900: max_k is 1000


@pytest.mark.parametrize("flags", [("--recall-concurrency", "3"), ("--recall-concurrency-per-key", "3")],
                         ids=["in-total", "per-principal"])
def test_recalls_past_the_concurrency_limit_are_busy_at_once(flags):
    # The front answers none on its loop: every recall waits for the frozen reader.
    with running_server("--recall-workers", "1", "--recall-inline-share", "0", *flags) as (endpoint, _, _), \
            Client(endpoint) as c:
        data = clustered(200, DIM, seed=92)
        c.observe_batch("limits", ids("l", 0, 200), data)
        c.flush()
        wait_for("the reader", lambda: len(readers(c)) == 1)
        raw = Raw(endpoint)
        other, waiting = Client(endpoint), concurrent.futures.ThreadPoolExecutor(1)
        with stopped(reader_pids(c)):
            for rid in range(3):  # taken, and held: the reader is frozen
                raw.send(*recall_header("limits", data[rid], rid))
                assert raw.ask({"op": "ping"})["op"] == "pong"
            busy = raw.ask(*recall_header("limits", data[3], rid=3))
            assert (busy["op"], busy["code"], busy["rid"]) == ("error", "busy", 3)
            assert busy["retryable"] and busy["retry_after_ms"] >= 1
            assert c.stats()["recall"]["in_flight"] == 3
            # The Python client asks again after retry_after_ms until there is room.
            later = waiting.submit(other.recall, "limits", data[4], k=1)
            time.sleep(0.3)
            assert not later.done()
        assert later.result(timeout=30)[0].id == "l4"
        answers = [raw.recv() for _ in range(3)]  # answered once the reader runs again
        assert sorted(a["rid"] for a in answers) == [0, 1, 2]
        assert all(a["op"] == "recall_result" and a["results"][0]["id"] == f"l{a['rid']}" for a in answers)
        assert c.recall("limits", data[5], k=1)[0].id == "l5"
        raw.close()
        other.close()
        waiting.shutdown()


def test_a_reader_killed_mid_recall_answers_retryable_and_is_restarted(server):
    endpoint, _, data = server
    raw = Raw(endpoint)
    with Client(endpoint) as c:
        with stopped(reader_pids(c)):
            raw.send(*recall_header("iso", data[0], rid=7, k=500, batch=50))
            assert raw.ask({"op": "ping"})["op"] == "pong"  # handed to a reader
            victim = next(r["pid"] for r in readers(c) if r["in_flight"])
            os.kill(victim, signal.SIGKILL)
            err = raw.recv(30)
        assert (err["op"], err["rid"]) == ("error", 7)
        assert err["retryable"] and CODES[err["code"]][0], err
        assert c.recall("iso", data[1], k=1)[0].id == "i1"  # the other reader answers meanwhile
        wait_for("a new reader", lambda: len(reader_pids(c)) == 2 and victim not in reader_pids(c))
        assert c.stats()["recall"]["reader_deaths"] >= 1
        for row in (2, 3, 4, 5):  # both readers, the new one among them
            assert c.recall("iso", data[row], k=1)[0].id == f"i{row}"
    raw.close()


class SlowPeer(Raw):
    """A connection that asks for much and stops reading."""

    def __init__(self, endpoint):
        super().__init__(endpoint)
        self.sock.setsockopt(zmq.RCVHWM, 1)


def all_answered(recall_stats: dict) -> bool:
    return recall_stats["in_flight"] == 0 and recall_stats["waiting"] == 0


def test_a_peer_that_stops_reading_is_closed_and_others_keep_being_acked():
    with running_server("--reply-queue-bytes", str(1 << 20), "--recall-concurrency", "1000",
                        "--recall-concurrency-per-key", "1000") as (endpoint, _, _):
        data = clustered(1000, DIM, seed=93)
        with Client(endpoint) as c:
            c.observe_batch("slow", ids("s", 0, 1000), data, what=["x" * 200] * 1000)
            c.flush()
        slow = SlowPeer(endpoint)
        session = slow.init()["session"]
        acked, stop, errors = [0], threading.Event(), []

        def stream():
            try:
                with Client(endpoint) as producer:
                    while not stop.is_set():
                        lo = acked[0]
                        producer.observe_batch("steady", ids("p", lo, lo + 50), clustered(50, DIM, seed=lo))
                        acked[0] = producer.flush()
            except Exception as e:  # reported below
                errors.append(e)

        producer = threading.Thread(target=stream)
        producer.start()
        try:
            for rid in range(300):  # ~300 KB of results each, never read
                slow.send(*recall_header("slow", data[rid], rid, k=1000, batch=100))
            with Client(endpoint) as probe:
                wait_for("the slow consumer to be closed", lambda: probe.stats()["slow_consumers"] >= 1)
                at_close = acked[0]
                wait_for("more acks for the other client", lambda: acked[0] > at_close or errors)
        finally:
            stop.set()
            producer.join()
        assert not errors, errors
        # Recalls still running after the close go on answering into a new
        # queue, which may overflow again: read once every one is answered.
        with Client(endpoint) as probe:
            wait_for("every recall answered", lambda: all_answered(probe.stats()["recall"]))
        replies = []
        while (reply := slow.reply(1.0)) is not None:  # what reached the slow peer, and why the rest did not
            replies.append(reply)
        assert all(r["op"] in ("recall_result", "error") for r in replies), replies
        closes = [r for r in replies if r.get("code") == "slow_consumer"]
        assert closes and session in closes[0]["sessions"] and not closes[0]["retryable"]
        refused = slow.ask({"op": "pause", "session": session, "rid": "late"}, timeout=30)
        assert (refused["rid"], refused["code"]) == ("late", "session_closed")
        assert refused["reason"] == "slow_consumer"
        slow.close()
