import dataclasses

import pytest

from engram_shm.cli import build_parser, config_from
from engram_shm.config import EngineConfig
from engram_shm.errors import InvalidArgument


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
