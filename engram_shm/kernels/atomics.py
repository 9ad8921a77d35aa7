"""Atomics Numba lacks on the CPU: compare-and-swap on int64 arrays (to claim a
segment's index-writer word from any thread or process) and a full fence (so
the compiler keeps a crash journal's stores on the right side of the stores
they describe)."""

import numpy as np
from numba import types
from numba.extending import intrinsic

from ..errors import InvalidArgument
from .policy import kernel
from .scalar import item_pointer


@intrinsic
def cas_i64(typingctx, arr, i, expected, new):
    """Atomically: if arr[i] == expected, arr[i] = new. Returns the previous value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.mutable):
        return None

    def codegen(context, builder, signature, args):
        ptr = item_pointer(context, builder, signature.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return types.int64(arr, types.intp, types.int64, types.int64), codegen


@intrinsic
def fence(typingctx):
    """A sequentially consistent fence: no load or store moves across it."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@kernel
def _compare_and_swap(words, i, expected, new):
    return cas_i64(words, i, expected, new)


def compare_and_swap(words: np.ndarray, i: int, expected: int, new: int) -> int:
    """Atomically set words[i] = new if it equals `expected`; returns the value
    found (== expected on success)."""
    if words.dtype != np.int64 or not words.flags.writeable or not 0 <= i < words.shape[0]:
        raise InvalidArgument("compare_and_swap needs a writable int64 array and an index inside it")
    return int(_compare_and_swap(words, i, expected, new))
