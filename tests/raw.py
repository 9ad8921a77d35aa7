"""A bare DEALER that speaks the protocol by hand, for tests against a live server."""

import time

import msgpack
import zmq

from engram_shm.transport import protocol as p

PUSHES = frozenset({"status", "durable", "indexed"})  # sent unasked: credit, durability, indexing


class Raw:
    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)

    def send(self, header, *payload):
        self.sock.send_multipart(p.pack(header, *payload))

    def reply(self, timeout=10.0):
        """The next message that is not a push, or None if none comes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            message = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
            if message["op"] not in PUSHES:
                return message
        return None

    def recv(self, timeout=10.0):
        """The next message that is not a push; fails the test if none comes."""
        message = self.reply(timeout)
        assert message is not None, "no reply from the server"
        return message

    def ask(self, header, *payload, timeout=10.0):
        self.send(header, *payload)
        return self.recv(timeout)

    def init(self, **fields):
        ack = self.ask({"op": "init", **fields})
        assert ack["op"] == "init_ack", ack
        return ack

    def batch(self, session, seq, space, ids, vectors, rid=None):
        fields, frame = p.vector_payload(vectors)
        self.send({"op": "observe_batch", "session": session, "seq": seq, "space": space,
                   "ids": ids, "rid": rid, **fields}, frame)

    def close(self):
        self.sock.close(linger=0)
