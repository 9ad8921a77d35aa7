"""Giving the CPU back from inside a kernel.

An index worker runs under SCHED_IDLE in an autogroup of its own at nice 19
(engine/idle.py), yet the scheduler weighs autogroups before their tasks: when
the worker's group is picked beside a recalling application's, the worker keeps
the core until the next tick (4 ms at HZ=250), SCHED_IDLE or not
(docs/architecture.md, Processes). A worker that yields every millisecond or
so (indexer.YIELD_S) lets the scheduler pick again before the tick; with
nothing else runnable, sched_yield returns at once.

A yield still leaves the core to the scheduler's choice, and a recall's
path (its search, then the hops of its answer through the server) wakes
several threads, each of which can find both cores taken by index workers.
So recalls also announce themselves (engine/beacon.py: a deadline in the
catalog), and an index writer checks the announcement after every node it
inserts and sleeps while a recall runs (`defer_to_recalls`).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .atomics import cas_i64
from .policy import kernel, uncounted_inline_kernel

CLOCK_MONOTONIC = 1  # the clock of Python's time.monotonic_ns on Linux
PAUSE_STEP_US = 50  # a deferring writer looks at the beacon again this often


@intrinsic
def sched_yield(typingctx):
    """libc's sched_yield(2), resolved by symbol when the kernel is loaded (an
    address would not survive Numba's on-disk cache)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        return builder.call(fn, [])
    return types.int32(), codegen


@intrinsic
def usleep(typingctx, microseconds):
    """libc's usleep(3): sleep, giving the core up."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "usleep")
        return builder.call(fn, [builder.trunc(args[0], ir.IntType(32))])
    return types.int32(microseconds), codegen


@intrinsic
def monotonic_ns(typingctx):
    """clock_gettime(CLOCK_MONOTONIC) in nanoseconds, the clock every process
    stamps the beacon with."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        timespec = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))  # tv_sec, tv_nsec
        words = builder.bitcast(timespec, i64.as_pointer())
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), i64.as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(ir.IntType(32), CLOCK_MONOTONIC), words])
        seconds = builder.load(words)
        nanoseconds = builder.load(builder.gep(words, [ir.Constant(ir.IntType(32), 1)]))
        return builder.add(builder.mul(seconds, ir.Constant(i64, 1_000_000_000)), nanoseconds)
    return types.int64(), codegen


@uncounted_inline_kernel
def defer_to_recalls(beacon, began, paused):
    """Sleep while the deadline a recall stamped into beacon[0] lies ahead,
    as long as the caller, which began at `began` (monotonic ns) and has
    slept `paused` ns since, has slept no longer than it has worked: a
    stream of recalls slows indexing to half its speed at most. Returns the
    time slept in all."""
    if beacon[0] == 0:  # no recall since the engine started
        return paused
    now = monotonic_ns()
    while beacon[0] > now and 2 * paused < now - began:
        usleep(PAUSE_STEP_US)
        later = monotonic_ns()
        paused += later - now
        now = later
    return paused


@uncounted_inline_kernel
def announce_recall(beacon, budget_ns):
    """A recall starts: stamp the deadline now + budget_ns into beacon[0]
    unless a later one stands; returns the stamp (for `recall_searched`)."""
    stamp = monotonic_ns() + budget_ns
    if stamp > beacon[0]:
        beacon[0] = stamp
    return stamp


@uncounted_inline_kernel
def recall_searched(beacon, stamp, linger_ns):
    """A recall's search is done: move the deadline to now + linger_ns,
    unless another recall stamped since its `announce_recall`."""
    cas_i64(beacon, 0, stamp, monotonic_ns() + linger_ns)


@kernel
def announce_recall_now(beacon, budget_ns):
    """`announce_recall` for Python callers."""
    return announce_recall(beacon, budget_ns)


@kernel
def recall_searched_now(beacon, stamp, linger_ns):
    """`recall_searched` for Python callers."""
    recall_searched(beacon, stamp, linger_ns)
