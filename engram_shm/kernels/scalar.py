"""Scalar building blocks that Numba lacks on the CPU: float16 loads and stores,
int8 codes and their rows' factors, and prefetch.

Numba 0.6x refuses float16 arithmetic; `as_f32` reads f16 storage held as uint16
bits by bitcasting to LLVM `half` and extending, which LLVM turns into F16C
`vcvtph2ps` when it vectorises a loop.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .policy import ROW_FACTOR_CODES


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def value_of_bits(bits, b):
    """The float32 whose bits (float32 bits as uint32, or float16 bits as
    uint16: the dtype of the array `bits`) are the integer `b` (jitted code only)."""
    raise NotImplementedError("value_of_bits is for jitted code")


@overload(value_of_bits, inline="always")
def _value_of_bits(bits, b):
    if not isinstance(bits, types.Array):
        return None
    if bits.dtype == types.uint16:
        return lambda bits, b: _f16_bits_to_f32(np.uint16(b))
    if bits.dtype == types.uint32:
        return lambda bits, b: _f32_from_bits(np.uint32(b))
    return None


def as_f32(x):
    """A stored vector element as float32 (jitted code only)."""
    raise NotImplementedError("as_f32 is for jitted code")


@overload(as_f32, inline="always")
def _as_f32(x):
    if x == types.uint16:
        return lambda x: _f16_bits_to_f32(x)
    if isinstance(x, (types.Float, types.Integer)):
        return lambda x: np.float32(x)
    return None


CACHE_LINE = 64  # bytes, on x86-64 and most ARM cores


def item_pointer(context, builder, aryty, ary_value, index):
    """A pointer to the first element of row `index` of an array (codegen)."""
    ary = context.make_array(aryty)(context, builder, ary_value)
    indices = [index] + [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
    return cgutils.get_item_pointer(context, builder, aryty, ary, indices)


def _row_bytes(context, builder, aryty, ary_value, index):
    """A byte pointer to row `index` of an array (one declaration of the
    prefetch then serves rows of every dtype in a module)."""
    item = item_pointer(context, builder, aryty, ary_value, index)
    return builder.bitcast(item, ir.IntType(8).as_pointer())


def _prefetch(builder, ptr):
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in every cache level, data


@intrinsic
def prefetch_row(typingctx, arr, i):
    """Hint the CPU to fetch the start of row `i` of `arr` into cache (no
    effect on results)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        _prefetch(builder, _row_bytes(context, builder, signature.args[0], args[0], args[1]))
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def prefetch_whole_row(typingctx, arr, i):
    """Hint the CPU to fetch every cache line of row `i` of a 2-D `arr`: a
    vector the search reads next, whose later lines the hardware prefetcher
    would fetch only after the first ones missed."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        start = _row_bytes(context, builder, aryty, args[0], args[1])
        intp = context.get_value_type(types.intp)
        cols = cgutils.unpack_tuple(builder, context.make_array(aryty)(context, builder, args[0]).shape, 2)[1]
        row_bytes = builder.mul(cols, intp(context.get_abi_sizeof(context.get_data_type(aryty.dtype))))
        lines = builder.udiv(builder.add(row_bytes, intp(CACHE_LINE - 1)), intp(CACHE_LINE))
        with cgutils.for_range(builder, lines) as loop:
            _prefetch(builder, builder.gep(start, [builder.mul(loop.index, intp(CACHE_LINE))]))
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def f32_to_f16_bits(typingctx, value):
    """float32 -> float16 (round to nearest even) as its uint16 bits."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(types.float32), codegen


def store_f32(arr, i, j, value):
    """arr[i, j] = value, a float32, converted to arr's storage (jitted code only)."""
    raise NotImplementedError("store_f32 is for jitted code")


@overload(store_f32, inline="always")
def _store_f32(arr, i, j, value):
    if not isinstance(arr, types.Array):
        return None
    if arr.dtype == types.uint16:
        def impl(arr, i, j, value):
            arr[i, j] = f32_to_f16_bits(value)
        return impl
    if arr.dtype == types.int8:  # value is already in code units: round, clip to +-127
        def impl(arr, i, j, value):
            arr[i, j] = np.int8(np.floor(min(max(value, np.float32(-127.0)), np.float32(127.0))
                                         + np.float32(0.5)))
        return impl

    def impl(arr, i, j, value):
        arr[i, j] = value
    return impl


def _factor_slots(dtype):
    """How many elements of a row of `dtype` hold its float32 factor: int8
    store rows (policy.ROW_FACTOR_CODES) and int16 cues
    (distance.int16_cue_width) end in one; 0 for float rows, which have none."""
    if dtype == types.int8:
        return ROW_FACTOR_CODES
    if dtype == types.int16:
        return ROW_FACTOR_CODES // 2
    return 0


@intrinsic
def _factor_pointer(typingctx, arr, i):
    """A float32 pointer to the factor that ends row `i` of an int8 store or int16 cue."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and _factor_slots(arr.dtype)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        cols = cgutils.unpack_tuple(builder, ary.shape, 2)[1]
        at = builder.sub(cols, context.get_constant(types.intp, _factor_slots(aryty.dtype)))
        item = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], at])
        return builder.bitcast(item, ir.FloatType().as_pointer())

    return types.CPointer(types.float32)(arr, types.intp), codegen


def vector_dim(a):
    """The dimension of the vectors in `a`'s rows: its width, less the factor
    an int8 store's rows and int16 cues end in (jitted code only)."""
    raise NotImplementedError("vector_dim is for jitted code")


@overload(vector_dim, inline="always")
def _vector_dim(a):
    slots = _factor_slots(a.dtype) if isinstance(a, types.Array) else 0
    return lambda a: a.shape[1] - slots


def row_factor(a, i):
    """What row `i`'s elements are multiplied by: the factor of an int8
    store's row or an int16 cue, 1 for float rows and cues (jitted code only)."""
    raise NotImplementedError("row_factor is for jitted code")


@overload(row_factor, inline="always")
def _row_factor(a, i):
    if isinstance(a, types.Array) and _factor_slots(a.dtype):
        return lambda a, i: _factor_pointer(a, i)[0]
    return lambda a, i: np.float32(1.0)


def set_row_factor(a, i, value):
    """Write the factor of an int8 store's row or an int16 cue; nothing for
    float rows (jitted code only)."""
    raise NotImplementedError("set_row_factor is for jitted code")


@overload(set_row_factor, inline="always")
def _set_row_factor(a, i, value):
    if isinstance(a, types.Array) and _factor_slots(a.dtype):
        def impl(a, i, value):
            _factor_pointer(a, i)[0] = np.float32(value)
        return impl
    return lambda a, i, value: None


def is_codes(a):
    """True for an int8 store (a constant the compiler folds; jitted code only)."""
    raise NotImplementedError("is_codes is for jitted code")


@overload(is_codes, inline="always")
def _is_codes(a):
    if isinstance(a, types.Array) and a.dtype == types.int8:
        return lambda a: True
    return lambda a: False


@intrinsic
def pointer_to(typingctx, address, dtype):
    """An int64 address as a typed pointer for `numba.carray`; `dtype` is a
    NumPy scalar type (np.int32) or an array's `.dtype`."""
    if isinstance(dtype, types.DType):
        item = dtype.dtype
    elif isinstance(dtype, types.NumberClass):
        item = dtype.instance_type
    else:
        return None
    ptr_type = types.CPointer(item)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(types.int64, dtype), codegen
