"""Checkpoints: every segment of an engine, copied to the data directory while
ingestion and recall go on, made atomic by a manifest written last.

    checkpoints/ckpt-<n>/seg-<index>.bin   one file per segment
    checkpoints/ckpt-<n>/MANIFEST.json     written last; names every file with
                                           its size and crc32c

A segment file is the segment's 512-byte header, then each column's used
prefix in layout order (store/layout.py): rows [0, ACCEPTED) of the per-row
columns, rows [0, UPPER_USED) of `upper`, bytes [0, ARENA_USED) of the arena.
Checkpoints stay proportional to what is stored. Each one is a full,
independent copy (as a Redis RDB snapshot is): hard-linking the files of
unchanged segments from the previous checkpoint would save writes, but one
damaged file would then damage every checkpoint kept, and the fallback to
the previous checkpoint would be worth nothing.

A consistent copy needs no pause (DESIGN 6): rows below ACCEPTED never change,
and the graph changes only under the segment's writer claim, which the copy
takes (the compare-and-swap index writers use) while it copies the graph
columns, then releases. The manifest records, read in this order: the log's
last lsn L, the sessions, and the committed generation G. Rows past G in a
copied segment are tentative: recovery buries them and replays their batches
from the log, which holds every batch past G and every session change past L.

A checkpoint directory is written as `ckpt-<n>.tmp`, every file fsynced, the
manifest written and fsynced, the directory renamed to `ckpt-<n>` and its
parent fsynced: a directory without the suffix is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, replace

import crc32c
import numpy as np

from ..engine.idle import give_way
from ..errors import Corrupt, DataDirCorrupt
from ..kernels.atomics import compare_and_swap
from . import quantization, shm
from .catalog import (
    CHECKPOINT_REQUEST,
    FRONT_RECOVERING,
    WAL_LSN,
    Catalog,
    SpaceParams,
    params_and_owner,
    segment_name,
)
from .datadir import fsync_dir
from .layout import (
    ACCEPTED,
    ARENA_USED,
    ENTRY,
    HEADER_WORDS,
    INDEXED,
    LAYOUT_VERSION,
    MAX_GEN,
    MAX_LEVEL,
    METRIC,
    MIN_GEN,
    REPAIR,
    SEALED,
    SEGMENT_NO,
    SPACE,
    UPPER_USED,
    WRITER,
    SegmentLayout,
    first_upper_rows,
    uniform_scales,
)
from .segment import Segment

log = logging.getLogger(__name__)

FORMAT = 1
PREFIX = "ckpt-"
TMP = ".tmp"
MANIFEST = "MANIFEST.json"
CLAIM_TOKEN = 1 << 62  # the checkpointer's writer claim; index writers' tokens are small
GRAPH_COLUMNS = ("parent", "links0", "upper")
CLAIM_WAIT_S = 0.0005
WRITE_CHUNK = 256 << 10  # bytes of a segment file written between two yields of the core


def complete(directory: str) -> list[tuple[int, str]]:
    """(number, path) of the complete checkpoints, newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(n[len(PREFIX):]), os.path.join(directory, n)) for n in names
             if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return sorted(found, reverse=True)


def read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DataDirCorrupt(f"checkpoint {path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataDirCorrupt(f"checkpoint {path}: unknown format {manifest.get('format')!r}")
    return manifest


def _prefixes(layout: SegmentLayout, accepted: int, upper_used: int, arena_used: int):
    """(column name, rows or bytes of it in the file) in layout order."""
    for name, _, _ in layout.columns():
        if name == "upper":
            yield name, upper_used
        elif name == "scales":
            yield name, layout.dim
        elif name == "arena":
            yield name, arena_used
        else:
            yield name, accepted


class _Image:
    """A consistent copy of one segment: its header and graph columns copied
    under the writer claim, the rest read from shared memory as it stands
    (immutable below the copied ACCEPTED)."""

    def __init__(self, seg: Segment, stop=lambda: False):
        while compare_and_swap(seg.header, WRITER, 0, CLAIM_TOKEN) != 0:
            if stop():
                raise InterruptedError("checkpoint stopped")
            time.sleep(CLAIM_WAIT_S)
        try:
            header = seg.header.copy()
            accepted = int(header[ACCEPTED])
            w = seg.w
            self.upper_used = seg.layout.upper_rows_used(w.level[:accepted])
            self.graph = {"parent": w.parent[:accepted].copy(), "links0": w.links0[:accepted].copy(),
                          "upper": w.upper[:self.upper_used].copy()}
        finally:
            seg.header[WRITER] = 0
        self.seg = seg
        self.accepted = accepted
        self.arena_used = int(seg.r.text_end[accepted - 1]) if accepted else 0
        header[[UPPER_USED, ARENA_USED, WRITER]] = [self.upper_used, self.arena_used, 0]
        self.header = header

    def write(self, path: str) -> tuple[int, int]:
        """Write the file, fsynced; returns (bytes, crc32c). In chunks of
        WRITE_CHUNK, giving the core back after each: a column written whole
        is one system call copying hundreds of megabytes, and the kernel runs
        it to the end while a recall that wakes on that core waits."""
        crc, size = 0, 0
        with open(path, "wb") as f:
            for part in self._parts():
                if part.size == 0:  # an empty prefix (memoryview cannot cast it)
                    continue
                view = memoryview(part).cast("B")
                for start in range(0, view.nbytes, WRITE_CHUNK):
                    chunk = view[start:start + WRITE_CHUNK]
                    f.write(chunk)
                    crc = crc32c.crc32c(chunk, value=crc)
                    give_way()
                size += view.nbytes
            f.flush()
            os.fsync(f.fileno())
        return size, crc

    def _parts(self):
        yield self.header
        for name, n in _prefixes(self.seg.layout, self.accepted, self.upper_used, self.arena_used):
            if name == "scales":
                yield self.seg.scales
            else:
                yield self.graph[name] if name in self.graph else getattr(self.seg.r, name)[:n]


def _wait_recovered(catalog: Catalog, stop) -> None:
    while catalog.header[FRONT_RECOVERING]:
        if stop():
            raise InterruptedError("stopped while a front was recovering")
        time.sleep(0.01)


def take(catalog: Catalog, live, sessions, directory: str, stop=lambda: False) -> dict:
    """Write a checkpoint of the LIVE segments of `catalog` (`live()`: writable
    mappings of them from one layout, in catalog order, taken after the log
    position and the generation: any row up to that generation is in them);
    `sessions()` lists the sessions. Returns the manifest of the complete
    checkpoint. Its segments are numbered 0.. in that order (a compaction's
    retired segments leave gaps in the catalog, not in a checkpoint)."""
    started = time.time()
    while True:  # read while no front is recovering, before and after (FRONT_RECOVERING)
        _wait_recovered(catalog, stop)
        lsn = int(catalog.header[WAL_LSN])
        session_rows = sessions()
        generation = catalog.committed_generation
        if not catalog.header[FRONT_RECOVERING]:
            break
    spaces = [{**asdict(catalog.space(i)), "owner": catalog.space_owner(i)} for i in range(catalog.n_spaces)]
    segments = live()
    number = max((n for n, _ in complete(directory)), default=0) + 1
    tmp = os.path.join(directory, f"{PREFIX}{number:08d}{TMP}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entries = []
    for index, seg in enumerate(segments):
        image = _Image(seg, stop)
        file = f"seg-{index:06d}.bin"
        size, crc = image.write(os.path.join(tmp, file))
        entries.append({"index": index, "file": file, "bytes": size, "crc32c": crc,
                        "space": int(image.header[SPACE]), "number": int(image.header[SEGMENT_NO]),
                        "accepted": image.accepted, "indexed": int(image.header[INDEXED])})
    manifest = {"format": FORMAT, "number": number, "engine": catalog.engine, "generation": generation,
                "wal_lsn": lsn, "created": started, "seconds": 0.0, "spaces": spaces,
                "segments": entries, "sessions": session_rows,
                "observations": int(sum(e["accepted"] for e in entries))}
    manifest["seconds"] = round(time.time() - started, 3)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    final = os.path.join(directory, f"{PREFIX}{number:08d}")
    os.rename(tmp, final)
    fsync_dir(directory)
    return manifest


def prune(directory: str, keep: int) -> dict | None:
    """Remove all but the newest `keep` complete checkpoints and any left
    half-written; returns the manifest of the oldest one kept (the log must
    be kept back to it)."""
    for name in os.listdir(directory):
        if name.endswith(TMP):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    found = complete(directory)
    for _, path in found[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for _, path in reversed(found[:keep]):
        try:
            return read_manifest(path)
        except DataDirCorrupt:
            continue
    return None


def request(catalog: Catalog) -> int:
    """Ask the engine's checkpointer for a checkpoint; returns the request
    number it answers in CHECKPOINT_DONE."""
    catalog.header[CHECKPOINT_REQUEST] += 1
    return int(catalog.header[CHECKPOINT_REQUEST])


# -- loading -----------------------------------------------------------------------
def load(path: str, manifest: dict, engine: str) -> list[Segment]:
    """Create the checkpoint's segments in shared memory (named for catalog
    indexes 0..), each file checked against its crc32c. On any fault the
    blocks made so far are removed and DataDirCorrupt is raised."""
    made: list[Segment] = []
    try:
        for entry in manifest["segments"]:
            made.append(_load_segment(os.path.join(path, entry["file"]), entry,
                                      segment_name(engine, entry["index"])))
    except BaseException as e:
        for seg in made:
            _discard(seg)
        if isinstance(e, (OSError, ValueError, Corrupt)):
            raise DataDirCorrupt(f"checkpoint {path}: {e}") from None
        raise
    return made


def _discard(seg: Segment) -> None:
    name = seg.name
    seg.close()
    shm.unlink(name)


def _load_segment(path: str, entry: dict, name: str) -> Segment:
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_WORDS * 8), np.int64).copy()
        if len(header) != HEADER_WORDS:
            raise ValueError(f"{entry['file']} is cut short")
        layout = SegmentLayout.from_header(header, sys.maxsize)
        accepted, upper_used = int(header[ACCEPTED]), int(header[UPPER_USED])
        seg = Segment.create(name, _current_layout(f, layout, header), int(header[METRIC]),
                             int(header[SPACE]), int(header[SEGMENT_NO]), _scales(f, layout, header))
        try:
            crc = crc32c.crc32c(memoryview(header).cast("B"))
            size = header.nbytes
            read_scales = seg.scales
            node_rows = codes = None
            for column, n in _prefixes(layout, accepted, upper_used, int(header[ARENA_USED])):
                if column == "scales":  # which `create` wrote: read again for the checksum
                    part = read_scales = np.empty(n, np.float32)
                elif column == "upper" and not layout.rows_per_layer:  # regrouped below
                    part = node_rows = np.empty((n, MAX_LEVEL, layout.M + 1), np.int32)
                elif column == "vectors" and layout.row_width != seg.layout.row_width:  # given factors below
                    part = codes = np.empty((n, layout.row_width), np.int8)
                else:
                    part = getattr(seg.w, column)[:n]
                if part.size == 0:
                    continue
                view = memoryview(part).cast("B")
                if f.readinto(view) != view.nbytes:
                    raise ValueError(f"{entry['file']} is cut short in column {column}")
                crc = crc32c.crc32c(view, value=crc)
                size += view.nbytes
            if (f.read(1) or size != entry["bytes"] or crc != entry["crc32c"]
                    or not np.array_equal(read_scales, seg.scales)):
                raise ValueError(f"{entry['file']} does not match its checksum")
            if node_rows is not None:
                upper_used = _rows_per_layer(seg.w, accepted, node_rows)
            if codes is not None:
                seg.w.vectors[:accepted] = quantization.with_unit_factors(codes)
            for word in (ACCEPTED, ARENA_USED, SEALED, MIN_GEN, MAX_GEN, INDEXED, ENTRY, REPAIR):
                seg.header[word] = header[word]
            seg.header[UPPER_USED] = upper_used
        except BaseException:
            _discard(seg)
            raise
    return seg


def _current_layout(f, layout: SegmentLayout, header: np.ndarray) -> SegmentLayout:
    """The layout a segment file loads at: the current version (see
    layout.py), with room for the upper rows an older block's nodes take
    once they have one per layer (counted from its level column, read ahead)."""
    if layout.rows_per_layer:
        return replace(layout, version=LAYOUT_VERSION)
    accepted = int(header[ACCEPTED])
    at = f.tell()
    offset = header.nbytes
    sizes = {name: dtype.itemsize * int(np.prod(shape[1:])) for name, dtype, shape in layout.columns()}
    for column, n in _prefixes(layout, accepted, int(header[UPPER_USED]), int(header[ARENA_USED])):
        if column == "level":
            break
        offset += n * sizes[column]
    f.seek(offset)
    levels = np.frombuffer(f.read(4 * accepted), np.int32)
    f.seek(at)
    return SegmentLayout.holding(layout.capacity, int(levels.sum(dtype=np.int64)), layout.dim,
                                 layout.dtype, layout.M, layout.arena_capacity)


def _rows_per_layer(w, accepted: int, node_rows: np.ndarray) -> int:
    """Lay out an older block's upper lists (a row of MAX_LEVEL lists per
    tall node, `node_rows`) as one row per layer in `w.upper`, moving each
    node's upper_row to its first; returns the rows used."""
    levels = w.level[:accepted]
    tall = np.flatnonzero(levels > 0)
    counts = levels[tall]
    old = w.upper_row[tall]
    if tall.size and (counts.max() > MAX_LEVEL or old.min() < 0 or old.max() >= len(node_rows)):
        raise ValueError("upper rows do not match the levels they serve")
    first = first_upper_rows(counts)
    used = int(counts.sum())
    w.upper[:used] = node_rows[np.repeat(old, counts), np.arange(used) - np.repeat(first, counts)]
    w.upper_row[tall] = first
    return used


def _scales(f, layout: SegmentLayout, header: np.ndarray) -> np.ndarray | None:
    """An int8 segment file's scales: its last column (read ahead of the
    others, which the checksum then covers), or a layout 1 block's one SCALE."""
    if layout.dtype != "int8":
        return None
    if not layout.has_scales:
        return uniform_scales(header)
    at = f.tell()
    f.seek(-4 * layout.dim, os.SEEK_END)
    scales = np.frombuffer(f.read(4 * layout.dim), np.float32).copy()
    f.seek(at)
    return scales


def spaces(manifest: dict) -> list[tuple[SpaceParams, str]]:
    """(parameters, owner) of each space (a manifest without owners, written
    before spaces had them, gives them all to the anonymous key)."""
    return [params_and_owner(s) for s in manifest["spaces"]]
