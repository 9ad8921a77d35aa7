"""A child of the supervisor dies with it.

The front and the index workers must not outlive the process that started
them: an orphaned front goes on acking into memory nobody will keep and holds
the port, and an orphan keeps its engine's memory alive (a new engine never
removes memory a live process of the old one maps: `Catalog.engine_alive`).

`bind_to_parent()`, called first thing in the child, gives two ways out:

- `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the child when its
  parent dies. The "parent" here is the *thread* that forked the child: the
  signal also comes when that thread exits while the process lives on. The
  Supervisor therefore spawns every child from its watcher thread, which
  outlives all of them (supervisor.py).
- A poll: a daemon thread compares `os.getppid()` with the parent every
  POLL_S and exits the process when they differ; this is the only way where
  prctl is unavailable (not Linux, or refused by a seccomp filter).

The parent may die before the child asks for the signal; the child then
already has a new parent (init or a subreaper), so it compares `os.getppid()`
with the pid the supervisor put in ENGRAM_PARENT_PID, and exits at once if
they differ.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PARENT_ENV = "ENGRAM_PARENT_PID"
POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_EXIT_CODE = 3


class StopRequest:
    """A child's SIGTERM handler: it only sets the flag its loop checks."""
    requested = False

    def __call__(self, signum, frame):
        self.requested = True


def bind_to_parent() -> int | None:
    """Make this process die when the parent named in ENGRAM_PARENT_PID dies.
    Returns that pid, or None (nothing done) when the variable is unset: a
    process started by hand has no supervisor to die with."""
    value = os.environ.pop(PARENT_ENV, None)  # not inherited by our own children
    if not value:
        return None
    parent = int(value)
    if not _ask_death_signal(_libc_prctl(), signal.SIGKILL):
        log.warning("PR_SET_PDEATHSIG is unavailable (%s); polling for the death of pid %d",
                    os.strerror(ctypes.get_errno()), parent)
    if os.getppid() != parent:  # it died before we asked: no signal will come
        _orphaned(parent)
    threading.Thread(target=_poll, args=(parent,), name="engram-lifeline", daemon=True).start()
    return parent


def _libc_prctl():
    """libc's prctl, or None (not Linux, or no libc to load). Loaded before a
    fork: loading a library after fork in a threaded process may deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _ask_death_signal(prctl, sig: int) -> bool:
    """PR_SET_PDEATHSIG: `sig` when the thread that forked us ends; True if
    granted. Logs nothing: it also runs in a child between fork and exec."""
    if prctl is None:
        return False
    return prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0),
                 ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def dying_with_this_thread(sig: int = signal.SIGKILL, also=None):
    """A preexec_fn for subprocess.Popen: the child gets `sig` when the
    thread that starts it dies (PR_SET_PDEATHSIG), and exits at once if this
    process died before it asked; `also`, a preexec_fn run after."""
    prctl = _libc_prctl()
    parent = os.getpid()

    def preexec() -> None:
        _ask_death_signal(prctl, sig)
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT_CODE)
        if also is not None:
            also()
    return preexec


def _poll(parent: int) -> None:
    while os.getppid() == parent:  # ends with the process (a daemon thread)
        time.sleep(POLL_S)
    _orphaned(parent)


def _orphaned(parent: int) -> None:
    log.warning("parent process %d is gone; exiting", parent)
    os._exit(ORPHAN_EXIT_CODE)  # at once: nobody is left to answer to, or to stop us cleanly
