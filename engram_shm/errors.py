"""One family of errors with stable codes.

Every refusal the engine makes, in process or over the wire, is an `EngramError`
subclass carrying a `code` from `CODES`. Codes are part of the public contract
(docs/protocol.md lists them); messages are for humans and may change.
"""

from __future__ import annotations

# code -> (retryable, meaning). The only list of error codes.
CODES: dict[str, tuple[bool, str]] = {
    # protocol (docs/protocol.md)
    "malformed": (False, "frame 0 is not a msgpack map (a WebSocket message: not a JSON object)"),
    "unsupported_version": (False, "v is missing or of another major version"),
    "unknown_op": (False, "op is not an operation of this protocol version"),
    "missing_field": (False, "a required header field is absent"),
    "wrong_type": (False, "a header field has the wrong type"),
    "bad_frame": (False, "payload frames are missing, extra, or of the wrong size"),
    "oversize": (False, "a frame exceeds max_frame_bytes, or a batch max_batch"),
    "unknown_session": (False, "no such session (never existed, or expired)"),
    "session_closed": (False, "the session is closed"),
    "session_paused": (True, "the session is paused; resume it first"),
    "not_session_owner": (False, "the session belongs to another connection"),
    "sequence_gap": (True, "seq is past the next expected number (see expected)"),
    "sequence_conflict": (False, "the message's numbers were acked for other observations (some of its "
                                 "ids are not stored): the client gave them to another batch; send "
                                 "these observations under new numbers (see expected, ids)"),
    "no_credit": (True, "the message passes the granted credit limit"),
    "session_limit": (True, "the server or the key holds its maximum of sessions (see limit)"),
    "busy": (True, "the server holds its maximum of recalls in flight (in total or for this "
                   "principal), or no recall reader is ready; retry after retry_after_ms"),
    "slow_consumer": (False, "the connection did not read its replies: more than reply_queue_bytes "
                             "waited for it, so its sessions were closed"),
    "internal": (True, "the server failed on this request; it stays up"),
    # the WebSocket bridge's JSON stream (docs/protocol.md, "WebSocket")
    "not_initialized": (False, "a session message before init on this WebSocket connection"),
    "session_mismatch": (False, "the message names another session than the connection's"),
    "duplicate_sequence": (False, "every sequence number of the message is acked already; nothing "
                                  "was stored again (see expected)"),
    # observations, recall, engine
    "invalid_argument": (False, "an argument has the wrong type or an out-of-range value"),
    "empty_batch": (False, "a batch holds no observations"),
    "length_mismatch": (False, "ids, vectors, texts, timestamps or confidences differ in length"),
    "dim_mismatch": (False, "a vector's dimension differs from the space's"),
    "non_finite": (False, "a vector, timestamp or confidence holds NaN or infinity"),
    "zero_vector": (False, "a zero vector cannot be normalised for the cosine metric"),
    "out_of_range": (False, "a value does not fit the space's storage dtype or allowed range"),
    "invalid_utf8": (False, "an id or text is not valid UTF-8"),
    "text_too_long": (False, "an id or text exceeds its byte limit"),
    "duplicate_id": (False, "the id is already stored in the space (ids are unique per space)"),
    "unknown_space": (False, "no space of that name exists"),
    "space_exists": (False, "a space of that name exists with other parameters"),
    "space_limit": (False, "the engine or the key holds its maximum of spaces, or the engine of "
                           "segments (see limit)"),
    "quota_exceeded": (False, "a space or a key would pass its quota of bytes (see quota, used, limit)"),
    "overloaded": (True, "the space's unindexed window is full; retry after retry_after_ms"),
    "shm_full": (True, "shared memory (/dev/shm, or the engine's memory_ceiling) has no room for a new "
                       "segment"),
    "engine_in_use": (False, "an engine of that name is already running"),
    "engine_not_found": (False, "no running engine of that name"),
    "engine_closed": (False, "the engine has been closed"),
    "index_failed": (False, "an index writer failed; see the message"),
    "corrupt": (False, "shared memory does not hold what its header says"),
    # security (docs/security.md)
    "unauthenticated": (False, "the client's key is unknown or revoked, or the client and the server "
                               "disagree on authentication"),
    "forbidden": (False, "the client's key holds no grant of that right on that space (acl.toml)"),
    "insecure_bind": (False, "binding a non-loopback address without authentication needs --insecure"),
    # durability (docs/durability.md)
    "storage_full": (True, "the data directory's disk is full (or a file size limit was hit); "
                           "nothing of the request was acked"),
    "storage_error": (True, "writing the data directory failed; nothing of the request was acked"),
    "data_dir_in_use": (False, "another engine holds the data directory's lock"),
    "data_dir_corrupt": (False, "the data directory holds no loadable checkpoint or log"),
    # cluster (docs/cluster.md)
    "moved": (False, "another node owns the space (see space, node, endpoint, epoch): send it there"),
    "moving": (True, "the space is being moved to another node: its writes wait; retry after "
                     "retry_after_ms"),
    "unavailable": (True, "the space's owner is not live (see node), or this node cannot reach the "
                          "cluster's etcd; nothing was stored; retry after retry_after_ms"),
    "cluster_conflict": (False, "the space table changed under the operation (another move, or a stale "
                                "epoch): read it again"),
}


class EngramError(Exception):
    """Base of every engine error: `code` is stable, `retryable` says whether the
    same request may succeed later unchanged."""

    code = "invalid_argument"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def retryable(self) -> bool:
        return CODES[self.code][0]

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "retryable": self.retryable, **self.details}


def _error(name: str, code: str, base: type[EngramError] = EngramError) -> type[EngramError]:
    assert code in CODES, code
    return type(name, (base,), {"code": code, "__doc__": CODES[code][1]})


class InvalidInput(EngramError):
    """Base of the refusals of bad observations and bad recall arguments."""


InvalidArgument = _error("InvalidArgument", "invalid_argument", InvalidInput)
EmptyBatch = _error("EmptyBatch", "empty_batch", InvalidInput)
LengthMismatch = _error("LengthMismatch", "length_mismatch", InvalidInput)
DimensionMismatch = _error("DimensionMismatch", "dim_mismatch", InvalidInput)
NonFiniteValue = _error("NonFiniteValue", "non_finite", InvalidInput)
ZeroVector = _error("ZeroVector", "zero_vector", InvalidInput)
OutOfRange = _error("OutOfRange", "out_of_range", InvalidInput)
InvalidText = _error("InvalidText", "invalid_utf8", InvalidInput)
TextTooLong = _error("TextTooLong", "text_too_long", InvalidInput)
DuplicateId = _error("DuplicateId", "duplicate_id", InvalidInput)
UnknownSpace = _error("UnknownSpace", "unknown_space", InvalidInput)
SpaceExists = _error("SpaceExists", "space_exists", InvalidInput)
SpaceLimit = _error("SpaceLimit", "space_limit")
QuotaExceeded = _error("QuotaExceeded", "quota_exceeded")
Overloaded = _error("Overloaded", "overloaded")
ShmFull = _error("ShmFull", "shm_full")
EngineInUse = _error("EngineInUse", "engine_in_use")
EngineNotFound = _error("EngineNotFound", "engine_not_found")
EngineClosed = _error("EngineClosed", "engine_closed")
IndexFailed = _error("IndexFailed", "index_failed")
Corrupt = _error("Corrupt", "corrupt")
Unauthenticated = _error("Unauthenticated", "unauthenticated")
Forbidden = _error("Forbidden", "forbidden")
InsecureBind = _error("InsecureBind", "insecure_bind")
StorageError = _error("StorageError", "storage_error")
StorageFull = _error("StorageFull", "storage_full", StorageError)  # a storage error: a full disk
DataDirInUse = _error("DataDirInUse", "data_dir_in_use")
DataDirCorrupt = _error("DataDirCorrupt", "data_dir_corrupt")
Moved = _error("Moved", "moved")
Moving = _error("Moving", "moving")
Unavailable = _error("Unavailable", "unavailable")
ClusterConflict = _error("ClusterConflict", "cluster_conflict")


class ProtocolError(EngramError):
    """Base of the refusals of malformed or out-of-order messages."""


Malformed = _error("Malformed", "malformed", ProtocolError)
UnsupportedVersion = _error("UnsupportedVersion", "unsupported_version", ProtocolError)
UnknownOp = _error("UnknownOp", "unknown_op", ProtocolError)
MissingField = _error("MissingField", "missing_field", ProtocolError)
WrongType = _error("WrongType", "wrong_type", ProtocolError)
BadFrame = _error("BadFrame", "bad_frame", ProtocolError)
Oversize = _error("Oversize", "oversize", ProtocolError)
UnknownSession = _error("UnknownSession", "unknown_session", ProtocolError)
SessionClosed = _error("SessionClosed", "session_closed", ProtocolError)
SessionPaused = _error("SessionPaused", "session_paused", ProtocolError)
NotSessionOwner = _error("NotSessionOwner", "not_session_owner", ProtocolError)
SequenceGap = _error("SequenceGap", "sequence_gap", ProtocolError)
SequenceConflict = _error("SequenceConflict", "sequence_conflict", ProtocolError)
NoCredit = _error("NoCredit", "no_credit", ProtocolError)
SessionLimit = _error("SessionLimit", "session_limit", ProtocolError)
NotInitialized = _error("NotInitialized", "not_initialized", ProtocolError)
SessionMismatch = _error("SessionMismatch", "session_mismatch", ProtocolError)
DuplicateSequence = _error("DuplicateSequence", "duplicate_sequence", ProtocolError)
Busy = _error("Busy", "busy", ProtocolError)
SlowConsumer = _error("SlowConsumer", "slow_consumer", ProtocolError)
Internal = _error("Internal", "internal")


def from_dict(error: dict) -> EngramError:
    """The exception an error message describes (clients raise it)."""
    code = error.get("code")
    cls = _BY_CODE.get(code, EngramError)
    details = {k: v for k, v in error.items() if k not in ("code", "message", "retryable", "op", "v")}
    e = cls(str(error.get("message", code)), **details)
    if cls is EngramError:
        e.code = code if code in CODES else "internal"
    return e


_BY_CODE = {cls.code: cls for cls in list(globals().values())
            if isinstance(cls, type) and issubclass(cls, EngramError)
            and cls not in (EngramError, InvalidInput, ProtocolError)}
