"""A reader process: answers the recalls the front hands it (recalls.py: the
ones it does not answer on its loop), with the same Reader as every other
process that maps the engine's shared memory.

    python -m engram_shm.transport.recall_worker ENGINE CONFIG_JSON BACKEND INDEX INCARNATION READY_FILE

Processes, not threads of the front: the kernels release the GIL, but
reading the rows of a large answer and packing it is Python, which would
hold the GIL the front's loop needs. It runs at nice `recall_niceness`, so
that when cores are short the front (and so every producer's acks) wins.
It streams each part of an answer as soon as it is packed. The supervisor
restarts it if it dies; it reports ready by writing its pid and incarnation
into READY_FILE once the front has answered its hello.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import zmq

from ..config import EngineConfig
from ..engine import lifeline
from ..engine.directory import SegmentDirectory
from ..engine.reader import Reader
from ..engine.readiness import report_ready
from ..kernels.warm import ready_child
from ..observability import logs
from ..store.catalog import Catalog
from .recalls import HELLO_S, JOB, LAST, PART, WELCOME, answer, hello_frames

log = logging.getLogger(__spec__.name)  # its module's name, also when run with -m
# How long a reader waits for a recall before it takes new segments and maps
# their pages (Reader.prepare): a recall that found a new layout answered in
# 3.7 to 11.6 ms, faulting in 729 to 1,876 pages it had not seen.
PREPARE_MS = 20


def to_front(sock, job: bytes):
    """`answer`'s send for one job: each part to the front, tagged with it."""
    return lambda frame, last: sock.send_multipart([LAST if last else PART, job, frame], copy=False)


def run(engine: str, config: EngineConfig, backend: str, index: int, incarnation: int,
        ready_file: str) -> None:
    lifeline.bind_to_parent()  # first: an orphan must not go on mapping the engine's memory
    stop = lifeline.StopRequest()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    os.nice(config.recall_niceness)
    ready_child()
    catalog = Catalog.attach(engine)
    directory = SegmentDirectory(catalog)
    reader = Reader(directory)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"r{index}.{incarnation}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # the front bounds the recalls in flight, hence their parts
    sock.connect(backend)
    hello, next_hello, ready = hello_frames(os.getpid()), 0.0, False
    try:
        while not stop.requested:
            now = time.monotonic()
            if now >= next_hello:  # also how a restarted front learns of this reader
                sock.send_multipart(hello)
                next_hello = now + HELLO_S
                reader.drop_retired()
            if not sock.poll(PREPARE_MS):
                reader.prepare()
                continue
            frames = sock.recv_multipart(copy=False)
            kind = frames[0].bytes
            if kind == JOB:
                answer(to_front(sock, frames[1].bytes), reader, config, frames[2:])
            elif kind == WELCOME and not ready:
                report_ready(ready_file, incarnation)
                ready = True
                log.info("recall reader %d of %s ready (incarnation %d)", index, engine, incarnation)
    finally:
        sock.close()
        ctx.term()
        reader.close()
        directory.close()
        catalog.close()


if __name__ == "__main__":
    settings = EngineConfig.from_json(sys.argv[2])
    logs.configure(settings, f"recall-{sys.argv[4]}")
    run(sys.argv[1], settings, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
