"""The server process: CLI round trip, clean shutdown, idle expiry, status
pushes, a front that is killed and restarted, and children that die with a
killed server."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from chaos.server import children
from engram_shm import Client
from engram_shm.errors import UnknownSession
from engram_shm.store import shm
from engram_shm.store.catalog import OWNER_PID, Catalog, process_start
from engram_shm.synthetic import clustered
from engram_shm.transport.client import ClientTimeout
from engram_shm.transport.launch import free_port, running_server

DIM = 16


def test_cli_observe_a_file_then_recall(tmp_path):
    data = clustered(600, DIM, seed=81)
    path = tmp_path / "obs.jsonl"
    with open(path, "w") as f:
        for i, v in enumerate(data):
            f.write(json.dumps({"id": f"j{i}", "vector": v.tolist(), "what": f"line {i}"}) + "\n")
    with running_server() as (endpoint, name, proc):
        r = subprocess.run([sys.executable, "-m", "engram_shm.cli", "observe", str(path), "--space",
                            "file", "--endpoint", endpoint], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "600 observations acked" in r.stdout and "observe file" in r.stderr  # progress bar
        r = subprocess.run([sys.executable, "-m", "engram_shm.cli", "recall", "file",
                            json.dumps(data[7].tolist()), "--k", "3", "--endpoint", endpoint],
                           capture_output=True, text=True, timeout=60)
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert rows[0]["id"] == "j7" and rows[0]["what"] == "line 7" and len(rows) == 3


def test_sigterm_stops_cleanly_after_draining(tmp_path):
    data = clustered(5000, 64, seed=82)
    with running_server() as (endpoint, name, proc):
        with Client(endpoint) as c:
            c.observe_batch("drainme", [f"s{i}" for i in range(5000)], data)
            c.flush()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        out = proc.output()
        assert proc.returncode == 0, out
        assert "stopped; shared memory removed" in out
        assert "not yet indexed" not in out  # the drain let indexing finish
    assert shm.list_blocks(name) == []


def test_idle_sessions_expire():
    with running_server("--session-idle-s", "0.5") as (endpoint, name, proc):
        c = Client(endpoint)
        session = c.session
        c._sock.close(linger=0)
        time.sleep(1.5)
        with pytest.raises(UnknownSession):
            Client(endpoint)._handshake(session)


def test_status_is_pushed_when_pressure_changes():
    with running_server("--ring-capacity", "1000", "--max-credit", "1000",
                        "--ef-construction", "400", workers=1) as (endpoint, name, proc):
        data = clustered(4000, 256, seed=83)
        with Client(endpoint, batch_size=250, timeout=120) as c:
            levels = set()
            original = c._grant

            def watch(msg):
                if msg.get("op") == "status":
                    levels.add(msg["level"])
                original(msg)

            c._grant = watch
            c.observe_batch("pressure", [f"p{i}" for i in range(4000)], data)
            assert c.flush() == 4000
        assert levels and levels != {"normal"}, levels


def test_a_killed_front_is_restarted_and_sessions_resume():
    data = clustered(3000, DIM, seed=84)
    with running_server() as (endpoint, name, proc):
        c = Client(endpoint, timeout=5)
        c.observe_batch("survive", [f"v{i}" for i in range(1500)], data[:1500])
        assert c.flush() == 1500
        front = int(subprocess.run(["pgrep", "-f", f"engram_shm.transport.front {name}"],
                                   capture_output=True, text=True).stdout.split()[0])
        os.kill(front, signal.SIGKILL)
        with Client(endpoint, timeout=30) as probe:  # returns once the restarted front answers
            probe.ping()
        # c's socket was reconnected by ZeroMQ itself: the new front does not know it as the
        # session's owner and refuses its batches until it resumes the session.
        c.observe_batch("survive", [f"v{i}" for i in range(1500, 3000)], data[1500:])
        try:
            assert c.flush(timeout=60) == 3000  # resumes its session, resends what was refused
        except Exception:
            print(proc.output())
            raise
        found = [c.recall("survive", data[i], k=1)[0].id for i in range(0, 3000, 50)]
        assert found == [f"v{i}" for i in range(0, 3000, 50)]
        assert c.stats()["spaces"]["survive"]["count"] == 3000
        assert c.reconnects >= 1
        c.close()


def test_a_killed_server_takes_its_children_along_and_a_new_one_recovers_everything(tmp_path):
    """SIGKILL of the server alone (not its process group): the front and the
    workers die with it (PDEATHSIG), so the port and the engine name are free
    at once, and the next server on them and on the same data directory
    collects the dead engine's memory and brings back everything it acked."""
    data = clustered(2000, DIM, seed=85)
    ids = [f"b{i}" for i in range(2000)]
    port = free_port()
    with running_server(data=str(tmp_path), port=port) as (endpoint, name, proc):
        c = Client(endpoint, timeout=10)
        c.observe_batch("before", ids, data)
        c.flush()
        session = c.session
        c._sock.close(linger=0)  # the session stays open
        found = children(name)
        assert len(found["front"]) == 1 and len(found["worker"]) == 2, found
        kids = {pid: process_start(pid) for pids in found.values() for pid in pids}
        try:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 2.0
            alive = kids
            while alive and time.monotonic() < deadline:
                time.sleep(0.02)
                alive = {pid: t for pid, t in kids.items() if process_start(pid) == t}  # a zombie is gone
            assert not alive, f"children outlived the killed server by 2 s: {alive} ({found})"
        finally:
            for pid, t in kids.items():  # only if the test failed: do not leave them running
                if process_start(pid) == t:
                    os.kill(pid, signal.SIGKILL)
    with running_server(data=str(tmp_path), port=port) as (endpoint, name, second):
        cat = Catalog.attach(name)
        try:
            assert cat.header[OWNER_PID] == second.pid  # a new engine, not the dead one's memory
        finally:
            cat.close()
        with Client(endpoint, timeout=10) as c:
            assert c.stats()["spaces"]["before"]["count"] == 2000
            assert [m.id for m in (c.recall("before", data[i], k=1)[0] for i in range(0, 2000, 40))] == \
                ids[::40]
            c._handshake(session)  # the dead server's open session resumes where it was
            assert c.last_acked == 2000 and c.durable_seq == 2000


def test_flush_gives_up_after_its_timeout_while_the_server_refuses_every_batch():
    """A server that answers every batch with `internal` (refused, to be sent
    again) is not silent: the timeout still bounds the flush (before, it
    resent for ever), nothing is acked, and the error says what the server
    answered; close, which flushes first, is bounded by its timeout too."""
    port = free_port()
    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.bind(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def refuse_everything():
        while not stop.is_set():
            if not server.poll(50):
                continue
            identity, *frames = server.recv_multipart()
            msg = msgpack.unpackb(frames[0], raw=False)
            if msg["op"] == "init":
                reply = {"op": "init_ack", "rid": msg["rid"], "session": "s1", "last_sequence": 0,
                         "capabilities": [], "max_batch": 4096, "max_frame_bytes": 1 << 26, "limit": 1 << 20}
            else:
                reply = {"op": "error", "rid": msg.get("rid"), "code": "internal", "message": "disk on fire",
                         "retryable": True, "retry_after_ms": 10}
            server.send_multipart([identity, msgpack.packb(reply)])

    def flush_then_close(c, raised):
        for call in (lambda: c.flush(timeout=1.0), lambda: c.close(timeout=0.5)):
            try:
                call()
                raised.append(None)
            except ClientTimeout as e:
                raised.append(e)

    thread = threading.Thread(target=refuse_everything, daemon=True)
    thread.start()
    try:
        c = Client(f"tcp://127.0.0.1:{port}", timeout=5)
        c.observe_batch("s", ["a", "b"], np.ones((2, 8), np.float32))
        raised = []
        caller = threading.Thread(target=flush_then_close, args=(c, raised), daemon=True)
        caller.start()
        caller.join(60)  # the old flush never returned: fail, not hang
        assert not caller.is_alive(), "flush(timeout) did not return"
        assert len(raised) == 2 and all(isinstance(e, ClientTimeout) for e in raised), raised
        assert "internal: disk on fire" in str(raised[0])
        assert c.last_acked == 0
    finally:
        stop.set()
        thread.join(5)
        server.close(linger=0)


def test_a_test_server_stops_when_the_process_that_ran_it_is_killed(tmp_path):
    """running_server gives its server a session of its own; killed before
    its cleanup runs (a test run killed by a CI timeout), the process that
    started it still takes it along: the server stops cleanly, its memory
    removed."""
    script = ("import sys, time\n"
              "from engram_shm.transport.launch import running_server\n"
              f"with running_server(data={str(tmp_path)!r}, workers=1) as (_, name, proc):\n"
              "    print(proc.pid, name, flush=True)\n"
              "    time.sleep(600)\n")
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    family = {}
    try:
        pid, name = runner.stdout.readline().split()
        family = {p: process_start(p) for p in [int(pid), *(p for ps in children(name).values() for p in ps)]}
        assert len(family) == 3 and shm.list_blocks(name)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (any(process_start(p) == t for p, t in family.items())
                                               or shm.list_blocks(name)):
            time.sleep(0.1)
        assert not [p for p, t in family.items() if process_start(p) == t], "the server outlived its runner"
        assert shm.list_blocks(name) == [], "the server did not stop cleanly"
    finally:
        runner.kill()
        runner.wait()
        for p, t in family.items():  # only if the test failed: do not leave them running
            if process_start(p) == t:
                os.kill(p, signal.SIGKILL)


def test_a_test_server_outlives_the_thread_that_started_it(tmp_path):
    """The death signal follows the forking thread, not the process: a
    server started from a thread that ends (a chaos run's killer restarting
    the engine) must keep running until its context closes."""
    started = {}

    def start():
        context = running_server(data=str(tmp_path), workers=1)
        started["server"] = context.__enter__()
        started["context"] = context

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    try:
        endpoint, _, proc = started["server"]
        time.sleep(1.0)  # a SIGTERM would have stopped it by now
        assert proc.poll() is None
        with Client(endpoint, timeout=10) as c:
            assert c.ping()
    finally:
        started["context"].__exit__(None, None, None)


def idle_threads(pid: int) -> list[int]:
    """The threads of process `pid` that run under SCHED_IDLE."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")
            if os.sched_getscheduler(int(tid)) == os.SCHED_IDLE]


def first_idle_threads(pid: int, timeout: float = 30.0) -> list[int]:
    """idle_threads(pid) once there is one (or the timeout has passed)."""
    deadline = time.monotonic() + timeout
    while not idle_threads(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return idle_threads(pid)


def test_the_servers_checkpointer_takes_only_idle_cpu(tmp_path):
    """A checkpoint copies and checksums the whole space: the server runs it
    under SCHED_IDLE, like the index workers, and nothing else of its own."""
    with running_server(data=str(tmp_path), workers=1) as (_, name, proc):
        found = first_idle_threads(proc.pid)  # the checkpointer starts after the front answers
        assert len(found) == 1, found
        assert proc.pid not in found


def test_the_fronts_prefaulter_takes_only_idle_cpu():
    """Populating pages ahead of the writer is milliseconds of kernel time at
    a stretch: the front's prefault thread runs under SCHED_IDLE, so that it
    never holds a core a recall reader or the front's loop wants; the loop
    itself keeps its policy."""
    with running_server(workers=1) as (endpoint, name, _):
        front = children(name)["front"][0]
        assert idle_threads(front) == []  # the thread starts with the first segment's writes
        with Client(endpoint, timeout=30) as c:
            c.observe_batch("s", [f"o{i}" for i in range(256)], clustered(256, 64, 4, seed=1))
            c.flush()
        found = first_idle_threads(front)
        assert len(found) == 1, found
        assert front not in found
