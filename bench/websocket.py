"""WebSocket benchmark: observations/s of one WebSocket connection speaking
Engram's JSON (768 dims), single and batch messages, against the ZeroMQ
Client on the same data to the same server in the same run.

    python -m bench.websocket [--n 20000] [--batch 256] [--dim 768] [--quick]

- zmq_client: `engram_shm.Client.observe_batch`, batches of --batch (msgpack
  header, raw float32 frame): the ratio base.
- ws_batch: one WebSocket connection, `observation_batch` messages of
  --batch episodes, pipelined within the granted credit.
- ws_single: the same connection kind, one `observation` message per
  episode (Engram's own message), pipelined within the credit.

The JSON text is built before the clock starts (only the sequence number is
put in per send): the figures are the server's (bridge, front, WAL), not the
cost of a Python client turning floats into text. A `json_decode` row gives
what decoding one 768-d episode costs the bridge with the standard json
module and with orjson (the bridge uses orjson), each followed by the one
NumPy conversion to float32. Engram's design target was 10K observations/s
per connection. Prints JSON lines (with machine and date) and a table.
"""

from __future__ import annotations

import json
import time

import numpy as np
import orjson
from websockets.sync.client import connect

from engram_shm import Client
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import free_port, running_server

from . import unbounded_window
from .report import emit, parser, table

PUSHES = ("heartbeat", "status", "durable")


def zmq_client(endpoint: str, space: str, vectors: np.ndarray, batch: int) -> float:
    ids = [f"z{i}" for i in range(len(vectors))]
    with Client(endpoint, batch_size=batch) as client:
        started = time.perf_counter()
        client.observe_batch(space, ids, vectors)
        client.flush()
        return time.perf_counter() - started


def episodes_json(vectors: np.ndarray, prefix: str, lo: int, hi: int) -> str:
    return json.dumps([{"id": f"{prefix}{i}", "what": "", "embedding": vectors[i].tolist()}
                       for i in range(lo, hi)])


def websocket(url: str, space: str, vectors: np.ndarray, batch: int) -> float:
    """Stream every vector over one connection, `batch` per message (1:
    Engram's single observation), keeping within the credit."""
    n = len(vectors)
    kind = "observation" if batch == 1 else "observation_batch"
    bodies = [episodes_json(vectors, space, lo, min(n, lo + batch)) for lo in range(0, n, batch)]
    if batch == 1:
        bodies = [b[1:-1] for b in bodies]  # the one episode object, not a list
    field = "episode" if batch == 1 else "episodes"
    with connect(url, max_size=None, compression=None) as ws:
        ws.send(json.dumps({"type": "init", "memory_space_id": space}))
        ack = json.loads(ws.recv(timeout=60))
        session, limit = ack["session_id"], ack["limit"]
        prefix = f'{{"type":"{kind}","session_id":"{session}","sequence_number":'
        started = time.perf_counter()
        sent = acked = 0  # messages
        while acked < len(bodies):
            while sent < len(bodies) and min(n, (sent + 1) * batch) <= limit:
                ws.send(f'{prefix}{sent * batch + 1},"{field}":{bodies[sent]}}}')
                sent += 1
            msg = json.loads(ws.recv(timeout=120))
            if msg["type"] in PUSHES:
                limit = max(limit, msg.get("limit", 0))
                continue
            if msg["type"] != "ack":
                raise RuntimeError(f"refused: {msg}")  # a big enough ring: no backpressure refusals
            acked += 1
            limit = max(limit, msg["limit"])
        return time.perf_counter() - started


def decode_costs(vectors: np.ndarray, repeat: int) -> dict:
    text = json.dumps({"type": "observation", "session_id": "s", "sequence_number": 1,
                       "episode": {"id": "x", "embedding": vectors[0].tolist()}})
    costs = {}
    for name, loads in (("json", json.loads), ("orjson", orjson.loads)):
        started = time.perf_counter()
        for _ in range(repeat):
            np.array([loads(text)["episode"]["embedding"]]).astype(np.float32)
        costs[f"{name}_us_per_obs"] = round((time.perf_counter() - started) / repeat * 1e6, 1)
    return costs


def main(argv=None, prog="python -m bench websocket") -> None:
    ap = parser(__doc__, prog)
    ap.add_argument("--n", type=int, default=20_000, help="observations per system")
    ap.add_argument("--batch", type=int, default=256, help="episodes per batch message")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--quick", action="store_true", help="a small run (the tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.batch = 1024, 128
    vectors = clustered(args.n, args.dim, seed=12)
    port = free_port()
    rows = []
    # A ring that holds the whole run: the figures are ingest, never waiting for indexing.
    server = running_server("--ws-port", str(port), *unbounded_window(4 * args.n), workers=1)
    with server as (endpoint, _, _):
        url = f"ws://127.0.0.1:{port}/v1/stream"
        for system, run in (("zmq_client", lambda: zmq_client(endpoint, "zmq", vectors, args.batch)),
                            ("ws_batch", lambda: websocket(url, "wsb", vectors, args.batch)),
                            ("ws_single", lambda: websocket(url, "wss", vectors, 1))):
            seconds = run()
            batch = 1 if system == "ws_single" else args.batch
            rows.append(emit({"bench": "websocket", "system": system, "n": args.n, "dim": args.dim,
                              "batch": batch, "obs_per_s": round(args.n / seconds, 1)}))
    emit({"bench": "websocket", "system": "json_decode", "dim": args.dim, **decode_costs(vectors, 200)})
    print(table(f"one connection, {args.dim} dims (x {rows[0]['system']})", rows,
                [("system", "system", ""), ("batch", "batch", "d"), ("obs/s", "obs_per_s", ",.0f"),
                 ("x zmq_client", "x obs_per_s", ".3f")]))


if __name__ == "__main__":
    main()
