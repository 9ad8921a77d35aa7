"""The write-ahead log: what the single writer accepted, in files, checksummed.

A file `<first lsn, 20 digits>.wal` is a 32-byte header, then records:

| part          | bytes | content                                                    |
|---------------|-------|------------------------------------------------------------|
| file header   | 32    | magic "ENGRAMWL", u32 version, u32 0, u64 first lsn,       |
|               |       | u64 committed generation when the file was opened          |
| record header | 8     | u32 body length, u32 crc32c of (length bytes + body)       |
| body          | n     | u64 lsn, u8 kind, u32 meta length, msgpack meta, blobs     |

Every record has the next log sequence number (lsn), across files. Kinds:
SPACE (meta: the space's parameters and owner), SESSION (meta: key, state, priority) and
BATCH (meta: space, first generation, n, dim, width (elements of a stored
row: dim, or dim + 4 for an int8 row's codes and factor; records before
layout 5 have none and rows of dim), dtype, an int8 space's scales as
float32 bytes (records before layout 2 carry one `scale`), session, last
sequence, record bytes; blobs: the vectors in their storage dtype, as stored, then when
f64[n], confidence f32[n], id_lens i32[n], record_ends i64[n], the UTF-8
records). A batch's vectors are logged from the segment after they were
checked and converted, so the log costs what the store costs and a replay
stores the same bits.

Only a whole record counts: a reader stops a file at the first record that is
short, fails its checksum or breaks the lsn sequence (a torn tail), logs what
it cut, and goes on with the next file only if that one continues the lsn
sequence. The writer cuts a torn tail off the last file before appending.
Integers are little-endian.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import crc32c
import msgpack
import numpy as np

from .. import faults
from ..errors import StorageError
from .datadir import fsync_dir, lock, storage_error, unlock

log = logging.getLogger(__name__)

MAGIC = b"ENGRAMWL"
VERSION = 1
FILE_HEADER = struct.Struct("<8sIIQQ")
RECORD_HEADER = struct.Struct("<II")
BODY_HEADER = struct.Struct("<QBI")
SPACE, BATCH, SESSION = 1, 2, 3
MAX_RECORD = 1 << 31
SUFFIX = ".wal"
VECTOR_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<u2"), "int8": np.dtype("i1")}


def file_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SUFFIX}"


def log_files(directory: str) -> list[str]:
    """Paths of the log's files, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in sorted(names)
            if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit()]


def batch_columns(meta: dict) -> list[tuple[np.dtype, int]]:
    """(dtype, count) of each blob of a BATCH record, in order: the one
    description of the layout, for writing and reading alike."""
    n = meta["n"]
    return [(VECTOR_DTYPES[meta["dtype"]], n * row_width(meta)), (np.dtype("<f8"), n), (np.dtype("<f4"), n),
            (np.dtype("<i4"), n), (np.dtype("<i8"), n), (np.dtype(np.uint8), meta["bytes"])]


def row_width(meta: dict) -> int:
    """Elements of a logged vector: `width` (an int8 row's codes and factor),
    `dim` in records written before rows had factors."""
    return meta.get("width", meta["dim"])


@dataclass(frozen=True)
class Record:
    lsn: int
    kind: int
    meta: dict
    body: memoryview  # the blobs
    path: str
    offset: int

    def batch(self) -> list[np.ndarray]:
        """The blobs of a BATCH record as arrays (views of the file's bytes)."""
        out, at = [], 0
        for dtype, count in batch_columns(self.meta):
            out.append(np.frombuffer(self.body, dtype, count, at))
            at += dtype.itemsize * count
        if at != len(self.body):
            raise ValueError(f"batch blobs take {at} bytes, the record holds {len(self.body)}")
        return out


@dataclass
class FileScan:
    """What reading one log file found."""
    path: str
    first_lsn: int
    start_generation: int
    records: int = 0
    last_lsn: int = 0
    good_end: int = FILE_HEADER.size
    size: int = 0
    problem: str | None = None  # why the file ends before `size`

    @property
    def cut_bytes(self) -> int:
        return self.size - self.good_end


def _parse(data: bytes, path: str, scan: FileScan) -> Iterator[Record]:
    at = FILE_HEADER.size
    expected = scan.first_lsn
    view = memoryview(data)
    while at < len(data):
        if at + RECORD_HEADER.size > len(data):
            scan.problem = "a record header is cut short"
            return
        length, crc = RECORD_HEADER.unpack_from(data, at)
        end = at + RECORD_HEADER.size + length
        if length < BODY_HEADER.size or end > len(data):
            scan.problem = f"a record of {length} bytes runs past the end of the file"
            return
        body = view[at + RECORD_HEADER.size:end]
        if crc32c.crc32c(body, value=crc32c.crc32c(data[at:at + 4])) != crc:
            scan.problem = "a record fails its checksum"
            return
        lsn, kind, meta_len = BODY_HEADER.unpack_from(body)
        if lsn != expected or BODY_HEADER.size + meta_len > length:
            scan.problem = f"a record has lsn {lsn} where {expected} was due"
            return
        meta = msgpack.unpackb(body[BODY_HEADER.size:BODY_HEADER.size + meta_len], raw=False)
        yield Record(lsn, kind, meta, body[BODY_HEADER.size + meta_len:], path, at)
        at = end
        scan.records += 1
        scan.last_lsn = lsn
        scan.good_end = at
        expected = lsn + 1


def scan_file(path: str) -> tuple[FileScan, Iterator[Record]]:
    """A file's header and its good records (lazily; the scan's counters are
    final once the iterator is exhausted)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # writable: replayed arrays are kernel inputs
        del data[f.readinto(data):]
    head = _head(data)
    if head is None:
        scan = FileScan(path, 0, 0, size=len(data), good_end=0,
                        problem="the file header is cut short, has no log magic or an unknown version")
        return scan, iter(())
    first_lsn, start_gen = head
    scan = FileScan(path, first_lsn, start_gen, size=len(data), last_lsn=first_lsn - 1)
    return scan, _parse(data, path, scan)


def _head(data: bytes) -> tuple[int, int] | None:
    """(first lsn, start generation) from a file's first bytes, None if they
    are not a header of this version."""
    if len(data) < FILE_HEADER.size:
        return None
    magic, version, _, first_lsn, start_gen = FILE_HEADER.unpack_from(data)
    return (first_lsn, start_gen) if magic == MAGIC and version == VERSION else None


def file_head(path: str) -> tuple[int, int] | None:
    """A log file's (first lsn, start generation), read from its header
    alone; None if unreadable."""
    try:
        with open(path, "rb") as f:
            return _head(f.read(FILE_HEADER.size))
    except OSError:
        return None


def read_log(directory: str, scans: list[FileScan] | None = None) -> Iterator[Record]:
    """Every good record of the log, in lsn order. A file whose first lsn does
    not continue the one before ends the log there: records after a hole are
    not replayed (they would skip generations and sequences). What is cut is
    logged and described in `scans`."""
    expected = None
    for path in log_files(directory):
        scan, records = scan_file(path)
        if scans is not None:
            scans.append(scan)
        if expected is not None and scan.problem is None and scan.first_lsn != expected:
            scan.problem = f"the file starts at lsn {scan.first_lsn}, {expected} was due: records are missing"
            scan.good_end = 0
            log.error("write-ahead log %s: %s; it and later files are not replayed", path, scan.problem)
            return
        yield from records
        if scan.problem is not None and scan.cut_bytes:
            log.warning("write-ahead log %s: %s at byte %d; %d bytes after it are cut", path,
                        scan.problem, scan.good_end, scan.cut_bytes)
        if scan.good_end == 0 and scan.problem is not None:
            continue
        expected = scan.last_lsn + 1


class WalWriter:
    """Appends records for the one writer of an engine; `sync()` makes what was
    appended durable. Under fsync="interval" a background thread syncs every
    `interval_ms`; under "always" the caller syncs before it acks (group
    commit: one sync covers every record appended since the last)."""

    def __init__(self, directory: str, policy: str, interval_ms: int, file_bytes: int,
                 next_lsn: int, start_generation: int):
        self.directory = directory
        self.policy = policy
        self.file_bytes = file_bytes
        self._lock_fd = lock(os.path.join(directory, "LOCK"), "the write-ahead log writer")
        self._fd = None
        self._io = threading.Lock()  # the fd against a concurrent sync
        self.broken: StorageError | None = None  # a failed write whose cut failed: retried
        self.failed: StorageError | None = None  # a failed fsync: final (see sync)
        try:
            self.next_lsn = max(next_lsn, self._cut_torn_tail() + 1)
            self.written = self.synced = 0  # bytes appended, and made durable, by this writer
            self._open_file(start_generation)
        except OSError as e:
            unlock(self._lock_fd)
            raise storage_error(e, "opening the write-ahead log") from None
        self._stop = threading.Event()
        self._period = interval_ms / 1000 if policy == "interval" else None
        self._wanted = threading.Condition()
        self._want = False
        self.on_synced = lambda: None  # called by the sync thread after each sync
        self.on_fsync = lambda seconds: None  # called with each fdatasync's time, under the I/O lock
        self._held: tuple[bytes, int] | None = None  # faults.ACK_BEFORE_WAL only: a record not yet written
        self._writes = 0  # record writes tried (faults.FAIL_WRITE_EVERY)
        self._syncer = threading.Thread(target=self._sync_thread, name="engram-wal-sync", daemon=True)
        self._syncer.start()

    @property
    def last_lsn(self) -> int:
        return self.next_lsn - 1

    def _cut_torn_tail(self) -> int:
        """Cut a torn record off the last file; returns the last good lsn (0
        for an empty log)."""
        files = log_files(self.directory)
        if not files:
            return 0
        scan, records = scan_file(files[-1])
        for _ in records:
            pass
        if scan.problem is not None and scan.good_end >= FILE_HEADER.size:
            log.warning("write-ahead log %s: %s; cutting %d bytes at %d", scan.path, scan.problem,
                        scan.cut_bytes, scan.good_end)
            with open(scan.path, "r+b") as f:
                f.truncate(scan.good_end)
                os.fsync(f.fileno())
        return scan.last_lsn

    def _open_file(self, start_generation: int) -> None:
        path = os.path.join(self.directory, file_name(self.next_lsn))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, FILE_HEADER.pack(MAGIC, VERSION, 0, self.next_lsn, start_generation))
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        with self._io:
            old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        self._size = FILE_HEADER.size

    # -- appending ---------------------------------------------------------------
    def append(self, kind: int, meta: dict, blobs=(), start_generation: int = 0) -> int:
        """Append one record; returns its lsn. Raises StorageFull/StorageError
        with nothing of the record left in the log."""
        if self.failed is not None:
            raise self.failed
        if self.broken is not None:
            self._heal()
        packed = msgpack.packb(meta, use_bin_type=True)
        parts = [BODY_HEADER.pack(self.next_lsn, kind, len(packed)), packed,
                 *(memoryview(b).cast("B") for b in blobs)]
        length = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)
        if length >= MAX_RECORD:
            raise StorageError(f"a log record of {length} bytes exceeds the limit of {MAX_RECORD}")
        head = struct.pack("<I", length)
        crc = crc32c.crc32c(head)
        for p in parts:
            crc = crc32c.crc32c(p, value=crc)
        record = [head + struct.pack("<I", crc), *parts]
        if faults.ANY and self._faulty(kind, record, RECORD_HEADER.size + length):
            return self.next_lsn - 1
        try:
            if self._size >= self.file_bytes:
                self.sync()  # the file is complete: durable before the next one starts
                self._open_file(start_generation)
            self._write_all(record, RECORD_HEADER.size + length)
        except OSError as e:
            raise storage_error(e, "appending to the write-ahead log") from None
        self._appended(RECORD_HEADER.size + length)
        return self.next_lsn - 1

    def _appended(self, size: int) -> None:
        self.next_lsn += 1
        self._size += size
        self.written += size
        if self.policy == "never":
            self.synced = self.written

    def _faulty(self, kind: int, record: list, size: int) -> bool:
        """Test-only faults (engram_shm/faults.py); True if the record was
        held back instead of written (ACK_BEFORE_WAL: written with the next)."""
        if self._held is not None:  # the bug: the previous batch reaches the log only now
            held, self._held = self._held, None
            try:
                self._write_all([held[0]], held[1])
            except OSError as e:
                raise storage_error(e, "appending to the write-ahead log") from None
            self._size += held[1]
            self.written += held[1]
        if faults.ACK_BEFORE_WAL and kind == BATCH:
            self._held = (b"".join(bytes(p) for p in record), size)
            self.next_lsn += 1
            return True
        return False

    def _write_all(self, parts: list, total: int) -> None:
        """writev until everything is written; on failure, cut what was
        written of this record, so the log never holds a partial one."""
        start = self._size
        done = 0
        try:
            if faults.FAIL_WRITE_EVERY:
                self._writes += 1
                if self._writes % faults.FAIL_WRITE_EVERY == 0:  # test-only: a disk that fails mid-record
                    done += os.write(self._fd, bytes(parts[0])[:4])
                    raise OSError(errno.EIO, "injected write failure (ENGRAM_TEST_FAULTS)")
            while done < total:
                done += os.writev(self._fd, _skip(parts, done))
        except OSError as e:
            if done:
                try:
                    # Back to where the record began: the file position too,
                    # or the next record is written past a hole of zeros that
                    # recovery reads as the log's end (losing what follows).
                    os.ftruncate(self._fd, start)
                    os.lseek(self._fd, start, os.SEEK_SET)
                except OSError:
                    self.broken = storage_error(e, "cutting a failed log write")
            raise

    def _heal(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
        except OSError as e:
            raise storage_error(e, "cutting a failed log write") from None
        self.broken = None

    # -- durability --------------------------------------------------------------
    def sync(self) -> None:
        """Make everything appended so far durable (fdatasync)."""
        with self._io:
            target = self.written
            if target <= self.synced or self._fd is None:
                return
            started = time.perf_counter()
            if faults.SLOW_FSYNC_S:
                time.sleep(faults.SLOW_FSYNC_S)  # test-only: a slow disk
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                # After a failed fsync the kernel may have dropped the dirty
                # pages: nothing written since the last good sync is known to
                # be on disk, so the writer must stop (PostgreSQL's lesson).
                self.failed = storage_error(e, "syncing the write-ahead log")
                raise self.failed from None
            self.on_fsync(time.perf_counter() - started)
            self.synced = max(self.synced, target)

    def request_sync(self) -> None:
        """Have the sync thread make everything appended so far durable, then
        call `on_synced`: a caller that holds its acks until then never waits
        for the disk itself, and one fsync covers every record appended
        before it starts (group commit)."""
        with self._wanted:
            self._want = True
            self._wanted.notify()

    def _sync_thread(self) -> None:
        """Syncs on request, and under fsync="interval" every period too."""
        while True:
            with self._wanted:
                if not self._want and not self._stop.is_set():
                    self._wanted.wait(self._period)
                if self._stop.is_set():
                    return
                self._want = False
            try:
                self.sync()
            except StorageError:
                log.exception("fsync of the write-ahead log failed; no more appends")
                self.on_synced()
                return
            self.on_synced()

    def close(self) -> None:
        """Sync, close the file and release the log's lock."""
        if self._lock_fd is None:
            return
        with self._wanted:
            self._stop.set()
            self._wanted.notify()
        self._syncer.join()
        try:
            self.sync()
        except StorageError:
            log.exception("final fsync of the write-ahead log failed")
        with self._io:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        fd, self._lock_fd = self._lock_fd, None
        unlock(fd)


def _skip(parts: list, n: int) -> list:
    """`parts` without their first n bytes (after a short write)."""
    if n == 0:
        return parts
    out = []
    for p in parts:
        size = p.nbytes if isinstance(p, memoryview) else len(p)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(p)[n:] if n else p)
        n = 0
    return out
