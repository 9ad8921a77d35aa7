"""The id index of a space: an open-addressing hash table from the 64-bit
FNV-1a hash of an id (kernels/ids.py; the `id_hash` column of a segment) to
where the id is stored, so that a writer finds an id already stored without
holding the ids themselves.

Table arrays (one table per space, in the writer's private memory: only the
single writer of the space uses it):

| field  | dtype  | shape | meaning                                              |
|--------|--------|-------|------------------------------------------------------|
| hashes | uint64 | [cap] | FNV-1a 64 of the id's UTF-8 bytes, where refs >= 0   |
| refs   | int64  | [cap] | (segment number in the space << 32) | slot; -1 empty |
| used   | int64  | [1]   | entries stored                                       |

cap is a power of two; the wrappers keep used <= cap / 2 (growing by doubling
with a rehash), so a probe meets an empty entry soon. Probing is linear from
the home position, a murmur3 finaliser of the hash (the low bits of FNV-1a
depend only on the low bits of the bytes, so ids differing in a digit would
cluster). Hashes may collide: several entries may hold one hash, and a lookup
returns every entry holding it; the caller compares the stored ids themselves
(`Segment.ids`). There are no deletions: rows buried after a crash leave the
index by a rebuild (rare: only a restarted writer buries).

Persistence: the table is never written anywhere. A restarted writer (the
server's front after a crash, or a recovery from a checkpoint, whose copy of
each segment includes its id_hash column) rebuilds it from the id_hash columns
with `insert_rows`, one pass per segment, skipping rows whose generation is
BURIED. No id is decoded, so a restart costs a kernel pass over 8 bytes per
row (see engram_shm/store/space.py).
"""

from collections import namedtuple

import numpy as np

from ..errors import InvalidArgument
from .ids import fnv1a_range
from .policy import kernel

IdTable = namedtuple("IdTable", "hashes refs used")

EMPTY = np.int64(-1)
BURIED = np.uint64(np.iinfo(np.uint64).max)  # the generation of a row no snapshot includes
MIN_CAPACITY = 64
FULL = -1  # insert_rows' status: the table has no empty entry left (the wrapper prevents it)
_LOW32 = np.int64(0xFFFFFFFF)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@kernel
def _home(h, mask):
    h = (h ^ (h >> _S33)) * _C1
    h = (h ^ (h >> _S33)) * _C2
    return np.int64((h ^ (h >> _S33)) & mask)


@kernel
def _put(hashes, refs, h, ref):
    """Store (h, ref) in the first empty entry from h's home; False if none."""
    cap = hashes.shape[0]
    mask = np.uint64(cap - 1)
    i = _home(h, mask)
    for _ in range(cap):
        if refs[i] == EMPTY:
            hashes[i] = h
            refs[i] = ref
            return True
        i = (i + 1) & (cap - 1)
    return False


@kernel
def _find(hashes, refs, h, row, out_rows, out_refs, n_out):
    """Append (row, ref) to out for every entry holding h; returns the new
    count, which may pass out's size (only the first ones are written)."""
    cap = hashes.shape[0]
    mask = np.uint64(cap - 1)
    i = _home(h, mask)
    for _ in range(cap):
        ref = refs[i]
        if ref == EMPTY:
            break
        if hashes[i] == h:
            if n_out < out_rows.shape[0]:
                out_rows[n_out] = row
                out_refs[n_out] = ref
            n_out += 1
        i = (i + 1) & (cap - 1)
    return n_out


@kernel
def _insert_rows(hashes, refs, used, id_hash, generation, segment_no, lo, hi):
    """Enter rows [lo, hi) of a segment, but buried ones; returns the number
    entered, or FULL."""
    base = np.int64(segment_no) << 32
    added = 0
    for s in range(lo, hi):
        if generation[s] == BURIED:
            continue
        if not _put(hashes, refs, id_hash[s], base | np.int64(s)):
            used[0] += added
            return FULL
        added += 1
    used[0] += added
    return added


@kernel
def _rehash(hashes, refs, new_hashes, new_refs):
    """Every entry of a table into a larger empty one; False if it is full."""
    for i in range(hashes.shape[0]):
        if refs[i] != EMPTY and not _put(new_hashes, new_refs, hashes[i], refs[i]):
            return False
    return True


@kernel
def _lookup(hashes, refs, query, out_rows, out_refs):
    n_out = 0
    for row in range(query.shape[0]):
        n_out = _find(hashes, refs, query[row], row, out_rows, out_refs, n_out)
    return n_out


@kernel
def _lookup_ids(hashes, refs, records, record_ends, id_lens, out_rows, out_refs):
    """`_lookup` of each id's FNV-1a: record i is id i then its text, ending at
    record_ends[i] (observations.Batch)."""
    n_out = 0
    for row in range(id_lens.shape[0]):
        start = record_ends[row - 1] if row > 0 else 0
        n_out = _find(hashes, refs, fnv1a_range(records, start, id_lens[row]), row, out_rows, out_refs,
                      n_out)
    return n_out


# -- wrappers -------------------------------------------------------------------
def capacity_for(n: int) -> int:
    """The smallest power of two that holds n entries at load <= 1/2."""
    return max(MIN_CAPACITY, 1 << max(0, 2 * n - 1).bit_length())


def new_table(n: int = 0) -> IdTable:
    """An empty table with room for n entries."""
    cap = capacity_for(n)
    return IdTable(np.zeros(cap, np.uint64), np.full(cap, EMPTY, np.int64), np.zeros(1, np.int64))


def _check_table(t: IdTable) -> None:
    cap = t.hashes.shape[0]
    if not (cap >= 1 and cap & (cap - 1) == 0 and t.hashes.dtype == np.uint64 and t.refs.dtype == np.int64
            and t.refs.shape == (cap,) and t.used.shape == (1,) and t.used.dtype == np.int64
            and t.hashes.flags.c_contiguous and t.refs.flags.c_contiguous
            and t.hashes.flags.writeable and t.refs.flags.writeable and t.used.flags.writeable):
        raise InvalidArgument("an id table is writable uint64 hashes and int64 refs of one "
                              "power-of-two length, and int64 used[1]")


def grow(t: IdTable, n: int) -> IdTable:
    """A table with room for n more entries at load <= 1/2: `t` itself, or a
    larger copy (doubled at least)."""
    _check_table(t)
    need = int(t.used[0]) + n
    cap = t.hashes.shape[0]
    if 2 * need <= cap:
        return t
    bigger = new_table(max(need, cap))
    if not _rehash(t.hashes, t.refs, bigger.hashes, bigger.refs):
        raise AssertionError("a rehash found no room in a table sized for it")
    bigger.used[0] = t.used[0]
    return bigger


def insert_rows(t: IdTable, id_hash: np.ndarray, generation: np.ndarray, segment_no: int,
                lo: int, hi: int) -> IdTable:
    """Enter rows [lo, hi) of a segment (its id_hash and generation columns)
    but buried ones, as refs (segment_no << 32 | slot); returns the table,
    grown if needed (use it instead of `t`)."""
    if not (id_hash.dtype == np.uint64 and generation.dtype == np.uint64 and id_hash.ndim == 1
            and generation.ndim == 1 and 0 <= lo <= hi <= min(id_hash.shape[0], generation.shape[0])
            and 0 <= segment_no < 2 ** 31 and hi <= 2 ** 32):
        raise InvalidArgument("insert_rows needs uint64 id_hash and generation columns holding "
                              "rows [lo, hi) and a segment number below 2**31")
    t = grow(t, hi - lo)
    if _insert_rows(t.hashes, t.refs, t.used, id_hash, generation, segment_no, lo, hi) == FULL:
        raise AssertionError("an id table grown for the rows found no room")
    return t


def _collect(run, t: IdTable, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Run a lookup kernel with outputs of room n (almost always enough: more
    than one match per query is a hash collision) and again if it was not."""
    out_rows, out_refs = np.empty(n, np.int64), np.empty(n, np.int64)
    found = run(t.hashes, t.refs, out_rows, out_refs)
    if found > n:
        out_rows, out_refs = np.empty(found, np.int64), np.empty(found, np.int64)
        found = run(t.hashes, t.refs, out_rows, out_refs)
    return out_rows[:found], out_refs[:found]


def lookup(t: IdTable, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, ref) whose entry holds the query row's hash, by
    query row."""
    _check_table(t)
    if query.dtype != np.uint64 or query.ndim != 1:
        raise InvalidArgument("lookup needs a 1-D uint64 array of hashes")
    query = np.ascontiguousarray(query)
    return _collect(lambda h, r, o, f: _lookup(h, r, query, o, f), t, query.shape[0])


def lookup_ids(t: IdTable, records: np.ndarray, record_ends: np.ndarray,
               id_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`lookup` of the FNV-1a hashes of a batch's ids (the columns of an
    observations.Batch): candidates, whose stored id may still differ."""
    _check_table(t)
    n = id_lens.shape[0]
    if not (records.dtype == np.uint8 and record_ends.dtype == np.int64 and id_lens.dtype == np.int32
            and records.ndim == record_ends.ndim == id_lens.ndim == 1 and record_ends.shape == (n,)
            and (n == 0 or (int(record_ends[-1]) <= records.shape[0] and int(id_lens.min()) >= 0))):
        raise InvalidArgument("lookup_ids needs uint8 records, int64 record_ends and int32 id_lens "
                              "of one batch")
    starts = np.concatenate([[0], record_ends[:-1]])
    if n and ((record_ends - starts) < id_lens).any():
        raise InvalidArgument("an id runs past its record")
    return _collect(lambda h, r, o, f: _lookup_ids(h, r, records, record_ends, id_lens, o, f), t, n)
