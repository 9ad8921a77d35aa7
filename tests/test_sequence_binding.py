"""Sequence numbers stay bound to the observations they were first sent with
(docs/protocol.md, "Sequence numbers"). Found by the 10-minute `combined`
chaos run: a batch refused by a failing disk was stored by a copy of the same
message (a duplicate on the network; a resend after a reconnect does the
same), while the client had given its numbers to the next batch, which the
server then acked as a re-send without storing it."""

import contextlib
import os
import time

import numpy as np
import pytest
from test_front import DIM, Raw, ids

from engram_shm import Client
from engram_shm.errors import StorageError
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import running_server


def failing_disk(every: int) -> dict:
    """The environment of a server whose every `every`-th log write fails."""
    return {**os.environ, "ENGRAM_TEST_FAULTS": f"fail_write_every={every}"}


def answer(raw: Raw, rid: int) -> dict:
    """The reply to request `rid`, past the pushes between (`durable` as the
    background fsync catches up)."""
    while True:
        msg = raw.recv()
        if msg.get("rid") == rid:
            return msg


def test_numbers_acked_for_other_ids_are_refused_never_acked_as_a_resend():
    data = clustered(40, DIM, seed=91)
    with running_server(env=failing_disk(4)) as (endpoint, name, proc):
        raw = Raw(endpoint)
        session = raw.init()["session"]
        # Batches of 4 until the disk refuses one, W (every 4th log write fails;
        # how many the server wrote before varies): a batch W at sequence s, then X, other ids.
        s = 1
        for k in range(5):
            w = ids(f"w{k}-", 0, 4)
            raw.batch(session, s, "bound", w, data[4 * k:4 * k + 4], rid=k + 1)
            first = answer(raw, k + 1)
            if first["op"] == "error":
                break
            s += 4
        assert (first["op"], first["code"]) == ("error", "storage_error"), first
        wv, x, xv = data[4 * k:4 * k + 4], ids("x", 0, 4), data[36:40]
        raw.batch(session, s, "bound", w, wv, rid=100)  # the copy: stored
        assert answer(raw, 100)["op"] == "ack"
        # A client that renumbered after the refusal sends X under W's numbers.
        raw.batch(session, s, "bound", x, xv, rid=101)
        conflict = answer(raw, 101)
        assert (conflict["code"], conflict["expected"], conflict["ids"]) == ("sequence_conflict", s + 4, x)
        raw.batch(session, s + 2, "bound", [*w[2:], *x[:2]], np.vstack([wv[2:], xv[:2]]), rid=102)
        overlap = answer(raw, 102)  # its acked part is W's: the overlap is its own, its tail new
        assert (overlap["op"], overlap["from"], overlap["to"]) == ("ack", s + 2, s + 5), overlap
        raw.batch(session, s + 2, "bound", x, xv, rid=103)  # an overlap that is not its own
        assert answer(raw, 103)["code"] == "sequence_conflict"
        raw.batch(session, s, "bound", w, wv, rid=104)  # W's own re-send: acked again
        again = answer(raw, 104)
        assert again["op"] == "ack" and again["duplicate"]
        raw.close()
        with Client(endpoint) as c:
            assert c.stats()["spaces"]["bound"]["count"] == s + 5
            stored = [*w, *x[:2]]
            assert [c.recall("bound", v, k=1)[0].id for v in np.vstack([wv, xv[:2]])] == stored


def test_a_batch_the_disk_refuses_keeps_its_numbers_and_is_stored_once_retried():
    n, size = 600, 25
    data = clustered(n, DIM, seed=92)
    with running_server(env=failing_disk(5)) as (endpoint, name, proc):
        with Client(endpoint, batch_size=size) as c:
            sent: dict[str, set[int]] = {}  # first id of a batch -> the numbers it went under
            send = c._send

            def recording(header, *payload):
                if header.get("op") == "observe_batch":
                    sent.setdefault(header["ids"][0], set()).add(header["seq"])
                send(header, *payload)

            c._send = recording
            refusals = []
            try:
                c.observe_batch("kept", ids("k", 0, n), data)
            except StorageError as e:
                refusals.append(e)
            while True:
                try:
                    assert c.flush() == n
                    break
                except StorageError as e:
                    refusals.append(e)
            assert refusals and all(e.details["ids"] for e in refusals)
            assert {first: seqs for first, seqs in sent.items() if len(seqs) != 1} == {}
            assert sorted(seq for seqs in sent.values() for seq in seqs) == list(range(1, n + 1, size))
            assert c.stats()["spaces"]["kept"]["count"] == n
            probe = range(0, n, 7)
            found = [c.recall("kept", data[i], k=1)[0].id for i in probe]
            assert found == [f"k{i}" for i in probe]


def test_the_client_raises_a_disk_refusal_at_once_and_keeps_the_batch():
    """flush() does not wait on a disk that keeps refusing: it raises, with
    the refused batch still queued and sent again; an ack that covers the
    batch (an earlier copy stored after all) takes its refusal back; closing
    with a refused batch queued raises too."""
    data = clustered(100, DIM, seed=93)
    with running_server(env=failing_disk(1)) as (endpoint, name, proc):
        c = Client(endpoint, batch_size=50)
        with pytest.raises(StorageError) as refused:  # from observe_batch if the refusal is back already
            c.observe_batch("never", ids("n", 0, 50), data[:50])
            c.flush()
        assert refused.value.code == "storage_error" and refused.value.details["ids"] == ids("n", 0, 50)
        assert c.last_acked == 0 and len(c._queue) == 1
        deadline = time.monotonic() + 30
        while not c._held() and time.monotonic() < deadline:  # sent again after retry_after_ms
            c._drive()
            c._pump(0.1)
        assert c._held() and len(c._queue) == 1
        c._on_message({"op": "ack", "rid": None, "from": 1, "to": 50})
        assert not c._held() and not c._queue
        c._close_socket()
        with Client(endpoint, batch_size=50) as other:
            with contextlib.suppress(StorageError):  # raised at once if its refusal is back already
                other.observe_batch("never", ids("m", 0, 50), data[50:])
            with pytest.raises(StorageError):  # the refused batch is still queued
                other.close()
