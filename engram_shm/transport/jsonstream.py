"""Engram's JSON stream (docs/protocol.md, "WebSocket"), translated to and
from the front's msgpack ops.

Pure functions: a client message decodes into a front request (a header and
one float32 vector frame) and a front reply encodes as the JSON the client
expects. The bridge (ws_bridge.py) owns the connections. Every refusal is an
EngramError with a code, so a hostile message costs one error message.
Vectors go from the decoded JSON lists to one float32 array in one NumPy
call per message, never a Python loop over their elements.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import numpy as np
import orjson

from ..errors import (
    DimensionMismatch,
    DuplicateSequence,
    EmptyBatch,
    EngramError,
    InvalidArgument,
    Malformed,
    MissingField,
    UnknownOp,
    WrongType,
)
from .protocol import field, vector_payload

VERSION = "1.0"
CLIENT_TYPES = frozenset({"init", "observation", "observation_batch", "flow_control", "close", "recall"})
SERVER_TYPES = frozenset({"init_ack", "ack", "status", "durable", "recall_result", "heartbeat", "error"})
# The front's pressure levels as Engram's stream states.
STATES = {"normal": "active", "warning": "backpressure", "critical": "backpressure",
          "overloaded": "overloaded"}
DEFAULT_SPACE = "default"  # Engram's default memory space
_GRANT_FIELDS = ("level", "pressure", "credit", "limit", "retry_after_ms")
_NOT_DETAILS = frozenset({"op", "v", "rid", "session", "code", "message", "retryable"})


@dataclass(frozen=True)
class Pending:
    """What a request to the front was, to translate its reply."""
    kind: str  # init, retake, observe, pause, resume, close, recall
    seq: int | None = None
    ids: list | None = None
    space: str | None = None
    request_id: object = None


# -- client messages -----------------------------------------------------------
def decode(message) -> dict:
    """A client message as a dict with a known `type`."""
    if not isinstance(message, str):
        raise Malformed("binary messages are not part of the JSON stream: send text")
    try:
        msg = orjson.loads(message)
    except orjson.JSONDecodeError as e:
        raise Malformed(f"invalid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise Malformed(f"a message is a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind is None:
        raise MissingField("a message needs a 'type'", field="type")
    if kind not in CLIENT_TYPES:
        raise UnknownOp(f"unknown message type {kind!r}", types=sorted(CLIENT_TYPES))
    return msg


def observe_request(session: str, seq: int, space: str, episodes: list) -> tuple[dict, memoryview]:
    """The front's observe_batch for episodes numbered from `seq`."""
    if not episodes:
        raise EmptyBatch("observation_batch holds no episodes")
    if not all(isinstance(e, dict) for e in episodes):
        raise WrongType("an episode is a JSON object", field="episode")
    ids = [field(e, "id", str) for e in episodes]
    header = {"op": "observe_batch", "session": session, "seq": seq, "space": space, "ids": ids,
              "what": [field(e, "what", str, "") for e in episodes]}
    when = [parse_time(e.get("when")) for e in episodes]
    if any(t is not None for t in when):
        now = time.time()
        header["when"] = [now if t is None else t for t in when]
    confidence = [field(e, "encoding_confidence", (int, float), None) for e in episodes]
    if any(c is not None for c in confidence):
        header["confidence"] = [1.0 if c is None else float(c) for c in confidence]
    fields, frame = vector_payload(embeddings([e.get("embedding") for e in episodes], "embedding"))
    header.update(fields)
    return header, frame


def recall_request(msg: dict, default_space: str) -> tuple[dict, memoryview]:
    header = {"op": "recall", "space": field(msg, "memory_space_id", str, default_space),
              "k": field(msg, "k", int, 10), "consistency": field(msg, "consistency", str, "strong"),
              "batch": field(msg, "batch", int, 100)}
    for name, kinds in (("threshold", (int, float)), ("generation", int), ("ef", int)):
        value = field(msg, name, kinds, None)
        if value is not None:
            header[name] = value
    fields, frame = vector_payload(embeddings([field(msg, "cue", list)], "cue")[0])
    header.update(fields)
    return header, frame


def embeddings(rows: list, name: str) -> np.ndarray:
    """JSON number lists as one (n, dim) float32 array; anything else (text,
    null, nested or ragged lists, booleans) is refused with a code."""
    try:
        array = np.array(rows)  # no dtype: strings and objects show as such, not as numbers
    except (ValueError, OverflowError):  # ragged rows
        raise DimensionMismatch(f"the {name}s of one message differ in length") from None
    if array.ndim != 2 or array.dtype.kind not in "iuf":
        raise WrongType(f"{name} must be a non-empty list of numbers", field=name)
    if array.shape[1] == 0:
        raise InvalidArgument(f"{name} is empty", field=name)
    with np.errstate(over="ignore"):  # beyond float32 becomes inf: the front refuses non_finite
        return array.astype(np.float32)


def parse_time(value) -> float | None:
    """An RFC 3339 time as unix seconds (None: not given)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise WrongType("when is an RFC 3339 time string", field="when")
    try:
        when = datetime.datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    except (ValueError, OverflowError):
        raise InvalidArgument(f"when {value[:64]!r} is not an RFC 3339 time", field="when") from None


def rfc3339(seconds: float | None = None) -> str | None:
    """Unix seconds (default: now) as RFC 3339 in UTC; None if unrepresentable."""
    try:
        when = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return when.isoformat().replace("+00:00", "Z")


# -- server messages --------------------------------------------------------------
def encode(msg: dict) -> bytes:
    return orjson.dumps(msg)


def init_ack(reply: dict, queue_capacity: int) -> dict:
    """Engram's init_ack, with this server's extensions (last_sequence and
    resumed for a resume, credit for flow control)."""
    return {"type": "init_ack", "session_id": reply["session"], "initial_sequence": 0,
            "capabilities": {"max_observations_per_second": 0, "queue_capacity": queue_capacity,
                             "supports_backpressure": True, "supports_snapshot_isolation": True,
                             "max_batch": reply.get("max_batch")},
            "protocol": VERSION, "last_sequence": reply["last_sequence"], "resumed": reply["resumed"],
            "state": reply.get("state", "active"), **grant(reply)}


def ack(reply: dict, pending: Pending) -> dict:
    """An ack of one message; its memory_id is the id of the episode numbered
    sequence_number (the last of a batch, whose ids are in memory_ids)."""
    if reply.get("duplicate"):
        expected = reply["limit"] - reply["credit"] + 1
        raise DuplicateSequence(f"sequence numbers {reply['from']}..{reply['to']} are acked already; "
                                f"expected {expected}", expected=expected)
    msg = {"type": "ack", "session_id": reply["session"], "sequence_number": reply["to"],
           "status": "accepted", "memory_id": pending.ids[-1], "committed_at": rfc3339(),
           "limit": reply["limit"]}
    if len(pending.ids) > 1:
        msg["first_sequence"] = reply["from"]
        msg["memory_ids"] = pending.ids
    if "durable_seq" in reply:
        msg["durable_sequence"] = reply["durable_seq"]
    return msg


def grant(reply: dict) -> dict:
    return {name: reply[name] for name in _GRANT_FIELDS if name in reply}


def status(session: str | None, state: str, **fields) -> dict:
    return {"type": "status", "session_id": session, "state": state, **fields}


def level_status(session: str, reply: dict) -> dict:
    """A status for a pressure level (from a front ack, status or resumed)."""
    return status(session, STATES[reply["level"]], **grant(reply))


def recall_result(reply: dict, request_id) -> dict:
    return {"type": "recall_result", "request_id": request_id, "more": reply["more"], "part": reply["part"],
            "snapshot_generation": reply["snapshot_generation"],
            "results": [{"id": r["id"], "similarity": r["similarity"], "confidence": r["confidence"],
                         "what": r["what"], "when": rfc3339(r["when"]), "generation": r["generation"]}
                        for r in reply["results"]]}


def heartbeat(session: str | None) -> dict:
    return {"type": "heartbeat", "session_id": session, "timestamp": rfc3339()}


def error(e: EngramError | dict, session: str | None, pending: Pending | None = None) -> dict:
    """Engram's error message, with a stable code, whether a retry may
    succeed, the details (expected, limit, retry_after_ms...) and which
    message it answers (sequence_number, or a recall's request_id)."""
    d = e.to_dict() if isinstance(e, EngramError) else e
    msg = {"type": "error", "message": d.get("message", ""), "session_id": session,
           "code": d.get("code", "internal"), "retryable": bool(d.get("retryable", False)),
           **{k: v for k, v in d.items() if k not in _NOT_DETAILS}}
    if pending is not None and pending.seq is not None:
        msg["sequence_number"] = pending.seq
    if pending is not None and pending.kind == "recall":
        msg["request_id"] = pending.request_id
    return msg
