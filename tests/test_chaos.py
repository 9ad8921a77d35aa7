"""The chaos suite (docs/chaos.md): every scenario for 20 s against a real
server, passing every validator; each deliberate bug (a test-only fault flag
of engram_shm/faults.py) caught by the validator that should catch it, so
the suite is shown able to fail; and the schedules reproducible from the
seed. Each run is `python -m chaos run` in a child process, as a user runs
it; its JSON summary is the last line of its output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chaos.run import BUGS
from chaos.schedule import SCENARIOS, schedule
from engram_shm import faults

SECONDS = 20
SAMPLE = 500  # acked ids recalled by their own vector per run (every one is checked stored, with its vector)


def chaos(*args: str, timeout: float = 420) -> tuple[int, dict, str]:
    r = subprocess.run([sys.executable, "-m", "chaos", "run", *args, "--json"], capture_output=True,
                       text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert lines, f"no summary (exit {r.returncode}): {r.stderr[-3000:]}"
    return r.returncode, json.loads(lines[-1]), r.stderr


def not_injected(name: str, summary: dict) -> list[str]:
    """The scenario's faults that did not happen (a run that injected
    nothing proves nothing)."""
    sc, done = SCENARIOS[name], summary["faults"]
    net = done["network"]
    kinds = {kind for _, kind, _ in done["process"]}
    expected = {"dropped": sc.net.drop, "duplicated": sc.net.duplicate, "reordered": sc.net.reorder,
                "partitioned": sc.partition_every_s}
    missing = [what for what, wanted in expected.items() if wanted and not net.get(what)]
    missing += [kind for kind in sc.every_s if kind not in kinds]
    if "kill_engine" in sc.every_s and done["engine_starts"] < 2:
        missing.append("engine restart")
    if "fail_write" in sc.storage and not summary["refused"].get("storage_error"):
        missing.append("failed writes")
    return missing


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_passes_every_validator(name):
    code, summary, err = chaos(name, "--seconds", str(SECONDS), "--seed", "14", "--sample", str(SAMPLE))
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
def test_deliberate_bug_is_caught(bug):
    code, summary, err = chaos(BUGS[bug], "--bug", bug, "--seconds", "10", "--seed", "14", "--sample", "200")
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
