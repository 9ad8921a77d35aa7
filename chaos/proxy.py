"""A faulty network between clients and the front: a ZeroMQ proxy that
delays, drops, duplicates and reorders messages, and partitions (drops
everything for a while), driven by seeded random streams.

Clients connect their DEALER to the proxy's ROUTER; for each client
connection the proxy opens its own DEALER to the front, so the front sees
one connection per client as without it (sessions belong to connections),
and a client that reconnects (a new socket) is a new connection there too.
Each message, in each direction, meets the faults of `NetFaults`:

- partition: during a window of the schedule, every message either way is
  dropped (the windows are part of the seeded schedule: chaos/schedule.py);
- drop with probability `drop`; duplicate with probability `duplicate`;
- delay: uniform in [0, delay_ms], first in, first out per connection and
  direction (a slow link, as TCP: nothing overtakes);
- reorder with probability `reorder`: that message is held back a further
  20-80 ms, out of the order, so later ones overtake it.

Decisions come from one random stream per direction, seeded from the run's
seed: the n-th message sent upstream always meets the n-th draw, whatever
the other direction does.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import zmq

UP, DOWN = 0, 1


@dataclass(frozen=True)
class NetFaults:
    delay_ms: float = 0.0
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.drop or self.duplicate or self.reorder)


class FaultyProxy:
    """Run with `start()`, stop with `stop()`; `endpoint` is where clients
    connect. `partitions`: (start, end) seconds after `start()` during which
    everything is dropped. `counts` says what it did."""

    def __init__(self, backend: str, faults: NetFaults, seed: int,
                 partitions: list[tuple[float, float]] = ()):
        self.backend = backend
        self.faults = faults
        self.partitions = sorted(partitions)
        self.rng = (random.Random(f"{seed}-up"), random.Random(f"{seed}-down"))
        self.counts: Counter = Counter()
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.setsockopt(zmq.RCVHWM, 0)
        self._front.setsockopt(zmq.SNDHWM, 0)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._backs: dict[bytes, zmq.Socket] = {}  # client identity -> its DEALER to the front
        self._owner: dict[zmq.Socket, bytes] = {}
        self._due: list = []  # heap of (time, n, direction, identity, frames)
        self._n = itertools.count()
        self._fifo: dict[tuple[int, bytes], float] = {}  # last delivery time per direction and client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self.started = 0.0

    def start(self) -> FaultyProxy:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in [self._front, *self._backs.values()]:
            sock.close(linger=0)
        self._ctx.term()

    def heal(self) -> None:
        """No more faults from now on (messages already held are delivered)."""
        self.faults = NetFaults()
        self.partitions = []

    def partitioned(self, now: float) -> bool:
        t = now - self.started
        return any(a <= t < b for a, b in self.partitions)

    # -- the loop -----------------------------------------------------------------
    def _back(self, identity: bytes) -> zmq.Socket:
        sock = self._backs.get(identity)
        if sock is None:
            sock = self._backs[identity] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(self.backend)
            self._owner[sock] = identity
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _run(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._front, zmq.POLLIN)
        while not self._stop.is_set():
            wait = 5.0
            if self._due:
                wait = max(0.0, min(wait, (self._due[0][0] - time.monotonic()) * 1000))
            for sock, _ in self._poller.poll(wait):
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self._front:
                        self._offer(UP, frames[0], frames[1:])
                    else:
                        self._offer(DOWN, self._owner[sock], frames)
            self._deliver(time.monotonic())

    def _offer(self, direction: int, identity: bytes, frames: list) -> None:
        """One message meets the faults."""
        now = time.monotonic()
        f, rng = self.faults, self.rng[direction]
        self.counts["messages"] += 1
        # Every message takes the same draws, used or not: the n-th message
        # meets the n-th draws whatever the configuration.
        drop, dup, reorder = rng.random(), rng.random(), rng.random()
        delay, extra = rng.uniform(0, f.delay_ms) / 1000, rng.uniform(0.02, 0.08)
        if self.partitioned(now):
            self.counts["partitioned"] += 1
            return
        if drop < f.drop:
            self.counts["dropped"] += 1
            return
        copies = 2 if dup < f.duplicate else 1
        self.counts["duplicated"] += copies - 1
        key = (direction, identity)
        if f.delay_ms:
            self.counts["delayed"] += 1
        at = max(self._fifo.get(key, 0.0), now + delay)
        self._fifo[key] = at
        if reorder < f.reorder:
            self.counts["reordered"] += 1
            at += extra  # held back out of the FIFO: later messages overtake it
        for _ in range(copies):
            heapq.heappush(self._due, (at, next(self._n), direction, identity, frames))

    def _deliver(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, direction, identity, frames = heapq.heappop(self._due)
            if self.partitioned(now):  # in flight when the partition began: lost with it
                self.counts["partitioned"] += 1
                continue
            try:
                if direction == UP:
                    self._back(identity).send_multipart(frames, zmq.NOBLOCK)
                else:
                    self._front.send_multipart([identity, *frames], zmq.NOBLOCK)
                self.counts["delivered"] += 1
            except zmq.ZMQError:  # the client is gone (it reconnected): as a lost message
                self.counts["unroutable"] += 1
