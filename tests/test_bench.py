from benchruns import quick

KEYS = {"bench", "machine", "date", "system", "data", "n", "dim", "dtype", "threads", "insert_per_s",
        "insert_per_cpu_s", "recall_at_10", "query_p50_ms", "query_p99_ms"}


def test_ann_quick_runs_all_peers_and_prints_json_lines():
    out, rows = quick("ann")
    for data in ("clustered-64", "sentence-48"):
        assert {(r["system"], r["dtype"], r["threads"]) for r in rows if r["data"] == data} == {
            ("hnswlib", "f32", 1), ("faiss", "f32", 1), ("engram_shm", "f16", 1), ("engram_shm", "int8", 1),
            ("hnswlib", "f32", 2), ("engram_shm", "f16", 2), ("engram_shm", "int8", 2),
            ("engram_shm+compact", "f16", 2), ("engram_shm+compact", "int8", 2)}
    for r in rows:
        assert set(r) == KEYS | ({"codes_recall_at_10"} if r["dtype"] == "int8" else set())
        assert r["insert_per_s"] > 0 and r["insert_per_cpu_s"] > 0 and 0 <= r["recall_at_10"] <= 1
    engram = [r for r in rows if r["system"].startswith("engram_shm")]
    assert all(r["recall_at_10"] >= 0.9 for r in engram), engram
    # the exact search over the codes finds about what the graph over them finds, or more
    assert all(r["codes_recall_at_10"] >= r["recall_at_10"] - 0.05 for r in engram if r["dtype"] == "int8")
    assert out.count("x hnswlib") == 2


def test_scaling_quick_compares_worker_counts():
    out, rows = quick("scaling")
    assert [(r["spaces"], r["workers"]) for r in rows] == [(1, 1), (1, 2), (8, 1), (8, 2)]
    for r in rows:
        assert {"bench", "workers", "insert_per_s"} <= set(r) and r["bench"] == "scaling"
        assert r["insert_per_s"] > 0
    assert rows[1]["segments"] >= 2  # the hot space spread over both writers
    assert min(r["segments"] for r in rows[2:]) >= 8  # a segment at least per space
    assert out.count("x 1st") == 2


def test_ingest_quick_compares_with_the_raw_transport():
    out, rows = quick("ingest")
    assert [r["system"] for r in rows] == ["raw_zmq", "raw_zmq_shm", "engram_shm", "engram_shm_client",
                                           "engram_shm_loop_only"]
    for r in rows:
        assert {"bench", "system", "batch", "dim", "obs_per_s"} <= set(r) and r["obs_per_s"] > 0
        assert r["receiver_cpu_us_per_batch"] >= 0 and r["sender_cpu_us_per_batch"] >= 0
    assert "x raw_zmq" in out and "receiver us/batch" in out


def test_ingest_quick_compares_fsync_policies():
    out, rows = quick("ingest", "--fsync", "always,interval,never")
    assert [r["system"] for r in rows] == ["engram_shm_fsync_never", "engram_shm_fsync_always",
                                           "engram_shm_fsync_interval", "engram_shm_memory_only"]
    assert all(r["obs_per_s"] > 0 for r in rows)
    assert "x first" in out and "x engram_shm_fsync_never" in out


def test_ingest_quick_compares_curve_with_no_authentication():
    out, rows = quick("ingest", "--auth")
    assert [r["system"] for r in rows] == ["engram_shm_auth_none", "engram_shm_auth_curve"]
    assert all(r["obs_per_s"] > 0 and r["recalls"] >= 0 for r in rows)


def test_restart_quick_comes_back_after_a_crash_and_a_clean_stop():
    out, rows = quick("restart")
    assert [r["case"] for r in rows] == ["crash", "clean"]
    for r in rows:
        assert r["ready_s"] > 0 and r["recovery_s"] is not None and r["own_top_hit"] >= 0.99, r
    assert rows[0]["log_tail"] > 0 and rows[1]["log_tail"] == 0


def test_websocket_quick_measures_one_connection_against_the_zmq_client():
    out, rows = quick("websocket")
    assert [r["system"] for r in rows] == ["zmq_client", "ws_batch", "ws_single", "json_decode"]
    assert all(r["obs_per_s"] > 0 and r["dim"] == 768 and r["machine"] and r["date"] for r in rows[:3])
    assert rows[3]["orjson_us_per_obs"] > 0 and "x zmq_client" in out


def test_isolation_quick_times_acks_alone_and_under_recall_load():
    out, rows = quick("isolation")
    assert [r["phase"] for r in rows] == ["alone", "recalls"]
    for r in rows:
        assert {"machine", "date", "ack_p50_ms", "ack_p99_ms", "batches"} <= set(r) and r["ack_p99_ms"] > 0
    assert rows[1]["heavy_recalls"] >= 1 and rows[1]["flood_recalls"] >= 1
    assert "x alone p99" in out and "goal: within 2x" in out


def test_recall_quick_measures_idle_and_ingesting_recalls_by_consistency_and_clients():
    out, rows = quick("recall")
    idle = {(via, "idle", consistency, clients) for via in ("client", "attach")
            for consistency in ("strong", "indexed") for clients in (1, 2)}
    ingest = {(via, "ingest", consistency, 1) for via in ("client", "attach")
              for consistency in ("strong", "indexed")}
    combinations = [(r["via"], r["phase"], r["consistency"], r["clients"]) for r in rows]
    assert sorted(combinations) == sorted(idle | ingest)  # each once
    for r in rows:
        assert r["bench"] == "recall" and r["n"] == 5000 and r["dim"] == 64 and r["ef_construction"] > 0, r
        assert r["recall_p99_ms"] >= r["recall_p50_ms"] > 0 and r["queries_per_s"] > 0 and r["recalls"] > 0, r
        assert r["count"] >= r["n"] and r["segments"] >= 1 and r["indexed_per_s"] > 0, r
        assert (r["ingest_per_s"] > 0) if r["phase"] == "ingest" else "ingest_per_s" not in r, r
        assert (r["count_after"] > r["count"]) if r["phase"] == "ingest" else "count_after" not in r, r
    assert "graphs built with ef_construction" in out


def test_memory_quick_reports_bytes_per_observation():
    out, rows = quick("memory")
    assert [r["dtype"] for r in rows] == ["f16", "f32", "int8"]
    for r in rows:
        assert r["n"] == 20000 and r["shm_bytes"] > r["n"] * r["floor_bytes_per_observation"]
        assert r["shm_peak_bytes"] >= r["shm_bytes"] and r["segments"] == 1  # compacted at rest
        assert r["process_rss_bytes"] > r["process_anonymous_bytes"] > 0
        # the log holds every vector as stored; a checkpoint holds them and the graph
        vector_bytes = r["n"] * r["dim"] * {"f16": 2, "f32": 4, "int8": 1}[r["dtype"]]
        assert r["checkpoint_bytes"] > r["wal_bytes"] > vector_bytes
    f16, f32, int8 = (r["shm_bytes"] for r in rows)
    assert int8 < f16 < f32  # int8 codes take half of f16's bytes, f32 twice


def test_ingest_quick_compares_metrics_off_and_on():
    out, rows = quick("ingest", "--metrics")
    systems = [f"engram_shm_{where}metrics_{on}" for where in ("", "loop_only_") for on in ("off", "on")]
    assert [r["system"] for r in rows] == systems
    assert all(r["obs_per_s"] > 0 for r in rows)
    assert rows[0]["x_metrics_off"] == rows[2]["x_metrics_off"] == 1.0
    assert "x metrics off" in out


def test_cluster_quick_measures_one_to_three_nodes_and_a_move():
    out, rows = quick("cluster")
    ingest = [r for r in rows if r["case"] == "ingest"]
    assert [(r["nodes"], r["nodes_used"]) for r in ingest] == [(1, 1), (2, 2), (3, 3)]
    assert all(r["accepted_per_s"] > 0 and 0 < r["indexed_per_s"] <= r["accepted_per_s"] for r in ingest)
    [move] = [r for r in rows if r["case"] == "move"]
    assert move["copied"] + move["tail"] == move["n"] and move["epoch"] == 2
    assert move["own_top_hit"] >= 0.95 and 0 <= move["frozen_s"] <= move["move_s"]
    assert "accepted x1" in out and "writes waited s" in out


def test_segments_quick_compares_a_grown_and_a_compacted_space_with_one_graph_at_each_beam():
    out, rows = quick("segments")
    assert [(r["way"], r["ef"]) for r in rows] == [("one graph", 16), ("one graph", 64), ("grown", 16),
                                                    ("grown", 64), ("compacted", 16), ("compacted", 64)]
    one, grown, compacted = rows[0], rows[2], rows[4]
    assert one["segments"] == 1 and grown["segments"] > 3  # 3000 rows: 64, 256, 1024, ... slots
    assert compacted["segments"] == 1 and compacted["compact_s"] >= 0 and grown["compact_s"] is None
    for r in rows:
        assert r["recall_p50_ms"] > 0 and 0 < r["recall_at_10"] <= 1 and r["machine"] and r["date"]
    assert rows[1]["recall_at_10"] >= rows[0]["recall_at_10"] - 0.02  # a wider beam finds as much
    per_segment = rows[3]["segment_search_ms"]
    assert len(per_segment) == grown["segments"] and sum(n for n, _ in per_segment) == 3000
    assert [n for n, _ in rows[5]["segment_search_ms"]] == [3000]
    assert "recall over many segments and over one graph" in out


def test_idtable_quick_compares_moving_with_the_batches_against_all_at_once():
    out, rows = quick("idtable")
    assert [r["way"] for r in rows] == ["at once", "incremental"]
    for r in rows:
        assert r["n"] == 65536 and r["growths"] == rows[0]["growths"] >= 8  # 64 entries to 131,072
        assert r["slowest_ms"] >= r["batch_p99_ms"] > 0 and r["total_ms"] > 0 and r["lookup_us"] > 0
    assert "x at once" in out
