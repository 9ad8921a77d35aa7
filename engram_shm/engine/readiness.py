"""How a child that maps no block to say so in (a recall reader, the
WebSocket bridge) tells the supervisor it is ready: a file in the server's
private directory holding "pid incarnation", written whole or not at all, so
a file left by an earlier incarnation never passes for this one."""

from __future__ import annotations

import os


def report_ready(path: str, incarnation: int) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {incarnation}")
    os.replace(path + ".tmp", path)


def is_ready(path: str, pid: int, incarnation: int) -> bool:
    """Whether the child `pid` of this incarnation has reported ready in `path`."""
    try:
        with open(path) as f:
            return f.read() == f"{pid} {incarnation}"
    except FileNotFoundError:
        return False
