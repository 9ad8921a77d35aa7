"""`engram-shm stats` and `engram-shm top`: a running server's `stats` reply
(docs/protocol.md) as terminal tables, once or live (rich).

`top` asks for stats every `interval` seconds and derives the rates of each
space from two replies (accepted and indexed per second); latencies are the
server's own quantiles (its histograms: observability/stats_block.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

LEVEL_STYLE = {"normal": "green", "warning": "yellow", "critical": "red", "overloaded": "bold red"}


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def spaces_table(stats: dict, rates: dict[str, tuple[float, float]] | None = None) -> Table:
    """One row per space; with `rates`, accepted/s and indexed/s too."""
    table = Table(title=f"engine {stats['engine']}: spaces", title_justify="left")
    for column in ("space", "accepted", "indexed", "window", "pressure", "level", "segments", "shm MiB"):
        table.add_column(column, justify="left" if column in ("space", "level") else "right")
    if rates is not None:
        table.add_column("accepted/s", justify="right")
        table.add_column("indexed/s", justify="right")
    for name, space in sorted(stats["spaces"].items()):
        level = space.get("level", "normal")
        row = [name, f"{space['count']:,}", f"{space['indexed']:,}", f"{space['window']:,}",
               f"{space.get('pressure', 0):.2f}", f"[{LEVEL_STYLE[level]}]{level}[/]", str(space["segments"]),
               f"{space['shm_bytes'] / 2**20:.1f}"]
        if rates is not None:
            accepted, indexed = rates.get(name, (0.0, 0.0))
            row += [f"{accepted:,.0f}", f"{indexed:,.0f}"]
        table.add_row(*row)
    return table


def engine_table(stats: dict) -> Table:
    """Sessions, messages, memory, latency, recall and durability in one table."""
    table = Table(title="engine", title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    latency = stats.get("latency", {})
    durability = stats.get("durability", {})
    rows = [("generation", f"{stats['generation']:,}"), ("sessions", str(stats["sessions"])),
            ("messages received", f"{stats['received']:,}"), ("errors sent", f"{stats['errors']:,}"),
            ("observations accepted", f"{stats['observations']:,}"),
            ("memory pressure", f"{stats['memory_pressure']:.3f}")]
    for kind in ("observe", "recall"):
        figures = latency.get(kind)
        if figures:
            rows.append((f"{kind} latency p50 / p99 ms ({figures['count']:,})",
                         f"{_ms(figures['p50_ms'])} / {_ms(figures['p99_ms'])}"))
    recall = stats.get("recall", {})
    rows += [("recalls (busy)", f"{recall.get('recalls', 0):,} ({recall.get('busy', 0):,})"),
             ("recall readers", str(len(recall.get("readers", []))))]
    if durability.get("data_dir"):
        age = durability.get("checkpoint_age_s")
        rows += [("fsync", durability["fsync"]), ("log lsn", f"{durability['wal_lsn']:,}"),
                 ("checkpoint age s", "-" if age is None else f"{age:.1f}")]
    else:
        rows.append(("data directory", "none (memory only)"))
    for figure, value in rows:
        table.add_row(figure, value)
    return table


def print_stats(stats: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(engine_table(stats))
    console.print(spaces_table(stats))


def rates_between(before: dict, after: dict, seconds: float) -> dict[str, tuple[float, float]]:
    """(accepted/s, indexed/s) of each space between two stats replies."""
    out = {}
    for name, space in after["spaces"].items():
        old = before["spaces"].get(name, {"count": 0, "indexed": 0})
        out[name] = ((space["count"] - old["count"]) / seconds, (space["indexed"] - old["indexed"]) / seconds)
    return out


def top(fetch: Callable[[], dict], interval: float, count: int = 0, console: Console | None = None) -> None:
    """Refresh the view every `interval` seconds, `count` times (0: until
    Ctrl-C)."""
    before, at = fetch(), time.monotonic()
    with Live(Group(engine_table(before), spaces_table(before, {})), console=console,
              auto_refresh=False) as live:
        shown = 0
        while count == 0 or shown < count:
            time.sleep(interval)
            after, now = fetch(), time.monotonic()
            rates = rates_between(before, after, now - at)
            live.update(Group(engine_table(after), spaces_table(after, rates)), refresh=True)
            before, at = after, now
            shown += 1
