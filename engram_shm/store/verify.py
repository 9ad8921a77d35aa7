"""`engram-shm verify DIR`: check a data directory offline, as
redis-check-aof does for an append-only file. Reads every checkpoint file
and log record, checks sizes and checksums, and says what a restart would
load: which checkpoint, how much of the log, and what it would cut. Changes
nothing (a torn tail is cut by the next engine that opens the directory).
"""

from __future__ import annotations

import os
from collections import Counter

import crc32c
from tqdm import tqdm

from ..errors import DataDirCorrupt
from . import checkpoint, wal

CHUNK = 4 << 20


def _file_crc(path: str, bar) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = crc32c.crc32c(chunk, value=crc)
            size += len(chunk)
            bar.update(len(chunk))
    return size, crc


def _checkpoint(path: str, bar) -> dict:
    try:
        manifest = checkpoint.read_manifest(path)
    except DataDirCorrupt as e:
        return {"path": path, "ok": False, "problem": str(e)}
    bad = []
    for entry in manifest["segments"]:
        try:
            size, crc = _file_crc(os.path.join(path, entry["file"]), bar)
        except OSError as e:
            bad.append(f"{entry['file']}: {e}")
            continue
        if (size, crc) != (entry["bytes"], entry["crc32c"]):
            bad.append(f"{entry['file']}: {size} bytes, crc32c {crc:#010x}; the manifest says "
                       f"{entry['bytes']} bytes, {entry['crc32c']:#010x}")
    return {"path": path, "ok": not bad, "problem": "; ".join(bad) or None, "number": manifest["number"],
            "generation": manifest["generation"], "wal_lsn": manifest["wal_lsn"],
            "observations": manifest["observations"], "spaces": len(manifest["spaces"]),
            "segments": len(manifest["segments"]), "sessions": len(manifest["sessions"])}


def verify(directory: str, progress=None) -> dict:
    """A report of the directory: checkpoints, log files, and the verdict."""
    directory = os.path.abspath(directory)
    ckpt_dir, wal_dir = os.path.join(directory, "checkpoints"), os.path.join(directory, "wal")
    if not os.path.isdir(directory):
        raise DataDirCorrupt(f"{directory} is not a directory")
    found = checkpoint.complete(ckpt_dir)
    files = wal.log_files(wal_dir)
    total = sum(os.path.getsize(f) for f in files)
    for _, path in found:
        for name in os.listdir(path):
            total += os.path.getsize(os.path.join(path, name))
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=progress,
              disable=progress is None) as bar:
        checkpoints = [_checkpoint(path, bar) for _, path in found]
        scans: list[wal.FileScan] = []
        kinds: Counter = Counter()
        observations, last_generation, first_lsn = 0, 0, None
        for record in wal.read_log(wal_dir, scans):
            first_lsn = record.lsn if first_lsn is None else first_lsn
            kinds[record.kind] += 1
            if record.kind == wal.BATCH:
                observations += record.meta["n"]
                last_generation = record.meta["gen"] + record.meta["n"] - 1
        bar.update(max(0, total - bar.n))
    loadable = next((c for c in checkpoints if c["ok"]), None)
    start = loadable["wal_lsn"] if loadable else 0
    last_lsn = max((s.last_lsn for s in scans), default=start)
    hole = first_lsn is not None and first_lsn > start + 1
    problems = [c["problem"] for c in checkpoints if not c["ok"]]
    problems += [f"{s.path}: {s.problem} ({s.cut_bytes} bytes would be cut)" for s in scans if s.problem]
    if hole:
        problems.append(f"the log starts at lsn {first_lsn}, after the checkpoint's {start}: "
                        "records are missing")
    report = {
        "directory": directory, "ok": not problems, "recoverable": not hole,
        "checkpoints": checkpoints, "loads_checkpoint": loadable and loadable["number"],
        "log": {"files": len(files), "bytes": sum(s.size for s in scans), "first_lsn": first_lsn,
                "last_lsn": last_lsn, "spaces": kinds[wal.SPACE], "batches": kinds[wal.BATCH],
                "session_changes": kinds[wal.SESSION], "observations": observations,
                "last_generation": last_generation,
                "cut": [{"file": s.path, "at": s.good_end, "bytes": s.cut_bytes, "why": s.problem}
                        for s in scans if s.problem]},
        "problems": problems,
    }
    lines = [f"{directory}: {'OK' if report['ok'] else 'PROBLEMS FOUND'}"]
    for c in checkpoints:
        lines.append(f"  checkpoint {c.get('number', '?')}: " + (
            f"ok, {c['observations']} observations in {c['segments']} segments at generation "
            f"{c['generation']}" if c["ok"] else f"CORRUPT: {c['problem']}"))
    log_ = report["log"]
    lines.append(f"  log: {log_['files']} files, {log_['bytes']} bytes, lsn {first_lsn}..{last_lsn}, "
                 f"{log_['batches']} batches ({observations} observations), {log_['session_changes']} "
                 f"session changes, {log_['spaces']} spaces")
    lines += [f"  problem: {p}" for p in problems]
    lines.append("  a restart loads " + (f"checkpoint {loadable['number']}" if loadable else "no checkpoint")
                 + (" and replays the log" if report["recoverable"] else ", but the log has a hole"))
    report["summary"] = "\n".join(lines)
    return report
