"""Issue 19 acceptance: memory shedding alone keeps the store below 0.85 of its limit.

A real Envoy (2 workers) in front of kask-sim with a memory limit, under `kask-sim supervise`
(restarts like Kubernetes and reports OOM kills), calibrated as `make demo` is (4 backend
workers x 2.2 ms = 1,818 key requests/s, 20Ki per request, ~36 KB resident per request in
flight, freed memory resident for 120 s), driven by an open-loop load (sessionload, the
incident's mix) with reader keys the negative cache cannot absorb (uniform over 10^9 keys):
steady at 0.75x capacity, a step to SURGE x capacity, steady again.

- without the filter the store is OOM-killed (the load is heavy enough to matter);
- with sessionguard, memory shedding alone (`concurrency` fixed at 2048, admission control in
  shadow mode, `memory` given only the pod's limit), the store must never be killed, its
  resident memory must stay <= 0.85 of the limit, writes >= 99.9% and logged-in reads >= 99%
  must succeed, and 503s must stop within 2 s after the surge ends.

`make test` runs a short version (3x capacity for 10 s, 64 MiB). The acceptance run (1.5x and
3x for 30 s, at 32, 64 and 256 MiB) is `.venv/bin/python tests/test_memory.py --acceptance
--docs`; it writes docs/memory.md's results and docs/img/memory.png.
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
#: make demo's calibration (scripts/replay.py): 4 backend workers x 2.2 ms = 1,818 key
#: requests/s. The acceptance run uses it.
DEMO_SERVICE_MS = 2.2
#: make test's: 4 x 8 ms = 500/s, so that the run measures the store and not a 2-core
#: machine shared with other jobs (at 3x the demo's capacity, Envoy, kask-sim and the load
#: generator need more CPU than such a machine has to spare).
SMOKE_SERVICE_MS = 8.0
PARALLELISM = 4


def capacity(service_ms: float) -> float:
    return PARALLELISM * 1000 / service_ms


#: kask-sim's memory per request in flight at 64 MiB (its default).
REQUEST_BYTES_AT_64MIB = 20 * 1024


def request_bytes(limit: int, same_ratios: bool) -> int:
    """kask-sim's per-request memory: 20 KiB, or with `same_ratios` 20 KiB per 64 MiB of limit
    (a store whose requests cost the same share of its limit, so the surge fills its memory
    as fast as at 64 MiB)."""
    return REQUEST_BYTES_AT_64MIB * limit // (64 * MiB) if same_ratios else REQUEST_BYTES_AT_64MIB


def kask_flags(limit: int, service_ms: float, delay_ms: int = 0,
               per_request: int = REQUEST_BYTES_AT_64MIB) -> list[str]:
    delay = ["--get-delay-ms", str(delay_ms)] if delay_ms else []
    return ["--memory-limit", str(limit), "--per-request-bytes", str(per_request),
            "--backend-parallelism", str(PARALLELISM), "--service-time-ms", str(service_ms),
            "--release-delay-secs", "120", *delay]


#: Acceptance: peak resident memory of the store, as a share of its limit.
PEAK_MAX = 0.85
WRITES_OK_MIN = 0.999
USER_READS_OK_MIN = 0.99
#: After the surge, 503s must stop within this many seconds.
STOP_WITHIN_S = 2
SAMPLE_EVERY_S = 0.1


def plugin(limit: int, defaults: bool = False) -> dict:
    """Memory shedding alone: what a new user writes, plus the other two store-protecting
    mechanisms out of the way; with `defaults`, only what a new user writes (every mechanism
    on)."""
    memory = {"memory": {"memory_limit_bytes": limit}}
    if defaults:
        return memory
    return {"concurrency": {"mode": "fixed", "limit": 2048}, "admission": {"enforce": False},
            **memory}


def phases(service_ms: float, surge: float, steady_s: int, surge_s: int,
           after_s: int) -> list[tuple[str, int, int]]:
    cap = capacity(service_ms)
    steady = round(0.75 * cap)
    return [("steady", steady_s, steady), ("surge", surge_s, round(surge * cap)),
            ("after", after_s, steady)]


def scenario(path: Path, shape: list[tuple[str, int, int]]) -> Path:
    body = "\n".join(
        f'[[phases]]\nname = "{n}"\nduration_s = {d}\nrate = {r}\n' for n, d, r in shape)
    path.write_text(f"""name = "memory-step"
seed = 19
connections = 12000
timeout_ms = 3000
connect_timeout_ms = 1200
arrival = "poisson"

[mix]
reader_miss = 0.85
user_get    = 0.10
write       = 0.04
delete      = 0.01

[keys]
reader_space = 1000000000
zipf_s = 0
# Every session exists before the run (sessionload counts a session as live from the moment
# its creating write is sent; a read of it before that write is answered is not a logged-in
# user's read, and the filter rightly does not know it yet).
session_pool = 1000
prefill = 1000
prefill_rate = 250

{body}""")
    return path


class Supervised:
    """kask-sim under `kask-sim supervise`, one port across restarts."""

    def __init__(self, workdir: Path, flags: list[str]):
        self.events_path = workdir / "events.jsonl"
        self.port_file = workdir / "kask-port"
        self.log = workdir / "kask.log"
        self.proc = harness.spawn(
            [harness.KASK_SIM, "supervise", "--backoff-initial-ms", "500",
             "--backoff-max-ms", "2000", "--events-file", self.events_path, "--",
             "--listen", "127.0.0.1:0", "--data-dir", workdir / "kask-data",
             "--port-file", self.port_file, *flags], self.log)
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


SHED_REASONS = ("concurrency", "admission", "memory")


def shed_by_reason(stats: dict) -> dict[str, int]:
    """The filter's 503s so far by the bound that shed them, critical and sheddable together."""
    return {r: sum(stats.get(f"sessionguard.shed.{r}.{c}", 0) for c in ("critical", "sheddable"))
            for r in SHED_REASONS}


class Sampler(threading.Thread):
    """The store's memory every SAMPLE_EVERY_S, and the filter's view (if any) every 0.25 s."""

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
                next_filter = t + 0.25
                try:
                    s = self.envoy.stats()
                    self.filter.append({"t": t, "ratio": s.get("sessionguard.memory.ratio_permille"),
                                        "age": s.get("sessionguard.memory.sample_age_ms"),
                                        "ceiling": s.get("sessionguard.memory.ceiling"),
                                        "in_flight": s.get("sessionguard.in_flight"),
                                        "per_request": s.get("sessionguard.memory.bytes_per_request"),
                                        "limit": s.get("sessionguard.limit"),
                                        "rtt_us": (s.get("sessionguard.min_rtt_us"),
                                                   s.get("sessionguard.sample_rtt_us")),
                                        "rejection": s.get("sessionguard.admission.rejection_permille"),
                                        "shed": shed_by_reason(s)})
                except OSError:
                    pass
            self.done.wait(max(0.0, SAMPLE_EVERY_S - (time.time() - t)))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def run_case(workdir: Path, limit: int, service_ms: float, shape: list,
             with_filter: bool = True, delay_ms: int = 0, defaults: bool = False,
             per_request: int = REQUEST_BYTES_AT_64MIB) -> dict:
    """One run; everything measured, nothing asserted."""
    workdir.mkdir(parents=True, exist_ok=True)
    kask = Supervised(workdir, kask_flags(limit, service_ms, delay_ms, per_request))
    envoy = None
    sampler = None
    try:
        cfg = harness.localize(harness.load_config("sidecar.yaml"),
                               upstreams={"sessionstore": [kask.port]},
                               plugin=plugin(limit, defaults) if with_filter else None)
        if not with_filter:
            cfg = baselines.bare(cfg)
        envoy = harness.Envoy(workdir, cfg, concurrency=2).start()
        sampler = Sampler(kask.port, envoy if with_filter else None)
        sampler.start()
        out = workdir / "load"
        run = subprocess.run(
            [harness.SESSIONLOAD, "run", "--scenario", scenario(workdir / "scenario.toml", shape),
             "--target", f"http://127.0.0.1:{envoy.port}", "--out", out, "--quiet"],
            capture_output=True, text=True, timeout=600)
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
    kills = [e for e in kask.events() if e.get("event") == "exit" and e.get("signal") == 9]
    live = [s for s in sampler.store if not s.get("down") and s["t"] >= t0 - 1]
    classes = summary["classes"]
    surge_end = shape[0][1] + shape[1][1]
    return {
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "limit": limit, "service_ms": service_ms, "delay_ms": delay_ms, "shape": shape,
        "defaults": defaults, "per_request_bytes": per_request,
        "load_average": os.getloadavg(), "with_filter": with_filter, "surge_end": surge_end,
        "oom_kills": sum(1 for e in kills if e.get("oom")),
        "sigkills": len(kills),
        "kill_times": [round(e["t"] / 1000.0 - t0, 2) for e in kills],
        "peak_rss": max((s["rss"] for s in live), default=None),
        "peak_inflight": max((s["inflight"] for s in live), default=None),
        "store": [{**s, "t": round(s["t"] - t0, 2)} for s in sampler.store],
        "filter": [{**s, "t": round(s["t"] - t0, 2)} for s in sampler.filter],
        "seconds": [{"t": s["t"], "sent": s["sent"], "ok": s["ok"], "shed": s["shed"],
                     "error": s["error"]} for s in series["seconds"]],
        "stats": stats,
        "classes": {c: {k: classes[c][k] for k in ("sent", "ok", "shed_503")}
                    | {"errors": classes[c]["errors"]["total"]} for c in classes},
        "sent": summary["overall"]["sent"], "ok": summary["overall"]["ok"],
    }


def ok_share(case: dict, cls: str) -> float:
    c = case["classes"][cls]
    return c["ok"] / c["sent"] if c["sent"] else 1.0


def last_shed_second(case: dict) -> int | None:
    shed = [s["t"] for s in case["seconds"] if s["shed"] > 0]
    return max(shed) if shed else None


def failures(case: dict, writes_min: float = WRITES_OK_MIN,
             user_reads_min: float = USER_READS_OK_MIN) -> list[str]:
    """What the acceptance criteria say about one guarded run (empty: all met)."""
    out = []
    limit = case["limit"]
    if case["sigkills"]:
        out.append(f"store killed at t={case['kill_times']}")
    peak = (case["peak_rss"] or 0) / limit
    if case["peak_rss"] is None or peak > PEAK_MAX:
        out.append(f"peak RSS {peak:.3f} of the limit > {PEAK_MAX}")
    if ok_share(case, "write") < writes_min:
        out.append(f"writes ok {ok_share(case, 'write'):.4f} < {writes_min}: {case['classes']['write']}")
    if ok_share(case, "user_get") < user_reads_min:
        out.append(f"logged-in reads ok {ok_share(case, 'user_get'):.4f} < {user_reads_min}: "
                   f"{case['classes']['user_get']}")
    last = last_shed_second(case)
    if last is not None and last >= case["surge_end"] + STOP_WITHIN_S:
        out.append(f"503s until second {last}; the surge ended at {case['surge_end']}: " + str(
            [(s["t"], s["shed"]) for s in case["seconds"] if s["t"] >= case["surge_end"] - 1]))
    return out


# ------------------------------------------------------------------------------------------
# make test: a short step to 3x capacity at 64 MiB.

SMOKE_LIMIT = 32 * MiB
SMOKE_SHAPE = phases(SMOKE_SERVICE_MS, 3.0, 4, 8, 6)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    base = tmp_path_factory.mktemp("memory")
    return {"bare": run_case(base / "bare", SMOKE_LIMIT, SMOKE_SERVICE_MS, SMOKE_SHAPE,
                             with_filter=False),
            "guarded": run_case(base / "guarded", SMOKE_LIMIT, SMOKE_SERVICE_MS, SMOKE_SHAPE)}


def test_without_the_filter_the_store_is_oom_killed(cases):
    bare = cases["bare"]
    assert bare["oom_kills"] >= 1, (
        f"no OOM kill without protection (peak RSS {(bare['peak_rss'] or 0) / MiB:.1f} MiB of "
        f"{SMOKE_LIMIT / MiB:.0f}): the load is not above capacity on this machine")


#: make test's bars for writes and logged-in reads are a little below the acceptance's (99.9%
#: and 99%, checked by the acceptance run): one shed write in ~700 (the limiter's critical
#: reserve catching up with the step) would fail 99.9%, and the sessions that replace deleted
#: ones are read, now and then, before the filter has seen their first write answered (such a
#: read is sheddable by design). docs/memory.md gives both.
SMOKE_WRITES_MIN = 0.995
SMOKE_USER_READS_MIN = 0.985


def test_memory_shedding_alone_keeps_the_store_alive_and_serves_users(cases):
    case = cases["guarded"]
    print(describe(case))
    problems = failures(case, SMOKE_WRITES_MIN, SMOKE_USER_READS_MIN)
    assert not problems, problems
    # It was the memory guard that shed (the surge is far above capacity).
    assert case["stats"].get("sessionguard.shed.memory.sheddable", 0) > 0, case["stats"]


def test_memory_metrics_are_exported(cases):
    stats = cases["guarded"]["stats"]
    for metric in ("sessionguard.memory.ratio_permille", "sessionguard.memory.sample_age_ms",
                   "sessionguard.memory.ceiling", "sessionguard.memory.bytes_per_request"):
        assert metric in stats, sorted(stats)
    assert stats["sessionguard.memory.sample_age_ms"] < 2000, stats
    # kask-sim holds ~36 KB per request (up to ~50 KB with a new connection each), below the
    # 64 KiB prior: the estimate falls towards it only at a steady load, from above, so it is
    # never far below it (that would let the store past its line) nor above twice the prior.
    b = stats["sessionguard.memory.bytes_per_request"]
    assert 30 * 1024 <= b < 128 * 1024, b
    ceilings = [f["ceiling"] for f in cases["guarded"]["filter"] if f.get("ceiling")]
    assert ceilings and min(ceilings) >= 8, ceilings


# ------------------------------------------------------------------------------------------
# The acceptance run (run this file directly).

ACCEPTANCE = [(limit, surge) for limit in (64 * MiB, 32 * MiB, 256 * MiB) for surge in (1.5, 3.0)]


def describe(r: dict) -> str:
    return (f"limit {r['limit'] // MiB} MiB, surge {r['shape'][1][2]}/s: OOM kills {r['oom_kills']}, "
            f"peak RSS {(r['peak_rss'] or 0) / r['limit']:.3f}, writes ok {ok_share(r, 'write'):.4f}, "
            f"logged-in reads ok {ok_share(r, 'user_get'):.4f}, last 503 second "
            f"{last_shed_second(r)} (surge ended {r['surge_end']}), failures {failures(r)}")


def print_series(r: dict) -> None:
    print("   per second (t sent ok shed err):",
          " ".join(f"{s['t']}:{s['sent']}/{s['ok']}/{s['shed']}/{s['error']}" for s in r["seconds"]))
    print("   filter (t ceiling in_flight per_request ratio limit rejection shed c/a/m rtt:min,sample):", " ".join(
        f"{f['t']:.1f}:{f.get('ceiling')}/{f.get('in_flight')}/{f.get('per_request')}/{f.get('ratio')}"
        f"/{f.get('limit')}/{f.get('rejection')}/" + "/".join(str(v) for v in (f.get("shed") or {}).values())
        + "/rtt:" + ",".join(str(v) for v in (f.get("rtt_us") or ()))
        for f in r["filter"]))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), squeeze=False)
    nan = float("nan")
    for ax, r in zip(axes[:, 0], results):
        limit = r["limit"] / MiB
        (_, steady_s, _), (_, surge_s, surge_rate), _ = r["shape"]
        ax.axvspan(steady_s, steady_s + surge_s, color="0.92", zorder=0)
        ts = [s["t"] for s in r["store"]]
        ax.plot(ts, [nan if s.get("down") else s["rss"] / MiB for s in r["store"]],
                color="0.15", lw=1.2, label="store RSS (MiB)")
        ax.axhline(limit, color="tab:red", ls="--", lw=1, label="pod limit")
        ax.axhline(PEAK_MAX * limit, color="tab:orange", ls=":", lw=1, label="0.85 x limit")
        for t in r["kill_times"]:
            ax.axvline(t, color="tab:red", lw=1.5)
        ax.set_ylim(0, limit * 1.1)
        ax.set_ylabel("MiB")
        ax.set_title(f"{limit:.0f} MiB, {surge_rate / capacity(r['service_ms']):.1f}x capacity: "
                     f"{r['oom_kills']} OOM kills, peak RSS {(r['peak_rss'] or 0) / r['limit']:.2f}, "
                     f"writes {ok_share(r, 'write'):.2%}, logged-in reads {ok_share(r, 'user_get'):.2%}",
                     fontsize=9, loc="left")
        rq = ax.twinx()
        f = [x for x in r["filter"] if x.get("ceiling")]
        rq.step([x["t"] for x in f], [x["ceiling"] for x in f], where="post", color="tab:blue",
                lw=1, label="ceiling (requests)")
        rq.plot([x["t"] for x in f], [x.get("in_flight") or 0 for x in f], color="tab:green",
                lw=1, label="in flight, filter")
        rq.plot(ts, [nan if s.get("down") else s["inflight"] for s in r["store"]],
                color="tab:purple", lw=0.8, label="in flight, store")
        if r.get("defaults"):
            lim = [x for x in r["filter"] if x.get("limit")]
            rq.step([x["t"] for x in lim], [x["limit"] for x in lim], where="post",
                    color="tab:brown", lw=1)
        top = max([x["ceiling"] for x in f] + [1])
        rq.set_ylim(0, top * 1.3)
        rq.set_ylabel("requests")
    h1, l1 = axes[0, 0].get_legend_handles_labels()
    colors = ["tab:blue", "tab:green", "tab:purple"]
    names = ["ceiling (right)", "in flight, filter (right)", "in flight, store (right)"]
    if results[0].get("defaults"):
        colors.append("tab:brown")
        names.append("concurrency limit (right)")
    lines = [plt.Line2D([], [], color=c) for c in colors]
    fig.legend(h1 + lines, l1 + names,
               loc="upper center", ncol=6, frameon=False, fontsize=8)
    axes[-1, 0].set_xlabel("seconds (grey: the surge)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(results: list[dict]) -> str:
    rows = ["| limit | kask-sim bytes/request | surge | OOM kills | peak RSS / limit | writes ok | "
            "logged-in reads ok | 503s stop after the surge | 503s by concurrency / admission / "
            "memory | ceiling (min-max) | learned bytes/request | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = last_shed_second(r)
        stop = "-" if last is None else (
            f"{max(0, last + 1 - r['surge_end'])} s" if last >= r["surge_end"] - 1 else "before the end")
        ceil = [x["ceiling"] for x in r["filter"] if x.get("ceiling")]
        per = [x["per_request"] for x in r["filter"] if x.get("per_request")]
        w, u = r["classes"]["write"], r["classes"]["user_get"]
        by_reason = " / ".join(f"{n:,}" for n in shed_by_reason(r["stats"]).values())
        rows.append(
            f"| {r['limit'] // MiB} MiB | {r.get('per_request_bytes', REQUEST_BYTES_AT_64MIB)} "
            f"| {r['shape'][1][2] / capacity(r['service_ms']):.1f}x "
            f"({r['shape'][1][2]}/s) | {r['oom_kills']} | {(r['peak_rss'] or 0) / r['limit']:.3f} | "
            f"{ok_share(r, 'write'):.2%} ({w['ok']}/{w['sent']}) | "
            f"{ok_share(r, 'user_get'):.2%} ({u['ok']}/{u['sent']}) | {stop} | {by_reason} | "
            f"{min(ceil, default=0)}-{max(ceil, default=0)} | {max(per, default=0)} | "
            f"{r['load_average'][0]:.1f} |")
    return "\n".join(rows)


def write_results(results: list[dict], command: str) -> None:
    """Replaces a results section of docs/memory.md and writes its plot: `results` and
    docs/img/memory.png for memory shedding alone, `results-defaults` and
    docs/img/memory-defaults.png for the plugin as a new user writes it."""
    root = harness.ROOT
    defaults = results[0].get("defaults", False)
    marker, image = ("results-defaults", "memory-defaults.png") if defaults else ("results", "memory.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    plot(results, root / "docs/img" / image)
    date = results[0]["measured_at"]
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    limit_line = (", the requests the store holds (purple) and the\nconcurrency limit (brown)"
                  if defaults else " and the requests the store holds (purple)")
    section = f"""<!-- {marker}: generated by tests/test_memory.py -->
Measured {date} at commit {commit}{" (with uncommitted changes)" if dirty else ""} by
`{command}` ({os.cpu_count()} cores, {cpu}; the machine was shared with other jobs: the
load average at the end of each run is in the table). kask-sim `{" ".join(kask_flags(0, results[0]["service_ms"])[4:])}`
with `--memory-limit` and `--per-request-bytes` as in the table; steady {results[0]["shape"][0][2]}/s (0.75x capacity)
for {results[0]["shape"][0][1]} s, the surge for {results[0]["shape"][1][1]} s, steady again for
{results[0]["shape"][2][1]} s; plugin `{json.dumps(plugin(0, defaults)).replace('"memory_limit_bytes": 0', '"memory_limit_bytes": LIMIT')}`.

{table(results)}

![store memory, the ceiling and requests in flight over time, one panel per run](img/{image})

Each panel: the store's resident memory (black, MiB) against its limit (red dashes) and 0.85
of it (orange dots); on the right axis, the in-flight ceiling the filter published (blue), its
own in-flight count across workers (green){limit_line};
grey: the surge; red lines: OOM kills.
<!-- /{marker} -->"""
    doc = root / "docs/memory.md"
    text = doc.read_text()
    start = text.index(f"<!-- {marker}:")
    end = text.index(f"<!-- /{marker} -->") + len(f"<!-- /{marker} -->")
    doc.write_text(text[:start] + section + text[end:])
    print(f"wrote docs/memory.md's {marker} and docs/img/{image}")


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Run the memory acceptance scenarios, print numbers")
    ap.add_argument("--acceptance", action="store_true", help="1.5x and 3x for 30 s at 32/64/256 MiB")
    ap.add_argument("--limit-mib", type=int, help="one run at this limit (with --surge)")
    ap.add_argument("--surge", type=float, default=3.0)
    ap.add_argument("--hold", type=int, default=30, help="seconds of surge")
    ap.add_argument("--bare", action="store_true", help="without the filter")
    ap.add_argument("--delay-ms", type=int, default=0,
                    help="kask-sim --get-delay-ms: every key request waits this long (slow, cheap)")
    ap.add_argument("--surge-rate", type=int, help="the surge's rate in requests/s (not x capacity)")
    ap.add_argument("--service-ms", type=float, default=DEMO_SERVICE_MS,
                    help="kask-sim's mean service time (capacity = 4000 / this)")
    ap.add_argument("--defaults", action="store_true",
                    help="the plugin as a new user writes it: memory_limit_bytes only, every mechanism on")
    ap.add_argument("--same-ratios", action="store_true",
                    help="kask-sim's per-request memory scaled with the limit (20 KiB per 64 MiB)")
    ap.add_argument("--docs", action="store_true",
                    help="write docs/memory.md's results section and docs/img/memory.png")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sg-memory-"))
    runs = ACCEPTANCE if args.acceptance else [((args.limit_mib or 64) * MiB, args.surge)]
    results = []
    for limit, surge in runs:
        shape = phases(args.service_ms, surge, 5, args.hold, 10)
        if args.surge_rate:
            shape[1] = ("surge", args.hold, args.surge_rate)
        r = run_case(base / f"{limit // MiB}-{surge}", limit, args.service_ms, shape,
                     with_filter=not args.bare, delay_ms=args.delay_ms, defaults=args.defaults,
                     per_request=request_bytes(limit, args.same_ratios))
        results.append(r)
        print(describe(r), flush=True)
        print_series(r)
    out = harness.ROOT / "out/memory"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")
    if args.docs:
        write_results(results, " ".join([".venv/bin/python", "tests/test_memory.py", *sys.argv[1:]]))
    sys.exit(0 if all(not failures(r) for r in results if r["with_filter"]) else 1)
