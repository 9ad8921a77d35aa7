"""Validation of observations and cues, into the columns the store writes.

Everything here runs per batch with numpy; the only per-item work is the
C-level encoding of ids and texts to UTF-8. A batch that fails any check raises
a specific `InvalidInput` error and nothing of it is stored.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .errors import (
    DimensionMismatch,
    DuplicateId,
    EmptyBatch,
    InvalidArgument,
    InvalidText,
    LengthMismatch,
    NonFiniteValue,
    OutOfRange,
    TextTooLong,
    ZeroVector,
)
from .kernels.distance import stored_dim
from .kernels.vectors import (
    ROW_BEYOND_SCALES,
    ROW_NON_FINITE,
    ROW_OK,
    ROW_TOO_BIG,
    ROW_ZERO,
    check_store_rows,
)

F16_MAX = float(np.finfo(np.float16).max)
_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class Limits:
    max_id_bytes: int = 256
    max_text_bytes: int = 65536


@dataclass(frozen=True, eq=False)
class Batch:
    """Validated observations in columns.

    vectors: [n, dim] as received, float32 or float16 bits (uint16), of a
    checked shape; their values are checked row by row as they are stored
    (`vector_rule`), and a bad row fails the whole batch.
    records: uint8, each observation's UTF-8 id then text, concatenated.
    record_ends: int64 [n], end of each record in `records`; id_lens: int32 [n].
    when: float64 [n] unix seconds; confidence: float32 [n] in [0, 1].
    """

    ids: list[str]
    vectors: np.ndarray
    records: np.ndarray
    record_ends: np.ndarray
    id_lens: np.ndarray
    when: np.ndarray
    confidence: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return stored_dim(self.vectors)  # a replayed int8 batch holds stored rows


def prepare(ids, vectors, what=None, when=None, confidence=None, *, dim: int | None,
            metric: str, dtype: str, limits: Limits = Limits()) -> Batch:
    """One observation (`ids` a str, `vectors` 1-D) or a batch (sequences, 2-D)."""
    single = isinstance(ids, str)
    id_list = [ids] if single else _str_list(ids, "ids")
    n = len(id_list)
    if n == 0:
        raise EmptyBatch("the batch holds no observations")
    matrix = vectors_matrix(vectors, n, single, dim, "vectors")
    texts = _texts(what, n, single)
    records, id_lens, text_lens = _records(id_list, texts)
    _check_lengths(id_lens, 1, limits.max_id_bytes, "id")
    _check_lengths(text_lens, 0, limits.max_text_bytes, "text")
    if len(set(id_list)) != n:
        seen = set()
        dup = next(i for i in id_list if i in seen or seen.add(i))
        raise DuplicateId(f"id {dup!r} appears twice in the batch", id=dup)
    return Batch(
        ids=id_list,
        vectors=matrix,
        records=np.frombuffer(records, np.uint8),
        record_ends=np.cumsum(id_lens + text_lens, dtype=np.int64),
        id_lens=id_lens.astype(np.int32),
        when=_column(when, n, "timestamps (when)", time.time(), np.float64),
        confidence=_confidences(confidence, n),
    )


def checked_rows(matrix: np.ndarray, metric: str, dtype: str, what: str,
                 quant: float | np.ndarray = 1.0) -> np.ndarray:
    """The rows of a float32 or f16-bits matrix as float32, scaled as a space
    of `metric` and `dtype` stores them (then times `quant`); raises the
    error of the first row it would refuse."""
    out = np.empty(matrix.shape, np.float32)
    row, reason = check_store_rows(matrix, *vector_rule(metric, dtype), out, quant)
    if reason != ROW_OK:
        raise_bad_row(reason, row, what)
    return out


def vectors_matrix(vectors, n: int, single: bool, dim: int | None, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous [n, dim] float32 matrix (float16 bits, as
    uint16, pass through), checked for shape and type."""
    if (type(vectors) is np.ndarray and vectors.dtype == _FLOAT32 and dim and vectors.flags.c_contiguous
            and (vectors.shape == (n, dim) or (single and n == 1 and vectors.shape == (dim,)))):
        # the common case (every recall's cue, most batches): none of the checks below
        return vectors if vectors.ndim == 2 else vectors.reshape(1, dim)
    if isinstance(vectors, np.ndarray) and vectors.dtype == np.uint16 and vectors.ndim == 2:
        array = vectors  # f16 payload from the wire, as bits
    else:
        try:
            array = np.asarray(vectors)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"{what} must be a numeric array: {e}") from None
        if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
            raise InvalidArgument(f"{what} must be real numbers, got dtype {array.dtype}")
    if single and array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise InvalidArgument(f"{what} must be 1-D (one observation) or 2-D (n, dim), "
                              f"got shape {array.shape}")
    if array.shape[0] != n:
        raise LengthMismatch(f"{n} ids but {array.shape[0]} {what}")
    if array.shape[1] == 0:
        raise InvalidArgument(f"{what} have zero dimensions")
    if dim is not None and array.shape[1] != dim:
        raise DimensionMismatch(f"{what} have {array.shape[1]} dims, the space has {dim}",
                                expected=dim, got=int(array.shape[1]))
    if array.dtype == np.uint16 or array.dtype == np.float32:  # nothing to convert
        return np.ascontiguousarray(array)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(array, dtype=np.float32)


def vector_rule(metric: str, dtype: str) -> tuple[bool, float]:
    """How rows are checked and stored: (scale to unit norm, largest magnitude
    allowed otherwise). Under cosine rows are normalised, so any finite
    non-zero row fits f16 storage."""
    return metric == "cosine", F16_MAX if dtype == "f16" else np.inf


def raise_bad_row(reason: int, row: int, what: str) -> None:
    """The error of a row the vector kernel refused (`reason` != ROW_OK)."""
    if reason == ROW_NON_FINITE:
        raise NonFiniteValue(f"{what} row {row} holds NaN or infinity (or overflows float32)",
                             index=row)
    if reason == ROW_ZERO:
        raise ZeroVector(f"{what} row {row} is all zeros; cosine needs a direction", index=row)
    if reason == ROW_TOO_BIG:
        raise OutOfRange(f"{what} row {row} exceeds the f16 range (+-{F16_MAX:g}); "
                         "use dtype f32 or the cosine metric", index=row)
    if reason == ROW_BEYOND_SCALES:
        raise OutOfRange(f"{what} row {row} is too large for the int8 space's scales (taken from its "
                         "first batch): its factor exceeds float32; use dtype f32 or the cosine metric",
                         index=row)
    raise AssertionError(f"unknown row check result {reason}")


def _str_list(values, what: str) -> list:
    if isinstance(values, (bytes, bytearray)) or not hasattr(values, "__len__"):
        raise InvalidArgument(f"{what} must be a str or a sequence of str")
    items = list(values)
    if not set(map(type, items)) <= {str}:
        bad = next(type(v).__name__ for v in items if not isinstance(v, str))
        raise InvalidArgument(f"{what} must be str, got {bad}")
    return items


def _texts(what, n: int, single: bool) -> list[str]:
    if what is None:
        return [""] * n
    if isinstance(what, (str, bytes)):
        if not single and n != 1:
            raise LengthMismatch(f"{n} ids but one text")
        what = [what]
    elif not hasattr(what, "__len__"):
        raise InvalidArgument("what must be a str or a sequence of str")
    texts = list(what)
    if len(texts) != n:
        raise LengthMismatch(f"{n} ids but {len(texts)} texts")
    kinds = set(map(type, texts))
    if not kinds <= {str, bytes, type(None)}:
        raise InvalidArgument("texts must be str (or UTF-8 bytes, or None)")
    if kinds != {str}:
        texts = [_decode(t, i) for i, t in enumerate(texts)]
    return texts


def _decode(text, index: int) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidText(f"text {index} is not valid UTF-8: {e.reason}", index=index) from None
    return text


def _records(ids: list[str], texts: list[str]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Each id then its text, UTF-8, concatenated; and the byte lengths of
    ids and texts. One join and one encode for the batch: byte lengths are
    character lengths when the batch is ASCII (the common case)."""
    parts = _interleave(ids, texts)
    joined = "".join(parts)
    if joined.isascii():
        lengths = np.fromiter(map(len, parts), np.int64, len(parts)).reshape(-1, 2)
        return joined.encode("ascii"), lengths[:, 0], lengths[:, 1]
    parts = _interleave(_encode(ids, "id"), _encode(texts, "text"))
    lengths = np.fromiter(map(len, parts), np.int64, len(parts)).reshape(-1, 2)
    return b"".join(parts), lengths[:, 0], lengths[:, 1]


def _interleave(a: list, b: list) -> list:
    """[a0, b0, a1, b1, ...] (slice assignment: no per-item Python step)."""
    out = [None] * (2 * len(a))
    out[::2] = a
    out[1::2] = b
    return out


def _encode(strings: list[str], what: str) -> list[bytes]:
    try:
        return list(map(str.encode, strings))
    except UnicodeEncodeError:
        for i, s in enumerate(strings):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidText(f"{what} {i} cannot be encoded as UTF-8 ({e.reason})",
                                  index=i) from None
        raise


def _check_lengths(lengths: np.ndarray, lo: int, hi: int, what: str) -> None:
    if lengths.min() < lo:
        raise InvalidArgument(f"{what} {int(np.argmin(lengths))} is empty", index=int(np.argmin(lengths)))
    if lengths.max() > hi:
        i = int(np.argmax(lengths))
        raise TextTooLong(f"{what} {i} is {int(lengths[i])} bytes, the limit is {hi}", index=i)


def _column(values, n: int, what: str, default: float, dtype) -> np.ndarray:
    if values is None:
        return np.full(n, default, dtype)
    if isinstance(values, datetime):
        values = values.timestamp()
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        column = np.full(n, values, np.float64)
    else:
        try:
            column = np.asarray(values)
        except (ValueError, TypeError):
            raise InvalidArgument(f"{what} must be numbers") from None
        if column.dtype.kind == "M":
            column = column.astype("datetime64[ns]").astype(np.int64) / 1e9
        elif column.dtype == object and all(isinstance(v, datetime) for v in column.ravel()):
            column = np.array([v.timestamp() for v in column.ravel()])
        if column.dtype.kind not in "fiu" or column.ndim > 1:
            raise InvalidArgument(f"{what} must be a number or a 1-D sequence of numbers")
        column = column.reshape(-1).astype(np.float64)
        if len(column) != n:
            raise LengthMismatch(f"{n} ids but {len(column)} {what}")
    if not np.isfinite(column).all():
        raise NonFiniteValue(f"{what} holds NaN or infinity", index=int(np.argmin(np.isfinite(column))))
    return column.astype(dtype)


def _confidences(confidence, n: int) -> np.ndarray:
    if confidence is None:
        return np.ones(n, np.float32)
    column = _column(confidence, n, "confidences", 1.0, np.float32)
    bad = (column < 0) | (column > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise OutOfRange(f"confidence {i} is {column[i]:g}; confidences lie in [0, 1]", index=i)
    return column
