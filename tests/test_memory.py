"""Issue 6 acceptance: memory shedding keeps the store alive.

A real Envoy (2 workers) in front of kask-sim with a memory limit, under `kask-sim supervise`
(restarts like Kubernetes and reports OOM kills), driven by an open-loop load (sessionload,
the incident's mix) at 1.5x the store's capacity:

- without the filter the store's backlog, and with it its memory, grows until it is
  OOM-killed (supervise's events: `"oom": true`, signal 9), again after every restart;
- with sessionguard, memory shedding only (no concurrency limit, no admission control, no
  negative cache), the store must never be killed, its resident memory must stay below
  `hard` x limit (plus TOLERANCE), and once the surge ends shedding must stop within
  STOP_WITHIN_S seconds, although resident memory stays high (kask-sim keeps freed memory
  resident, as Go does): the filter decides on heap + stack in use, which fall at once.

The filter runs with its defaults (memory shedding decides on resident memory less what the
runtime retains free, `RSS - (heap_idle - heap_released)`). Run directly, this file also
measures the fallback that decides on heap + stack in use (`retained_gauges: []`), which
acts too late (docs/memory.md).

Run directly (`.venv/bin/python tests/test_memory.py --docs`) it prints the numbers and
writes docs/memory.md and docs/img/memory.png from the same measurements.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import baselines
import harness

MiB = 1 << 20
#: The pod's memory limit. kask-sim holds ~36 KB per in-flight request (Kask's figure), so
#: ~750 requests in flight kill it.
LIMIT = 32 * MiB
#: 4 backend workers x 8 ms = 500 key requests/s. Envoy's route timeout (2.5 s) caps the
#: store's backlog at ~1,250 requests, well past the ~750 that kill it.
CAPACITY = 500
KASK_FLAGS = ["--memory-limit", str(LIMIT), "--per-request-bytes", "20Ki",
              "--backend-parallelism", "4", "--service-time-ms", "8",
              "--release-delay-secs", "120"]
#: Open-loop load: steady at 0.3x capacity, a surge at 1.5x, steady again. Kept low so the
#: test measures the store, not a 2-core machine shared with other jobs.
PHASES = [("steady", 3, 150), ("surge", 10, 750), ("after", 6, 150)]
SURGE_START = PHASES[0][1]
SURGE_END = SURGE_START + PHASES[1][1]
#: The filter: memory shedding only, polling every POLL_MS.
HARD = 0.85
POLL_MS = 100
MEMORY = {"enabled": True, "memory_limit_bytes": LIMIT, "poll_interval_ms": POLL_MS}
CONFIGS = {"defaults": MEMORY}
#: For docs/memory.md only: the fallback signal, heap + stack in use.
DOC_CONFIGS = {**CONFIGS, "in-use": {**MEMORY, "retained_gauges": []}}


def plugin(memory: dict) -> dict:
    return {"concurrency": {"enabled": False}, "admission": {"enabled": False},
            "negative_cache": {"enabled": False}, "memory": memory}


#: Resident memory may pass `hard` (0.85 of the limit) by this much of the limit: the filter
#: sees the store's memory every POLL_MS and its workers pick the decision up on their next
#: 100 ms tick, while the backlog keeps growing by (arrival - capacity) x 36 KB, ~9 MiB/s
#: here (~0.03 of the limit per 100 ms); the rest is margin for a machine shared with other
#: jobs, where polls and ticks run late.
TOLERANCE = 0.10
#: After the load falls back, 503s must stop within this many seconds.
STOP_WITHIN_S = 3
SAMPLE_EVERY_S = 0.1


def scenario(path: Path) -> Path:
    phases = "\n".join(
        f'[[phases]]\nname = "{n}"\nduration_s = {d}\nrate = {r}\n' for n, d, r in PHASES)
    path.write_text(f"""name = "memory-surge"
seed = 6
connections = 9000
timeout_ms = 3000
arrival = "poisson"

[mix]
reader_miss = 0.85
user_get    = 0.10
write       = 0.04
delete      = 0.01

[keys]
reader_space = 1000000
session_pool = 2000
prefill = 200
prefill_rate = 500

{phases}""")
    return path


class Supervised:
    """kask-sim under `kask-sim supervise`, one port across restarts."""

    def __init__(self, workdir: Path):
        self.events_path = workdir / "events.jsonl"
        self.port_file = workdir / "kask-port"
        self.log = workdir / "kask.log"
        self.proc = harness.spawn(
            [harness.KASK_SIM, "supervise", "--backoff-initial-ms", "500",
             "--backoff-max-ms", "2000", "--events-file", self.events_path, "--",
             "--listen", "127.0.0.1:0", "--data-dir", workdir / "kask-data",
             "--port-file", self.port_file, *KASK_FLAGS], self.log)
        harness.wait_for(lambda: self.port_file.exists() or self.proc.poll() is not None, 20,
                         "kask-sim to listen")
        assert self.proc.poll() is None, self.log.read_text()
        self.port = int(self.port_file.read_text().strip())
        harness.wait_for(self.healthy, 10, "kask-sim /healthz")

    def healthy(self) -> bool:
        try:
            return harness.request(self.port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines()
                if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        harness.stop(self.proc)


class Sampler(threading.Thread):
    """The store's memory every SAMPLE_EVERY_S, and the filter's view (if any) every 0.5 s."""

    def __init__(self, kask_port: int, envoy: harness.Envoy | None):
        super().__init__(daemon=True)
        self.kask_port, self.envoy = kask_port, envoy
        self.store: list[dict] = []
        self.filter: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        next_filter = 0.0
        while not self.done.is_set():
            t = time.time()
            try:
                text = harness.request(self.kask_port, "GET", "/metrics", timeout=0.5).body.decode()
                v = lambda n: harness.metric_value(text, n) or 0.0  # noqa: E731
                self.store.append({
                    "t": t, "rss": v("process_resident_memory_bytes"),
                    "inuse": v("go_memstats_heap_inuse_bytes") + v("go_memstats_stack_inuse_bytes"),
                    "inflight": v("kasksim_inflight_requests")})
            except OSError:
                self.store.append({"t": t, "down": True})
            if self.envoy is not None and t >= next_filter:
                next_filter = t + 0.5
                try:
                    s = self.envoy.stats()
                    self.filter.append({"t": t, "ratio": s.get("sessionguard.memory.ratio_permille"),
                                        "age": s.get("sessionguard.memory.sample_age_ms")})
                except OSError:
                    pass
            self.done.wait(max(0.0, SAMPLE_EVERY_S - (time.time() - t)))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def run_case(workdir: Path, memory: dict | None) -> dict:
    """One run of the surge (memory=None: no filter); everything measured, nothing asserted."""
    with_filter = memory is not None
    workdir.mkdir(parents=True, exist_ok=True)
    kask = Supervised(workdir)
    envoy = None
    sampler = None
    try:
        cfg = harness.localize(harness.load_config("sidecar.yaml"),
                               upstreams={"sessionstore": [kask.port]},
                               plugin=plugin(memory) if with_filter else None)
        if not with_filter:
            cfg = baselines.bare(cfg)
        envoy = harness.Envoy(workdir, cfg, concurrency=2).start()
        sampler = Sampler(kask.port, envoy if with_filter else None)
        sampler.start()
        out = workdir / "load"
        run = subprocess.run(
            [harness.SESSIONLOAD, "run", "--scenario", scenario(workdir / "scenario.toml"),
             "--target", f"http://127.0.0.1:{envoy.port}", "--out", out, "--quiet"],
            capture_output=True, text=True, timeout=120)
        assert run.returncode in (0, 3), run.stderr[-2000:]
        stats = envoy.stats() if with_filter else {}
    finally:
        if sampler is not None:
            sampler.stop()
        if envoy is not None:
            envoy.stop()
        kask.stop()
    series = json.loads((out / "timeseries.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    t0 = series["t0_unix_ms"] / 1000.0
    events = kask.events()
    kills = [e for e in events if e.get("event") == "exit" and e.get("signal") == 9]
    live = [s for s in sampler.store if not s.get("down") and s["t"] >= t0 - 1]
    return {
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "memory_config": memory,
        "oom_kills": sum(1 for e in kills if e.get("oom")),
        "sigkills": len(kills),
        "kill_times": [round(e["t"] / 1000.0 - t0, 2) for e in kills],
        "peak_rss": max((s["rss"] for s in live), default=None),
        "peak_inuse": max((s["inuse"] for s in live), default=None),
        "store": [{**s, "t": round(s["t"] - t0, 2)} for s in sampler.store],
        "filter": [{**s, "t": round(s["t"] - t0, 2)} for s in sampler.filter],
        "seconds": [{"t": s["t"], "sent": s["sent"], "ok": s["ok"], "shed": s["shed"],
                     "error": s["error"]} for s in series["seconds"]],
        "stats": stats,
        "summary": {k: summary["overall"][k] for k in ("sent", "ok", "shed_503")}
        | {"errors": summary["overall"]["errors"]["total"],
           "write_ok": summary["classes"]["write"]["ok"],
           "write_sent": summary["classes"]["write"]["sent"]},
    }


def last_shed_second(case: dict) -> int | None:
    shed = [s["t"] for s in case["seconds"] if s["shed"] > 0]
    return max(shed) if shed else None


# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    base = tmp_path_factory.mktemp("memory")
    out = {"bare": run_case(base / "bare", None)}
    for name, memory in CONFIGS.items():
        out[name] = run_case(base / name, memory)
    return out


def check_survives_below_hard(case: dict) -> None:
    assert case["sigkills"] == 0, (
        f"store killed at t={case['kill_times']} (peak RSS {case['peak_rss'] / MiB:.1f} MiB)")
    assert case["peak_rss"] is not None
    ceiling = (HARD + TOLERANCE) * LIMIT
    assert case["peak_rss"] <= ceiling, (
        f"peak RSS {case['peak_rss'] / MiB:.1f} MiB > (hard {HARD} + {TOLERANCE}) x "
        f"{LIMIT / MiB:.0f} MiB")
    assert sum(s["shed"] for s in case["seconds"]) > 0, "no shedding: the load is too light"
    assert case["stats"].get("sessionguard.shed.memory.sheddable", 0) > 0


def check_stops_shedding(case: dict) -> None:
    last = last_shed_second(case)
    assert last is not None, "nothing was shed"
    assert last < SURGE_END + STOP_WITHIN_S, (
        f"503s until second {last}; the surge ended at {SURGE_END}: "
        + str([(s["t"], s["shed"]) for s in case["seconds"] if s["t"] >= SURGE_END - 1]))
    # Resident memory is still high then (kask-sim retains it, as Go does): the filter
    # stopped because it decides on memory in use, not on RSS.
    after = [s for s in case["store"] if not s.get("down") and s["t"] >= SURGE_END + STOP_WITHIN_S]
    assert after and max(s["rss"] for s in after) > 0.5 * case["peak_rss"]


def test_without_the_filter_the_store_is_oom_killed(cases):
    bare = cases["bare"]
    assert bare["oom_kills"] >= 1, (
        f"no OOM kill without protection (peak RSS {bare['peak_rss'] / MiB:.1f} MiB of "
        f"{LIMIT / MiB:.0f}): the load is not above capacity on this machine")
    assert bare["sigkills"] >= bare["oom_kills"]


def test_memory_shedding_keeps_the_store_alive_below_hard(cases):
    check_survives_below_hard(cases["defaults"])


def test_shedding_stops_within_seconds_after_the_surge(cases):
    check_stops_shedding(cases["defaults"])


def test_writes_are_not_shed_while_readers_are(cases):
    case = cases["defaults"]
    assert case["summary"]["write_ok"] >= 0.95 * case["summary"]["write_sent"], case["summary"]
    assert case["stats"].get("sessionguard.shed.memory.critical", 0) == 0


def test_memory_metrics_are_exported(cases):
    for name in CONFIGS:
        case = cases[name]
        stats = case["stats"]
        for metric in ("sessionguard.memory.ratio_permille", "sessionguard.memory.sample_age_ms"):
            assert metric in stats, sorted(stats)
        assert 0 <= stats["sessionguard.memory.ratio_permille"] <= 2000
        # Polled every 100 ms; a fresh sample is never older than a few polls.
        assert stats["sessionguard.memory.sample_age_ms"] < 2000, stats
        ratios = [f["ratio"] for f in case["filter"] if f["ratio"] is not None]
        assert max(ratios) >= 700, f"{name}: the filter never saw pressure: {ratios}"


# ------------------------------------------------------------------------------------------
# docs/memory.md and docs/img/memory.png (run this file directly with --docs)

TITLES = {
    "bare": "Envoy without the filter",
    "defaults": "sessionguard memory shedding (defaults: RSS less retained-free)",
    "in-use": "sessionguard deciding on heap + stack in use (retained_gauges: [])",
}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.7 * len(results)), sharex=True,
                             squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        ax.axvspan(SURGE_START, SURGE_END, color="0.92", zorder=0)
        # NaN where the store was down, so the lines break there.
        ts = [s["t"] for s in r["store"]]
        nan = float("nan")
        ax.plot(ts, [nan if s.get("down") else s["rss"] / MiB for s in r["store"]],
                color="0.2", lw=1.2, label="store RSS")
        ax.plot(ts, [nan if s.get("down") else s["inuse"] / MiB for s in r["store"]],
                color="tab:purple", lw=1.0, label="heap + stack in use")
        for s in r["store"]:
            if s.get("down"):
                ax.axvspan(s["t"] - SAMPLE_EVERY_S / 2, s["t"] + SAMPLE_EVERY_S / 2,
                           color="tab:red", alpha=0.15, lw=0)
        ax.axhline(LIMIT / MiB, color="tab:red", ls="--", lw=1, label="pod limit")
        ax.axhline(HARD * LIMIT / MiB, color="tab:orange", ls=":", lw=1, label="0.85 x limit")
        for t in r["kill_times"]:
            ax.axvline(t, color="tab:red", lw=1.5)
        ax.set_ylim(0, LIMIT / MiB * 1.1)
        ax.set_ylabel("MiB")
        ax.set_title(f"{TITLES[name]}: {r['oom_kills']} OOM kills, peak RSS "
                     f"{(r['peak_rss'] or 0) / LIMIT:.2f} of the limit", fontsize=10, loc="left")
        rq = ax.twinx()
        xs = [s["t"] + 0.5 for s in r["seconds"]]
        rq.step(xs, [s["ok"] for s in r["seconds"]], where="mid", color="tab:green", lw=1,
                label="ok/s")
        rq.step(xs, [s["shed"] for s in r["seconds"]], where="mid", color="tab:blue", lw=1,
                label="503/s")
        rq.set_ylim(0, max(rate for _, _, rate in PHASES) * 1.15)
        rq.set_ylabel("requests/s")
    h1, l1 = axes[0, 0].get_legend_handles_labels()
    ok = plt.Line2D([], [], color="tab:green")
    shed = plt.Line2D([], [], color="tab:blue")
    fig.legend(h1 + [ok, shed], l1 + ["answered ok /s (right)", "503 /s (right)"],
               loc="upper center", ncol=6, frameon=False, fontsize=8)
    axes[-1, 0].set_xlabel("seconds (grey: surge at 1.5x capacity); red: OOM kill / store down")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def row(name: str, r: dict) -> str:
    s = r["summary"]
    last = last_shed_second(r)
    stop = "-" if last is None else (
        f"{max(0, last + 1 - SURGE_END)} s" if last >= SURGE_END - 1 else "before the end")
    if r["memory_config"] is not None and last is not None and last >= PHASES[-1][1] + SURGE_END - 1:
        stop = "never (until the end of the run)"
    return (f"| {TITLES[name]} | {r['oom_kills']} | {(r['peak_rss'] or 0) / MiB:.1f} MiB "
            f"({(r['peak_rss'] or 0) / LIMIT:.2f}) | {(r['peak_inuse'] or 0) / MiB:.1f} MiB | "
            f"{s['ok']} / {s['sent']} | {s['write_ok']} / {s['write_sent']} | {s['shed_503']} | "
            f"{stop} |")


def write_docs(results: dict) -> None:
    root = harness.ROOT
    plot(results, root / "docs/img/memory.png")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    date = next(iter(results.values())).get("measured_at") or datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    phases = ", ".join(f"{n} {d} s at {r}/s" for n, d, r in PHASES)
    rows = "\n".join(row(n, r) for n, r in results.items())
    text = f"""# Memory shedding keeps the store alive (issue 6)

Measured by `.venv/bin/python tests/test_memory.py --docs` on {date} ({os.cpu_count()} cores,
{cpu}; the same scenario, without the third row, runs in `make test` as `tests/test_memory.py`, ~45 s).

## Setup

- kask-sim under `kask-sim supervise` (restarts like Kubernetes, reports OOM kills):
  `{" ".join(KASK_FLAGS)}`: capacity {CAPACITY} key requests/s, ~36 KB resident per
  in-flight request (Kask's figure), so ~750 requests in flight exceed the {LIMIT // MiB} MiB limit.
  Freed memory stays resident for 120 s, as Go keeps its heap.
- Envoy (`envoy/sidecar.yaml`, 2 workers, route timeout 2.5 s) in front of it: without the
  filter, or with sessionguard doing memory shedding only, otherwise at its defaults:
  `{json.dumps(plugin(CONFIGS["defaults"]))}`; the third row adds `"retained_gauges": []`,
  the fallback that decides on heap + stack in use (what the filter did before commit
  fd60aa0).
- Open-loop load (sessionload, the incident's mix: 85% reader 404s, 10% logged-in reads,
  4% writes, 1% logouts; Poisson arrivals, 3 s client timeout): {phases} (1.5x capacity).
- The store's `/metrics` sampled every {SAMPLE_EVERY_S * 1000:.0f} ms (RSS, heap + stack in use).

## Results

| setup | OOM kills | peak RSS (of limit) | peak in use | answered ok / sent | writes ok / sent | 503s | 503s stop after the surge |
|---|---|---|---|---|---|---|---|
{rows}

![store memory and requests per second, one panel per setup](img/memory.png)

Each panel: the store's resident memory (black) and heap + stack in use (purple) against the
pod limit (red dashes) and 0.85 of it (orange dots); answered and shed (503) requests per
second (right axis); red lines: OOM kills; grey: the surge.

## What it shows

- **Without the filter** the backlog grows at (750 − 500)/s x ~36 KB, and the store is
  OOM-killed ~2-3 s into the surge, restarted, killed again: the 2020 CrashLoopBackOff.
- **With memory shedding at its defaults** the store is never killed: shedding starts as
  the decision ratio passes `soft` (0.70 of the limit) and holds it at ~0.80, between `soft`
  and `hard`, while the surge lasts; resident memory peaked at 0.86-0.91 of the limit over
  several runs (above the decision ratio by what malloc keeps after connections close, which
  the Go gauges cannot describe). The store keeps answering at its capacity, and writes
  (critical) are never shed. When the surge ends, 503s stop within a second although RSS
  stays at its peak (kask-sim, like Go, keeps freed memory resident): the filter decides on
  RSS less what the runtime holds resident but free (`go_memstats_heap_idle_bytes −
  go_memstats_heap_released_bytes`), which is RSS while a surge builds and live demand once
  it ends. The test polls every 100 ms; at the default 1 s, a surge adding ~0.3 of the limit
  per second, as here, would overshoot by about that much before the first decision: set
  `poll_interval_ms` for the fastest surge the pod must survive.
- **Deciding on heap + stack in use instead** (the third row; the filter's signal before
  fd60aa0) is too late: in use is only ~75-88% of what the same requests hold resident
  (Kask: ~30 KB in use of ~33-40 KB resident per request; kask-sim ~88%, less under
  connection churn), so shedding starts when RSS is already ~0.8 of the limit, and too
  gently (x² in the band) to stop a surge adding ~0.3 of the limit per second: RSS reaches
  the limit (see the OOM kills in the table; in other runs it survived at 0.99 only because
  the RSS ceiling at `critical` shed everything). Before fd60aa0 the ceiling then also kept
  shedding on retained memory: measured at 10:1 503s to answers until the end of the run,
  long after the surge. It now acts only while demand is itself above `soft`.

Acceptance criteria, as checked by `tests/test_memory.py` on the defaults: never OOM-killed; peak RSS ≤ ({HARD} + {TOLERANCE}) x limit (tolerance: one
{POLL_MS} ms poll plus one 100 ms tick of backlog growth at ~9 MiB/s, i.e. ~0.05 of the
limit, with margin for a shared machine); 503s stop within
{STOP_WITHIN_S} s of the surge's end; `sessionguard.memory.ratio_permille` and
`sessionguard.memory.sample_age_ms` exported.
"""
    (root / "docs/memory.md").write_text(text)
    print("wrote docs/memory.md and docs/img/memory.png")


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Run the memory acceptance scenario, print numbers")
    ap.add_argument("--docs", action="store_true",
                    help="write docs/memory.md and docs/img/memory.png")
    ap.add_argument("--only", choices=["bare", *DOC_CONFIGS])
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sg-memory-"))
    results = {}
    for name in ("bare", *DOC_CONFIGS):
        if args.only and args.only != name:
            continue
        results[name] = run_case(base / name, DOC_CONFIGS.get(name))
        r = results[name]
        print(f"{name}: OOM kills {r['oom_kills']} at {r['kill_times']}, peak RSS "
              f"{(r['peak_rss'] or 0) / MiB:.1f} MiB, peak in use {(r['peak_inuse'] or 0) / MiB:.1f} MiB, "
              f"last 503 second {last_shed_second(r)}, {r['summary']}")
        print("   per second (t sent ok shed err):",
              " ".join(f"{s['t']}:{s['sent']}/{s['ok']}/{s['shed']}/{s['error']}" for s in r["seconds"]))
        if r["filter"]:
            print("   filter ratio:", " ".join(f"{f['t']:.1f}:{f['ratio']}" for f in r["filter"]))
    out = harness.ROOT / "out/memory"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")
    if args.docs:
        write_docs(results)
