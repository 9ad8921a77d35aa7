"""One family of errors with stable codes.

Every refusal the engine makes, in process or over the wire, is an `EngramError`
subclass carrying a `code` from `CODES`. Codes are part of the public contract
(docs/protocol.md lists them); messages are for humans and may change.
"""

from __future__ import annotations

# code -> (retryable, meaning). The only list of error codes.
CODES: dict[str, tuple[bool, str]] = {
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
    "space_limit": (False, "the engine holds the maximum number of spaces or segments"),
    "overloaded": (True, "the space's unindexed window is full; retry after retry_after_ms"),
    "shm_full": (True, "shared memory (/dev/shm) has no room for a new segment"),
    "engine_in_use": (False, "an engine of that name is already running"),
    "engine_not_found": (False, "no running engine of that name"),
    "engine_closed": (False, "the engine has been closed"),
    "index_failed": (False, "an index writer failed; see the message"),
    "corrupt": (False, "shared memory does not hold what its header says"),
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
Overloaded = _error("Overloaded", "overloaded")
ShmFull = _error("ShmFull", "shm_full")
EngineInUse = _error("EngineInUse", "engine_in_use")
EngineNotFound = _error("EngineNotFound", "engine_not_found")
EngineClosed = _error("EngineClosed", "engine_closed")
IndexFailed = _error("IndexFailed", "index_failed")
Corrupt = _error("Corrupt", "corrupt")
