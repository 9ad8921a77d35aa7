"""Background work takes only the CPU nobody else wants: index workers, the
server's checkpointer and the writer's prefault thread yield to the front,
the readers and the applications that recall (attached readers, clients on
the same machine).

Levers, because the scheduler weighs task groups before tasks:
- SCHED_IDLE (nice 19 where the kernel lacks it) orders the caller below
  every normal task of its own group. A core that runs only SCHED_IDLE tasks
  counts as idle when the kernel places a task that wakes.
- With autogroups (Linux's default for tasks outside a cgroup: one group per
  session), a process in another session (an application that attached, a
  client, a benchmark's producer) would compete with the server's whole
  group, which busy workers keep runnable, at equal weight. A worker process
  therefore takes a session of its own and sets its autogroup's nice to 19:
  a group of weight 15 against 1024. Weight is not precedence, though: a
  waking client's thread waited 2.6 ms for a core both workers held (perf
  sched, docs/architecture.md).
- So a worker also moves into an idle cgroup where it may
  (`join_idle_cgroup`; then autogroups no longer apply to it): cpu.idle is
  the group analog of SCHED_IDLE, and a task of any normal group that wakes
  takes the core from it at once. Inside a cgroup it may not write under (a
  systemd service without delegation, a container) the cgroup's own weight
  decides.
- Background threads leave the core between steps (`give_way`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger(__name__)

IDLE_NICENESS = 19  # where SCHED_IDLE is missing: below the readers (recall_niceness, 10)
GIVE_WAY_S = 0.0001
IDLE_CGROUP = "engram-idle"  # made in the caller's cpu cgroup; the engines under it share it
AUTOGROUP = "/proc/self/autogroup"


def run_when_idle() -> None:
    """SCHED_IDLE for the calling thread (on Linux a thread's own policy) and
    the threads it starts."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(IDLE_NICENESS)


def give_way() -> None:
    """Between two steps of a background thread's work: leave the core for a
    moment. sched_yield(2) does not: it lets other tasks of the caller's own
    autogroup run, but across groups the scheduler weighs the groups, and
    SCHED_IDLE threads of the server's group (its prefault threads, by their
    bursts), runnable on, kept a client's thread (another session) waiting
    for a core 2.2 ms after its answer had come (perf sched,
    docs/architecture.md). A thread that sleeps leaves its
    group's place on the core to whoever waits."""
    time.sleep(GIVE_WAY_S)


def join_idle_cgroup() -> bool:
    """Move this process (a worker, single-threaded as it starts) into the
    child IDLE_CGROUP of its cpu cgroup, marked cpu.idle (Linux 5.15+, cgroup
    v1 or v2); False where there is none such or it is not this user's to
    make or join (a systemd service without delegation, a container)."""
    try:
        group = os.path.join(cpu_cgroup(), IDLE_CGROUP)
        os.makedirs(group, exist_ok=True)
    except OSError as e:
        log.info("index worker outside an idle cgroup (%s): its autogroup's weight only", e)
        return False
    try:
        with open(os.path.join(group, "cpu.idle"), "w") as f:
            f.write("1")
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError as e:  # no cpu.idle (an older kernel, cpu not enabled below a v2 group)
        log.info("index worker outside an idle cgroup (%s): its autogroup's weight only", e)
        remove_idle_cgroup()
        return False


def remove_idle_cgroup() -> None:
    """Remove IDLE_CGROUP once its processes are gone (it stays while
    another engine's are in it)."""
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(cpu_cgroup(), IDLE_CGROUP))


def cpu_cgroup() -> str:
    """The directory of this process's cgroup in the hierarchy that has
    the cpu controller (v1: a hierarchy of its own; v2: the unified one)."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = {c: path for _, controllers, path in memberships for c in controllers.split(",")}
    found = {}  # "v1" or "v2" -> the directory
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            root, mount = fields[3], fields[4]
            kind, _, options = fields[fields.index("-") + 1:][:3]
            if kind == "cgroup" and "cpu" in v1 and "cpu" in options.split(","):
                found["v1"] = os.path.normpath(os.path.join(mount, os.path.relpath(v1["cpu"], root)))
            elif kind == "cgroup2" and "" in v1:
                found["v2"] = os.path.normpath(os.path.join(mount, os.path.relpath(v1[""], root)))
    if not found:
        raise FileNotFoundError("no cgroup hierarchy with the cpu controller is mounted")
    return found.get("v1", found.get("v2"))  # v1's cpu hierarchy, where there is one, has the controller


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
