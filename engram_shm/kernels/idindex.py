"""The id index of a space: an open-addressing hash table from the 64-bit
FNV-1a hash of an id (kernels/ids.py; the `id_hash` column of a segment) to
where the id is stored, so that a writer finds an id already stored without
holding the ids themselves.

Table arrays (one table per space, in the writer's private memory: only the
single writer of the space uses it):

| field   | dtype | shape    | meaning                                              |
|---------|-------|----------|------------------------------------------------------|
| entries | int64 | [cap, 2] | [i, 0] the bits of an id's FNV-1a 64 (uint64 viewed  |
|         |       |          | as int64); [i, 1] its ref + 1 (a ref: a key of the   |
|         |       |          | segment, the writer's: its catalog index,            |
|         |       |          | store/space.py, << 32 | slot), or 0: entry i is empty|
| used    | int64 | [1]      | entries stored (in `entries` and `old` together)     |
| old     | int64 | [ocap, 2]| the table before the last growth while its entries   |
|         |       |          | move over, else [0, 2]                               |
| moved   | int64 | [1]      | the entries of `old` below this index have moved     |

cap is a power of two; the wrappers keep used <= cap / 2, so a probe meets an
empty entry soon: 32 to 64 bytes per id. Probing is linear from the home
position, a murmur3 finaliser of the hash (the low bits of FNV-1a depend only
on the low bits of the bytes, so ids differing in a digit would cluster).

Growth is incremental, so that no single batch pays for moving every id: a
table about to pass load 1/2 becomes `old`, a table twice as large
(`_entries`) takes the new entries, and every insert moves MOVE_PER_ROW
entries of `old` per row it enters, in slot order. A lookup probes both,
skipping `old`'s entries below `moved` (they are in `entries` already: `old`
itself is never changed, so its probe chains stay whole). The old table is
gone after a quarter of its capacity in rows, before the new one reaches
load 1/2. With 1M ids in batches of 256, the slowest batch took 0.61 ms,
against 33 ms when the batch that grows the table moves every entry
(`python -m bench idtable`).

Memory latency is the cost: a table of 1M ids is 32 MiB and every probe or
insert lands on a random line. Hash and ref share a row so that each touches
one cache line, not two, and the kernels prefetch homes (inserts 16 rows ahead,
lookups all of a batch first) so that misses overlap. Rebuilding 1M ids took
131 ms with separate hash and ref arrays, 81 ms in rows, 29 ms with prefetch.

Hashes may collide: several entries may hold one hash, and a lookup returns
every entry holding it; the caller compares the stored ids themselves
(`Segment.ids`). There are no deletions: rows buried after a crash leave the
index by a rebuild (rare: only a restarted writer buries).

Persistence: the table is never written anywhere. A restarted writer (the
server's front after a crash, or a recovery from a checkpoint, whose copy of
each segment includes its id_hash column) rebuilds it from the id_hash columns
with `insert_rows`, one pass per segment, skipping rows whose generation is
BURIED. No id is decoded, so a restart costs a kernel pass over 8 bytes per
row (see engram_shm/store/space.py).
"""

import mmap
from collections import namedtuple

import numpy as np

from ..errors import InvalidArgument
from .ids import fnv1a_range
from .policy import kernel
from .scalar import prefetch_row

IdTable = namedtuple("IdTable", "entries used old moved")

EMPTY = np.int64(0)  # entries[i, 1] of an empty entry (refs are stored + 1)
BURIED = np.uint64(np.iinfo(np.uint64).max)  # the generation of a row no snapshot includes
MIN_CAPACITY = 64
MOVE_PER_ROW = 4  # entries of `old` moved per row entered: gone after cap_old / 4 rows
FULL = -1  # _insert_rows: the table has no empty entry left (the wrapper prevents it)
BAD_RECORD = -2  # _lookup_ids: an id runs outside its record, or a record outside `records`
HUGE_PAGE_BYTES = 4 << 20  # NumPy asks for huge pages from this size on (`_entries`)
AHEAD = 16  # _insert_rows and _move prefetch the home of the entry this far ahead
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@kernel
def _home(h, mask):
    h = (h ^ (h >> _S33)) * _C1
    h = (h ^ (h >> _S33)) * _C2
    return np.int64((h ^ (h >> _S33)) & mask)


@kernel
def _put(entries, h, stored_ref):
    """Store (h, ref + 1) in the first empty entry from h's home; False if none."""
    cap = entries.shape[0]
    i = _home(h, np.uint64(cap - 1))
    for _ in range(cap):
        if entries[i, 1] == EMPTY:
            entries[i, 0] = np.int64(h)
            entries[i, 1] = stored_ref
            return True
        i = (i + 1) & (cap - 1)
    return False


@kernel
def _find(entries, skip_below, h, row, out_rows, out_refs, n_out):
    """Append (row, ref) to out for every entry holding h, but those below
    index `skip_below`; returns the new count, which may pass out's size
    (only the first ones are written)."""
    cap = entries.shape[0]
    if cap == 0:
        return n_out
    bits = np.int64(h)
    i = _home(h, np.uint64(cap - 1))
    for _ in range(cap):
        stored_ref = entries[i, 1]
        if stored_ref == EMPTY:
            break
        if entries[i, 0] == bits and i >= skip_below:
            if n_out < out_rows.shape[0]:
                out_rows[n_out] = row
                out_refs[n_out] = stored_ref - 1
            n_out += 1
        i = (i + 1) & (cap - 1)
    return n_out


@kernel
def _move(old, moved, entries, n):
    """Move the next n entries of `old` (by index) into `entries`; False if
    it is full."""
    end = min(old.shape[0], moved[0] + n)
    mask = np.uint64(entries.shape[0] - 1)
    for i in range(moved[0], end):
        if i + AHEAD < end and old[i + AHEAD, 1] != EMPTY:
            prefetch_row(entries, _home(np.uint64(old[i + AHEAD, 0]), mask))
        if old[i, 1] != EMPTY and not _put(entries, np.uint64(old[i, 0]), old[i, 1]):
            return False
        moved[0] = i + 1
    moved[0] = end
    return True


@kernel
def _insert_rows(entries, used, old, moved, id_hash, generation, segment_no, lo, hi):
    """Move MOVE_PER_ROW entries of `old` per row, then enter rows [lo, hi)
    of a segment, but buried ones; returns the number entered, or FULL."""
    if not _move(old, moved, entries, MOVE_PER_ROW * (hi - lo)):
        return FULL
    base = (np.int64(segment_no) << 32) + 1
    mask = np.uint64(entries.shape[0] - 1)
    added = 0
    for s in range(lo, hi):
        if s + AHEAD < hi:
            prefetch_row(entries, _home(id_hash[s + AHEAD], mask))
        if generation[s] == BURIED:
            continue
        if not _put(entries, id_hash[s], base + np.int64(s)):
            used[0] += added
            return FULL
        added += 1
    used[0] += added
    return added


@kernel
def _lookup(entries, old, moved, query, out_rows, out_refs):
    """Every (row, ref) of an entry holding query[row] into out; returns their
    count, which may pass out's size (only the first ones are written). All
    homes are prefetched first: the probes of a batch then wait for memory
    together, not one after another."""
    mask = np.uint64(entries.shape[0] - 1)
    for row in range(query.shape[0]):
        prefetch_row(entries, _home(query[row], mask))
    n_out = 0
    for row in range(query.shape[0]):
        n_out = _find(entries, 0, query[row], row, out_rows, out_refs, n_out)
        n_out = _find(old, moved[0], query[row], row, out_rows, out_refs, n_out)
    return n_out


@kernel
def _lookup_ids(entries, old, moved, records, record_ends, id_lens, hashes, out_rows, out_refs):
    """`_lookup` of each id's FNV-1a (into `hashes`, caller-owned scratch):
    record i is id i then its text, ending at record_ends[i]
    (observations.Batch); BAD_RECORD if one does not fit."""
    start = 0
    for row in range(id_lens.shape[0]):
        end = record_ends[row]
        n = id_lens[row]
        if n < 0 or start + n > end or end > records.shape[0]:
            return BAD_RECORD
        hashes[row] = fnv1a_range(records, start, n)
        start = end
    return _lookup(entries, old, moved, hashes, out_rows, out_refs)


# -- wrappers -------------------------------------------------------------------
def capacity_for(n: int) -> int:
    """The smallest power of two that holds n entries at load <= 1/2."""
    return max(MIN_CAPACITY, 1 << max(0, 2 * n - 1).bit_length())


def new_table(n: int = 0) -> IdTable:
    """An empty table with room for n entries."""
    return IdTable(_entries(n), np.zeros(1, np.int64), _NO_OLD, np.zeros(1, np.int64))


def _entries(n: int) -> np.ndarray:
    """Room for n entries in zeroed pages that the kernel hands out as they are
    first written. A large table is mapped here, not made by np.zeros:
    NumPy asks for huge pages, and the first batch after a growth lands on
    all of them: it waited for 32 MiB to be zeroed at once, 4 ms (1.2 ms
    with small pages; throwaway timing)."""
    cap = capacity_for(n)
    if cap * 16 < HUGE_PAGE_BYTES:  # small: from the heap, not a mapping of its own per space
        return np.zeros((cap, 2), np.int64)
    return np.frombuffer(mmap.mmap(-1, cap * 16), np.int64).reshape(cap, 2)


_NO_OLD = np.zeros((0, 2), np.int64)  # writable like every `old`: one compiled type


def _check_table(t: IdTable) -> None:
    e, used, old, moved = t.entries, t.used, t.old, t.moved
    cap = e.shape[0]

    def words(a, rows: int) -> bool:
        return a.dtype == np.int64 and a.ndim == 2 and a.shape == (rows, 2) and a.flags.c_contiguous

    def counter(a) -> bool:
        return a.dtype == np.int64 and a.shape == (1,) and a.flags.writeable

    if not (words(e, cap) and cap and cap & (cap - 1) == 0 and e.flags.writeable and counter(used)
            and words(old, old.shape[0]) and old.shape[0] & (old.shape[0] - 1) == 0
            and old.shape[0] < cap and counter(moved)):
        raise InvalidArgument("an id table is writable int64 entries[cap, 2] (cap a power of two), "
                              "int64 old[ocap, 2] (ocap 0 or a smaller power of two) and int64 used[1] "
                              "and moved[1]")


def _vector(a: np.ndarray, dtype) -> bool:
    return a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous


def grow(t: IdTable, n: int) -> IdTable:
    """A table with room for n more entries at load <= 1/2: `t` itself, or
    a larger one (doubled at least) whose `old` is `t`'s entries, to be
    moved over by the inserts that follow. A table that is still moving its
    entries from an earlier growth moves the rest first (a batch larger
    than a quarter of the table)."""
    _check_table(t)
    need = int(t.used[0]) + n
    cap = t.entries.shape[0]
    if 2 * need <= cap:
        return t
    if t.old.shape[0] and not _move(t.old, t.moved, t.entries, t.old.shape[0]):
        raise AssertionError("moving an id table's entries found no room in a table sized for them")
    return IdTable(_entries(max(need, cap)), t.used, t.entries, np.zeros(1, np.int64))


def insert_rows(t: IdTable, id_hash: np.ndarray, generation: np.ndarray, segment_no: int,
                lo: int, hi: int) -> IdTable:
    """Enter rows [lo, hi) of a segment (its id_hash and generation columns)
    but buried ones, as refs (segment_no << 32 | slot); returns the table,
    grown if needed (use it instead of `t`)."""
    if not (_vector(id_hash, np.uint64) and _vector(generation, np.uint64)
            and 0 <= lo <= hi <= min(id_hash.shape[0], generation.shape[0])
            and 0 <= segment_no < 2 ** 31 and hi <= 2 ** 32):
        raise InvalidArgument("insert_rows needs contiguous uint64 id_hash and generation columns "
                              "holding rows [lo, hi) and a segment number below 2**31")
    t = grow(t, hi - lo)
    if _insert_rows(t.entries, t.used, t.old, t.moved, id_hash, generation, segment_no, lo, hi) == FULL:
        raise AssertionError("an id table grown for the rows found no room")
    if t.old.shape[0] and t.moved[0] == t.old.shape[0]:  # every entry moved: let the old table go
        t = t._replace(old=_NO_OLD, moved=np.zeros(1, np.int64))
    return t


def lookup(t: IdTable, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, ref) whose entry holds the query row's hash, by
    query row."""
    _check_table(t)
    if not _vector(query, np.uint64):
        raise InvalidArgument("lookup needs a contiguous 1-D uint64 array of hashes")
    n = query.shape[0]
    rows, refs = np.empty(n, np.int64), np.empty(n, np.int64)
    found = _lookup(t.entries, t.old, t.moved, query, rows, refs)
    if found > n:  # more than one entry of a hash: a collision (rare), again with room
        rows, refs = np.empty(found, np.int64), np.empty(found, np.int64)
        found = _lookup(t.entries, t.old, t.moved, query, rows, refs)
    return rows[:found], refs[:found]


def lookup_ids(t: IdTable, records: np.ndarray, record_ends: np.ndarray,
               id_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`lookup` of the FNV-1a hashes of a batch's ids (the columns of an
    observations.Batch): candidates, whose stored id may still differ."""
    _check_table(t)
    n = id_lens.shape[0]
    if not (_vector(records, np.uint8) and _vector(record_ends, np.int64) and _vector(id_lens, np.int32)
            and record_ends.shape[0] == n):
        raise InvalidArgument("lookup_ids needs contiguous uint8 records, int64 record_ends and "
                              "int32 id_lens of one batch")
    hashes, rows, refs = np.empty(n, np.uint64), np.empty(n, np.int64), np.empty(n, np.int64)
    found = _lookup_ids(t.entries, t.old, t.moved, records, record_ends, id_lens, hashes, rows, refs)
    if found == BAD_RECORD:
        raise InvalidArgument("an id runs outside its record, or a record outside the records")
    if found > n:  # more than one entry of a hash: a collision (rare), again with room
        rows, refs = np.empty(found, np.int64), np.empty(found, np.int64)
        found = _lookup(t.entries, t.old, t.moved, hashes, rows, refs)
    return rows[:found], refs[:found]
