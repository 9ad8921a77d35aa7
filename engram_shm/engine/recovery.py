"""Bringing an engine's state back from its data directory (docs/durability.md).

`cold`: a fresh catalog is filled from the newest checkpoint that loads (a
corrupt one falls back to the one before), rows the checkpoint copied past
its generation are buried (they are tentative: the log decides), and the log
is replayed: every batch past the checkpoint's generation is stored again,
with its own generations and its stored vector bits, and the session changes
are applied over the checkpoint's sessions. Graphs are loaded, never rebuilt; replayed rows are
searchable at once (the exact scan of the unindexed window) and indexed in
the background.

`warm`: a restarted writer (the server's front) keeps the shared memory it
finds. Only the last log file can hold what the dead writer logged but did
not finish applying (it was killed between logging a batch and publishing
its generation, or recording the session's sequence): that file is replayed
on top, so a batch whole in the log is committed and its session's sequence
covers it, and a re-send is acked as a duplicate instead of refused. A
warm recovery killed midway is started over from the committed generation
the first attempt found (catalog RECOVERY_FROM): rows past it, the dead
attempt's replays among them, are buried and stored again from the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataDirCorrupt
from ..observations import Batch
from ..store import checkpoint, quantization, wal
from ..store.catalog import CHECKPOINT_GENERATION, CHECKPOINT_NS, WAL_LSN, params_and_owner
from ..store.datadir import DataDir
from ..store.segment import Segment
from .writer import EngineWriter

log = logging.getLogger(__name__)

FREE = 0  # a session state: gone (expired); see transport/sessions.py


@dataclass
class Recovered:
    """What a recovery found and did."""
    checkpoint: int | None = None
    checkpoint_generation: int = 0
    checkpoint_lsn: int = 0  # the log position the checkpoint holds
    skipped_checkpoints: list[str] = field(default_factory=list)
    log_records: int = 0
    replayed_batches: int = 0
    replayed_observations: int = 0
    cut: list[str] = field(default_factory=list)
    sessions: dict[str, dict] = field(default_factory=dict)  # key -> {state?, priority?, last_seq}
    observations: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        where = f"checkpoint {self.checkpoint} (generation {self.checkpoint_generation})" \
            if self.checkpoint else "no checkpoint"
        text = (f"{self.observations} observations from {where} and {self.log_records} log records "
                f"({self.replayed_observations} observations replayed) in {self.seconds:.2f} s")
        if self.skipped_checkpoints:
            text += f"; skipped corrupt checkpoints: {'; '.join(self.skipped_checkpoints)}"
        if self.cut:
            text += f"; log cut: {'; '.join(self.cut)}"
        return text


def cold(writer: EngineWriter, datadir: DataDir, keep: Callable[[int, Segment], None],
         open_segment: Callable[[int], Segment]) -> Recovered:
    """Fill the writer's fresh catalog from the data directory. `keep(index,
    segment)` takes each loaded segment (before the catalog publishes it);
    `open_segment(index)` maps any segment of the catalog for the writer."""
    started = time.perf_counter()
    report = Recovered()
    catalog = writer.catalog
    generation, lsn = 0, 0
    for number, path in checkpoint.complete(datadir.checkpoints):
        try:
            manifest = checkpoint.read_manifest(path)
            segments = checkpoint.load(path, manifest, catalog.engine)
        except DataDirCorrupt as e:
            log.error("%s; falling back to the checkpoint before it", e)
            report.skipped_checkpoints.append(str(e))
            continue
        for params, owner in checkpoint.spaces(manifest):
            catalog.add_space(params, owner)
        for entry, seg in zip(manifest["segments"], segments):
            keep(entry["index"], seg)
            catalog.add_segment(entry["index"], entry["space"], entry["number"])
        generation, lsn = manifest["generation"], manifest["wal_lsn"]
        catalog.publish_generation(generation)
        catalog.header[CHECKPOINT_GENERATION] = generation
        catalog.header[CHECKPOINT_NS] = int(manifest["created"] * 1e9)
        report.checkpoint, report.checkpoint_generation, report.checkpoint_lsn = number, generation, lsn
        report.sessions = {s["key"]: s for s in manifest["sessions"]}
        break
    writer.recover(open_segment)  # buries rows copied past the checkpoint's generation
    scans: list[wal.FileScan] = []
    records = wal.read_log(datadir.wal, scans)
    _replay(writer, _after(records, scans, lsn), generation, report)
    catalog.header[WAL_LSN] = max(lsn, max((s.last_lsn for s in scans), default=0))
    report.cut = [f"{s.path}: {s.problem} ({s.cut_bytes} bytes)" for s in scans if s.problem]
    report.observations = sum(w.count for w in writer.spaces.values())
    report.seconds = time.perf_counter() - started
    return report


def _after(records, scans: list, lsn: int):
    """The records, checked to continue the checkpoint: a log that starts past
    lsn + 1 has lost records the checkpoint does not hold."""
    for i, record in enumerate(records):
        if i == 0 and record.lsn > lsn + 1:
            raise DataDirCorrupt(f"the log starts at lsn {record.lsn} but the newest loadable "
                                 f"checkpoint ends at lsn {lsn}: records {lsn + 1}..{record.lsn - 1} "
                                 "are missing")
        yield record


def warm(writer: EngineWriter, wal_dir: str, open_segment: Callable[[int], Segment],
         generation: int) -> Recovered:
    """Adopt the shared memory a dead writer left, and replay its last log
    file on top (see the module docstring). `generation`: the committed one
    before any recovery began (a recovery cut short by a kill moved it)."""
    started = time.perf_counter()
    report = Recovered()
    writer.recover(open_segment, generation)
    files = wal.log_files(wal_dir)
    if files:
        scan, records = wal.scan_file(files[-1])
        _replay(writer, records, generation, report)
        if scan.problem:
            report.cut.append(f"{scan.path}: {scan.problem} ({scan.cut_bytes} bytes)")
    report.observations = sum(w.count for w in writer.spaces.values())
    report.seconds = time.perf_counter() - started
    return report


def _replay(writer: EngineWriter, records, generation: int, report: Recovered) -> None:
    """Apply log records over a state: batches past `generation` are stored
    again; every session change is applied in log order (the last change of
    a session in the log is its state: every change is logged) and every
    batch advances its session's sequence (max: idempotent)."""
    sessions = report.sessions
    for record in records:
        report.log_records += 1
        meta = record.meta
        if record.kind == wal.SPACE:
            writer.replay_space(*params_and_owner(meta))
        elif record.kind == wal.BATCH:
            if meta["gen"] > generation:
                params = writer.spaces[meta["space"]].params
                writer.replay_batch(params, _batch(record), meta["gen"], quantization.from_log(meta))
                report.replayed_batches += 1
                report.replayed_observations += meta["n"]
            if meta["session"] is not None and meta["seq"]:
                session = sessions.setdefault(meta["session"], {"key": meta["session"]})
                session["last_seq"] = max(session.get("last_seq", 0), meta["seq"])
        elif record.kind == wal.SESSION:
            if meta["state"] == FREE:
                sessions.pop(meta["key"], None)
            else:
                last = max(sessions.get(meta["key"], {}).get("last_seq", 0), meta.get("last_seq", 0))
                sessions[meta["key"]] = {**meta, "last_seq": last}


def _batch(record: wal.Record) -> Batch:
    meta = record.meta
    # Copies: the blobs sit at arbitrary offsets of the file, and kernels are
    # compiled for aligned arrays.
    vectors, when, confidence, id_lens, record_ends, records = (a.copy() for a in record.batch())
    starts = np.concatenate([[0], record_ends[:-1]]).tolist()
    raw = records.tobytes()
    ids = [raw[s:s + n].decode("utf-8") for s, n in zip(starts, id_lens.tolist())]
    vectors = vectors.reshape(meta["n"], wal.row_width(meta))
    if meta["dtype"] == "int8" and vectors.shape[1] == meta["dim"]:  # logged before rows had factors
        vectors = quantization.with_unit_factors(vectors)
    return Batch(ids, vectors, records, record_ends, id_lens, when, confidence)
