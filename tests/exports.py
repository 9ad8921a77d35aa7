"""Reading a space back whole through the server's export op (as a move reads
it): the way tests check that every acked row is stored, once, with its
fields, without a recall per row."""

from __future__ import annotations

import numpy as np

from engram_shm.transport.client import Client


def export_all(client: Client, space: str, limit: int | None = None, cursor=(), freeze=False):
    """Every row from `cursor` on: (rows by id, last reply). Each row is
    (vector as float32, what, when, confidence); an id exported twice fails."""
    out, reply = {}, {"cursor": list(cursor), "more": True}
    while reply["more"]:
        header = {"op": "export", "space": space, "cursor": reply["cursor"], "freeze": freeze}
        if limit is not None:
            header["limit"] = limit
        reply = client.request(header)
        vectors = np.frombuffer(reply["_payload"][0], np.float16 if reply["dtype"] == "f16" else np.float32)
        vectors = vectors.reshape(reply["shape"]).astype(np.float32)
        for row, obs_id in enumerate(reply["ids"]):
            assert obs_id not in out, f"{obs_id} exported twice"
            out[obs_id] = (vectors[row], reply["what"][row], reply["when"][row], reply["confidence"][row])
    return out, reply
