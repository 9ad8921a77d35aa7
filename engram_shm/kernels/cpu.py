"""Giving the CPU back from inside a kernel.

An index worker runs under SCHED_IDLE in an autogroup of its own at nice 19
(engine/idle.py), yet the scheduler weighs autogroups before their tasks: when
the worker's group is picked beside a recalling application's, the worker keeps
the core until the next tick (4 ms at HZ=250), SCHED_IDLE or not
(docs/architecture.md, Processes). A worker that yields every millisecond or
so (indexer.YIELD_S) lets the scheduler pick again before the tick; with
nothing else runnable, sched_yield returns at once.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def sched_yield(typingctx):
    """libc's sched_yield(2), resolved by symbol when the kernel is loaded (an
    address would not survive Numba's on-disk cache)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        return builder.call(fn, [])
    return types.int32(), codegen
