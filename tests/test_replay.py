"""The replays (`make demo`, `make replay-surge`, scripts/replay.py).

- The quick form of `make demo` (the incident and the 3x surge, a few seconds of load per
  setup, all six setups): every setup runs, the table, results.json and plots are produced,
  the numbers add up, the store's watchdog and sessionguard's counters are wired, and
  sessionguard keeps the store alive. Not how well anything sheds under a real surge: this
  machine is shared and the quick surge lasts 3 s.
- The README's replay table against the committed results (docs/results/replay.json), with
  no run: both are parsed and compared.
- The bookkeeping that turns store samples and filter counters into the reported numbers.
"""

import hashlib
import json
import re
import subprocess
import sys

import pytest

import harness

sys.path.insert(0, str(harness.ROOT / "scripts"))
import replay  # noqa: E402

SETUPS = ["bare", "stock-envoy", "circuit-breaker", "adaptive-concurrency", "admission-control",
          "sessionguard"]
SCENARIOS = ["incident", "surge3"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    committed = {p: _digest(p) for p in (replay.RESULTS_FILE, replay.DOC, replay.README)}
    run = subprocess.run(
        [sys.executable, str(harness.ROOT / "scripts/replay.py"), "--quick",
         "--scenario", ",".join(SCENARIOS), "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # A quick run records nothing: the committed results and the docs are untouched.
    assert {p: _digest(p) for p in committed} == committed
    return run, out


def test_quick_replay_runs_every_setup_and_scenario(quick_run):
    run, out = quick_run
    assert run.stdout.count("[1/6]") == 2 and run.stdout.count("[6/6]") == 2
    assert "OOM kills" in run.stdout
    for name in SCENARIOS:
        table = run.stdout[run.stdout.index(f"--scenario {name}"):]
        table = table[table.index("reached store (answered)"):]
        for setup in SETUPS:
            assert f"\n{setup} " in table, table
        data = json.loads((out / name / "results.json").read_text())
        meta = data["meta"]
        assert meta["quick"] is True and meta["scenario"] == name
        assert meta["machine"]["nproc"] >= 1 and meta["machine"]["cpu"]
        assert meta["commit"] and meta["filter"]["wasm_sha256"]
        assert [r["setup"] for r in data["results"]] == SETUPS
        png = out / name / f"replay-{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 20_000


@pytest.mark.parametrize("name", SCENARIOS)
def test_quick_replay_numbers_add_up(quick_run, name):
    _, out = quick_run
    data = json.loads((out / name / "results.json").read_text())
    meta = data["meta"]
    phases = meta["phases"]
    planned_s = sum(p["duration_s"] for p in phases)
    surge = next(p for p in phases if p["name"] == "surge")
    assert surge["rate_to"] > phases[0]["rate_to"] > 0
    for r in data["results"]:
        name_ = r["setup"]
        # The generator sent the load (it may lag a little on a busy machine, never by half).
        s = r["surge"]
        assert s["asked_rate"] == surge["rate_to"], name_
        assert s["achieved_rate"] > 0.8 * s["asked_rate"], (name_, s)
        # Per class: what was sent adds up to the total, each outcome to what was sent.
        assert sum(c["sent"] for c in r["classes"].values()) == r["sent"], name_
        for cls, c in r["classes"].items():
            assert c["sent"] > 0, (name_, cls)
            assert c["ok"] + c["shed_503"] + c["errors"] + c["incorrect"] == c["sent"], (name_, cls)
        assert sum(c["shed_503"] for c in r["classes"].values()) == r["shed_503"], name_
        assert r["shed_503_user"] == sum(r["classes"][c]["shed_503"]
                                         for c in ("write", "user_get", "delete")), name_
        # Answers that came back were right: no stale 404, no wrong body.
        assert r["incorrect"]["incorrect"] == 0, (name_, r["incorrect"])
        # The store's watchdog: below the limit unless it was killed, and every kill was seen
        # by the supervisor during the run.
        assert r["peak_rss_bytes"] is not None, name_
        if r["oom_kills"] == 0:
            assert r["peak_rss_bytes"] < r["limit_bytes"], (name_, r["peak_rss_bytes"])
        assert len(r["kills_t"]) == r["oom_kills"], name_
        assert all(-5 < t < planned_s + 10 for t in r["kills_t"]), (name_, r["kills_t"])
        # What reached the store, counted at both ends, and what it answered in the surge.
        assert r["envoy_upstream_rq"] and 0 < r["store_answered"] <= r["envoy_upstream_rq"], name_
        assert 0 <= s["store_answers_per_s"] <= 1.5 * replay.CAPACITY, (name_, s)
        assert len(r["seconds"]) == planned_s, name_
        for sec in r["seconds"]:
            for c in sec["c"].values():
                assert c[1] + c[2] + c[3] <= c[0], (name_, sec)
        if r["p50_ms"] is not None:
            assert 0 < r["p50_ms"] <= r["p99_ms"]
        # Only sessionguard exports shed counters.
        assert (r["filter_shed"] is not None) == (name_ == "sessionguard"), name_


@pytest.mark.parametrize("name", SCENARIOS)
def test_quick_replay_sessionguard_keeps_the_store_alive_and_counts_its_sheds(quick_run, name):
    _, out = quick_run
    data = json.loads((out / name / "results.json").read_text())
    sg = next(r for r in data["results"] if r["setup"] == "sessionguard")
    assert sg["oom_kills"] == 0 and sg["restarts"] == 0, sg["kills_t"]
    assert sg["peak_rss_ratio"] <= 0.85, sg["peak_rss_ratio"]
    fs = sg["filter_shed"]
    # Its per-class shed counters are exported.
    assert isinstance(fs["critical"], int) and isinstance(fs["sheddable"], int)
    # Every 503 a client got came from the filter (the store was never down); the filter may
    # have shed more than clients saw (a client that timed out before its 503 arrived).
    assert sg["shed_503"] <= fs["critical"] + fs["sheddable"], (fs, sg["shed_503"])
    assert {"concurrency", "admission", "memory"} <= set(fs["by_reason"]), fs["by_reason"]
    # It classified every request the clients sent (and the prefill's writes).
    assert sum(fs["requests"].values()) >= sg["sent"], fs["requests"]
    readers = sg["classes"]["reader_miss"]["sent"]
    if name == "incident":
        # Zipf keys repeat: the negative cache answers some lookups itself.
        assert fs["negcache_hits"] > 0.05 * readers, (fs["negcache_hits"], readers)
    else:
        # Uniform keys over 10^9: the cache cannot absorb them.
        assert fs["negcache_hits"] < 0.01 * readers, (fs["negcache_hits"], readers)


# ------------------------------------------------------------------------------------------
# The README's table and the committed results: no run needed
# ------------------------------------------------------------------------------------------

def _number(cell: str) -> float:
    m = re.fullmatch(r"(-?[\d,]+(?:\.\d+)?)%?", cell)
    assert m, f"not a number: {cell!r}"
    return float(m.group(1).replace(",", ""))


def test_readme_replay_table_matches_the_committed_results():
    data = json.loads(replay.RESULTS_FILE.read_text())
    readme = replay.README.read_text()
    table = replay.parse_readme_table(readme)
    assert set(table) == {replay.README_NAMES[s] for s in SETUPS}, sorted(table)
    checked = 0
    for i, name in enumerate(replay.README_SCENARIOS):
        entry = data["scenarios"].get(name)
        assert entry is not None, f"{name} is in the README's table but has no recorded run"
        meta = entry["meta"]
        assert not meta["quick"]
        # The README names the run: its date, commit and command.
        assert meta["date"] in readme and meta["commit"] in readme and meta["command"] in readme
        rows = {r["setup"]: r for r in entry["results"]}
        assert set(rows) == set(SETUPS), sorted(rows)
        for setup in SETUPS:
            r = rows[setup]
            cells = {h: v[i] for h, v in table[replay.README_NAMES[setup]].items()}
            want = {
                "OOM kills": (r["oom_kills"], 0),
                "peak RSS / limit": (r["peak_rss_ratio"], 0.005),
                "store answers in surge, of capacity":
                    (r["surge"]["store_share_of_capacity_pct"], 0.5),
                "writes ok": (r["writer_success_pct"], 0.05),
                "logged-in reads ok": (r["user_read_success_pct"], 0.05),
                "reader lookups ok": (r["reader_miss_success_pct"], 0.05),
                "503s to logged-in users": (r["shed_503_user_share_pct"], 0.05),
            }
            assert set(cells) == set(want), sorted(cells)
            for column, (value, tolerance) in want.items():
                cell = cells[column]
                if value is None:
                    assert cell == "-", (name, setup, column, cell)
                else:
                    assert abs(_number(cell) - value) <= tolerance + 1e-9, \
                        (name, setup, column, cell, value)
                checked += 1
    assert checked == len(replay.README_SCENARIOS) * len(SETUPS) * 7


def test_replay_doc_names_every_recorded_run_and_has_its_plot():
    data = json.loads(replay.RESULTS_FILE.read_text())
    doc = replay.DOC.read_text()
    assert data["scenarios"], "no recorded run"
    for name, entry in data["scenarios"].items():
        meta = entry["meta"]
        assert f"--scenario {name}" in doc
        assert meta["date"] in doc and meta["commit"] in doc and meta["command"] in doc
        assert (harness.ROOT / "docs/img" / f"replay-{name}.png").exists(), name
        # Every setup's row of this scenario is in the doc's table.
        for r in entry["results"]:
            assert f"| {r['setup']} | {r['oom_kills']} | " in doc, (name, r["setup"])
    for e in data["earlier"]:
        assert e["meta"]["date"] in doc and e["meta"]["commit"] in doc


# ------------------------------------------------------------------------------------------
# Bookkeeping
# ------------------------------------------------------------------------------------------

def test_store_answers_are_counted_across_restarts():
    t0 = 1000.0
    samples = [
        {"t": 999.0, "start": 1.0, "requests": 10.0},     # before t = 0 (prefill)
        {"t": 1000.5, "start": 1.0, "requests": 110.0},
        {"down": True, "t": 1000.75},                       # killed
        {"t": 1001.0, "start": 2.0, "requests": 5.0},       # restarted: counts from zero
        {"t": 1001.5, "start": 2.0, "requests": 55.0},
    ]
    deltas = replay.store_answer_deltas(samples, t0)
    assert deltas == [(-1.0, 10.0), (0.5, 100.0), (1.0, 5.0), (1.5, 50.0)]
    assert replay.store_requests(samples) == 110 + 55


def test_filter_shed_counters_are_summed_by_class():
    stats = {
        "sessionguard.shed.concurrency.critical": 3,
        "sessionguard.shed.concurrency.sheddable": 90,
        "sessionguard.shed.memory.critical": 1,
        "sessionguard.shed.memory.sheddable": 6,
        "sessionguard.shadow.concurrency": 50,
        "sessionguard.requests.write": 40,
        "sessionguard.requests.read_unknown": 400,
        "sessionguard.negcache.hits": 7,
        "sessionguard.limit": 20,
    }
    fs = replay.filter_sheds(stats)
    assert fs["critical"] == 4 and fs["sheddable"] == 96
    assert fs["critical_share_pct"] == 4.0
    assert fs["by_reason"]["memory"] == {"critical": 1, "sheddable": 6}
    assert fs["requests"] == {"write": 40, "read_unknown": 400} and fs["negcache_hits"] == 7
    assert replay.filter_sheds({"sessionguard.limit": 20}) is None


def test_a_recorded_run_keeps_the_one_it_replaces():
    data = replay.load_results_file(harness.ROOT / "does-not-exist.json")
    row = {"setup": "sessionguard", "oom_kills": 0, "peak_rss_ratio": 0.2,
           "writer_success_pct": 60.0, "user_read_success_pct": 55.0,
           "reader_miss_success_pct": 40.0, "correct_pct": 100.0, "p99_ms": 10.0,
           "shed_503": 5, "shed_503_user_share_pct": 20.0, "behind_schedule": False,
           "surge": {"asked_rate": 5455, "achieved_rate": 5400.0, "store_answers_per_s": 1700.0,
                     "store_share_of_capacity_pct": 93.5},
           "filter_shed": None, "memory": [1, 2], "timeseries": [3]}
    replay.record_run(data, "surge3", {"date": "A", "commit": "c1"}, [row])
    assert "memory" not in data["scenarios"]["surge3"]["results"][0]  # raw data stays in out/
    replay.record_run(data, "surge3", {"date": "B", "commit": "c2"}, [row])
    assert data["scenarios"]["surge3"]["meta"]["date"] == "B"
    assert [e["meta"]["date"] for e in data["earlier"]] == ["A"]
    assert data["earlier"][0]["rows"][0]["writer_success_pct"] == 60.0
