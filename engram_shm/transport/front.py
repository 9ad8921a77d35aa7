"""The ingest front: one ROUTER socket, sessions, sequences, credit, acks and
recalls (docs/protocol.md).

One thread runs the loop: it reads what is waiting, answers each message
(observations are validated, stored in shared memory and acked per batch;
recalls are checked, then answered by reader processes from the same memory,
never waiting for indexing: recalls.py), and every few milliseconds does its
upkeep: pressure levels and status pushes, indexed notifications, drained
closes, idle expiry, readers that died. Any fault in one message is answered
with an error code; the loop itself never stops on bad input, and never
waits for a client: replies a client does not read wait in its queue, within
a bound (replies.py).

With a data directory the front is the log's writer: every batch and session
change is logged before it is answered. Under fsync="always" the replies of
a turn (every message read in one go) wait for one fsync that covers them
all: group commit. Each ack carries the session's `durable_seq`, and
`durable` pushes tell a session when the background fsync has covered more.

    python -m engram_shm.transport.front ENGINE CONFIG_JSON INCARNATION READERS_ENDPOINT
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time

import zmq

from .. import faults
from ..auth.gate import gate_for
from ..cluster import export
from ..cluster.node import NodeCluster
from ..config import EngineConfig
from ..engine import lifeline, recovery, release
from ..engine.beacon import RecallBeacon
from ..engine.checkpointer import durability_stats
from ..engine.directory import SegmentDirectory
from ..engine.reader import Reader
from ..engine.writer import EngineWriter
from ..errors import (
    EngineClosed,
    EngramError,
    Forbidden,
    Internal,
    InvalidArgument,
    NoCredit,
    Overloaded,
    SequenceConflict,
    SequenceGap,
    SessionLimit,
    SlowConsumer,
    StorageError,
    UnknownSpace,
)
from ..kernels.warm import ready_child
from ..observability import logs
from ..observability.stats_block import CONSISTENCIES, REASONS, WAL_WRITTEN, StatsBlock, latency_summary
from ..store import checkpoint, shm
from ..store.catalog import (
    CHECKPOINT_DONE,
    CHECKPOINT_ERRNO,
    CHECKPOINT_GENERATION,
    FRONT_INCARNATION,
    FRONT_PID,
    FRONT_RECOVERING,
    FRONT_START,
    RECOVERY_FROM,
    WAL_LSN,
    Catalog,
    process_start,
    segment_name,
)
from ..store.datadir import storage_error
from ..store.segment import Segment
from ..store.wal import WalWriter
from . import protocol as p
from .credit import LEVELS, credit_for, level_of, retry_after_ms
from .recalls import RecallDispatch
from .replies import SNDHWM, ReplyQueues
from .sessions import ACTIVE, ANONYMOUS, CLOSED, FREE, PAUSED, Session, SessionTable, table_name

log = logging.getLogger(__spec__.name)  # its module's name, also when run with -m

UPKEEP_S = 0.02
EXPORT_HOLD_S = 60.0  # see Front._exports
MAX_RECV_PER_TURN = 256
HEADER_BYTES_PER_OBSERVATION = 64  # msgpack framing of one observation's id, text, when and confidence
OBSERVATION_OPS = ("observe", "observe_batch")
MAX_IDS_SHOWN = 10  # ids an error names, at most


class Front:
    def __init__(self, config: EngineConfig, catalog: Catalog, sessions: SessionTable,
                 metrics: StatsBlock | None = None):
        self.config = config
        # The counters only the front can count (observability/stats_block.py);
        # None (--metrics off) records nothing.
        self.metrics = metrics
        self.catalog = catalog
        self.sessions = sessions
        self._segments: dict[int, Segment] = {}  # catalog index -> the front's mapping

        def open_segment(index: int) -> Segment:
            """The front's own mapping of a segment it adopts (segments its
            writer creates arrive via _on_new_segment)."""
            if index not in self._segments:
                self._segments[index] = Segment.attach(segment_name(catalog.engine, index), writable=True)
            return self._segments[index]

        self.gate = gate_for(config)
        self.writer = EngineWriter(catalog, config, self._on_new_segment, self._on_retired)
        self.wal: WalWriter | None = None
        if config.durable:
            if not catalog.header[FRONT_RECOVERING]:  # else the front before died recovering from there
                catalog.header[RECOVERY_FROM] = catalog.committed_generation
                catalog.header[FRONT_RECOVERING] = 1  # no checkpoint meanwhile (catalog.py)
            report = recovery.warm(self.writer, os.path.join(config.data_dir, "wal"), open_segment,
                                   int(catalog.header[RECOVERY_FROM]))
            sessions.merge(report.sessions)
            catalog.header[FRONT_RECOVERING] = 0
            self.wal = self.writer.wal = WalWriter(
                os.path.join(config.data_dir, "wal"), config.fsync, config.fsync_interval_ms,
                config.wal_file_bytes, int(catalog.header[WAL_LSN]) + 1, catalog.committed_generation)
            if metrics is not None:
                self.wal.on_fsync = metrics.fsync_latency.observe
            recovered = report.observations
        else:
            recovered = self.writer.recover(open_segment)
        self.writer.ledger.overrides = self.gate.limits()
        self.cluster = NodeCluster(config) if config.cluster else None
        self.memory_pressure = 0.0
        self.counters = {"received": 0, "errors": 0, "observations": 0}
        self.stopping = False
        self._dropped = False  # faults.DROP_ONE done
        self.principal = ANONYMOUS  # the client key of the message being handled
        self.reload_requested = False  # SIGHUP: read the keys and the ACL again
        self.key_credit: collections.Counter[str] = collections.Counter()  # credit held per key
        self.replies = ReplyQueues(config.reply_queue_bytes, self._slow_consumer)
        # Its own Reader answers small recalls on the loop (recalls.py).
        self._recall_directory = SegmentDirectory(catalog) if config.recall_inline_share > 0 else None
        self.recalls = RecallDispatch(config, self.replies.deliver, metrics and metrics.recall_latency,
                                      self._recall_directory and Reader(self._recall_directory),
                                      self._recall_waits, RecallBeacon(catalog))
        self._watched: dict[str, tuple[float, int]] = {}  # spaces with an open window or above normal:
        # (window fill, level index)
        self._touched: set[str] = set()  # spaces written since the last upkeep
        self._wal_counted = 0  # log bytes of this front already added to the stats block
        self._frames: list = []  # the message being handled
        # A client message received early, to see what waits behind a recall
        # (_recall_waits), with its header if it has a valid one: handled next.
        self._ahead: tuple[list, dict | None] | None = None
        self._held: list | None = None  # replies of the turn being read (fsync=always)
        self._waiting: collections.deque = collections.deque()  # (log position, replies) to sync
        self._checkpoints: list[tuple[int, bytes, object]] = []  # (request, identity, rid)
        # Spaces an export reads: their cursors name segments, so compaction
        # leaves them alone until EXPORT_HOLD_S after the last chunk.
        self._exports: dict[str, float] = {}
        log.info("front of %s: %d observations and %d sessions recovered", catalog.engine,
                 recovered, len(sessions.live))

    def _on_new_segment(self, index: int, seg: Segment) -> None:
        self._segments[index] = seg

    def _on_retired(self, index: int, seg: Segment) -> None:
        release.later(self._segments.pop(index))  # unmapped off the loop

    # -- the loop ----------------------------------------------------------------
    def serve(self, endpoint: str, readers_endpoint: str, ready=lambda: None) -> None:
        """Run the loop: clients on `endpoint`, recall readers on
        `readers_endpoint` (recalls.py)."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_part_bytes(self.config))
        sock.setsockopt(zmq.LINGER, 2000)
        self.gate.start(ctx, sock)
        sock.bind(endpoint)
        readers = ctx.socket(zmq.ROUTER)
        readers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No marks: recall_concurrency bounds the jobs out, and so the parts in.
        readers.setsockopt(zmq.SNDHWM, 0)
        readers.setsockopt(zmq.RCVHWM, 0)
        readers.setsockopt(zmq.LINGER, 0)
        readers.bind(readers_endpoint)
        self.replies.sock = sock
        self.recalls.sock = readers
        ready()
        last_upkeep = 0.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(readers, zmq.POLLIN)
        group_commit = self.wal is not None and self.config.fsync == "always"
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if group_commit:  # the log's sync thread wakes the loop when a sync is done
            self.wal.on_synced = lambda: _poke(wake_w)
            poller.register(wake_r, zmq.POLLIN)
        try:
            while not self.stopping:
                events = dict(poller.poll(0 if self._ahead else int(UPKEEP_S * 1000)))
                if readers in events:  # answers first: a recall's answer never waits behind batches
                    self._relay_answers(readers)
                if sock in events or self._ahead:
                    if group_commit:
                        self._held = []
                    for _ in range(MAX_RECV_PER_TURN):
                        message = self._next_message(sock)
                        if message is None:
                            break
                        self.handle(*message)
                        if _readable(readers):
                            self._relay_answers(readers)
                    if group_commit:
                        self._commit_turn()
                if wake_r in events:
                    while _drain(wake_r):
                        pass
                    self._release()
                now = time.monotonic()
                if now - last_upkeep >= UPKEEP_S:
                    last_upkeep = now
                    self.upkeep()
                self.replies.flush()
            if self._ahead:  # refused like any message that comes after the stop
                self.handle(*self._next_message(sock))
            if self._waiting:
                self.wal.request_sync()
                deadline = time.monotonic() + 10
                while self._waiting and time.monotonic() < deadline and self.wal.failed is None:
                    time.sleep(0.001)
                    self._release()
            self.recalls.close()
            self.replies.flush()
        finally:
            readers.close()
            sock.close()
            self.gate.stop()
            ctx.term()
            os.close(wake_r)
            os.close(wake_w)

    def _relay_answers(self, readers) -> None:
        """Relay the parts of answers the recall readers sent (recalls.py)."""
        for _ in range(MAX_RECV_PER_TURN):
            try:
                message = readers.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self.recalls.on_message(message)
            except Exception:  # a reader's bug must not cost the front
                log.exception("a message from a recall reader could not be handled")

    def _requests_waiting(self) -> bool:
        """Does a client's request or a reader's answer wait for the loop?"""
        return bool(self._ahead) or _readable(self.replies.sock) or _readable(self.recalls.sock)

    def _next_message(self, sock) -> tuple[list, dict | None] | None:
        """The next client message and its header if read already; None if
        none waits."""
        if self._ahead:
            message, self._ahead = self._ahead, None
            return message
        try:
            return sock.recv_multipart(zmq.NOBLOCK, copy=False), None
        except zmq.Again:
            return None

    def _recall_waits(self) -> bool:
        """Should a small recall leave the loop to a reader: does another
        recall, or a reader's answer, wait for the loop? The next client
        message is received to tell (and handled next): a batch behind the
        recall waits for one search, which costs it less than the hand-off
        costs the recall (two relays and a reader process to wake, at a lower
        priority than the batch's work)."""
        if _readable(self.recalls.sock):
            return True
        if not self._ahead:
            try:
                frames = self.replies.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            self._ahead = frames, _header_or_none(frames)
        header = self._ahead[1]
        return header is not None and header["op"] == "recall"

    def handle(self, frames, header: dict | None = None) -> None:
        """Answer one client message (`header`: its header frame, read already)."""
        self.counters["received"] += 1
        identity = frames[0].bytes
        rid = session_key = None
        try:
            if len(frames) < 2:
                raise p.Malformed("a message needs a header frame")
            self.principal = self.gate.principal_of(frames[1])
            if header is None:
                header = p.unpack_header(frames[1].buffer)
            rid = header.get("rid")
            session_key = header.get("session")
            if self.stopping and header["op"] not in ("recall", "ping", "stats"):
                raise EngineClosed("the server is shutting down")
            self._frames = frames
            getattr(self, "op_" + header["op"])(identity, header, frames[2:])
        except EngramError as e:
            self.counters["errors"] += 1
            if self.metrics is not None and header is not None and header.get("op") in OBSERVATION_OPS:
                self._count_rejected(header, e.code)
            self.send(identity, {"op": "error", "rid": rid, "session": session_key, **e.to_dict()})
        except Exception as e:  # a bug must cost one request, never the front
            log.exception("internal error on a message", extra=logs.fields(
                session=session_key if isinstance(session_key, str) else None, code=Internal.code))
            self.counters["errors"] += 1
            err = Internal(f"internal error: {type(e).__name__}: {e}")
            self.send(identity, {"op": "error", "rid": rid, "session": session_key, **err.to_dict()})

    def _count_rejected(self, header: dict, code: str) -> None:
        """Count a refused observation message's observations under its code,
        in its space's slot: a name that is not a space's (yet) counts as
        "other", so hostile names cannot add labels."""
        ids, space = header.get("ids"), header.get("space")
        n = len(ids) if header["op"] == "observe_batch" and isinstance(ids, list) else 1
        writer = self.writer.spaces.get(space) if isinstance(space, str) else None
        slot = self.metrics.slot(writer.index) if writer is not None else self.metrics.slots - 1
        self.metrics.rejected[slot, REASONS.index(code)] += n

    def _commit_turn(self) -> None:
        """Group commit: the turn's replies wait for a sync of everything it
        logged, which the log's sync thread does while the loop reads on;
        one fsync covers every turn that ended before it started."""
        held, self._held = self._held, None
        if held:
            self._waiting.append((self.wal.written, held))
            if self.wal.written > self.wal.synced:
                self.wal.request_sync()
            else:
                self._release()

    def _release(self) -> None:
        """Send the held replies whose records are on disk, in order."""
        if self.wal.failed is not None:
            # The kernel may have dropped the pages it failed to write: nothing
            # logged since the last good fsync is known to be on disk. Stop
            # without answering; the restarted front replays the log's tail.
            log.critical("fsync of the write-ahead log failed; the front exits unanswered")
            os._exit(70)
        synced = self.wal.synced
        while self._waiting and self._waiting[0][0] <= synced:
            for identity, frames in self._waiting.popleft()[1]:
                self.replies.deliver(identity, frames)

    def send(self, identity: bytes, header: dict, *payload) -> None:
        frames = p.pack(header, *payload)
        if self._held is not None:
            self._held.append((identity, frames))
        else:
            self.replies.deliver(identity, frames)

    def _slow_consumer(self, identity: bytes) -> None:
        """A connection left more than reply_queue_bytes of replies unread and
        they were dropped: its sessions close, logged like any close (their
        acks may be lost, so the client starts a new session and asks again
        instead of going on blind), and it is told why, should it read again."""
        closed = []  # this time, or at an earlier overflow (whose message was dropped too)
        for session in list(self.sessions.live.values()):
            if session.owner != identity:
                continue
            if self.sessions.state(session) != CLOSED:
                self._close_for(session, SlowConsumer.code)
                log.warning("session closed: its connection does not read its replies",
                            extra=logs.fields(session=session.key, space=session.space,
                                              code=SlowConsumer.code))
            if session.closed_reason == SlowConsumer.code:
                closed.append(session.key)
        err = SlowConsumer(f"more than {self.config.reply_queue_bytes} bytes of replies waited unread; "
                           "they were dropped and this connection's sessions closed", sessions=closed)
        self.send(identity, {"op": "error", **err.to_dict()})

    # -- sessions ------------------------------------------------------------------
    def op_init(self, identity, header, payload) -> None:
        self._no_payload(header, payload)
        resume = p.field(header, "resume", str, None)
        notify = p.field(header, "notify_indexed", bool, False)
        self.gate.check_admitted(self.principal)
        if resume is not None:
            session = self.sessions.resume(resume, identity, self.principal)
            resumed = True
        else:
            self._admit_session(self.principal)
            session = self.sessions.open(p.field(header, "priority", str, "normal"), identity, self.principal)
            resumed = False
            self._log_session(session, ACTIVE)
        session.notify_indexed = notify
        last = self.sessions.last_seq(session)
        session.limit = last  # a new connection starts from a fresh grant (below)
        self.send(identity, {"op": "init_ack", "rid": header.get("rid"), "session": session.key,
                             "initial_sequence": 0, "last_sequence": last, "resumed": resumed,
                             "state": "paused" if self.sessions.state(session) == PAUSED else "active",
                             "capabilities": list(p.CAPABILITIES), "protocol": p.VERSION,
                             "max_batch": self.config.max_batch,
                             "max_frame_bytes": self.config.max_frame_bytes,
                             "idle_timeout_s": self.config.session_idle_s,
                             "fsync": self.config.fsync if self.wal is not None else "none",
                             **self._durable(session), **self._grant(session)})

    def _admit_session(self, principal: str) -> None:
        """Refuse a new session past max_sessions, or past the key's limit."""
        held, cap = len(self.sessions.live), self.config.max_sessions
        if held >= cap:
            raise SessionLimit(f"the server holds its maximum of {cap} sessions (max_sessions); close "
                               "some or wait for idle ones to expire", quota="max_sessions", used=held,
                               limit=cap, retry_after_ms=1000)
        held, cap = self.sessions.count(principal), self.writer.ledger.limits(principal).sessions
        if held >= cap:
            raise SessionLimit(f"key {principal!r} holds its maximum of {cap} sessions "
                               "(max_sessions_per_key); close some or wait for idle ones to expire",
                               quota="max_sessions_per_key", key=principal, used=held, limit=cap,
                               retry_after_ms=1000)

    def op_pause(self, identity, header, payload) -> None:
        self._no_payload(header, payload)
        session = self.sessions.get(header.get("session"), identity, allow_paused=True)
        self._set_state(session, PAUSED)
        self.send(identity, {"op": "paused", "rid": header.get("rid"), "session": session.key})

    def op_resume(self, identity, header, payload) -> None:
        self._no_payload(header, payload)
        session = self.sessions.get(header.get("session"), identity, allow_paused=True)
        self._set_state(session, ACTIVE)
        self.send(identity, {"op": "resumed", "rid": header.get("rid"), "session": session.key,
                             **self._grant(session)})

    def op_close(self, identity, header, payload) -> None:
        self._no_payload(header, payload)
        session = self.sessions.get(header.get("session"), identity, allow_paused=True)
        drain = p.field(header, "drain", bool, True)
        self._set_state(session, CLOSED)
        session.close_rid, session.close_owner = header.get("rid"), identity
        session.draining = drain
        self._pop_indexed(session)
        if not drain or not session.unindexed:
            self._closed(session)

    def _set_state(self, session: Session, state: int) -> None:
        """Change a session's state, then log it: a restart restores it. A
        closed session takes nothing more: its credit goes back to its key."""
        self.sessions.set_state(session, state)
        self._log_session(session, state)
        if state == CLOSED:
            self._hold_credit(session, 0)

    def _close_for(self, session: Session, code: str) -> None:
        """The server closes a session (its data stays); a later message on
        it gets session_closed with `code` as its reason."""
        session.closed_reason = code
        session.draining = False
        self._set_state(session, CLOSED)

    def _log_session(self, session: Session, state: int) -> None:
        """Log a session's change, best effort: a full disk must not stop a
        client from opening, pausing or closing a session. Unlogged, a change
        is lost on a restart of the whole engine (a session then comes back
        as it was, and expires), while its batches stay safe: each carries
        its session, and is refused if it cannot be logged."""
        try:
            self.writer.log_session(session.key, state, session.priority, session.principal)
        except StorageError as e:
            log.warning("session change to state %d not logged: %s", state, e,
                        extra=logs.fields(session=session.key, code=e.code))

    def _closed(self, session: Session) -> None:
        session.draining = False
        self.send(session.close_owner, {"op": "closed", "rid": session.close_rid, "session": session.key,
                                        "last_sequence": self.sessions.last_seq(session)})

    # -- observations ----------------------------------------------------------------
    def op_observe(self, identity, header, payload) -> None:
        self._observe(identity, header, payload, single=True)

    def op_observe_batch(self, identity, header, payload) -> None:
        self._observe(identity, header, payload, single=False)

    def _observe(self, identity, header, payload, single: bool) -> None:
        session = self.sessions.get(header.get("session"), identity)
        seq = p.field(header, "seq", int)
        space = p.field(header, "space", str)
        importing = p.field(header, "import", bool, False)
        if importing:  # a move copies rows in (docs/cluster.md): before this node owns the space
            self.gate.check_engine(self.principal)
        elif self.cluster is not None:
            self.cluster.route(space, p.field(header, "epoch", int, None), write=True)
        self.gate.check(self.principal, space, "observe")
        vectors = p.vectors(header, payload, self.config.max_frame_bytes, single)
        if single:
            ids = [p.field(header, "obs_id", str)]
            what = [p.field(header, "what", str, "")]
            when = p.field(header, "when", (int, float), None)
            when = None if when is None else [when]
            confidence = p.field(header, "confidence", (int, float), None)
            confidence = None if confidence is None else [confidence]
        else:
            ids = p.field(header, "ids", list)
            n = len(ids)
            what = p.optional_list(header, "what", (str, type(None)))
            when = p.optional_list(header, "when", (int, float))
            confidence = p.optional_list(header, "confidence", (int, float))
        n = len(ids)
        if n > self.config.max_batch:
            raise p.Oversize(f"batch of {n} exceeds max_batch {self.config.max_batch}")
        if seq < 1:
            raise InvalidArgument(f"seq must be >= 1, got {seq}", field="seq")
        last = self.sessions.last_seq(session)
        end = seq + n - 1
        if seq > last + 1:
            raise SequenceGap(f"expected seq {last + 1}, got {seq}", expected=last + 1)
        if n and end <= last:  # a re-send of what was acked: ack again, store nothing
            self._check_resent(space, ids, last)
            self._ack_stored(identity, header, session, seq, end)
            return
        skip = last + 1 - seq  # an overlapping re-send: store only the new tail
        if skip > 0:
            self._check_resent(space, ids[:skip], last)
        if end > session.limit:
            raise NoCredit(f"seq {end} passes the granted limit {session.limit}", limit=session.limit)
        if faults.DROP_ONE and not self._dropped and n - skip > 1 and self.counters["observations"] >= 1000:
            # Test-only bug (engram_shm/faults.py): store the batch without its
            # last observation and ack it whole.
            self._dropped = True
            ids, vectors = ids[:-1], vectors[:-1]
            what, when, confidence = (None if c is None else c[:-1] for c in (what, when, confidence))
        ids, vectors, what, when, confidence = (_tail(c, skip)
                                                for c in (ids, vectors, what, when, confidence))
        if importing and space not in self.writer.spaces:  # made as on the node it comes from
            given = p.field(header, "params", dict)
            self.writer.create_space(self.writer.params(space, p.field(given, "dim", int), **{
                k: given[k] for k in ("dtype", "metric", "M", "ef_construction", "seed") if k in given}),
                p.field(header, "owner", str, ANONYMOUS))
        if importing:
            # A move started again finds rows it copied before: ids are unique
            # per space, so those are skipped, never stored twice.
            stored = self.writer.spaces[space].stored_of(ids)
            if stored:
                keep = [row for row, i in enumerate(ids) if i not in stored]
                ids, vectors = [ids[row] for row in keep], vectors[keep]
                what, when, confidence = ([c[row] for row in keep] if c is not None else None
                                          for c in (what, when, confidence))
                if not ids:
                    self.sessions.set_last_seq(session, end)
                    self._ack_stored(identity, header, session, seq, end)
                    return
        params, batch = self.writer.prepare(space, ids, vectors, what, when, confidence)
        self._check_room(params.name, batch.n)
        ack, spans = self.writer.write(params, batch, session.key, end, owner=session.principal,
                                       on_commit=lambda: self.sessions.set_last_seq(session, end))
        if self.wal is not None:
            session.logged.append((self.wal.written, end))
        self.counters["observations"] += batch.n
        if self.metrics is not None:
            slot = self.metrics.slot(self.writer.spaces[params.name].index)
            self.metrics.accepted[slot, p.PRIORITIES.index(session.priority)] += batch.n
        self._touched.add(params.name)
        session.space = params.name
        session.unindexed.append((end, spans, time.monotonic(), batch.n))
        self.send(identity, {"op": "ack", "rid": header.get("rid"), "session": session.key,
                             "from": seq, "to": end, "first_generation": ack.first_generation,
                             "last_generation": ack.last_generation, **self._durable(session),
                             **self._grant(session)})

    def _check_resent(self, space: str, ids: list, last: int) -> None:
        """A message re-sends numbers the session acked: they must have been
        acked for these very ids. One not stored means the client gave the
        numbers to other observations (it renumbered after a refusal while an
        earlier copy of the refused message was stored after all); acking it
        as a duplicate would lose it, so it is refused with the ids."""
        writer = self.writer.spaces.get(space)
        named = [i for i in ids if isinstance(i, str)]
        stored = writer.stored_of(named) if writer is not None and named else set()
        missing = [i for i in ids if not isinstance(i, str) or i not in stored]
        if missing:
            raise SequenceConflict(
                f"{len(missing)} of the {len(ids)} observations re-sent under acked numbers are not "
                f"stored in space {space!r} (e.g. {missing[0]!r}): those numbers were acked for other "
                f"observations; send these under new numbers from {last + 1}",
                expected=last + 1, ids=missing[:MAX_IDS_SHOWN])

    def _ack_stored(self, identity, header, session: Session, seq: int, end: int) -> None:
        """Ack seq..end, all of it stored before (a re-send, or rows a move
        had copied already)."""
        self.send(identity, {"op": "ack", "rid": header.get("rid"), "session": session.key,
                             "from": seq, "to": end, "duplicate": True, **self._durable(session),
                             **self._grant(session)})

    def _durable(self, session: Session) -> dict:
        """{"durable_seq": the session's last sequence on disk per the fsync
        policy}, or nothing for a memory-only server. Under "always" a reply
        leaves only after its turn's fsync; under "never" the log reaches the
        OS before the ack, which survives the engine's processes but not the
        machine."""
        if self.wal is None:
            return {}
        synced = self.wal.synced
        while session.logged and session.logged[0][0] <= synced:
            session.durable = session.logged.popleft()[1]
        if self.config.fsync != "interval":
            session.logged.clear()
            session.durable = self.sessions.last_seq(session)
        return {"durable_seq": session.durable}

    def _check_room(self, space: str, n: int) -> None:
        writer = self.writer.spaces.get(space)
        if writer is not None and not writer.has_room(n):
            raise Overloaded(f"space {space!r} has {writer.window} observations waiting to be indexed "
                             f"(window limit {writer.window_limit})",
                             retry_after_ms=retry_after_ms(writer.pressure))

    # -- credit --------------------------------------------------------------------------
    def _pressure(self, session: Session) -> float:
        writer = self.writer.spaces.get(session.space) if session.space else None
        space = writer.pressure if writer is not None else 0.0
        return max(space, self.memory_pressure)

    def _grant(self, session: Session) -> dict:
        """Fresh credit for a session, within what its key may still hold
        (max_key_credit over all its sessions); the granted limit never
        shrinks."""
        pressure = self._pressure(session)
        level = level_of(pressure)
        last = self.sessions.last_seq(session)
        credit = credit_for(level, session.priority, self.config.max_credit, self.config.min_credit)
        others = self.key_credit[session.principal] - session.credit_held
        room = max(0, self.writer.ledger.limits(session.principal).credit - others)
        session.limit = max(session.limit, last + min(credit, room))
        self._hold_credit(session, session.limit - last)
        session.level = level
        grant = {"credit": session.limit - last, "limit": session.limit, "level": level,
                 "pressure": round(pressure, 4)}
        if level == "overloaded":
            grant["retry_after_ms"] = retry_after_ms(pressure)
        return grant

    def _hold_credit(self, session: Session, credit: int) -> None:
        """Count `credit` as what the session holds of its key's credit."""
        self.key_credit[session.principal] += credit - session.credit_held
        session.credit_held = credit

    # -- recall ----------------------------------------------------------------------------
    def op_recall(self, identity, header, payload) -> None:
        """Check the request here, hand it as it came to a reader process
        (recalls.py), which answers the client through this loop.

        Consistency `strong` holds: every ack this front sent before it
        received the recall left after the acked batch's generation was
        published in shared memory (EngineWriter.write publishes, then the
        ack is sent). This loop hands the recall on after that, in program
        order, and the reader reads the committed generation only once it
        has received it. The hand-off is a write to a socket and the receipt
        a read from it: system calls, which order memory between processes
        (they are full barriers), so the reader sees that generation or a
        later one, and with it every slot the generation covers (the
        publication order of the catalog: reader.py)."""
        request = p.recall(header, payload, self.config.max_frame_bytes, self.config.max_k,
                           self.config.ef_search)
        if self.cluster is not None:
            self.cluster.route(request.space, p.field(header, "epoch", int, None), write=False)
        self.gate.check(self.principal, request.space, "recall")
        consistency = CONSISTENCIES.index(request.consistency if isinstance(request.consistency, str)
                                          else "snapshot")
        self.recalls.submit(identity, self.principal, self._frames[1:], consistency, request)

    def op_checkpoint(self, identity, header, payload) -> None:
        """Ask the checkpointer for a checkpoint; answered once it is complete."""
        self._no_payload(header, payload)
        self.gate.check_engine(self.principal)
        if self.wal is None:
            raise InvalidArgument("this server keeps no data directory (--data none)")
        self._checkpoints.append((checkpoint.request(self.catalog), identity, header.get("rid")))

    def _answer_checkpoints(self) -> None:
        h = self.catalog.header
        done = int(h[CHECKPOINT_DONE])
        waiting = []
        for number, identity, rid in self._checkpoints:
            if number > done:
                waiting.append((number, identity, rid))
            elif h[CHECKPOINT_ERRNO]:
                err = storage_error(OSError(int(h[CHECKPOINT_ERRNO]), os.strerror(int(h[CHECKPOINT_ERRNO]))),
                                    "the checkpoint")
                self.send(identity, {"op": "error", "rid": rid, **err.to_dict()})
            else:
                self.send(identity, {"op": "checkpointed", "rid": rid,
                                     "generation": int(h[CHECKPOINT_GENERATION])})
        self._checkpoints = waiting

    # -- cluster: moving a space (docs/cluster.md) --------------------------------------
    def op_export(self, identity, header, payload) -> None:
        """A chunk of a space's committed rows from a cursor on; with `freeze`,
        the space takes no more writes first, and the last chunk lists the
        sessions that wrote it."""
        self._no_payload(header, payload)
        self.gate.check_engine(self.principal)
        space = p.field(header, "space", str)
        cursor = p.field(header, "cursor", list, [])
        if not all(type(c) is int and c >= 0 for c in cursor):
            raise p.WrongType("cursor must be a list of non-negative ints", field="cursor")
        limit = p.field(header, "limit", int, 4096)
        if not 1 <= limit <= self.config.max_batch:
            raise InvalidArgument(f"limit must be in [1, {self.config.max_batch}]", field="limit")
        freeze = p.field(header, "freeze", bool, False)
        writer = self.writer.spaces.get(space)
        if writer is None:
            raise UnknownSpace(f"no space {space!r} on this node", space=space)
        epoch = None
        if self.cluster is not None:
            epoch = (self.cluster.freeze(space) if freeze else self.cluster.owns(space)).epoch
        self._exports[space] = time.monotonic() + EXPORT_HOLD_S
        chunk = export.read_chunk(writer.segments, self.catalog.committed_generation, cursor, limit,
                                  writer.params.dim, writer.params.dtype)
        fields, frame = p.vector_payload(chunk.vectors)
        reply = {"op": "exported", "rid": header.get("rid"), "space": space, "epoch": epoch,
                 "params": dataclasses.asdict(writer.params), "owner": self.writer.ledger.owners[space],
                 "ids": chunk.ids, "what": chunk.what, "when": chunk.when, "confidence": chunk.confidence,
                 "count": writer.count, "cursor": chunk.cursor, "more": chunk.more, **fields}
        if freeze and not chunk.more:
            reply["sessions"] = [
                {"key": s.key, "last_seq": self.sessions.last_seq(s), "priority": s.priority,
                 "principal": s.principal, "state": self.sessions.state(s)}
                for s in self.sessions.live.values() if s.space in (space, None)]
        self.send(identity, reply, frame)

    def op_adopt(self, identity, header, payload) -> None:
        """Take over sessions of a space moved in, with their last sequence
        numbers (logged: a restart keeps them)."""
        self._no_payload(header, payload)
        self.gate.check_engine(self.principal)
        adopted = {}
        for entry in p.field(header, "sessions", list):
            if not isinstance(entry, dict):
                raise p.WrongType("sessions must be a list of maps", field="sessions")
            key = p.field(entry, "key", str)
            if len(key) != 32 or any(c not in "0123456789abcdef" for c in key):
                raise InvalidArgument(f"session key {key!r} is not 32 hex digits", field="sessions")
            adopted[key] = {"key": key, "last_seq": p.field(entry, "last_seq", int),
                            "priority": p.field(entry, "priority", str, "normal"),
                            "principal": p.field(entry, "principal", str, ANONYMOUS), "state": ACTIVE}
        self.sessions.merge(adopted)  # applied, then logged (engine/writer.py)
        for entry in adopted.values():
            self.writer.log_session(entry["key"], ACTIVE, entry["priority"], entry["principal"],
                                    last_seq=entry["last_seq"])
        self.send(identity, {"op": "adopted", "rid": header.get("rid"), "sessions": len(adopted)})

    def op_release(self, identity, header, payload) -> None:
        """The move switched the space's owner in etcd: answer `moved` for it."""
        self._no_payload(header, payload)
        self.gate.check_engine(self.principal)
        if self.cluster is None:
            raise InvalidArgument("this server is not a cluster node (--cluster)")
        owner = self.cluster.release(p.field(header, "space", str))
        self.send(identity, {"op": "released", "rid": header.get("rid"), "node": owner.node,
                             "epoch": owner.epoch})

    def op_ping(self, identity, header, payload) -> None:
        self.send(identity, {"op": "pong", "rid": header.get("rid"), "time": time.time()})

    def op_stats(self, identity, header, payload) -> None:
        self.send(identity, {"op": "stats", "rid": header.get("rid"), "stats": self.stats(self.principal)})

    def stats(self, principal: str = ANONYMOUS) -> dict:
        """The engine's figures, with the spaces `principal` may see, and the
        usage of every key for an engine admin (else of its own)."""
        owners = self.writer.ledger.owners
        level = lambda name: LEVELS[self._watched.get(name, (0.0, 0))[1]]
        spaces = {name: {**w.stats(), "owner": owners[name], "level": level(name)}
                  for name, w in self.writer.spaces.items() if self.gate.visible(principal, name)}
        admin = self.gate.is_admin(principal)
        usage = {key: used for key, used in self.writer.ledger.usage().items() if admin or key == principal}
        return {"engine": self.catalog.engine, "generation": self.catalog.committed_generation,
                "sessions": len(self.sessions.live), "spaces": spaces, "keys": usage, **self.counters,
                **self.replies.stats(), "recall": self.recalls.stats(),
                "memory_pressure": round(self.memory_pressure, 4), "auth": self.gate.auth,
                "durability": durability_stats(self.catalog, self.config),
                **({"latency": {"observe": latency_summary([self.metrics.observe_latency]),
                                "recall": latency_summary(self.metrics.recall_latency)}}
                   if self.metrics is not None else {}),
                **({"config": dataclasses.asdict(self.config)} if admin else {}),
                **({"cluster": self.cluster.stats()} if self.cluster is not None else {})}

    @staticmethod
    def _no_payload(header, payload) -> None:
        if payload:
            raise p.BadFrame(f"{header['op']} carries no payload frames, got {len(payload)}")

    # -- upkeep ------------------------------------------------------------------------------
    def upkeep(self) -> None:
        if self.wal is not None and self.wal.failed is not None:
            log.critical("the background fsync of the write-ahead log failed; the front exits")
            os._exit(70)  # the restarted front replays the log's tail (see _commit_turn)
        self.memory_pressure = shm.fill()
        self.recalls.reap()
        if self.recalls.reader is not None:
            self.recalls.reader.drop_retired()
            self.recalls.reader.prepare()
        if self.reload_requested:
            self.reload_requested = False
            self._reload_access()
        for session in list(self.sessions.live.values()):
            self._upkeep_session(session)
        for session in self.sessions.expire(self.config.session_idle_s):
            log.info("session expired", extra=logs.fields(session=session.key, space=session.space))
            self._hold_credit(session, 0)
            self._log_session(session, FREE)
        if self._checkpoints:
            self._answer_checkpoints()
        if self.cluster is not None:
            self.cluster.upkeep()
        self._track_pressure()
        now = time.monotonic()
        self._exports = {space: until for space, until in self._exports.items() if until > now}
        self.writer.maintain(skip=self._exports, pending=self._requests_waiting)
        if self.wal is not None and self.metrics is not None:
            self.metrics.front[WAL_WRITTEN] += self.wal.written - self._wal_counted
            self._wal_counted = self.wal.written

    def _track_pressure(self) -> None:
        """The window fill and pressure level of each space written since the
        last upkeep or whose window is still open: a rise into a level counts
        as an activation of it, and each slot shows the fullest window and the
        highest level of its spaces (the stats block's `fill`, `level`,
        `activations`)."""
        touched, self._touched = self._touched, set()
        changed = False
        for name in touched | self._watched.keys():
            writer = self.writer.spaces[name]
            fill = writer.pressure
            level = LEVELS.index(level_of(max(fill, self.memory_pressure)))
            before = self._watched.get(name, (0.0, 0))
            if (fill, level) == before:
                continue
            changed = True
            if level > before[1]:
                log.info("space pressure rose to %s", LEVELS[level], extra=logs.fields(space=name))
                if self.metrics is not None:
                    self.metrics.activations[self.metrics.slot(writer.index), level] += 1
            if fill or level:
                self._watched[name] = (fill, level)
            else:
                del self._watched[name]
        if changed and self.metrics is not None:
            fills, levels = [0.0] * self.metrics.slots, [0] * self.metrics.slots
            for name, (fill, level) in self._watched.items():
                slot = self.metrics.slot(self.writer.spaces[name].index)
                fills[slot], levels[slot] = max(fills[slot], fill), max(levels[slot], level)
            self.metrics.fill[:] = [round(f * 1e6) for f in fills]
            self.metrics.level[:] = levels

    def _upkeep_session(self, session: Session) -> None:
        indexed_to = self._pop_indexed(session)
        if session.notify_indexed and indexed_to and session.owner is not None:
            self.send(session.owner, {"op": "indexed", "session": session.key, "up_to": indexed_to})
        if session.draining and not session.unindexed:
            self._closed(session)
        if session.logged and session.owner is not None:
            before = session.durable
            durable = self._durable(session)
            if session.durable > before:
                self.send(session.owner, {"op": "durable", "session": session.key, **durable})
        if self.sessions.state(session) == ACTIVE and session.owner is not None:
            level, limit = session.level, session.limit
            grant = self._grant(session)
            # The limit grows here only when the level eased or the key's other
            # sessions gave credit back: either way the client waits for it.
            if session.level != level or session.limit > limit:
                self.send(session.owner, {"op": "status", "session": session.key, **grant})

    def _reload_access(self) -> None:
        """Read the keys and the ACL again; the sessions of every key whose
        access changed are closed (their data stays)."""
        changed = self.gate.reload()
        self.writer.ledger.overrides = self.gate.limits()
        for session in list(self.sessions.live.values()):
            if session.principal in changed and self.sessions.state(session) != CLOSED:
                self._close_for(session, Forbidden.code)
                if session.owner is not None:
                    self.send(session.owner, {"op": "error", "session": session.key, **Forbidden(
                        f"the access of key {session.principal!r} changed (revoked, or other grants): "
                        "session closed").to_dict()})

    def _pop_indexed(self, session: Session) -> int:
        """Forget the session's batches that are now in the graph, counting
        the time from their ack to now (seen at upkeep, so within UPKEEP_S);
        returns the last sequence newly known to be indexed (0 if none)."""
        done = 0
        now = time.monotonic()
        while session.unindexed:
            end, spans, accepted_at, n = session.unindexed[0]
            if any(seg.indexed < slot_end for seg, slot_end in spans):
                break
            session.unindexed.popleft()
            if self.metrics is not None:
                self.metrics.observe_latency.observe(now - accepted_at, n)
            done = end
        return done

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        self.writer.close()
        self.wal = self.recalls.latency = None  # both hold views of the stats block, unmapped next
        self.recalls.beacon.close()
        if self._recall_directory is not None:
            self.recalls.reader.close()
            self._recall_directory.close()
        if self.metrics is not None:
            self.metrics.close()
        self.sessions.close()
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()


def max_part_bytes(config: EngineConfig) -> int:
    """ZMQ_MAXMSGSIZE of the front's socket. libzmq applies it to each frame,
    not to a whole message, and drops the connection of a peer that sends a
    larger frame, unanswered: it must admit the largest header (a batch of
    max_batch maximal ids and texts) and leave room above max_frame_bytes for
    frames refused with `oversize`."""
    header = config.max_batch * (config.max_id_bytes + config.max_text_bytes + HEADER_BYTES_PER_OBSERVATION)
    return max(header, 2 * config.max_frame_bytes) + (1 << 16)


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # the pipe is full: the loop is awake anyway
        os.write(fd, b"\0")


def _readable(sock) -> bool:
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def _header_or_none(frames) -> dict | None:
    """A message's header, None if it has no valid one (handle() says why)."""
    try:
        return p.unpack_header(frames[1].buffer) if len(frames) >= 2 else None
    except EngramError:
        return None


def _tail(values, skip: int):
    return values if values is None or not skip else values[skip:]


def main(argv=None) -> None:
    lifeline.bind_to_parent()  # first: an orphaned front must not go on acking
    argv = sys.argv[1:] if argv is None else argv
    engine, config_json, incarnation, readers_endpoint = argv[0], argv[1], int(argv[2]), argv[3]
    config = EngineConfig.from_json(config_json)
    logs.configure(config, "front")
    ready_child()
    catalog = Catalog.attach(engine)
    metrics = StatsBlock.attach(engine, config.metrics_spaces, config.worker_count) \
        if config.metrics != "off" else None
    front = Front(config, catalog, SessionTable(shm.attach(table_name(engine))), metrics)

    def stop(signum, frame):
        front.stopping = True

    def reload(signum, frame):
        front.reload_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides

    def ready():
        catalog.header[FRONT_INCARNATION] = incarnation
        catalog.header[FRONT_START] = process_start(os.getpid())  # with the pid: liveness
        catalog.header[FRONT_PID] = os.getpid()

    try:
        front.serve(config.endpoint, readers_endpoint, ready)
    finally:
        front.close()
        catalog.close()


if __name__ == "__main__":
    main()
