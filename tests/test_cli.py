import json
import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engram_shm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_streams_recalls_and_reports():
    r = run("demo", "--n", "3000", "--dim", "32", "--workers", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    got, probes = map(int, report["own_vector_top_hit_while_ingesting"].split("/"))
    assert got == probes > 0
    assert report["recall_at_10"] >= 0.9
    assert "streaming" in r.stderr  # the progress bar


def test_errors_are_reported_with_their_code():
    r = run("demo", "--n", "10", "--M", "1")
    assert r.returncode == 2
    assert "[invalid_argument]" in r.stderr and "Traceback" not in r.stderr


def test_gc_reports():
    r = run("gc")
    assert r.returncode == 0 and "stale block(s) removed" in r.stdout
