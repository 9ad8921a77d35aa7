"""The stats block: one small shared-memory block `engram_<engine>_stats`,
created by the server next to its catalog, into which the engine's processes
write the counters only they can count; the server's collector reads it at
scrape time (collector.py). Prometheus's multiprocess mode would instead keep
a file per process in a directory that grows with every restart.

Every word is an int64 with exactly one writer, so a word is never written
by two processes and needs no lock; a reader may see a histogram mid-update
(a bucket counted, its sum not yet), never a torn word. S = space slots
(`metrics_spaces` + 1: the last, "other", sums every later space), W = index
workers, C = error codes (`errors.CODES`, in order), H = latency histogram
words (a count per bucket of LATENCY_BOUNDS, one for +Inf, then the sum in
ns), B = size histogram words (a count per bucket of SIZE_BOUNDS, +Inf, sum).

| region      | shape          | writer               | meaning                                     |
|-------------|----------------|----------------------|---------------------------------------------|
| header      | [8]            | server               | MAGIC, VERSION, S, W, C, H, B               |
| accepted    | [S, 3]         | front                | observations accepted, by priority          |
|             |                |                      | (high, normal, low)                         |
| rejected    | [S, C]         | front                | observations refused, by error code         |
| activations | [S, 4]         | front                | times a space's pressure rose into a level  |
|             |                |                      | (normal, warning, critical, overloaded)     |
| level       | [S]            | front                | the highest pressure level of the slot's    |
|             |                |                      | spaces now (0-3)                            |
| fill        | [S]            | front                | the fullest window of the slot's spaces:    |
|             |                |                      | window / its limit, parts per million       |
| observed    | [H]            | front                | accept-to-indexed seconds, per observation  |
| recalled    | [3, H]         | front                | recall seconds, hand-off to last part, by   |
|             |                |                      | consistency (strong, snapshot, indexed)     |
| front       | [8]            | front                | WAL_WRITTEN: log bytes appended             |
| fsync       | [H]            | front's log, under   | seconds of each fdatasync of the log        |
|             |                | its I/O lock         |                                             |
| workers     | [W, 3 + B]     | index worker i       | UTILIZATION (busy share of the last second, |
|             |                | (row i)              | parts per million), STOLEN (claims of       |
|             |                |                      | another worker's segments), DEFERRED_US     |
|             |                |                      | (microseconds slept while recalls ran:      |
|             |                |                      | engine/beacon.py), then the histogram of    |
|             |                |                      | nodes inserted per claim                    |

Counters survive the restart of their writer (a restarted front or worker
adds to what its predecessor wrote) and start at zero with the server. With
`--metrics off` there is no block: the front records nothing, and index
workers (like those of an embedded engine) write into a private one.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

from ..errors import CODES
from ..store import shm
from ..transport.credit import LEVELS
from ..transport.protocol import PRIORITIES

MAGIC_VALUE = 0x454E4752414D5354  # "ENGRAMST"
VERSION = 1
(MAGIC, VERSION_WORD, N_SLOTS, N_WORKERS, N_CODES, N_LATENCY, N_SIZE) = range(7)
HEADER_WORDS = 8
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
CONSISTENCIES = ("strong", "snapshot", "indexed")
REASONS = tuple(CODES)
WAL_WRITTEN = 0
UTILIZATION, STOLEN, DEFERRED_US = 0, 1, 2
WORKER_HEAD = 3
FRONT_WORDS = 8


def block_name(engine: str) -> str:
    return shm.block_name(engine, "stats")


class Histogram:
    """A Prometheus histogram in a row of int64 words: a count per bucket
    (the last is +Inf), then the sum of the observations times `scale`."""

    def __init__(self, row: np.ndarray, bounds: tuple, scale: float):
        assert len(row) == len(bounds) + 2
        self.row, self.bounds, self.scale = row, bounds, scale

    def observe(self, value: float, n: int = 1) -> None:
        """Count `n` observations of `value`."""
        self.row[bisect_left(self.bounds, value)] += n
        self.row[-1] += int(value * self.scale * n)

    def buckets(self) -> tuple[list[tuple[str, int]], float, int]:
        """(cumulative (le, count) pairs ending with +Inf, sum, count), as
        prometheus_client's HistogramMetricFamily takes them."""
        counts = self.row[:-1].tolist()
        total, out = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], counts):
            total += count
            out.append((bound, total))
        return out, int(self.row[-1]) / self.scale, total

    def quantile(self, q: float) -> float | None:
        """The q-quantile as Prometheus's histogram_quantile estimates it
        (linear within the bucket), None without observations."""
        counts = self.row[:-1]
        total = int(counts.sum())
        if not total:
            return None
        rank = q * total
        below, lower = 0, 0.0
        for bound, count in zip((*self.bounds, self.bounds[-1]), counts.tolist()):
            if below + count >= rank and count:
                return lower + (bound - lower) * (rank - below) / count
            below, lower = below + count, bound
        return self.bounds[-1]


def latency_summary(histograms: list[Histogram]) -> dict:
    """{count, p50_ms, p99_ms} over these latency histograms together (the
    `stats` op's `latency`)."""
    merged = Histogram(np.sum([h.row for h in histograms], axis=0), LATENCY_BOUNDS, 1e9)
    quantile = {q: merged.quantile(q) for q in (0.5, 0.99)}
    return {"count": merged.buckets()[2],
            **{f"p{round(q * 100)}_ms": None if v is None else round(v * 1000, 3)
               for q, v in quantile.items()}}


def _words(slots: int, workers: int) -> list[tuple[str, tuple]]:
    latency, size = len(LATENCY_BOUNDS) + 2, len(SIZE_BOUNDS) + 2
    return [("header", (HEADER_WORDS,)), ("accepted", (slots, len(PRIORITIES))),
            ("rejected", (slots, len(REASONS))), ("activations", (slots, len(LEVELS))),
            ("level", (slots,)), ("fill", (slots,)), ("observed", (latency,)),
            ("recalled", (len(CONSISTENCIES), latency)),
            ("front", (FRONT_WORDS,)), ("fsync", (latency,)), ("workers", (workers, WORKER_HEAD + size))]


def _size(slots: int, workers: int) -> int:
    return 8 * sum(int(np.prod(shape)) for _, shape in _words(slots, workers))


class StatsBlock:
    def __init__(self, buf, block=None, owner: bool = False):
        self.block, self.owner = block, owner
        head = np.ndarray((HEADER_WORDS,), np.int64, buffer=buf)
        if int(head[MAGIC]) != MAGIC_VALUE or int(head[VERSION_WORD]) != VERSION or \
                int(head[N_CODES]) != len(REASONS) or int(head[N_LATENCY]) != len(LATENCY_BOUNDS) or \
                int(head[N_SIZE]) != len(SIZE_BOUNDS):
            raise ValueError("not a stats block of this version")
        self.slots, self.n_workers = int(head[N_SLOTS]), int(head[N_WORKERS])
        at = 0
        for name, shape in _words(self.slots, self.n_workers):
            setattr(self, name, np.ndarray(shape, np.int64, buffer=buf, offset=at))
            at += 8 * int(np.prod(shape))
        self.observe_latency = Histogram(self.observed, LATENCY_BOUNDS, 1e9)
        self.recall_latency = [Histogram(row, LATENCY_BOUNDS, 1e9) for row in self.recalled]
        self.fsync_latency = Histogram(self.fsync, LATENCY_BOUNDS, 1e9)
        self.batch_sizes = [Histogram(row[WORKER_HEAD:], SIZE_BOUNDS, 1.0) for row in self.workers]

    @staticmethod
    def _init(buf, slots: int, workers: int) -> None:
        head = np.ndarray((HEADER_WORDS,), np.int64, buffer=buf)
        head[[N_SLOTS, N_WORKERS, N_CODES, N_LATENCY, N_SIZE]] = [
            slots, workers, len(REASONS), len(LATENCY_BOUNDS), len(SIZE_BOUNDS)]
        head[VERSION_WORD] = VERSION
        head[MAGIC] = MAGIC_VALUE  # last: the block is complete

    @classmethod
    def create(cls, engine: str, spaces: int, workers: int) -> "StatsBlock":
        """The server's block: `spaces` labelled slots and "other", a row per
        index worker."""
        block = shm.create(block_name(engine), _size(spaces + 1, workers))
        cls._init(block.buf, spaces + 1, workers)
        return cls(block.buf, block, owner=True)

    @classmethod
    def private(cls, spaces: int, workers: int) -> "StatsBlock":
        """A block in this process's memory, for a process no server watches."""
        buf = bytearray(_size(spaces + 1, workers))
        cls._init(buf, spaces + 1, workers)
        return cls(buf)

    @classmethod
    def attach(cls, engine: str, spaces: int, workers: int) -> "StatsBlock":
        """The engine's block, or a private one if its engine keeps none."""
        try:
            block = shm.attach(block_name(engine))
        except FileNotFoundError:
            return cls.private(spaces, workers)
        try:
            return cls(block.buf, block)
        except ValueError:
            shm.close(block)
            raise

    def slot(self, space_index: int) -> int:
        """The slot of the space at this catalog index: its own, or "other"."""
        return min(space_index, self.slots - 1)

    def close(self) -> None:
        """Release the views, then unmap (and remove, for the server)."""
        for name, _ in _words(self.slots, self.n_workers):
            setattr(self, name, None)
        self.observe_latency = self.recall_latency = self.fsync_latency = self.batch_sizes = None
        block, self.block = self.block, None
        if block is not None:
            (shm.destroy if self.owner else shm.close)(block)
