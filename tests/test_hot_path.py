"""Hostcalls per request, path by path: the smoke version of `make bench` inside the tests.

`scripts/hostcalls.mjs` loads the built .wasm in a minimal proxy-wasm host (Node), drives whole
request lifecycles and counts every import the module calls. Unlike throughput, the counts do
not depend on the machine, so a change that adds a hostcall to a hot path fails here, not
only in a benchmark nobody ran. Budgets are the counts of docs/perf.md plus a little room for
the sampled (timed) requests.
"""

import json
import shutil
import subprocess

import pytest

import harness

NODE = shutil.which("node")

# path name prefix -> (most hostcalls, most allocation callbacks) per request, steady state
BUDGETS = {
    "pass: GET of a known key": (1.5, 1.2),
    "pass, key not read by this worker": (2.5, 2.2),
    "negative-cache hit": (3.2, 2.1),
    "shed": (4.2, 2.1),
    "other: GET /healthz": (1.0, 1.0),
    "no-op filter": (0.0, 0.0),
}
# Per tick (100 ms) on the elected VM: 14 (the occupancy scan once made it 81; gauges written
# every tick whether changed or not, 20).
TICK_BUDGET = 16


@pytest.fixture(scope="module")
def counts():
    assert NODE, "node missing: run scripts/setup.sh (it installs Debian's nodejs)"
    r = subprocess.run([NODE, "scripts/hostcalls.mjs", "--json", str(harness.WASM),
                        str(harness.NOOP_WASM)],
                       cwd=harness.ROOT, capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout)
    failed = [p["name"] for p in out["paths"] if not p["ok"]]
    assert r.returncode == 0 and not failed, f"paths that did not end as they should: {failed}\n{r.stderr}"
    return out


def test_every_path_stays_within_its_hostcall_budget(counts):
    seen = set()
    for p in counts["paths"]:
        for prefix, (calls, allocs) in BUDGETS.items():
            if p["name"].startswith(prefix):
                seen.add(prefix)
                print(f"{p['name']}: {p['total']} hostcalls, {p['allocs']} allocation callbacks")
                assert p["total"] <= calls and p["allocs"] <= allocs, p
    assert seen == set(BUDGETS), f"paths missing from scripts/hostcalls.mjs: {set(BUDGETS) - seen}"


def test_a_hot_key_is_read_from_the_table_once_per_reuse_window(counts):
    hot, cold = (next(p for p in counts["paths"] if p["name"].startswith(n))
                 for n in ("pass: GET of a known key", "pass, key not read by this worker"))
    assert "proxy_get_shared_data" not in hot["byPhase"]["request_headers"]
    assert cold["byPhase"]["request_headers"]["proxy_get_shared_data"] == 1


def test_the_tick_stays_cheap(counts):
    assert counts["tick"]["per_tick"] <= TICK_BUDGET, counts["tick"]
    assert counts["memory_poll"]["ok"], counts["memory_poll"]
