"""What every benchmark prints: JSON lines, then a table labelled with the
machine that measured it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import numpy as np


def machine() -> str:
    model = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def today() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def parser(doc: str, prog: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its module docstring's first paragraph
    as the description, the rest (usage and what it measures) as the epilog."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def percentiles_ms(seconds: list, name: str, digits: int = 3) -> dict:
    """{name_p50_ms, name_p99_ms} of latencies given in seconds (NaN if none)."""
    ms = np.array(seconds or [np.nan]) * 1e3
    return {f"{name}_p{q}_ms": round(float(np.percentile(ms, q)), digits) for q in (50, 99)}


def emit(row: dict) -> dict:
    """Print one measurement as a JSON line, stamped with the machine and date."""
    row = {**row, "machine": machine(), "date": today()}
    print(json.dumps(row), flush=True)
    return row


def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec). A key `x <metric>` is the ratio of a
    row's metric to the first row's."""
    def cell(row, key, spec):
        if key.startswith("x "):
            metric = key[2:]
            return format(row[metric] / rows[0][metric], spec)
        return format(row[key], spec)

    widths = [max(len(h), *(len(cell(r, k, s)) for r in rows)) + 2 for h, k, s in columns]
    lines = [f"{title} on {machine()}",
             "".join(h.rjust(w) for (h, _, _), w in zip(columns, widths))]
    for r in rows:
        lines.append("".join(cell(r, k, s).rjust(w) for (_, k, s), w in zip(columns, widths)))
    return "\n".join(lines)
