from tests.test_bench import quick

LEVEL_KEYS = {"bench", "level", "offered_per_s", "sent_per_s", "accepted_per_s", "refused_per_s",
              "refused_by_code", "indexed_per_s", "window_max", "window_mean", "ack_p50_ms", "ack_p99_ms",
              "recall_p50_ms", "recall_p99_ms", "dim", "batch", "seconds", "machine", "date"}


def test_ramp_quick_offers_two_levels_and_loses_nothing_acked():
    out, rows = quick("ramp")
    *levels, summary = rows
    assert [r["offered_per_s"] for r in levels] == [10_000, 200_000]
    for r in levels:
        assert set(r) >= LEVEL_KEYS and r["bench"] == "ramp", r
        assert r["sent_per_s"] > 0 and r["accepted_per_s"] > 0 and r["indexed_per_s"] >= 0, r
        assert r["ack_p99_ms"] >= r["ack_p50_ms"] > 0 and r["recall_p99_ms"] >= r["recall_p50_ms"] > 0, r
        assert r["window_max"] >= r["window_mean"] >= 0, r
        assert r["refused_per_s"] == round(sum(r["refused_by_code"].values()) / r["seconds"], 1), r
    assert summary["bench"] == "ramp" and summary["level"] == "summary", summary
    assert summary["acked"] > 0 and summary["lost"] == 0 and summary["stored"] == summary["acked"], summary
    assert summary["found"] == summary["sampled"] > 0, summary
    assert "nothing acked is lost" in out and "accepted/s" in out


def test_batch_quick_measures_every_batch_size():
    out, rows = quick("batch")
    assert [r["batch"] for r in rows] == [1, 10, 50, 100, 256, 1000]
    for r in rows:
        assert set(r) >= {"bench", "batch", "n", "dim", "obs_per_s", "ack_p50_ms", "ack_p99_ms"}, r
        assert r["bench"] == "batch" and r["n"] > 0 and r["obs_per_s"] > 0, r
        assert r["ack_p99_ms"] >= r["ack_p50_ms"] > 0, r
    assert "x batch 1" in out
