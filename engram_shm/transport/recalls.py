"""Who answers a recall: the front's loop itself, or a reader process
(recall_worker.py).

The front checks a recall on its loop. A small one (one part of at most
INLINE_MAX_K rows) it answers there and then, with its own Reader of the
shared memory, unless other recalls want the loop too (one in flight at the
readers, an answer of theirs to relay, or another recall next in
line: the front reads the message behind the recall to tell, and handles
it next) or such answers took more than `recall_inline_share` of the
loop's time (a budget refilled at that rate, banked up to INLINE_BURST_S).
So an answer on the loop delays a batch behind it by one search at most,
and many recalls at once go to the readers, which search in parallel. A
batch waiting behind a recall does not send it to a reader: the hand-off
costs the recall more than the search costs the batch (the front is busy
with the batch meanwhile, and the reader, at a lower priority, waits for
a core; docs/architecture.md). Under
ingestion a hand-off costs two more relays and wakes a reader process, each
a wait for a core the index workers hold, which was most of a served
recall's time beyond the search itself (docs/architecture.md). Any other
recall goes, its client's frames unchanged, to the least-loaded reader; the
reader searches the shared memory and sends back each `recall_result`
already packed, which the front relays as it is, so that a heavy recall
costs the loop two relays per part, never the search or the decoding of
rows. Limits: `recall_concurrency` recalls in flight at the readers in
total and `recall_concurrency_per_key` per principal, past which a recall
is refused at once with `busy`.

The readers' socket is a ROUTER the front binds at an ipc:// endpoint in a
directory private to the server (mode 0700; server.py): only this user can
connect, so no other local user can hand the front's readers work or read
answers (a loopback TCP port is open to every local user), and no port is
taken. Messages (frame 0 is the kind):

| from   | frames                                          | when                         |
|--------|-------------------------------------------------|------------------------------|
| reader | HELLO, msgpack {pid, start}                     | at start, then every HELLO_S |
| front  | WELCOME                                         | to a reader it did not know  |
| front  | JOB, job id, client header frame, cue frame     | a recall to answer           |
| reader | PART or LAST, job id, frame 0 for the client    | each part of the answer      |

Readers are known by their hellos, so a restarted front learns them within
HELLO_S. While no reader is known (the server is starting, or every reader
is being restarted) a recall waits, counted in flight, up to READER_WAIT_S,
then gets `busy`. A reader that dies (its pid and start time no longer name a live
process, or its socket is gone) has its recalls answered with `internal`
(retryable); the supervisor restarts it. Job ids start at a random number
per front, so a part a reader sends to a front that has since restarted is
never taken for an answer to another recall.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import zmq

from ..config import EngineConfig
from ..engine.beacon import RecallBeacon
from ..engine.reader import Reader
from ..errors import Busy, EngineClosed, EngramError, Internal
from ..store.catalog import process_start
from . import protocol as p

log = logging.getLogger(__name__)

HELLO, WELCOME, JOB, PART, LAST = b"H", b"W", b"J", b"P", b"L"
HELLO_S = 0.5
READER_WAIT_S = 10.0  # a reader restarts within the supervisor's back-off (at most 5 s) and a warm-up
SERVICE_WEIGHT = 0.1  # of the latest recall in the moving average that paces retries after busy
INLINE_MAX_K = 100  # rows an answer on the loop may decode and pack
INLINE_BURST_S = 0.05  # of loop time the inline budget banks while no recall comes


def answer(send: Callable[[bytes, bool], None], reader: Reader, config: EngineConfig, frames: list,
           request: p.Recall | None = None) -> None:
    """Search for one recall (its header and cue frames; `request`: those
    frames as the front's loop checked them already) and send its answer
    part by part, `send(frame 0 of the client's message, last)`, or an error."""
    rid = None if request is None else request.rid
    try:
        if request is None:
            header = p.unpack_header(frames[0].buffer)
            rid = header.get("rid")
            request = p.recall(header, frames[1:], config.max_frame_bytes, config.max_k, config.ef_search)
        found = reader.find(request.space, request.cue, request.k, request.consistency, request.threshold,
                            request.ef)
        parts = max(1, -(-len(found) // request.batch))
        for part in range(parts):
            lo = part * request.batch
            more = part < parts - 1
            send(p.recall_result(rid, found.memories(lo, lo + request.batch), part, more, found.generation),
                 not more)
    except EngramError as e:
        send(p.pack({"op": "error", "rid": rid, **e.to_dict()})[0], True)
    except Exception as e:  # a bug must cost one recall, never its process
        log.exception("internal error on a recall")
        err = Internal(f"internal error: {type(e).__name__}: {e}")
        send(p.pack({"op": "error", "rid": rid, **err.to_dict()})[0], True)


@dataclass(eq=False)
class _Reader:
    identity: bytes
    pid: int
    start: int
    jobs: set = field(default_factory=set)


@dataclass(eq=False)
class _Job:
    client: bytes  # identity of the client's connection
    rid: object
    principal: str
    started: float
    frames: list | None  # the request, until a reader has it
    consistency: int  # its index in stats_block.CONSISTENCIES
    reader: _Reader | None = None


class RecallDispatch:
    def __init__(self, config: EngineConfig, reply: Callable[[bytes, list], None], latency: list | None,
                 reader: Reader | None = None, recall_waits: Callable[[], bool] = lambda: False,
                 beacon: RecallBeacon | None = None):
        self.config = config
        self.beacon = beacon  # stamped as a recall is handed off (engine/beacon.py)
        self.reader = reader  # the front's own, for answers on the loop (None: none there)
        self.recall_waits = recall_waits  # does another recall want the loop?
        self._inline_s = INLINE_BURST_S  # the loop time answers on it may take now
        self._inline_at = time.monotonic()
        self.sock = None  # the readers' ROUTER socket, set by the front's loop
        self.limit = config.recall_concurrency
        self.per_key = config.recall_concurrency_per_key
        self.reply = reply  # (client identity, frames) -> None: the front's reply path
        self.latency = latency  # a Histogram per consistency (None: not recorded): hand-off to last part
        self._readers: dict[bytes, _Reader] = {}
        self._jobs: dict[bytes, _Job] = {}
        self._waiting: collections.deque = collections.deque()  # ids of jobs no reader has yet
        self._by_principal: collections.Counter = collections.Counter()
        self._job_ids = itertools.count(secrets.randbits(62))
        self.service_s = 0.01  # moving average of a recall's time from submission to its last part
        self.counters = {"recalls": 0, "inline": 0, "busy": 0, "reader_deaths": 0}

    def submit(self, client: bytes, principal: str, frames: list, consistency: int,
               request: p.Recall) -> None:
        """Answer a checked recall (its header and cue frames, and `request`,
        what the check made of them) here, or hand it to the reader with the
        fewest in flight, or refuse it with Busy."""
        if self._answer_here(client, frames, consistency, request):
            return
        if len(self._jobs) >= self.limit:
            raise self._busy(f"{len(self._jobs)} recalls are in flight (recall_concurrency {self.limit})")
        if self._by_principal[principal] >= self.per_key:
            raise self._busy(f"{principal!r} has {self._by_principal[principal]} recalls in flight "
                             f"(recall_concurrency_per_key {self.per_key})")
        job_id = next(self._job_ids).to_bytes(8, "little")
        self._jobs[job_id] = _Job(client, request.rid, principal, time.monotonic(), frames, consistency)
        self._by_principal[principal] += 1
        self.counters["recalls"] += 1
        self._waiting.append(job_id)
        if self.beacon is not None:
            self.beacon.begin()  # the hand-off's hops are the recall's time too
        self._dispatch()

    def _answer_here(self, client: bytes, frames: list, consistency: int, request: p.Recall) -> bool:
        if self.reader is None or self._jobs or request.k > min(request.batch, INLINE_MAX_K) \
                or self.recall_waits():
            return False
        now = time.monotonic()
        self._inline_s = min(INLINE_BURST_S,
                             self._inline_s + (now - self._inline_at) * self.config.recall_inline_share)
        self._inline_at = now
        if self._inline_s <= 0:
            return False
        answer(lambda frame, last: self.reply(client, [frame]), self.reader, self.config, frames, request)
        seconds = time.monotonic() - now
        self._inline_s -= seconds
        self.counters["recalls"] += 1
        self.counters["inline"] += 1
        if self.latency is not None:
            self.latency[consistency].observe(seconds)
        return True

    def _dispatch(self) -> None:
        """Hand the waiting jobs out, each to the reader with the fewest."""
        while self._waiting and self._readers:
            job_id = self._waiting[0]
            job = self._jobs[job_id]
            reader = min(self._readers.values(), key=lambda r: len(r.jobs))
            try:
                self.sock.send_multipart([reader.identity, JOB, job_id, *job.frames], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:  # EHOSTUNREACH: its socket is gone (the pipe has no bound)
                log.warning("recall reader pid %d cannot be reached (%s)", reader.pid, e.strerror)
                self._lost(reader)
                continue
            self._waiting.popleft()
            job.reader, job.frames = reader, None
            reader.jobs.add(job_id)

    def _busy(self, why: str) -> Busy:
        self.counters["busy"] += 1
        return Busy(why, retry_after_ms=max(1, round(self.service_s * 1000)))

    def on_message(self, frames: list) -> None:
        """A message from a reader: a hello, or a part of an answer to relay."""
        identity, kind = frames[0].bytes, frames[1].bytes
        if kind == HELLO:
            if identity not in self._readers:
                hello = msgpack.unpackb(frames[2].bytes)
                self._readers[identity] = _Reader(identity, hello["pid"], hello["start"])
                self.sock.send_multipart([identity, WELCOME], zmq.NOBLOCK)
                log.info("recall reader pid %d is ready", hello["pid"])
                self._dispatch()
            return
        job = self._jobs.get(frames[2].bytes)
        if job is None:
            return  # answered already (its reader was given up for dead), or asked of a former front
        self.reply(job.client, [frames[3]])
        if kind == LAST:
            self._finish(frames[2].bytes)
            seconds = time.monotonic() - job.started
            self.service_s += SERVICE_WEIGHT * (seconds - self.service_s)
            if self.latency is not None:
                self.latency[job.consistency].observe(seconds)

    def _finish(self, job_id: bytes) -> _Job:
        job = self._jobs.pop(job_id)
        if job.reader is not None:
            job.reader.jobs.discard(job_id)
        self._by_principal[job.principal] -= 1
        if not self._by_principal[job.principal]:
            del self._by_principal[job.principal]
        return job

    def reap(self) -> None:
        """Give up the readers that died, answering their recalls, and the
        recalls that waited too long for any reader."""
        for reader in list(self._readers.values()):
            if process_start(reader.pid) != reader.start:
                log.warning("recall reader pid %d died with %d recalls in flight", reader.pid,
                            len(reader.jobs))
                self._lost(reader)
        cutoff = time.monotonic() - READER_WAIT_S
        late = []
        while self._waiting and self._jobs[self._waiting[0]].started < cutoff:
            late.append(self._waiting.popleft())
        if late:
            self._fail(late, self._busy(f"no recall reader was ready within {READER_WAIT_S:.0f} s"))

    def _lost(self, reader: _Reader) -> None:
        del self._readers[reader.identity]
        self.counters["reader_deaths"] += 1
        self._fail(reader.jobs, Internal(f"the reader answering this recall (pid {reader.pid}) died; "
                                         "retry"))

    def _fail(self, job_ids, error: EngramError) -> None:
        for job_id in list(job_ids):
            job = self._finish(job_id)
            self.reply(job.client, p.pack({"op": "error", "rid": job.rid, **error.to_dict()}))

    def close(self) -> None:
        """Answer the recalls still in flight: the front is stopping."""
        self._waiting.clear()
        self._fail(self._jobs, EngineClosed("the server is shutting down"))

    def stats(self) -> dict:
        return {"readers": [{"pid": r.pid, "in_flight": len(r.jobs)} for r in self._readers.values()],
                "in_flight": len(self._jobs), "waiting": len(self._waiting),
                "service_ms": round(self.service_s * 1000, 3), **self.counters}


def hello_frames(pid: int) -> list[bytes]:
    return [HELLO, msgpack.packb({"pid": pid, "start": process_start(pid)})]

