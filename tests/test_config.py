import dataclasses
import json
import subprocess
import sys
import time

import pytest

from engram_shm import Client
from engram_shm.cli import SERVE_DEFAULTS, build_parser, config_from
from engram_shm.config import EngineConfig
from engram_shm.errors import InvalidArgument
from engram_shm.transport.launch import running_server


def test_every_option_has_a_flag_with_help():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    flags = {a.dest: a for a in demo._actions}
    for f in dataclasses.fields(EngineConfig):
        assert f.name in flags, f.name
        assert f.metadata["help"] in flags[f.name].help


def test_flags_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("ENGRAM_M", "24")
    monkeypatch.setenv("ENGRAM_DTYPE", "f32")
    args = build_parser().parse_args(["demo", "--dtype", "f16", "--workers", "3"])
    c = config_from(args)
    assert (c.M, c.dtype, c.workers, c.metric) == (24, "f16", 3, "cosine")


@pytest.mark.parametrize("bad", [dict(M=1), dict(dtype="f64"), dict(metric="hamming"),
                                 dict(name="bad_name"), dict(segment_capacity=1)])
def test_bad_options_are_refused(bad):
    with pytest.raises(InvalidArgument):
        EngineConfig(**bad)


def test_bad_environment_is_refused(monkeypatch):
    monkeypatch.setenv("ENGRAM_WORKERS", "many")
    with pytest.raises(InvalidArgument):
        EngineConfig.from_env()


def test_a_toml_file_sits_between_defaults_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGRAM_M", raising=False)
    path = tmp_path / "engram.toml"
    path.write_text('[engram]\nM = 12\nendpoint = "tcp://127.0.0.1:6000"\nsession_idle_s = 5\n')
    c = config_from(build_parser().parse_args(["serve", "--config", str(path), "--M", "20"]))
    assert (c.M, c.endpoint, c.session_idle_s) == (20, "tcp://127.0.0.1:6000", 5.0)
    c = config_from(build_parser().parse_args(["serve", "--config", str(path)]))
    assert c.M == 12
    path.write_text("M = 12\nbogus = 1\n")
    with pytest.raises(InvalidArgument, match="bogus"):
        config_from(build_parser().parse_args(["serve", "--config", str(path)]))
    path.write_text('M = "twelve"\n')
    with pytest.raises(InvalidArgument):
        config_from(build_parser().parse_args(["serve", "--config", str(path)]))


def test_an_environment_value_equal_to_the_default_still_overrides_the_file(tmp_path, monkeypatch):
    path = tmp_path / "engram.toml"
    path.write_text("max_batch = 10\n")
    monkeypatch.setenv("ENGRAM_MAX_BATCH", str(EngineConfig().max_batch))
    c = config_from(build_parser().parse_args(["serve", "--config", str(path)]), SERVE_DEFAULTS)
    assert c.max_batch == EngineConfig().max_batch


def test_client_commands_take_their_endpoint_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_ENDPOINT", "tcp://127.0.0.1:7001")
    for command in (["observe", "f.jsonl", "--space", "s"], ["recall", "s", "[1]"], ["checkpoint"], ["stats"],
                    ["top"]):
        assert config_from(build_parser().parse_args(command)).endpoint == "tcp://127.0.0.1:7001", command
    path = tmp_path / "engram.toml"
    path.write_text('endpoint = "tcp://127.0.0.1:7002"\n')
    monkeypatch.delenv("ENGRAM_ENDPOINT")
    args = build_parser().parse_args(["stats", "--config", str(path)])
    assert config_from(args).endpoint == "tcp://127.0.0.1:7002"


def test_serve_refuses_thread_index_writers_instead_of_ignoring_them():
    r = subprocess.run([sys.executable, "-m", "engram_shm.cli", "serve", "--worker-mode", "thread", "--data",
                        "none", "--metrics", "off"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "worker_mode" in r.stderr, r.stderr


def test_cli_environment_toml_and_children_agree(tmp_path, monkeypatch):
    """Each source wins where it should, and the children run with the result:
    the front answers with it, every child logs at its level in its format."""
    path = tmp_path / "engram.toml"
    path.write_text('[engram]\nmax_credit = 100\nmax_batch = 10\nlog_format = "text"\nmetrics_spaces = 5\n'
                    'session_idle_s = 60.0\n')
    monkeypatch.setenv("ENGRAM_MAX_BATCH", "4096")  # the default, over the file's 10
    monkeypatch.setenv("ENGRAM_LOG_FORMAT", "json")  # over the file's text
    monkeypatch.setenv("ENGRAM_LOG_LEVEL", "INFO")
    monkeypatch.setenv("ENGRAM_SESSION_IDLE_S", "30")  # under the flag's 45
    flags = ("--config", str(path), "--max-credit", "300", "--metrics-spaces", "2", "--session-idle-s", "45",
             "--recall-workers", "1")
    with running_server(*flags, workers=1) as (endpoint, name, proc):
        with Client(endpoint) as c:
            ack = c._request({"op": "init"})[0]  # a second session, to read its init_ack whole
            assert (ack["max_batch"], ack["credit"], ack["idle_timeout_s"]) == (4096, 300, 45.0)
            config = c.stats()["config"]
        assert (config["max_batch"], config["max_credit"], config["metrics_spaces"], config["log_format"],
                config["session_idle_s"]) == (4096, 300, 2, "json", 45.0)
        deadline = time.monotonic() + 30
        while not {"front", "index-0", "recall-0"} <= (roles := _json_log_roles(proc.output())):
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
    assert {"serve", "front", "index-0", "recall-0"} <= roles


def _json_log_roles(output: str) -> set[str]:
    """The processes that logged JSON lines at INFO in a server's output."""
    roles = set()
    for line in output.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["level"] == "INFO":
                roles.add(event["process"])
    return roles
