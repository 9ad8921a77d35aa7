"""The chaos suite (docs/chaos.md): every scenario for 20 s against a real
server, passing every validator; each deliberate bug (a test-only fault flag
of engram_shm/faults.py) caught by the validator that should catch it, so
the suite is shown able to fail; and the schedules reproducible from the
seed. Each run is `python -m chaos run` in a child process, as a user runs
it; its JSON summary is the last line of its output. The runs of the tests
selected start together, CHAOS_JOBS (2) at a time: a run spends most of
its time waiting for its faults and its server, so two share the machine
and the suite takes about half as long.

Each run cleans up after itself, on failure too (its server is stopped or
killed, its shared memory collected and its data directory removed by
chaos/server.py); conftest.py checks no shared memory is left."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys

import pytest

from chaos.run import BUGS
from chaos.schedule import SCENARIOS, schedule
from engram_shm import faults

SECONDS = 20
SAMPLE = 500  # acked ids recalled by their own vector per run (every one is checked stored, with its vector)


JOBS = int(os.environ.get("CHAOS_JOBS", "2"))  # runs at once: each mostly waits on its faults


def chaos(*args: str, env: dict | None = None, timeout: float = 600) -> tuple[int, dict, str]:
    r = subprocess.run([sys.executable, "-m", "chaos", "run", *args, "--json"], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert lines, f"no summary (exit {r.returncode}): {r.stderr[-3000:]}"
    return r.returncode, json.loads(lines[-1]), r.stderr


def scenario_args(name: str) -> tuple[str, ...]:
    return name, "--seconds", str(SECONDS), "--seed", "14", "--sample", str(SAMPLE)


def bug_args(bug: str) -> tuple[str, ...]:
    # ack_before_wal shows only when an engine kill lands after an ack the
    # client read: 20 s holds two kills, the first often before the stream flows.
    seconds = "20" if bug == "ack_before_wal" else "10"
    return BUGS[bug], "--bug", bug, "--seconds", seconds, "--seed", "14", "--sample", "200"


@pytest.fixture(scope="module")
def runs(request):
    """The runs of every chaos test selected in this session, started at
    once, JOBS at a time, in the order of the tests; each test waits for
    its own. Keyed by their arguments."""
    wanted = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if item.module is not sys.modules[__name__] or not params:
            continue
        if "name" in params:
            wanted.append(scenario_args(params["name"]))
        elif "bug" in params:
            wanted.append(bug_args(params["bug"]))
    # Each child gets this copy of the environment, not the live one: pytest
    # sets PYTEST_CURRENT_TEST on every test phase in the main thread, and a
    # child vforked meanwhile (env=None reads the global environ) can fail
    # its exec with EFAULT, as CI once did.
    env = os.environ.copy()
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        yield {args: pool.submit(chaos, *args, env=env) for args in wanted}


def not_injected(name: str, summary: dict) -> list[str]:
    """The scenario's faults that did not happen (a run that injected
    nothing proves nothing)."""
    sc, done = SCENARIOS[name], summary["faults"]
    net = done["network"]
    kinds = {kind for _, kind, pid in done["process"] if pid}
    expected = {"delayed": sc.net.delay_ms, "dropped": sc.net.drop, "duplicated": sc.net.duplicate,
                "reordered": sc.net.reorder, "partitioned": sc.partition_every_s}
    missing = [what for what, wanted in expected.items() if wanted and not net.get(what)]
    if name == "combined":  # a mix: some of each family is enough (a kind may fall on a young process)
        missing += [] if kinds else ["process faults"]
    else:
        missing += [kind for kind in sc.every_s if kind not in kinds]
    if "kill_engine" in sc.every_s and done["engine_starts"] < 2:
        missing.append("engine restart")
    if (sc.burst and not done["bursts"]) or (sc.skew_s and not done["clock_jumps"]):
        missing.append("bursts or clock jumps")
    if "fail_write" in sc.storage and not summary["refused"].get("storage_error") and name != "combined":
        missing.append("failed writes")
    return missing


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_passes_every_validator(name, runs):
    code, summary, err = runs[scenario_args(name)].result()
    assert code == 0 and summary["ok"], (summary["problems"], err[-2000:])
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["acked"] == summary["sent"] > 0
    assert not not_injected(name, summary), summary["faults"]
    print(f"{name}: sent {summary['sent']}, refused {summary['refused']}, retried {summary['retried']}, "
          f"visibility p99 {summary['visibility_p99_ms']} ms, faults {summary['faults']}")


CAUGHT_BY = {  # each deliberate bug, and the validator that must name it
    "ack_before_wal": "no_acked_loss",
    "drop_one": "no_acked_loss",
    "skip_reverse_links": "graph_integrity",
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_deliberate_bug_is_caught(bug, runs):
    code, summary, err = runs[bug_args(bug)].result()
    assert code == 1 and not summary["ok"], f"{bug} went unnoticed: {summary}"
    assert CAUGHT_BY[bug] in summary["failed"], (summary["failed"], summary["problems"])


def test_the_same_seed_gives_the_same_schedule():
    for sc in SCENARIOS.values():
        assert schedule(sc, 600, 5) == schedule(sc, 600, 5)
    busy = SCENARIOS["combined"]
    assert schedule(busy, 20, 5).digest != schedule(busy, 20, 6).digest
    assert schedule(busy, 20, 5).events and schedule(busy, 20, 5).partitions


def test_fault_flags_parse_and_refuse_typos():
    assert faults.parse("ack_before_wal, slow_fsync_ms=20") == {"ack_before_wal": 1, "slow_fsync_ms": 20}
    assert faults.parse("") == {}
    for bad in ("ack_before_wall", "slow_fsync_ms", "drop_one=3"):
        with pytest.raises(ValueError):
            faults.parse(bad)
    assert not faults.ANY  # the test process itself runs without faults


def test_a_log_write_that_fails_midway_leaves_no_hole(tmp_path, monkeypatch):
    """Found by the 10-minute `combined` run: a write that failed after part
    of its record was cut off the file, but the file position stayed past
    the cut, so the next record followed a hole of zeros, which recovery
    reads as the log's end: every record after it was lost."""
    from engram_shm.errors import StorageError
    from engram_shm.store import wal

    monkeypatch.setattr(faults, "FAIL_WRITE_EVERY", 3)
    writer = wal.WalWriter(str(tmp_path), "always", 10, 1 << 20, 1, 0)
    kept = []
    for i in range(10):
        with contextlib.suppress(StorageError):
            kept.append(writer.append(wal.SESSION, {"key": f"s{i}", "state": 1}))
    writer.close()
    scans = []
    assert [r.lsn for r in wal.read_log(str(tmp_path), scans)] == kept
    assert all(scan.problem is None for scan in scans), scans
