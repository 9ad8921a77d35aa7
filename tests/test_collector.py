"""The collector's exposition, read back by prometheus-client's parser: any
space name a client may choose (quotes, backslashes, newlines are not
printable and refused earlier, "other" itself) comes back as it was or as
"other", never as a broken line or a second series for one label set, and
the numbers add up."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engram_shm import Engine
from engram_shm.observability.collector import OTHER, EngineCollector
from engram_shm.observability.stats_block import StatsBlock

LABELLED = 3
names = st.one_of(st.just(OTHER), st.text(min_size=1, max_size=24).filter(
    lambda s: s.isprintable() and len(s.encode("utf-8", "replace")) <= 128))


@pytest.fixture(scope="module")
def engine():
    with Engine(workers=1) as e:
        yield e


def exposition(engine, stats) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine.config, engine.catalog, engine.directory, stats))
    return generate_latest(registry).decode()


@settings(max_examples=25)
@given(st.lists(names, min_size=1, max_size=6, unique=True))
def test_hostile_space_names_come_back_whole(engine, spaces):
    rng = np.random.default_rng(len(engine.catalog.names))
    for name in spaces:
        try:
            engine.observe(name, f"id-{engine.catalog.n_spaces}", rng.random(4) + 0.1)
        except Exception as e:  # a name the engine refuses (e.g. a lone surrogate) is no label
            assert getattr(e, "code", None) in ("invalid_argument", "invalid_utf8", "duplicate_id"), e
    stats = StatsBlock.private(LABELLED, 1)
    stats.accepted[:, 1] = np.arange(stats.slots) + 1
    families = {f.name: f for f in text_string_to_metric_families(exposition(engine, stats))}
    catalog = [engine.catalog.space(i).name for i in range(engine.catalog.n_spaces)]
    expected = collections.Counter()
    for index, name in enumerate(catalog):
        expected[name if index < LABELLED else OTHER] += engine.directory.of_space(index)[0].accepted
    seen = {s.labels["memory_space"]: s.value for s in families["engram_shm_space_accepted"].samples}
    assert seen == dict(expected)
    series = [tuple(sorted(s.labels.items())) for f in families.values() for s in f.samples
              if s.name == "engram_streaming_observations_total"]
    assert len(series) == len(set(series))  # a space named "other" shares the aggregate's series
    accepted = {s.labels["memory_space"]: s.value for s in families["engram_streaming_observations"].samples}
    assert sum(accepted.values()) == sum(range(1, stats.slots + 1))
    assert set(accepted) == set(catalog[:LABELLED]) | {OTHER}
