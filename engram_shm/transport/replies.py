"""Replies the front's ROUTER socket cannot take yet, kept per peer within a
bound (docs/protocol.md, "Replies").

ROUTER_MANDATORY makes a send fail instead of dropping: EAGAIN when the
peer's pipe is at its high-water mark (it does not read fast enough),
EHOSTUNREACH when the peer is gone. A refused reply waits in its peer's queue,
and so does every later reply to that peer, so a peer always gets its replies
in order; the loop flushes the queues every turn. A peer gone is counted, and
its queue forgotten. A peer whose queue passes `bound_bytes` is a slow
consumer: its queue is dropped and `on_overflow(identity)` closes its
sessions, so one peer that stops reading costs the others nothing (neither
the front's memory nor its loop: a send never blocks).

The socket's SNDHWM is kept low (SNDHWM below) so that what waits for a peer
is counted here in bytes, not hidden in libzmq's pipe, whose mark counts
messages of any size.
"""

from __future__ import annotations

import collections
import errno
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

SNDHWM = 64  # messages in libzmq's pipe per peer: an ack window of a pipelining client, and room


class ReplyQueues:
    def __init__(self, bound_bytes: int, on_overflow: Callable[[bytes], None]):
        self.sock = None  # the ROUTER socket, set by the front's loop
        self.bound_bytes = bound_bytes
        self.on_overflow = on_overflow
        self._queues: dict[bytes, collections.deque] = {}
        self._bytes: dict[bytes, int] = {}
        self.counters = {"replies_unroutable": 0, "replies_queued": 0, "slow_consumers": 0}

    def deliver(self, identity: bytes, frames: list) -> None:
        """Send a reply (its frames after the identity), or queue it behind the
        peer's earlier ones."""
        if identity not in self._queues:
            try:
                self.sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
                return
            except zmq.ZMQError as e:
                if e.errno != errno.EAGAIN:
                    self._unroutable(identity, e)
                    return
            self._queues[identity] = collections.deque()
            self._bytes[identity] = 0
        self._queues[identity].append(frames)
        self._bytes[identity] += sum(map(len, frames))
        self.counters["replies_queued"] += 1
        if self._bytes[identity] > self.bound_bytes:
            self.counters["slow_consumers"] += 1
            log.warning("a peer left %d bytes of replies unread (bound %d): dropped, its sessions close",
                        self._bytes[identity], self.bound_bytes)
            self._forget(identity)
            self.on_overflow(identity)

    def flush(self) -> None:
        """Send what the peers' pipes take now, each peer's replies in order."""
        for identity in list(self._queues):
            queue = self._queues[identity]
            while queue:
                try:
                    self.sock.send_multipart([identity, *queue[0]], zmq.NOBLOCK, copy=False)
                except zmq.ZMQError as e:
                    if e.errno != errno.EAGAIN:
                        self._unroutable(identity, e)
                    break
                self._bytes[identity] -= sum(map(len, queue.popleft()))
            if not queue:
                self._forget(identity)

    def _unroutable(self, identity: bytes, e: zmq.ZMQError) -> None:
        self.counters["replies_unroutable"] += 1 + len(self._queues.get(identity, ()))
        self._forget(identity)
        log.debug("replies to a peer that is gone: %s", e)

    def _forget(self, identity: bytes) -> None:
        self._queues.pop(identity, None)
        self._bytes.pop(identity, None)

    def stats(self) -> dict:
        return {**self.counters, "peers_waiting": len(self._queues),
                "bytes_waiting": sum(self._bytes.values())}
