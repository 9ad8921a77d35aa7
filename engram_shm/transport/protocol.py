"""Encoding and decoding of protocol messages (docs/protocol.md is the contract).

A message is [msgpack header, raw payload frames...]. Decoders raise
ProtocolError subclasses with the codes of the document; vectors are read
with np.frombuffer over the received frame, never copied or turned into lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from ..config import MAX_EF
from ..errors import (
    BadFrame,
    InvalidArgument,
    InvalidText,
    Malformed,
    MissingField,
    Oversize,
    UnknownOp,
    UnsupportedVersion,
    WrongType,
)

VERSION = "1.7"
MAJOR = int(VERSION.split(".")[0])

CLIENT_OPS = frozenset({"init", "observe", "observe_batch", "pause", "resume", "close", "recall",
                        "ping", "stats", "checkpoint", "export", "adopt", "release"})
SERVER_OPS = frozenset({"init_ack", "ack", "indexed", "durable", "status", "paused", "resumed", "closed",
                        "recall_result", "pong", "stats", "checkpointed", "exported", "adopted", "released",
                "error"})
CAPABILITIES = ("observe", "observe_batch", "recall_stream", "resume", "priority",
                "indexed_notifications", "f16_payload")
PRIORITIES = ("high", "normal", "low")
PAYLOAD_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<u2")}  # f16 travels as its bits
_MISSING = object()


def pack(header: dict, *payload) -> list:
    """The frames of a message: the header (with `v`) and raw payloads."""
    return [msgpack.packb({"v": VERSION, **header}, use_bin_type=True), *payload]


def unpack_header(frame) -> dict:
    """Frame 0 as a header map with a known op of a compatible version."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except UnicodeDecodeError as e:
        raise InvalidText(f"a string in the header is not valid UTF-8: {e.reason}") from None
    except Exception as e:  # msgpack raises a zoo: ExtraData, FormatError, StackError...
        raise Malformed(f"frame 0 is not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise Malformed(f"frame 0 is a msgpack {type(header).__name__}, not a map")
    v = header.get("v")
    if not isinstance(v, str) or v.split(".")[0] != str(MAJOR):
        raise UnsupportedVersion(f"protocol version {v!r} is not supported; this server speaks "
                                 f"{VERSION}", supported=VERSION)
    op = header.get("op")
    if op not in CLIENT_OPS:
        raise UnknownOp(f"unknown op {op!r}", ops=sorted(CLIENT_OPS))
    return header


def field(header: dict, name: str, types, default=_MISSING):
    """header[name], checked against `types`; absent -> default, or MissingField."""
    value = header.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise MissingField(f"{header.get('op') or header.get('type')} needs field {name!r}", field=name)
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise WrongType(f"field {name!r} must be {names}, got {type(value).__name__}", field=name)
    return value


def optional_list(header: dict, name: str, item_types):
    """An optional per-observation column: None, or a list of item_types
    (its length is checked with the batch's)."""
    values = field(header, name, list, None)
    if values is None:
        return None
    if not set(map(type, values)) <= set(_as_tuple(item_types)):  # exact types: no bool for int
        raise WrongType(f"field {name!r} must be a list of {item_types}", field=name)
    return values


def vectors(header: dict, frames: list, max_frame_bytes: int, single: bool) -> np.ndarray:
    """The one payload frame as an [n, dim] array view (float32, or f16 bits)."""
    if len(frames) != 1:
        raise BadFrame(f"{header['op']} carries exactly one vector frame, got {len(frames)}")
    kind = field(header, "dtype", str, "f32")
    dtype = PAYLOAD_DTYPES.get(kind)
    if dtype is None:
        raise WrongType(f"dtype must be one of {sorted(PAYLOAD_DTYPES)}, got {kind!r}", field="dtype")
    shape = field(header, "shape", list)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape) or \
            len(shape) != (1 if single else 2):
        raise WrongType(f"shape must be {'[dim]' if single else '[n, dim]'} of non-negative ints",
                        field="shape")
    buf = memoryview(frames[0])
    if buf.nbytes > max_frame_bytes:
        raise Oversize(f"frame of {buf.nbytes} bytes exceeds max_frame_bytes {max_frame_bytes}")
    rows, dim = (1, shape[0]) if single else shape
    if rows * dim * dtype.itemsize != buf.nbytes:
        raise BadFrame(f"shape {shape} of {kind} needs {rows * dim * dtype.itemsize} bytes, the "
                       f"frame has {buf.nbytes}", expected_bytes=rows * dim * dtype.itemsize)
    if dim == 0:
        raise BadFrame("vectors of zero dimensions")
    array = np.frombuffer(buf, dtype=dtype).reshape(rows, dim)
    return array.astype(array.dtype.newbyteorder("=")) if not dtype.isnative else array


def vector_payload(array: np.ndarray) -> tuple[dict, bytes | memoryview]:
    """(header fields, frame) for sending vectors: float16 travels as f16 bits,
    anything else as float32."""
    array = np.asarray(array)
    kind = "f16" if array.dtype == np.float16 else "f32"
    data = np.ascontiguousarray(array, dtype=np.float16 if kind == "f16" else np.float32)
    # Bytes through a flat uint8 view: memoryview.cast refuses an empty [0, dim] array.
    return {"dtype": kind, "shape": list(data.shape)}, memoryview(data.reshape(-1).view(np.uint8))


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True)
class Recall:
    """A recall request, checked."""
    rid: object
    space: str
    k: int
    batch: int
    consistency: str | int  # "strong", "indexed", or the generation of a snapshot
    threshold: float | None
    ef: int
    cue: np.ndarray


def recall(header: dict, frames: list, max_frame_bytes: int, max_k: int, ef_search: int) -> Recall:
    """A recall's header and cue frame, checked (the front before it hands the
    request on, the reader that answers it)."""
    space = field(header, "space", str)
    k = field(header, "k", int, 10)
    if not 1 <= k <= max_k:
        raise InvalidArgument(f"k must be in [1, {max_k}], got {k}", field="k")
    batch = field(header, "batch", int, 100)
    if batch < 1:
        raise InvalidArgument(f"batch must be >= 1, got {batch}", field="batch")
    consistency = field(header, "consistency", str, "strong")
    if consistency == "snapshot":
        consistency = field(header, "generation", int)
    elif consistency not in ("strong", "indexed"):
        raise InvalidArgument(f"consistency must be strong, indexed or snapshot, got {consistency!r}",
                              field="consistency")
    threshold = field(header, "threshold", (int, float), None)
    ef = field(header, "ef", int, ef_search)
    if not 1 <= ef <= MAX_EF:
        raise InvalidArgument(f"ef must be in [1, {MAX_EF}], got {ef}", field="ef")
    cue = vectors(header, frames, max_frame_bytes, single=True)
    return Recall(header.get("rid"), space, k, batch, consistency, threshold, ef, cue)


def recall_result(rid, memories, part: int, more: bool, generation: int) -> bytes:
    """Frame 0 of one recall_result message (it carries no payload)."""
    rows = [{"id": m.id, "similarity": m.similarity, "confidence": m.confidence, "what": m.what,
             "when": m.when, "generation": m.generation} for m in memories]
    return pack({"op": "recall_result", "rid": rid, "results": rows, "more": more, "part": part,
                 "snapshot_generation": generation})[0]
