import json
import subprocess
import sys


def test_killing_the_front_and_workers_at_random_loses_nothing_acked():
    r = subprocess.run([sys.executable, "-m", "chaos.kill_anything", "--quick", "--seed", "7"],
                       capture_output=True, text=True, timeout=600)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and report["ok"], report
    assert report["killed"] and report["acked"] == report["sent"] == report["stored"]
