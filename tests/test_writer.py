import numpy as np

from engram_shm import Engine
from engram_shm.engine.writer import EngineWriter
from engram_shm.store.layout import MAX_GEN
from engram_shm.store.space import BURIED
from engram_shm.synthetic import clustered


def test_a_restarted_writer_recovers_spaces_ids_and_buries_unacked_rows():
    data = clustered(900, 16, seed=51)
    with Engine(workers=1, segment_capacity=256) as e:
        e.observe("s", [f"a{i}" for i in range(600)], data[:600])
        committed = e.generation
        # A writer killed inside a batch: rows published in their segments, the
        # generation never committed, the batch never acked.
        params, batch = e.writer.prepare("s", [f"b{i}" for i in range(300)], data[600:])
        e.writer.spaces["s"].append(batch, committed + 1)
        assert e.generation == committed
        assert all(not m.id.startswith("b") for m in e.recall("s", data[700], k=5))

        fresh = EngineWriter(e.catalog, e.config, e._on_new_segment)
        assert fresh.recover(e._segments.__getitem__) == 900
        w = fresh.spaces["s"]
        assert w.index_ids() == 600 and w.find_id("a599") and w.find_id("b0") is None
        assert e.generation == committed + 300  # never hand out a generation twice
        gens = np.concatenate([s.r.generation[:s.accepted] for s in w.segments])
        assert (gens == BURIED).sum() == 300
        assert all(not m.id.startswith("b") for m in e.recall("s", data[700], k=5))

        # the client re-sends the batch it never got an ack for: it is stored
        params, batch = fresh.prepare("s", [f"b{i}" for i in range(300)], data[600:])
        ack, _ = fresh.write(params, batch)
        assert ack.first_generation == committed + 301
        assert e.recall("s", data[700], k=1)[0].id == "b100"
        # the re-sent rows share a segment with the buried ones, which stay hidden
        def hidden():
            found = e.recall("s", data[700], k=20)
            unique = len({m.id for m in found}) == len(found)
            return unique and all(0 < m.generation <= e.generation for m in found)

        assert hidden()
        # rows buried before MAX_GEN marked a burial (an older data directory):
        # the next recovery marks them
        held = [s for s in fresh.spaces["s"].segments if (s.r.generation[:s.accepted] == BURIED).any()]
        assert held and all(s.header[MAX_GEN] == -1 for s in held)
        for s in held:
            s.header[MAX_GEN] = e.generation
        assert not hidden()
        EngineWriter(e.catalog, e.config, e._on_new_segment).recover(e._segments.__getitem__)
        assert all(s.header[MAX_GEN] == -1 for s in held) and hidden()
        assert len(fresh.spaces["s"].open) >= 1
