"""engram_shm.Client: the Python client of the streaming protocol.

It batches observations, keeps at most the granted credit in flight, backs off
on `overloaded`, and after a reconnect resumes its session and re-sends only
what the server had not acked, so nothing is lost or stored twice. Batches are
pipelined: `observe_batch` returns once its batches are sent or queued;
`flush()` waits for every ack. A batch the server refuses for good (say a
duplicate id) frees its sequence numbers, later batches are renumbered, and
the refusal is raised by the next call. Not thread-safe: one client per thread.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..auth.keys import load_pair, load_public
from ..engine.reader import Memory
from ..errors import (
    Busy,
    EngramError,
    Internal,
    InvalidArgument,
    Oversize,
    SessionPaused,
    Unauthenticated,
    UnknownSession,
    from_dict,
)
from . import protocol as p

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
# Refusals after which a batch is sent again, in its place and under its numbers
# (a copy of the refused attempt may yet be stored: docs/protocol.md). A batch
# refused `session_paused` (sent before the pause took effect) waits for resume().
RESEND_CODES = {"no_credit", "overloaded", "sequence_gap", "internal", "shm_full", "engine_closed",
                "session_limit", "moving", "unavailable", "session_paused"}
# Another node owns the space (docs/cluster.md): with a router (the cluster
# client), the session moves there and resumes; without one, an error.
ROUTED_CODES = {"moved"}
# The server does not know this connection as the session's owner any more (a
# restarted front lost who owned it, and ZeroMQ reconnected the socket by
# itself): take the session over with init{resume}, then resend.
RESUME_CODES = {"not_session_owner"}
# The disk refused the batch (docs/durability.md): it keeps its place and its
# numbers, and goes again after retry_after_ms (default HELD_RETRY_MS), while
# the refusal is raised to the caller. Never renumbered: a copy of the refused
# attempt (one sent before a reconnect) may still be stored, and another batch
# under its numbers would then be acked as a duplicate without being stored.
HELD_CODES = {"storage_full", "storage_error"}
HELD_RETRY_MS = 1000
CLIENT_KEY_ENV, SERVER_KEY_ENV = "ENGRAM_CLIENT_KEY", "ENGRAM_SERVER_KEY"
_MONITORS = itertools.count()
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# Handshakes in a row the server ends without saying why before the client
# concludes it refuses ours. When one side speaks CURVE and the other not,
# which side notices first is a race: often the server just hangs up.
REFUSED_HANDSHAKES = 3


class ClientTimeout(Internal):
    """No answer from the server in time (the client has reconnected if it could)."""


@dataclass(eq=False)
class _Batch:
    header: dict
    payload: bytes
    n: int
    start: int | None = None  # sequence number of the current send attempt
    rid: int | None = None
    not_before: float = 0.0  # back-off after `overloaded`

    @property
    def end(self) -> int:
        return self.start + self.n - 1


@dataclass
class _Reply:
    messages: list = field(default_factory=list)
    done: bool = False


class Client:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, priority: str = "normal",
                 batch_size: int = 256, timeout: float = 30.0, payload_dtype: str = "f32",
                 notify_indexed: bool = False, context: zmq.Context | None = None,
                 client_key: str | None = None, server_key: str | None = None):
        """`client_key` (the client's .key_secret file) and `server_key` (the
        server's public .key file) authenticate with CURVE; they default to
        the files named by ENGRAM_CLIENT_KEY and ENGRAM_SERVER_KEY."""
        if payload_dtype not in ("f32", "f16"):
            raise ValueError("payload_dtype is f32 or f16")
        self.endpoint = endpoint
        self.priority = priority
        self.batch_size = batch_size
        self.timeout = timeout
        self.payload_dtype = np.float16 if payload_dtype == "f16" else np.float32
        self.notify_indexed = notify_indexed
        self._ctx = context or zmq.Context.instance()
        self._curve = _curve_keys(client_key or os.environ.get(CLIENT_KEY_ENV),
                                  server_key or os.environ.get(SERVER_KEY_ENV))
        self._monitor = None
        self._rids = itertools.count(1)
        self._queue: list[_Batch] = []  # sent or waiting, not yet acked, in sequence order
        self._by_rid: dict[int, _Batch] = {}
        self._replies: dict[int, _Reply] = {}
        self._errors: list[EngramError] = []
        self._last_refusal = ""  # of a batch to send again: said when a flush times out
        self._pending: dict[str, list] = {}
        self.session: str | None = None
        self.last_acked = 0
        self._base = 0  # the sequence number of the last observation no longer queued
        self.indexed_up_to = 0
        self.limit = 0
        self.level = "normal"
        self.reconnects = 0
        self.paused = False
        self._resume_needed = False
        # The cluster client's hook: router() -> the space owner's endpoint
        # now, or None if unknown; `route_fields` (the owner's epoch) go with
        # every observation and recall.
        self.router = None
        self.route_fields: dict = {}
        self._sock = None
        self._connect()
        self._handshake(None)

    # -- connection --------------------------------------------------------------
    def _connect(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        if self._curve is not None:
            self._sock.curve_publickey, self._sock.curve_secretkey, self._sock.curve_serverkey = self._curve
        # A refused handshake is silent on the socket itself: watch for it,
        # so that a wrong or missing key is an error, not a timeout.
        self._monitor = self._sock.get_monitor_socket(
            HANDSHAKE_EVENTS, f"inproc://engram-client-monitor.{os.getpid()}.{next(_MONITORS)}")
        self._failed_handshakes = 0
        self._sock.connect(self.endpoint)

    def _close_socket(self) -> None:
        if self._sock is not None and not self._sock.closed:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)

    def _check_handshake(self) -> None:
        """Raise Unauthenticated if the server refused our key, speaks another
        security mechanism, or ends every handshake (REFUSED_HANDSHAKES in a
        row, none done). A single failure (a server dying mid-handshake) is
        left to ZeroMQ's reconnection."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._failed_handshakes = 0
                continue
            self._failed_handshakes += 1
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = "the server refused this client's key (unknown or revoked)"
            elif value != zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and \
                    self._failed_handshakes < REFUSED_HANDSHAKES:
                continue
            elif self._curve is None:
                why = "the server ends every handshake: it requires authentication, so give a key pair " \
                      f"(client_key/server_key or {CLIENT_KEY_ENV}/{SERVER_KEY_ENV})"
            else:
                why = "the server ends every handshake: it may not use CURVE, or server_key is not its key"
            self._close_socket()
            raise Unauthenticated(f"{self.endpoint}: {why}")

    def _handshake(self, resume: str | None, timeout: float | None = None) -> None:
        header = {"op": "init", "priority": self.priority, "notify_indexed": self.notify_indexed}
        if resume:
            header["resume"] = resume
        ack = self._request(header, timeout=timeout)[0]
        self.session = ack["session"]
        self.capabilities = ack["capabilities"]
        self.max_batch = ack["max_batch"]
        self.max_frame_bytes = ack["max_frame_bytes"]
        if resume is None or ack["last_sequence"] < self._base:
            # A new session numbers from 1; a server that knows less than we
            # saw acked (it lost acked data) gets everything after what it knows.
            self._base = ack["last_sequence"]
        self.last_acked = ack["last_sequence"]
        self.fsync = ack.get("fsync", "none")
        self.durable_seq = ack.get("durable_seq", 0)
        self.limit = 0  # a new connection starts from the server's grant
        self._grant(ack)
        # Batches the server acked before we lost the connection are done;
        # everything else goes again, numbered from the server's last ack.
        self._drop_acked()
        for b in self._queue:
            b.start = b.rid = None
        self._by_rid.clear()

    def _resume(self, timeout: float | None) -> None:
        """init{resume} on the (maybe new) endpoint. A node the session never
        reached (a space moved in without it: none of its batches were
        stored there) starts a new one: nothing of it can be stored twice."""
        try:
            self._handshake(self.session, timeout=timeout)
        except UnknownSession:
            if self.router is None:
                raise
            self._handshake(None, timeout=timeout)

    def reconnect(self, deadline: float | None = None) -> None:
        """A fresh socket, the same session: re-send what was not acked.
        Retries until `deadline` (default: timeout from now) while the server
        does not answer (it may be restarting)."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        while True:
            self.reconnects += 1
            self._close_socket()
            if self.router is not None:  # the space may have another owner by now
                self.endpoint = self.router() or self.endpoint
            self._connect()
            try:
                self._resume(min(self.timeout, max(0.5, deadline - time.monotonic())))
                break
            except ClientTimeout:
                if time.monotonic() >= deadline:
                    raise
        self._drive()

    def _durable(self, msg: dict) -> None:
        self.durable_seq = max(self.durable_seq, msg.get("durable_seq", 0))

    def _grant(self, msg: dict) -> None:
        self.limit = max(self.limit, msg.get("limit", 0))
        self.level = msg.get("level", self.level)

    # -- observations ---------------------------------------------------------------
    def observe(self, space: str, obs_id: str, vector, what: str = "", when: float | None = None,
                confidence: float | None = None) -> None:
        """Queue one observation; sent in a batch of `batch_size` (or at flush)."""
        rows = self._pending.setdefault(space, [])
        rows.append((obs_id, vector, what, when, confidence))
        if len(rows) >= self.batch_size:
            self._flush_pending(space)

    def observe_batch(self, space: str, ids, vectors, what=None, when=None, confidence=None) -> None:
        """Send a batch (split to the server's max_batch and max_frame_bytes,
        and to our batch_size)."""
        vectors = np.asarray(vectors, dtype=self.payload_dtype)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError("vectors must be (n, dim) with one id per row")
        row_bytes = max(1, vectors.shape[1] * vectors.itemsize)
        if row_bytes > self.max_frame_bytes:  # refused here: the server would drop such frames unanswered
            raise Oversize(f"one vector of {row_bytes} bytes exceeds the server's max_frame_bytes "
                           f"{self.max_frame_bytes}")
        step = min(self.batch_size, self.max_batch, self.max_frame_bytes // row_bytes)
        for lo in range(0, len(ids), step):
            sl = slice(lo, lo + step)
            header = {"op": "observe_batch", "space": space, "ids": list(ids[sl])}
            if what is not None:
                header["what"] = list(what[sl])
            for name, column in (("when", when), ("confidence", confidence)):
                if column is not None:
                    header[name] = np.asarray(column[sl], dtype=np.float64).tolist()
            fields, frame = p.vector_payload(vectors[sl])
            header.update(fields)
            self._wait_for_room()
            self._queue.append(_Batch(header, bytes(frame), len(header["ids"])))
            self._drive()
        self._raise_errors()

    def _wait_for_room(self) -> None:
        """Block while the queue holds more than twice the credit window: the
        producer slows to what the server accepts instead of buffering without
        bound."""
        self._progress_until(lambda: sum(b.n for b in self._queue) <
                             2 * max(self.batch_size, self.limit - self.last_acked, 1) or self._held())

    def _progress_until(self, done, patience: float | None = None) -> None:
        """Send and read until done(). After `timeout` s without a reply,
        reconnect and resume (a reconnect that gets no answer within `timeout`
        raises ClientTimeout); with `patience`, give up after it, however the
        server answers (one that refuses a batch for ever is answering)."""
        deadline = None if patience is None else time.monotonic() + patience
        silent_since = time.monotonic()
        self._last_refusal = ""  # a timeout names this wait's refusals, not an earlier one's
        while not done():
            self._drive()
            if self._pump(0.05):
                silent_since = time.monotonic()
            elif time.monotonic() - silent_since > self.timeout:
                self.reconnect(deadline)
                silent_since = time.monotonic()
            if deadline is not None and time.monotonic() > deadline and not done():
                refused = f" (last refused: {self._last_refusal})" if self._last_refusal else ""
                raise ClientTimeout(f"{len(self._queue)} batches still unacked after {patience} s{refused}")

    def _flush_pending(self, space: str) -> None:
        rows = self._pending.pop(space, [])
        if rows:
            ids, vectors, what, when, confidence = zip(*rows)
            self.observe_batch(space, list(ids), np.asarray(vectors), list(what),
                               None if all(w is None for w in when) else
                               [time.time() if w is None else w for w in when],
                               None if all(c is None for c in confidence) else
                               [1.0 if c is None else c for c in confidence])

    def flush(self, timeout: float | None = None, durable: bool = False) -> int:
        """Send everything queued and wait until all of it is acked; returns the
        last acked sequence. With `durable`, also wait until the server has it
        on disk per its fsync policy (`durable_seq`; docs/protocol.md). Raises
        the first refusal seen since the last call; a refusal of the disk
        (StorageError, StorageFull) is raised at once, its batch still queued
        under its numbers: the next flush sends it again. A silent server is
        reconnected to; with `timeout`, flush gives up after it with
        ClientTimeout (the batches stay queued, for a later flush), also while
        the server keeps refusing a batch to be sent again (say `internal`)."""
        self._send_all(timeout, durable)
        self._raise_errors()
        return self.last_acked

    def _send_all(self, timeout: float | None = None, durable: bool = False) -> None:
        """flush() without raising the refusals it records."""
        for space in list(self._pending):
            self._flush_pending(space)
        if self.paused and self._queue:
            raise SessionPaused("the session is paused: resume() before flushing", queued=len(self._queue))
        if durable and self.fsync == "none":
            raise InvalidArgument("the server keeps no data directory: nothing becomes durable")

        def done() -> bool:
            return (not self._queue and (not durable or self.durable_seq >= self.last_acked)) or self._held()

        self._progress_until(done, timeout)

    def _drive(self) -> None:
        """Send the queued batches that credit allows, in order; read replies."""
        self._pump(0)
        if self._resume_needed:
            self._resume_needed = False
            self.reconnect()  # which drives again
            return
        if self.paused:
            return
        now = time.monotonic()
        next_seq = self._base + 1
        for b in self._queue:
            if b.start is not None:
                next_seq = b.end + 1
                continue
            if next_seq + b.n - 1 > self.limit or b.not_before > now:
                break
            b.start, b.rid = next_seq, next(self._rids)
            self._by_rid[b.rid] = b
            self._send({**b.header, **self.route_fields, "session": self.session, "seq": b.start,
                        "rid": b.rid}, b.payload)
            next_seq = b.end + 1
        self._pump(0)

    # -- replies ----------------------------------------------------------------------
    def _send(self, header: dict, *payload) -> None:
        try:
            self._sock.send_multipart(p.pack(header, *payload), copy=False)
        except zmq.ZMQError:
            self.reconnect()

    def _pump(self, timeout: float) -> bool:
        """Handle the replies that arrive within `timeout` s; True if any did."""
        got = False
        self._check_handshake()
        try:
            while self._sock.poll(int(timeout * 1000) if not got else 0):
                frames = self._sock.recv_multipart()
                msg = p.msgpack.unpackb(frames[0], raw=False)
                if len(frames) > 1:
                    msg["_payload"] = frames[1:]  # an export's rows
                self._on_message(msg)
                got = True
        except zmq.ZMQError:
            self.reconnect()
        return got

    def _on_message(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "ack":
            b = self._by_rid.pop(msg.get("rid"), None)
            self.last_acked = max(self.last_acked, msg["to"])
            self._drop_acked()
            if b is not None and b.start is not None and b.end > self.last_acked:
                b.start = None  # acked for a shorter range than sent: resend the rest
            self._grant(msg)
            self._durable(msg)
        elif op == "status":
            self._grant(msg)
        elif op == "durable":
            self._durable(msg)
        elif op == "indexed":
            self.indexed_up_to = max(self.indexed_up_to, msg["up_to"])
        elif op == "error" and msg.get("rid") in self._by_rid:
            self._refused(self._by_rid.pop(msg["rid"]), msg)
        elif msg.get("rid") in self._replies:
            reply = self._replies[msg["rid"]]
            reply.messages.append(msg)
            reply.done = op in ("error", "init_ack", "paused", "resumed", "closed", "pong", "stats",
                                "checkpointed", "exported", "adopted", "released") \
                or (op == "recall_result" and not msg.get("more"))
        # anything else answers a request already abandoned (a timeout): ignore

    def _refused(self, batch: _Batch, msg: dict) -> None:
        """A batch was refused: it and every later batch lose their numbers."""
        if batch not in self._queue or batch.start is None:
            return  # a stale attempt (already being resent)
        code = msg.get("code")
        if code == "sequence_gap":  # the server holds up to expected - 1: trust it
            self.last_acked = max(self.last_acked, msg.get("expected", 1) - 1)
            self._drop_acked()
            if batch not in self._queue:
                return
        # After a gap everything unacked goes again, batches sent before this
        # one too: the server is missing `expected`, so the attempt that
        # carried it was lost on the way (or refused, its answer lost), and
        # waiting for its ack would resend the later ones into the same gap
        # for ever. One still in flight is acked twice, stored once.
        index = 0 if code == "sequence_gap" else self._queue.index(batch)
        for b in self._queue[index:]:
            if b.rid is not None:
                self._by_rid.pop(b.rid, None)
            b.start = b.rid = None
        if code in RESUME_CODES:
            self._resume_needed = True
        elif code in ROUTED_CODES and self.router is not None:
            self._resume_needed = True  # reconnect() asks the router where the space is now
        elif code in RESEND_CODES:
            self._last_refusal = f"{code}: {msg.get('message', '')}"
            self._grant(msg)
            batch.not_before = time.monotonic() + msg.get("retry_after_ms", 20) / 1000
        elif code in HELD_CODES:
            batch.not_before = time.monotonic() + msg.get("retry_after_ms", HELD_RETRY_MS) / 1000
            self._errors.append(self._refusal(batch, msg))
        else:
            self._queue.remove(batch)
            self._errors.append(self._refusal(batch, msg))

    @staticmethod
    def _refusal(batch: _Batch, msg: dict) -> EngramError:
        err = from_dict(msg)
        err.details["ids"] = batch.header["ids"]
        return err

    def _held(self) -> bool:
        """A batch waits on a refusing disk: the caller must hear of it now."""
        return any(e.code in HELD_CODES for e in self._errors)

    def _drop_acked(self) -> None:
        """Drop the batches the server holds (through last_acked). Queued
        batches are numbered in queue order from `_base + 1`, whether an
        attempt is under way or not: a batch being resent whose earlier
        attempt reached the server after all (it was delayed, or doubled, by
        the network) is covered by that attempt's ack and dropped, never sent
        again under new numbers (the server would refuse it as duplicate_id)."""
        while self._queue and self._base + self._queue[0].n <= self.last_acked:
            b = self._queue.pop(0)
            if b.rid is not None:
                self._by_rid.pop(b.rid, None)
            # Stored after all (sent again, or an earlier copy): no refusal of it to report.
            self._errors = [e for e in self._errors
                            if e.code not in HELD_CODES or e.details.get("ids") is not b.header["ids"]]
            b.start = self._base + 1  # the numbers it was stored under
            self._base += b.n
        if not self._queue:
            self._base = max(self._base, self.last_acked)

    def _raise_errors(self, keep: set[str] = frozenset()) -> None:
        """Raise the first refusal recorded, forgetting the others; those of
        a code in `keep` stay for a later call."""
        raised = [e for e in self._errors if e.code not in keep]
        if raised:
            self._errors = [e for e in self._errors if e.code in keep]
            raise raised[0]

    def _request(self, header: dict, *payload, timeout: float | None = None) -> list[dict]:
        """Send a control request and wait for its whole answer."""
        rid = next(self._rids)
        reply = self._replies[rid] = _Reply()
        self._send({**header, "rid": rid}, *payload)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            while not reply.done:
                if not self._pump(min(0.05, max(0.0, deadline - time.monotonic()))) and \
                        time.monotonic() > deadline:
                    raise ClientTimeout(f"no answer to {header['op']} within {timeout} s "
                                        f"from {self.endpoint}")
        finally:
            del self._replies[rid]
        if reply.messages[-1].get("op") == "error":
            raise from_dict(reply.messages[-1])
        return reply.messages

    # -- recall -----------------------------------------------------------------------
    def recall_stream(self, space: str, cue, k: int = 10, consistency: str = "strong",
                      generation: int | None = None, threshold: float | None = None,
                      ef: int | None = None, batch: int = 100) -> Iterator[list[Memory]]:
        """The answer in parts of `batch` results, best first. Observations this
        client sent are flushed first, so a strong recall sees them. A recall
        refused with `busy` is asked again after its retry_after_ms, for up
        to `timeout` s."""
        # A batch the disk refuses stays queued, its refusal for the next
        # observe or flush to raise: recalls go on (docs/durability.md).
        self._send_all()
        self._raise_errors(keep=HELD_CODES)
        header = {"op": "recall", "space": space, "k": k, "consistency": consistency,
                  "batch": batch}
        for name, value in (("generation", generation), ("threshold", threshold), ("ef", ef)):
            if value is not None:
                header[name] = value
        fields, frame = p.vector_payload(np.asarray(cue, dtype=np.float32))
        header.update(self.route_fields)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                answer = self._request({**header, **fields}, frame)
                break
            except Busy as e:  # the server's recalls in flight are at their limit: ask again when told
                if time.monotonic() > deadline:
                    raise
                self._pump(e.details.get("retry_after_ms", 50) / 1000)
        for msg in answer:
            self.snapshot_generation = msg["snapshot_generation"]
            yield [Memory(r["id"], r["similarity"], r["confidence"], r["what"], r["when"],
                          r["generation"]) for r in msg["results"]]

    def recall(self, space: str, cue, k: int = 10, **options) -> list[Memory]:
        return [m for part in self.recall_stream(space, cue, k, **options) for m in part]

    # -- control ----------------------------------------------------------------------
    def pause(self) -> None:
        """Pause the session: the server refuses its observations until resume();
        this client queues them meanwhile."""
        self._request({"op": "pause", "session": self.session})
        self.paused = True

    def resume(self) -> None:
        self._grant(self._request({"op": "resume", "session": self.session})[0])
        self.paused = False
        self._drive()

    def checkpoint(self, timeout: float | None = None) -> int:
        """Have the server write a checkpoint; returns its generation once it
        is complete."""
        return self._request({"op": "checkpoint"}, timeout=timeout)[0]["generation"]

    def request(self, header: dict, *payload, timeout: float | None = None) -> dict:
        """A control request's one answer (an admin's: export, adopt,
        release); payload frames come back under `_payload`."""
        return self._request(header, *payload, timeout=timeout)[-1]

    def ping(self) -> float:
        return self._request({"op": "ping"})[0]["time"]

    def stats(self) -> dict:
        return self._request({"op": "stats"})[0]["stats"]

    def close(self, drain: bool = True, timeout: float | None = None) -> int:
        """Flush, close the session (after indexing, with drain) and the socket;
        returns the session's last sequence. `timeout` bounds the flush and the
        close request, each (ClientTimeout; the socket is closed all the same)."""
        try:
            self.flush(timeout)
            return self._request({"op": "close", "session": self.session, "drain": drain},
                                 timeout=timeout)[0]["last_sequence"]
        finally:
            self._close_socket()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        if self._sock is not None and not self._sock.closed:
            if exc[0] is None:
                self.close()
            else:
                self._close_socket()


def _curve_keys(client_key: str | None, server_key: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server public) from key files, or None without keys."""
    if client_key is None and server_key is None:
        return None
    if client_key is None or server_key is None:
        raise InvalidArgument("CURVE needs both the client's key pair and the server's public key "
                              f"(client_key and server_key, or {CLIENT_KEY_ENV} and {SERVER_KEY_ENV})")
    public, secret = load_pair(client_key)
    return public, secret, load_public(server_key)
