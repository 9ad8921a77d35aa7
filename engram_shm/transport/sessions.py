"""Sessions of the streaming front, kept in a shared-memory table so that a
restarted front resumes them (a client's `init {resume}` finds its last acked
sequence after a front crash as after a reconnect).

Block `engram_<engine>_sessions` (created by the server, written by the front):

| array | dtype | shape            | meaning                                        |
|-------|-------|------------------|------------------------------------------------|
| rows  | int64 | [MAX_SESSIONS, 8]| state, last acked seq, priority, created ns,   |
|       |       |                  | last seen ns                                   |
| keys  | uint8 | [MAX_SESSIONS,16]| the session id's 16 random bytes               |
| principals | uint8 | [MAX_SESSIONS, 64] | the client key that opened it (UTF-8,   |
|       |       |                  | zero-padded; "anonymous" without auth)         |

State 0 marks a free row. Only the principal that opened a session may use
or resume it (docs/security.md). Everything else about a session (its connection,
granted limit, pending close) lives in the front's memory.
"""

from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import NotSessionOwner, SessionClosed, SessionLimit, SessionPaused, UnknownSession, WrongType
from ..limits import ANONYMOUS, PRINCIPAL_BYTES
from ..store import shm
from .protocol import PRIORITIES

MAX_SESSIONS = 4096
FREE, ACTIVE, PAUSED, CLOSED = 0, 1, 2, 3
R_STATE, R_LAST_SEQ, R_PRIORITY, R_CREATED, R_SEEN = range(5)
_ROWS_BYTES = MAX_SESSIONS * 8 * 8
_KEYS_BYTES = MAX_SESSIONS * 16


def table_name(engine: str) -> str:
    return shm.block_name(engine, "sessions")


def create_table(engine: str):
    return shm.create(table_name(engine), _ROWS_BYTES + _KEYS_BYTES + MAX_SESSIONS * PRINCIPAL_BYTES)


@dataclass(eq=False)
class Session:
    key: str
    row: int
    priority: str
    owner: bytes | None = None
    principal: str = ANONYMOUS
    limit: int = 0
    level: str = "normal"
    space: str | None = None
    notify_indexed: bool = False
    # (last seq of a batch, [(segment, end slot)]) not yet known to be indexed
    unindexed: collections.deque = field(default_factory=collections.deque)
    close_rid: object = None
    close_owner: bytes | None = None
    draining: bool = False
    # (log position after a batch, its last seq) not yet known to be on disk
    logged: collections.deque = field(default_factory=collections.deque)
    durable: int = 0  # last sequence known to be on disk
    credit_held: int = 0  # granted beyond the last ack, counted in its key's credit
    closed_reason: str | None = None  # why the server closed it (an error code), if it did


class SessionTable:
    def __init__(self, block):
        self.block = block
        self.rows = np.ndarray((MAX_SESSIONS, 8), np.int64, buffer=block.buf)
        self.keys = np.ndarray((MAX_SESSIONS, 16), np.uint8, buffer=block.buf, offset=_ROWS_BYTES)
        self.principals = np.ndarray((MAX_SESSIONS, PRINCIPAL_BYTES), np.uint8, buffer=block.buf,
                                     offset=_ROWS_BYTES + _KEYS_BYTES)
        self.live: dict[str, Session] = {}
        for row in np.nonzero(self.rows[:, R_STATE] != FREE)[0].tolist():
            key = self.keys[row].tobytes().hex()
            self.live[key] = Session(key, row, PRIORITIES[int(self.rows[row, R_PRIORITY])],
                                     principal=self._principal(row), durable=int(self.rows[row, R_LAST_SEQ]))

    # -- lifecycle ---------------------------------------------------------------
    def open(self, priority: str, owner: bytes, principal: str = ANONYMOUS) -> Session:
        if priority not in PRIORITIES:
            raise WrongType(f"priority must be one of {PRIORITIES}, got {priority!r}", field="priority")
        return self._add(secrets.token_bytes(16).hex(), ACTIVE, priority, 0, owner, principal)

    def _add(self, key: str, state: int, priority: str, last_seq: int, owner: bytes | None,
             principal: str) -> Session:
        free = np.nonzero(self.rows[:, R_STATE] == FREE)[0]
        if not len(free):
            raise SessionLimit(f"the server holds {MAX_SESSIONS} sessions; close some or wait for "
                               "idle ones to expire", retry_after_ms=1000)
        row = int(free[0])
        now = time.time_ns()
        self.keys[row] = np.frombuffer(bytes.fromhex(key), np.uint8)
        raw = principal.encode("utf-8")[:PRINCIPAL_BYTES]
        self.principals[row] = 0
        self.principals[row, :len(raw)] = np.frombuffer(raw, np.uint8)
        self.rows[row, [R_LAST_SEQ, R_PRIORITY, R_CREATED, R_SEEN]] = [
            last_seq, PRIORITIES.index(priority), now, now]
        self.rows[row, R_STATE] = state
        session = Session(key, row, priority, owner, principal, durable=last_seq)
        self.live[key] = session
        return session

    # -- durability ----------------------------------------------------------------
    def snapshot(self) -> list[dict]:
        """Every session as a checkpoint records it."""
        rows = np.nonzero(self.rows[:, R_STATE] != FREE)[0].tolist()
        return [{"key": self.keys[r].tobytes().hex(), "state": int(self.rows[r, R_STATE]),
                 "priority": PRIORITIES[int(self.rows[r, R_PRIORITY])], "principal": self._principal(r),
                 "last_seq": int(self.rows[r, R_LAST_SEQ])} for r in rows]

    def merge(self, recovered: dict[str, dict]) -> None:
        """Apply sessions recovered from a data directory: states as given
        (a session the log only knows from its batches comes back active),
        sequences only forward."""
        for key, entry in recovered.items():
            session = self.live.get(key)
            last = int(entry.get("last_seq", 0))
            if session is None:
                self._add(key, int(entry.get("state", ACTIVE)), entry.get("priority", "normal"), last, None,
                          entry.get("principal", ANONYMOUS))
                continue
            if "state" in entry:
                self.rows[session.row, R_STATE] = int(entry["state"])
            if last > self.last_seq(session):
                self.set_last_seq(session, last)
                session.durable = max(session.durable, last)

    def resume(self, key: str, owner: bytes, principal: str = ANONYMOUS) -> Session:
        """Give a session to a new connection (a reconnect) of the principal
        that opened it; to any other principal it does not exist."""
        session = self.live.get(key)
        if session is None or session.principal != principal:
            raise UnknownSession(f"no session {key!r} (never opened, or expired)", session=key)
        if self.state(session) == CLOSED:
            raise self._closed(session)
        session.owner = owner
        self.touch(session)
        return session

    def get(self, key, owner: bytes, allow_paused: bool = False) -> Session:
        """The session an op names, checked for existence, owner and state."""
        if not isinstance(key, str):
            raise WrongType("field 'session' must be str", field="session")
        session = self.live.get(key)
        if session is None:
            raise UnknownSession(f"no session {key!r} (never opened, or expired)", session=key)
        state = self.state(session)
        if state == CLOSED:
            raise self._closed(session)
        if session.owner != owner:
            raise NotSessionOwner(f"session {key!r} belongs to another connection; "
                                  "init with resume to take it over", session=key)
        if state == PAUSED and not allow_paused:
            raise SessionPaused(f"session {key!r} is paused", session=key)
        self.touch(session)
        return session

    def count(self, principal: str) -> int:
        """Rows held by the sessions of `principal`."""
        return sum(1 for s in self.live.values() if s.principal == principal)

    @staticmethod
    def _closed(session: Session) -> SessionClosed:
        if session.closed_reason is None:
            return SessionClosed(f"session {session.key!r} is closed", session=session.key)
        return SessionClosed(f"session {session.key!r} was closed by the server: {session.closed_reason}",
                             session=session.key, reason=session.closed_reason)

    def _principal(self, row: int) -> str:
        return self.principals[row].tobytes().rstrip(b"\0").decode("utf-8", "replace")

    def set_state(self, session: Session, state: int) -> None:
        self.rows[session.row, R_STATE] = state

    def state(self, session: Session) -> int:
        return int(self.rows[session.row, R_STATE])

    def last_seq(self, session: Session) -> int:
        return int(self.rows[session.row, R_LAST_SEQ])

    def set_last_seq(self, session: Session, seq: int) -> None:
        self.rows[session.row, R_LAST_SEQ] = seq

    def touch(self, session: Session) -> None:
        self.rows[session.row, R_SEEN] = time.time_ns()

    def expire(self, idle_s: float) -> list[Session]:
        """Free the rows of sessions idle for longer than idle_s (closed ones
        too: their id then answers unknown_session)."""
        cutoff = time.time_ns() - int(idle_s * 1e9)
        gone = [s for s in self.live.values() if self.rows[s.row, R_SEEN] < cutoff and not s.draining]
        for s in gone:
            self.rows[s.row, R_STATE] = FREE
            del self.live[s.key]
        return gone

    def close(self) -> None:
        self.rows = self.keys = self.principals = None
        self.live.clear()
        shm.close(self.block)
