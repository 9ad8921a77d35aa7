"""The chaos suite's load: clients that stream at a steady rate or in bursts,
stamp observations with a skewed clock, retry whatever the network or the
engine refuses or loses, and record everything the validators check.

`ChaosClient` is the real `engram_shm.Client` (the protocol's retries, resume
and re-sends are the ones under test) with a record of what happened:
- `acked`: id -> the sequence number its batch was acked at (a batch counts
  as acked once the client drops it from its queue because the server's
  acks, its `init_ack` after a resume or a `sequence_gap` say the session
  holds it);
- `acks`: every ack message (session, from, to, duplicate, first generation);
- `resumes`: (the client's last acked sequence, the server's `last_sequence`)
  at every resume;
- `refusals` by code, `retried` batches, `timeouts` (silences it reconnected
  after), and `visibility`: seconds from an ack to the `indexed` notice that
  covers it.

A batch the disk refuses (`storage_error`, `storage_full`) keeps its place
and numbers in the client's queue and goes again; `ChaosClient` does not
raise that refusal: the scenario's clients retry until acked. A refusal that
is not retryable is recorded and the batch given up (`failed`): the
validators then report it.
"""

from __future__ import annotations

import collections
import threading
import time
import zlib

import numpy as np

from engram_shm.transport import protocol as p
from engram_shm.transport.client import HELD_CODES, Client, ClientTimeout, _Batch

SPACE = "chaos"


class ChaosClient(Client):
    def __init__(self, endpoint: str, **options):
        self.acked: dict[str, int] = {}
        self.acks: list[tuple[str, int, int, bool, int | None]] = []
        self.resumes: list[tuple[int, int]] = []
        self.refusals: collections.Counter = collections.Counter()
        self.retried = 0
        self.timeouts = 0
        self.failed: list[tuple[str, list[str]]] = []  # (code, ids) given up
        self.visibility: list[float] = []
        self._unseen: collections.deque = collections.deque()  # (to, ack time) not yet indexed
        self._given_up: set[int] = set()
        self.closed_at: int | None = None  # the server's last_sequence at close
        super().__init__(endpoint, notify_indexed=True, **options)

    # -- recording ------------------------------------------------------------------
    def _settle(self, before: list[_Batch]) -> None:
        """Batches that left the queue, not given up, are acked at their numbers."""
        after = {id(b) for b in self._queue}
        for b in before:
            if id(b) not in after and id(b) not in self._given_up and b.start is not None:
                for i, obs_id in enumerate(b.header["ids"]):
                    self.acked[obs_id] = b.start + i

    def _handshake(self, resume, timeout=None) -> None:
        before, known = list(self._queue), self.last_acked
        super()._handshake(resume, timeout)
        if resume:
            self.resumes.append((known, self.last_acked))
        self._settle(before)

    def _on_message(self, msg: dict) -> None:
        before = list(self._queue)
        op = msg.get("op")
        now = time.monotonic()
        if op == "ack":
            ack = (msg.get("session"), msg["from"], msg["to"], bool(msg.get("duplicate")),
                   msg.get("first_generation"))
            if not ack[3] and (not self.acks or ack not in self.acks[-50:]):  # not a doubled reply
                self._unseen.append((msg["to"], now))
            self.acks.append(ack)
        elif op == "indexed":
            while self._unseen and self._unseen[0][0] <= msg["up_to"]:
                self.visibility.append(now - self._unseen.popleft()[1])
        elif op == "error" and msg.get("rid") in self._by_rid:
            self.refusals[msg.get("code")] += 1
        super()._on_message(msg)
        self._settle(before)

    def _refused(self, batch: _Batch, msg: dict) -> None:
        queued = batch in self._queue and batch.start is not None
        super()._refused(batch, msg)
        if not queued:
            return
        if msg.get("code") in HELD_CODES:  # kept in place by the client: it goes again, unreported
            self._errors.pop()
        elif batch not in self._queue:
            self._given_up.add(id(batch))
            self.failed.append((msg.get("code"), batch.header["ids"]))
            self._errors.pop()

    def _drive(self) -> None:
        waiting = [b for b in self._queue if b.start is None]
        super()._drive()
        for b in waiting:
            if b.start is not None:  # sent now: a retry if it was sent before
                tries = b.__dict__.get("tries", 0)
                b.tries = tries + 1
                self.retried += tries > 0

    # -- sending --------------------------------------------------------------------
    def offer(self, space: str, ids: list[str], vectors: np.ndarray, when: list[float],
              deadline: float) -> None:
        """Queue one batch and send what credit allows; returns once the queue
        has room, however long the faults take (until `deadline`)."""
        header = {"op": "observe_batch", "space": space, "ids": ids, "when": when}
        fields, frame = p.vector_payload(np.ascontiguousarray(vectors, dtype=np.float32))
        header.update(fields)
        self._queue.append(_Batch(header, bytes(frame), len(ids)))
        self.persist(lambda: sum(b.n for b in self._queue) <
                     2 * max(self.batch_size, self.limit - self.last_acked, 1), deadline)

    def persist(self, done, deadline: float) -> bool:
        """Send and read until done() or the deadline, reconnecting through
        every silence (a partition, a dead or stalled engine)."""
        while time.monotonic() < deadline:
            try:
                self._progress_until(done, patience=max(0.0, deadline - time.monotonic()))
                return True
            except ClientTimeout:
                self.timeouts += 1
        return done()

    def idle(self, seconds: float) -> None:
        """Read acks and notices for up to `seconds`."""
        try:
            self._drive()
            self._pump(seconds)
        except ClientTimeout:
            self.timeouts += 1

    def drain(self, deadline: float) -> bool:
        """Everything queued acked (faults over)."""
        return self.persist(lambda: not self._queue, deadline)


class Producer(threading.Thread):
    """One client streaming into SPACE: `rate` observations per second in
    batches of `batch`, plus `burst` observations at each time of `bursts`
    (seconds after start), stamped with time.time() plus the skew of the
    schedule (a list of (from second, skew seconds)). Stops sending at
    `stop`, then drains."""

    def __init__(self, name: str, endpoint: str, dim: int, seed: int, rate: float, batch: int = 100,
                 bursts: list[float] = (), burst: int = 0, skews: list[tuple[float, float]] = (),
                 timeout: float = 2.0):
        super().__init__(name=f"chaos-{name}", daemon=True)
        self.label, self.endpoint, self.dim, self.seed = name, endpoint, dim, seed
        self.rate, self.batch, self.bursts, self.burst = rate, batch, sorted(bursts), burst
        self.skews = sorted(skews)
        self.timeout = timeout
        self.sent: dict[str, tuple[np.ndarray, float]] = {}  # id -> (vector, when)
        self.stop_sending = threading.Event()
        self.drain_until = 0.0  # set before stop_sending
        self.client: ChaosClient | None = None
        self.error: BaseException | None = None
        self.drained = False
        self._batches = 0

    def skew(self, t: float) -> float:
        s = 0.0
        for at, value in self.skews:
            if at <= t:
                s = value
        return s

    def _make(self, n: int, t: float) -> tuple[list[str], np.ndarray, list[float]]:
        rng = np.random.default_rng([self.seed, zlib_hash(self.label), self._batches])
        base = len(self.sent)
        ids = [f"{self.label}-{base + i}" for i in range(n)]
        vectors = rng.standard_normal((n, self.dim)).astype(np.float32)
        when = [time.time() + self.skew(t)] * n
        for i, obs_id in enumerate(ids):
            self.sent[obs_id] = (vectors[i], when[i])
        self._batches += 1
        return ids, vectors, when

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the runner, never swallowed
            self.error = e

    def _run(self) -> None:
        # The first connection may meet the faults too: retry it.
        far = time.monotonic() + 600
        while self.client is None:
            try:
                self.client = ChaosClient(self.endpoint, batch_size=self.batch, timeout=self.timeout)
            except ClientTimeout:
                if self.stop_sending.is_set():
                    raise
        c = self.client
        start = time.monotonic()
        due = 0.0  # observations owed by the steady rate
        last = start
        bursts = list(self.bursts)
        while not self.stop_sending.is_set():
            now = time.monotonic()
            t = now - start
            due = min(due + self.rate * (now - last), 4 * self.batch + self.rate)  # no endless catch-up
            last = now
            todo = []
            while due >= self.batch:
                todo.append(self.batch)
                due -= self.batch
            while bursts and bursts[0] <= t:
                bursts.pop(0)
                todo += [self.batch] * (self.burst // self.batch)
            for n in todo:
                if self.stop_sending.is_set():
                    break
                ids, vectors, when = self._make(n, t)
                c.offer(SPACE, ids, vectors, when, far)
            if not todo:
                c.idle(0.01)
        self.drained = c.drain(self.drain_until)
        if self.drained:  # the last indexed notices, for the visibility figures
            c.persist(lambda: c.indexed_up_to >= c.last_acked, min(self.drain_until, time.monotonic() + 30))
            header = {"op": "close", "session": c.session, "drain": False}
            for _ in range(5):
                try:
                    c.closed_at = c._request(header)[0]["last_sequence"]
                    break
                except ClientTimeout:
                    continue
        c._close_socket()


def zlib_hash(text: str) -> int:
    return zlib.crc32(text.encode())
