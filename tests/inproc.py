"""A front in the test's own process: its socket replaced by a recorder."""

import msgpack

from engram_shm.store import shm
from engram_shm.transport.front import Front
from engram_shm.transport.sessions import SessionTable, table_name


class Replies:
    """Stands in for the front's ROUTER socket: keeps every reply, decoded."""

    def __init__(self):
        self.all = []

    def send_multipart(self, frames, flags=0, copy=True):
        self.all.append(msgpack.unpackb(frames[1], raw=False))


def front_on(name, config, catalog):
    """A Front of engine `name` (its catalog and session table exist) whose
    replies land in `front.replies.sock.all`."""
    front = Front(config, catalog, SessionTable(shm.attach(table_name(name))))
    front.replies.sock = Replies()
    return front
