"""The shipped dashboard and rules against a real Prometheus (Debian's
`prometheus` package, which .ci/system-deps installs): promtool checks the
rules and runs their unit tests, then a Prometheus server scrapes a live
engine under load and every expression of the dashboard and of the rules,
evaluated through its HTTP API, returns data."""

import json
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from engram_shm import Client
from engram_shm.errors import EngramError
from engram_shm.synthetic import clustered
from engram_shm.transport.launch import free_port, running_server

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
RULES = DOCS / "prometheus" / "alerts.yml"
RULE_TESTS = DOCS / "prometheus" / "alerts_test.yml"
DASHBOARD = DOCS / "grafana" / "engram_shm.json"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs = pytest.mark.skipif(not (PROMTOOL and PROMETHEUS), reason="SKIPPED: Prometheus is not installed "
                           "(Debian's prometheus package; .ci/system-deps installs it)")
THRESHOLD = re.compile(r"^(.*?)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[0-9.eE]+$", re.S)


def dashboard_expressions() -> list[str]:
    return [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]


def rule_expressions() -> list[str]:
    """Every recording rule's expression, and every alert's without its
    threshold (an alert that does not fire returns nothing, by design)."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            out.append(THRESHOLD.match(expr).group(1) if "alert" in rule else expr)
    return out


@needs
def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for alert in alerts:  # each alert both firing and not firing
        cases = [bool(case["exp_alerts"]) for t in tests for case in t["alert_rule_test"]
                 if case["alertname"] == alert]
        assert True in cases and False in cases, alert


def load(endpoint: str, stop: threading.Event, failures: list) -> None:
    """Traffic that makes every series exist and move: batches past the
    ring's half (pressure), refused ones, recalls of each consistency, a
    checkpoint. What goes wrong lands in `failures`."""
    try:
        _load(endpoint, stop)
    except Exception as e:
        failures.append(e)
        raise


def _load(endpoint: str, stop: threading.Event) -> None:
    data = clustered(6000, 256, seed=93)
    with Client(endpoint, batch_size=250, timeout=60) as c:
        c.observe_batch("load", [f"l{i}" for i in range(250)], data[:250])
        c.flush()
        c.checkpoint()
        at = 250
        while not stop.is_set():
            if at < len(data):
                rows = data[at:at + 500]
                c.observe_batch("load", [f"l{i}" for i in range(at, at + len(rows))], rows)
                at += len(rows)
            try:
                with Client(endpoint) as bad:
                    bad.observe_batch("load", ["nan"], np.full((1, 256), np.nan, np.float32))
                    bad.flush()
            except EngramError:
                pass
            for consistency in ("strong", "indexed"):
                c.recall("load", data[0], k=5, consistency=consistency)
            stop.wait(0.3)
        c.flush()


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        reply = json.loads(r.read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


@needs
def test_a_real_prometheus_gets_data_for_every_dashboard_and_rule_expression():
    metrics_port, prometheus_port = free_port(), free_port()
    flags = ("--metrics", f"127.0.0.1:{metrics_port}", "--ring-capacity", "1000", "--ef-construction", "400",
             "--recall-workers", "1")
    with running_server(*flags, workers=1) as (endpoint, _, _), \
            tempfile.TemporaryDirectory(prefix="engram-prometheus-") as home:
        config = pathlib.Path(home, "prometheus.yml")
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "engram_shm",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
        stop, failures = threading.Event(), []
        traffic = threading.Thread(target=load, args=(endpoint, stop, failures))
        with open(pathlib.Path(home, "prometheus.log"), "w") as log:
            prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                                           f"--storage.tsdb.path={home}/data",
                                           f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                          stdout=log, stderr=subprocess.STDOUT)
        try:
            traffic.start()
            deadline = time.monotonic() + 45
            expressions = dashboard_expressions() + rule_expressions()
            missing = expressions
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                try:
                    missing = [e for e in missing if not query(prometheus_port, e)]
                except OSError:  # not listening yet
                    continue
            log = pathlib.Path(home, "prometheus.log").read_text()
            assert not missing, f"no data for {missing}\n{log[-2000:]}"
        finally:
            stop.set()
            traffic.join(60)
            prometheus.kill()
            prometheus.wait(10)
        assert not failures, failures
