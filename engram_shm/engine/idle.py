"""Background work takes only the CPU nobody else wants: index workers, the
server's checkpointer and the writer's prefault thread yield to the front,
the readers and the applications that recall (attached readers, clients on
the same machine).

Two levers, because the scheduler weighs task groups before tasks:
- SCHED_IDLE (nice 19 where the kernel lacks it) orders the caller below
  every normal task of its own group. A core that runs only SCHED_IDLE tasks
  counts as idle when the kernel places a task that wakes.
- With autogroups (Linux's default for tasks outside a cgroup: one group per
  session), a process in another session (an application that attached, a
  client, a benchmark's producer) competes with the server's whole group,
  which busy workers keep runnable, at equal weight. A worker process
  therefore also takes a session of its own and sets its autogroup's nice to
  19: a group of weight 15 against 1024. Inside a cgroup (a systemd service)
  autogroups do not apply, and the cgroup's own weight decides.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

IDLE_NICENESS = 19  # where SCHED_IDLE is missing: below the readers (recall_niceness, 10)
AUTOGROUP = "/proc/self/autogroup"


def run_when_idle() -> None:
    """SCHED_IDLE for the calling thread (on Linux a thread's own policy) and
    the threads it starts."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(IDLE_NICENESS)


def own_idle_autogroup() -> bool:
    """Move this process (a worker, single-threaded as it starts, bound to
    its parent by lifeline) into a session of its own whose autogroup has the
    lowest weight; False where autogroups are off or missing."""
    # Only where the group's nice can be set: a session of its own at nice 0
    # would weigh this worker as much as the whole server.
    if not os.access(AUTOGROUP, os.W_OK):
        return False
    try:
        os.setsid()
        with open(AUTOGROUP, "w") as f:
            f.write(str(IDLE_NICENESS))
        return True
    except OSError as e:
        log.warning("index worker without an idle autogroup of its own: %s", e)
        return False
