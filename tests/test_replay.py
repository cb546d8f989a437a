"""The incident replay (`make demo`, scripts/replay.py) in its quick form: a few seconds of
load per setup. Checks that every setup runs, and that the table, results.json and the plot
are produced and make sense; not how fast anything is (this machine is shared)."""

import json
import subprocess
import sys

import harness

SETUPS = ["bare", "circuit-breaker", "adaptive-concurrency", "admission-control", "sessionguard"]


def test_quick_replay_produces_a_sane_table_json_and_plot(tmp_path):
    out = tmp_path / "replay"
    run = subprocess.run(
        [sys.executable, str(harness.ROOT / "scripts/replay.py"), "--quick", "--no-docs",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Progress while it runs, then the table with one row per setup.
    assert "[1/5]" in run.stdout and "[5/5]" in run.stdout
    assert "OOM kills" in run.stdout
    table = run.stdout[run.stdout.index("store OOM kills"):]
    for setup in SETUPS:
        assert f"\n{setup} " in table, table

    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert meta["quick"] is True
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["cpu"]
    assert meta["surge_rate"] > meta["steady_rate"] > 0
    assert [r["setup"] for r in data["results"]] == SETUPS
    planned = sum(meta["shape"][k] for k in ("steady", "ramp", "surge", "after"))
    for r in data["results"]:
        name = r["setup"]
        assert r["sent"] > 0.5 * meta["steady_rate"] * planned, (name, r["sent"])
        assert isinstance(r["oom_kills"], int) and r["oom_kills"] >= 0
        for key in ("writer_success_pct", "user_read_success_pct", "reader_miss_success_pct",
                    "overall_success_pct"):
            assert r[key] is not None and 0.0 <= r[key] <= 100.0, (name, key, r[key])
        # Answers that came back were right: no stale 404, no wrong body (the store and
        # every proxy here must be correct; only 503s, errors and timeouts may differ).
        assert r["incorrect"]["incorrect"] == 0, (name, r["incorrect"])
        assert r["correct_pct"] == 100.0 or r["correct_pct"] is None, (name, r["correct_pct"])
        if r["p50_ms"] is not None:
            assert 0 < r["p50_ms"] <= r["p99_ms"]
        # The store was sampled while it ran, never above its limit by more than the last
        # allocation before the watchdog's kill.
        assert r["peak_rss_bytes"] is not None, name
        assert r["oom_kills"] > 0 or r["peak_rss_bytes"] <= r["limit_bytes"], name  # over it: killed
        assert len(r["memory"]) >= planned, name
        # What reached the store, counted at both ends: the store answered at most what
        # Envoy sent it (plus nothing else: the sampler's /metrics is not counted).
        assert r["envoy_upstream_rq"] is not None and r["envoy_upstream_rq"] > 0, name
        assert 0 < r["store_answered"] <= r["envoy_upstream_rq"], name
        assert len(r["timeseries"]) == planned, name
        for sec in r["timeseries"]:
            assert sec["ok"] + sec["shed"] + sec["error"] + sec["incorrect"] <= sec["sent"]
    sg = data["results"][-1]
    # sessionguard answered repeated reader lookups itself: fewer requests reached the store.
    assert sg["filter"].get("sessionguard.negcache.hits", 0) > 0
    assert "sessionguard.memory.ratio_permille" in sg["filter"]

    png = out / "replay.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
