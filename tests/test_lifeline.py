"""A child bound with lifeline dies with its parent: by PR_SET_PDEATHSIG, by
the getppid poll where prctl is unavailable, and at once when the parent
died before it asked."""

import os
import signal
import subprocess
import sys
import time

import pytest

from engram_shm.engine import lifeline

CHILD = """
import sys, time
from engram_shm.engine import lifeline
if sys.argv[1] == "poll":
    lifeline._libc_prctl = lambda: None  # as where prctl is missing
print(lifeline.bind_to_parent(), flush=True)
time.sleep(60)
"""

PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, ENGRAM_PARENT_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env,
                         stdout=subprocess.PIPE, text=True)
bound = child.stdout.readline().strip()
print(child.pid, bound, flush=True)
time.sleep(60)
"""


def gone(pid: int) -> bool:
    """No such process, or a zombie (exited, not yet reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def wait_gone(pid: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    while not gone(pid):
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("how", ["pdeathsig", "poll"])
def test_a_child_dies_with_its_parent(how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, how], stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        child, bound = parent.stdout.readline().split()
        child = int(child)
        assert int(bound) == parent.pid
        parent.kill()
        parent.wait()
        took = wait_gone(child, timeout=2.0)
        assert took is not None, f"child {child} outlived its parent by 2 s ({how})"
        if how == "pdeathsig":
            assert took < lifeline.POLL_S, f"{took:.3f} s: the signal should beat the poll"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    env = dict(os.environ, ENGRAM_PARENT_PID=str(os.getpid() + 1_000_000))  # not our parent
    r = subprocess.run([sys.executable, "-c", CHILD, "pdeathsig"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == lifeline.ORPHAN_EXIT_CODE, r.stderr
    assert r.stdout == "" and "is gone; exiting" in r.stderr


def test_without_a_parent_pid_nothing_is_bound(monkeypatch):
    monkeypatch.delenv(lifeline.PARENT_ENV, raising=False)
    assert lifeline.bind_to_parent() is None
