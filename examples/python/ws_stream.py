"""Stream observations to engram_shm over WebSocket (Engram's JSON
messages) and recall them, with the `websockets` package.

    python examples/python/ws_stream.py [ws://127.0.0.1:7432/v1/stream] [count]

Sends batches of 100 episodes, one message each, waits for each ack, and
on a retryable refusal (overloaded, no_credit) sends the same batch again
after `retry_after_ms`: a refused message consumes no sequence number.
"""

import json
import sys
import time

import numpy as np
from websockets.sync.client import connect


def main(url: str = "ws://127.0.0.1:7432/v1/stream", count: int = 1000) -> None:
    vectors = np.random.default_rng(8).standard_normal((count, 64)).astype(np.float32)
    with connect(url) as ws:
        def reply() -> dict:
            while True:
                msg = json.loads(ws.recv(timeout=30))
                if msg["type"] not in ("heartbeat", "status", "durable"):
                    return msg

        ws.send(json.dumps({"type": "init", "memory_space_id": "py-ws-example"}))
        session = reply()["session_id"]
        seq = 1
        while seq <= count:
            episodes = [{"id": f"ws-{i}", "what": f"observation {i}", "embedding": vectors[i].tolist()}
                        for i in range(seq - 1, min(count, seq + 99))]
            ws.send(json.dumps({"type": "observation_batch", "session_id": session, "sequence_number": seq,
                                "episodes": episodes}))
            answer = reply()
            if answer["type"] == "ack":
                seq = answer["sequence_number"] + 1
            elif answer["retryable"]:
                time.sleep(answer.get("retry_after_ms", 20) / 1000)
            else:
                raise SystemExit(f"refused: {answer}")
        found = 0
        for i in range(count):
            ws.send(json.dumps({"type": "recall", "cue": vectors[i].tolist(), "k": 1}))
            found += reply()["results"][0]["id"] == f"ws-{i}"
        ws.send(json.dumps({"type": "close", "session_id": session}))
    print(json.dumps({"example": "python-ws", "streamed": count, "acked": seq - 1, "recalled": found}))


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
