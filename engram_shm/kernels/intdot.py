"""Dot products of int8 code rows with an int16 cue, summed in int32 by the
host's multiply-add of 16-bit pairs (x86 `pmaddwd`, fused with the sum into
`vpdpwssd` where AVX512-VNNI has it).

Written as LLVM IR because its vectoriser does not find this: a loop of
int8 x int16 products runs on 256-bit registers, and four rows' sums
sharing a cue become 32-bit multiplies (`vpmulld`), half the lanes again.
With 512-bit pairs, four rows of 384 codes took 6 ns a row in cache, the
float32 sums 16 ns (a throwaway micro-benchmark; docs/architecture.md,
Kernels, has the inserts' A/B). The sums are exact
while |code * cue| * dim < 2**31 (distance.int16_cue_max keeps cues so).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .scalar import item_pointer

# The multiply-add of each instruction set, widest first: (feature, i16
# lanes, intrinsic). Without one (not x86) the IR multiplies widened lanes
# and LLVM picks the target's instructions.
_MULTIPLY_ADDS = (
    ("+avx512bw", 32, "llvm.x86.avx512.pmaddw.d.512"),
    ("+avx2", 16, "llvm.x86.avx2.pmadd.wd"),
    ("+sse2", 8, "llvm.x86.sse2.pmadd.wd"),
)
_GENERIC_LANES = 8


def _multiply_add(context):
    """(lanes, intrinsic name or None) for the features Numba compiles for."""
    triple, _cpu, features = context.codegen().magic_tuple()
    if triple.startswith(("x86_64", "i686", "i386")):
        present = set(features.split(","))
        for feature, lanes, name in _MULTIPLY_ADDS:
            if feature in present:
                return lanes, name
    return _GENERIC_LANES, None


@intrinsic
def multiply_add_prefix(typingctx, codes, rows, cue, j, n):
    """The int32 sums of codes[r, t] * cue[j, t] over t < done for each row
    r of the tuple `rows`, and `done`: the elements of n the vector loop
    took (a multiple of its lanes); the caller adds the rest."""
    if not (isinstance(codes, types.Array) and codes.dtype == types.int8 and codes.ndim == 2
            and isinstance(cue, types.Array) and cue.dtype == types.int16 and cue.ndim == 2
            and isinstance(rows, types.UniTuple) and isinstance(rows.dtype, types.Integer)):
        return None
    k = rows.count
    sig = types.Tuple((types.UniTuple(types.int32, k), types.intp))(codes, rows, cue, j, n)

    def codegen(context, builder, signature, args):
        codes_ty, rows_ty, cue_ty, j_ty, n_ty = signature.args
        codes_v, rows_v, cue_v, j_v, n_v = args
        lanes, name = _multiply_add(context)
        i8, i16, i32, intp = ir.IntType(8), ir.IntType(16), ir.IntType(32), context.get_value_type(types.intp)
        v8, v16 = ir.VectorType(i8, lanes), ir.VectorType(i16, lanes)
        acc_ty = ir.VectorType(i32, lanes // 2 if name else lanes)

        def as_intp(value, ty):
            return context.cast(builder, value, ty, types.intp)

        row_pointers = [item_pointer(context, builder, codes_ty, codes_v, as_intp(r, rows_ty.dtype))
                        for r in cgutils.unpack_tuple(builder, rows_v, k)]
        cue_pointer = item_pointer(context, builder, cue_ty, cue_v, as_intp(j_v, j_ty))
        done = builder.and_(as_intp(n_v, n_ty), intp(-lanes))
        if name:
            madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_ty, [v16, v16]), name)
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [acc_ty]), f"llvm.vector.reduce.add.v{acc_ty.count}i32")

        def products(codes_chunk, cue_chunk):
            wide = builder.sext(codes_chunk, v16)
            if name:
                return builder.call(madd, [wide, cue_chunk])
            vi32 = ir.VectorType(i32, lanes)
            return builder.mul(builder.sext(wide, vi32), builder.sext(cue_chunk, vi32))

        entry = builder.block
        loop = builder.append_basic_block("madd.loop")
        exit_ = builder.append_basic_block("madd.exit")
        builder.cbranch(builder.icmp_signed(">", done, intp(0)), loop, exit_)
        builder.position_at_end(loop)
        at = builder.phi(intp)
        sums = [builder.phi(acc_ty) for _ in row_pointers]
        cue_chunk = builder.load(builder.bitcast(builder.gep(cue_pointer, [at]), v16.as_pointer()), align=2)
        added = [builder.add(s, products(builder.load(builder.bitcast(builder.gep(p, [at]), v8.as_pointer()),
                                                       align=1), cue_chunk))
                 for s, p in zip(sums, row_pointers)]
        after = builder.add(at, intp(lanes))
        builder.cbranch(builder.icmp_signed("<", after, done), loop, exit_)
        zero = ir.Constant(acc_ty, None)
        at.add_incoming(intp(0), entry)
        at.add_incoming(after, loop)
        for s, a in zip(sums, added):
            s.add_incoming(zero, entry)
            s.add_incoming(a, loop)
        builder.position_at_end(exit_)
        finals = []
        for a in added:
            final = builder.phi(acc_ty)
            final.add_incoming(zero, entry)
            final.add_incoming(a, loop)
            finals.append(final)
        totals = [builder.call(reduce_add, [f]) for f in finals]
        return context.make_tuple(builder, signature.return_type,
                                  [context.make_tuple(builder, signature.return_type[0], totals), done])

    return sig, codegen
