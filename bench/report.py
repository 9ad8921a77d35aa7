"""What every benchmark prints: JSON lines, then a table labelled with the
machine that measured it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import numpy as np
from llvmlite import binding as llvm


def machine() -> str:
    model = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The CPU LLVM compiles the kernels for: a VM's model name ("AMD EPYC")
    # does not tell one generation (znver3: AVX2) from the next (znver4: AVX-512).
    target = llvm.get_host_cpu_name()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model} ({target}), {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def today() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def parser(doc: str, prog: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its module docstring's first paragraph
    as the description, the rest (usage and what it measures) as the epilog."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def self_bytes(proc_file: str, field: str) -> int:
    """A field of one of this process's /proc/self files, in bytes: e.g.
    smaps_rollup's `Rss` (resident pages, the shared memory it touched
    included) or `Anonymous` (its own pages only), status's `VmHWM` (peak)."""
    with open(f"/proc/self/{proc_file}") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def engine_shm_bytes(engine_name: str) -> int:
    """The pages an engine's shared-memory blocks occupy in /dev/shm."""
    from engram_shm.store import shm  # here: a peer's process in bench.stream never loads engram_shm

    return sum(map(shm.block_bytes, shm.list_blocks(engine_name)))


def percentiles_ms(seconds: list, name: str, digits: int = 3) -> dict:
    """{name_p50_ms, name_p99_ms} of latencies given in seconds (NaN if none)."""
    ms = np.array(seconds or [np.nan]) * 1e3
    return {f"{name}_p{q}_ms": round(float(np.percentile(ms, q)), digits) for q in (50, 99)}


def emit(row: dict) -> dict:
    """Print one measurement as a JSON line, stamped with the machine and date."""
    row = {**row, "machine": machine(), "date": today()}
    print(json.dumps(row), flush=True)
    return row


def mib(key: str):
    """A column of bytes shown in MiB."""
    return lambda row: row[key] / 2**20


def cell(row: dict, key, spec: str, reference: dict) -> str:
    """One table cell. A key is a field, a function of the row, or `x
    <metric>`: the ratio of the row's metric to the reference row's. A metric
    the row lacks is shown as a dash."""
    try:
        if callable(key):
            return format(key(row), spec)
        if key.startswith("x "):
            metric = key[2:]
            return format(row[metric] / reference[metric], spec)
        return format(row[key], spec)
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A text table labelled with the machine. columns: (header, key, format
    spec); ratio columns (`x <metric>`) are to the first row."""
    cells = [[cell(r, k, s, rows[0]) for _, k, s in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) + 2 for i, (h, _, _) in enumerate(columns)]
    lines = [f"{title} on {machine()}",
             "".join(h.rjust(w) for (h, _, _), w in zip(columns, widths))]
    lines += ["".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The same table in Markdown (ratios to the first row)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" if not s or s == "s" else "---:" for _, _, s in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, s, rows[0]) for _, k, s in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
