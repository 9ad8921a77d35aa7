"""Stream observations to engram_shm over ZeroMQ and recall them.

    python examples/python/zmq_stream.py [tcp://127.0.0.1:5555] [count]

The Client batches, keeps within the server's credit, and resumes its
session after a lost connection; flush() waits for every ack.
"""

import json
import sys

import numpy as np

from engram_shm import Client


def main(endpoint: str = "tcp://127.0.0.1:5555", count: int = 1000) -> None:
    vectors = np.random.default_rng(7).standard_normal((count, 64)).astype(np.float32)
    ids = [f"zmq-{i}" for i in range(count)]
    with Client(endpoint) as client:
        client.observe_batch("py-zmq-example", ids, vectors, what=[f"observation {i}" for i in range(count)])
        acked = client.flush()
        found = sum(client.recall("py-zmq-example", vectors[i], k=1)[0].id == ids[i] for i in range(count))
    print(json.dumps({"example": "python-zmq", "streamed": count, "acked": acked, "recalled": found}))


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
