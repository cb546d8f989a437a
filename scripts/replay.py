#!/usr/bin/env python3
"""The 2020-06-11 sessionstore incident and larger surges, replayed side by side (issues 7, 16).

An open-loop load (sessionload: 85% reader lookups of missing keys, 10% logged-in session
reads, 4% writes, 1% logouts; Poisson arrivals, 3 s client timeout) is replayed against the
same store emulator (kask-sim with a memory limit, restarted like Kubernetes' CrashLoopBackOff
by `kask-sim supervise`) behind six Envoy front ends that differ in one filter or setting:

  bare                  Envoy, no protection (its circuit breakers raised to 100,000)
  stock-envoy           Envoy as it comes: no filter, default circuit breakers (1024)
  circuit-breaker       Envoy's static circuit breaker, max_requests tuned to the capacity
  adaptive-concurrency  Envoy's gradient controller
  admission-control     Envoy's admission control (SRE throttling, 404 = success)
  sessionguard          this filter: defaults + memory shedding with the pod's limit

Scenarios (load in multiples of the store's capacity):

  incident  0.75x, ramp to x1.33 of that (1.0x), hold, back to 0.75x; reader keys Zipf over
            10^6 (popular keys repeat, so a negative cache absorbs them), as in 2020
  surge3    0.75x, step to 3x, hold 30 s, down to 0.5x; reader keys uniform over 10^9
            (a negative cache cannot absorb them)
  surge5    the same at 5x (or --multiple K)

Per setup it reports store OOM kills, peak store memory against the limit, what the store
answered while the surge held (share of its capacity), per-class success, correctness,
latency, 503s and, for sessionguard, its own shed counters (critical vs sheddable). It prints
a table and writes out/replay/<scenario>/results.json. A full run of all six setups also
records itself in docs/results/replay.json (date, commit, command, machine; the run it
replaces moves to that file's "earlier" list) and regenerates docs/replay.md,
docs/img/replay-<scenario>.png and the README's replay section from that file.

    .venv/bin/python scripts/replay.py --scenario incident,surge3  # make demo
    .venv/bin/python scripts/replay.py --scenario surge5           # make replay-surge
    .venv/bin/python scripts/replay.py --quick                     # seconds per setup (tests)
    .venv/bin/python scripts/replay.py --docs-only                 # docs from the results file
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import baselines  # noqa: E402
import harness  # noqa: E402

MiB = 1 << 20

# ------------------------------------------------------------------------------------------
# Calibration (docs/replay.md "Calibration"): this machine has 2 cores shared by Envoy,
# kask-sim and the load generator, so the store is made small and the load scaled to it.
# These are settings, not measurements.
# ------------------------------------------------------------------------------------------

#: The store's backend: 4 workers x 2.2 ms (exponential) = 1,818 key requests/s.
BACKEND_PARALLELISM = 4
SERVICE_TIME_MS = 2.2
CAPACITY = BACKEND_PARALLELISM * 1000 / SERVICE_TIME_MS
#: The pod's memory limit. kask-sim holds ~36 KB per in-flight request (Kask's figure), so
#: 64 MiB is ~1,700 requests in flight: a surge's backlog reaches that in seconds.
MEMORY_LIMIT = 64 * MiB
PER_REQUEST = "20Ki"
#: How long freed request memory stays resident (Go's lazy scavenging); longer than a run.
RELEASE_DELAY_SECS = 120
#: Envoy's static circuit breaker for (c): in flight enough to keep the 4 workers busy
#: through Poisson bursts (~35 ms of queue at capacity), far below what hurts memory.
CB_MAX_REQUESTS = 64
#: CrashLoopBackOff, scaled from Kubernetes' 10 s..5 min to this run's length.
BACKOFF_INITIAL_MS = 1000
BACKOFF_MAX_MS = 8000
#: How often the store's /metrics is sampled (memory, answers) for the plots and the peak.
SAMPLE_EVERY_S = 0.25
#: Sessions written before t = 0 go at PREFILL_RATE: durable writes hold a backend worker
#: longer than reads, so a fast prefill would itself overload the small store.
PREFILL_RATE = 500
FULL_KEYS = {"prefill": 1000, "sessions": 20000}
QUICK_KEYS = {"prefill": 200, "sessions": 2000}

RESULTS_FILE = ROOT / "docs/results/replay.json"
README = ROOT / "README.md"
DOC = ROOT / "docs/replay.md"
#: How many replaced runs docs/results/replay.json keeps (summary rows only).
EARLIER_KEPT = 12

K = "k"  # in a phase: the scenario's surge multiple of capacity

SCENARIOS = {
    "incident": {
        "label": "incident",
        "title": "The 2020 incident: 0.75x capacity, then a surge of x1.33 (to 1.0x)",
        "multiple": 0.75 * 4 / 3,
        # (name, seconds, from, to) in multiples of capacity
        "phases": [("steady", 15, 0.75, 0.75), ("surge-ramp", 5, 0.75, K), ("surge", 30, K, K),
                   ("after", 15, 0.75, 0.75)],
        "quick": [("steady", 2, 0.75, 0.75), ("surge-ramp", 1, 0.75, K), ("surge", 3, K, K),
                  ("after", 2, 0.75, 0.75)],
        "reader_space": 1_000_000, "zipf_s": 1.0, "connections": 8000, "seed": 20200611,
        "keys_text": ("Zipf (s = 1) over 10^6 never-written keys: popular keys repeat (the top "
                      "10,000 take ~68% of lookups), which a negative cache absorbs"),
    },
    "surge3": {
        "label": "3x",
        "title": "A 3x surge whose reader keys a negative cache cannot absorb",
        "multiple": 3.0,
        "phases": [("steady", 10, 0.75, 0.75), ("surge", 30, K, K), ("after", 10, 0.5, 0.5)],
        "quick": [("steady", 2, 0.75, 0.75), ("surge", 3, K, K), ("after", 2, 0.5, 0.5)],
        "reader_space": 1_000_000_000, "zipf_s": 0.0, "connections": 12000, "seed": 3,
        "keys_text": ("uniform over 10^9 never-written keys: a lookup repeats one of the ~10^5 "
                      "keys looked up in the last 10 s (the negative cache's TTL) with "
                      "probability ~10^-4, so a negative cache cannot absorb them"),
    },
    "surge5": {
        "label": "5x",
        "title": "A 5x surge whose reader keys a negative cache cannot absorb",
        "multiple": 5.0,
        "phases": [("steady", 10, 0.75, 0.75), ("surge", 30, K, K), ("after", 10, 0.5, 0.5)],
        "quick": [("steady", 2, 0.75, 0.75), ("surge", 3, K, K), ("after", 2, 0.5, 0.5)],
        "reader_space": 1_000_000_000, "zipf_s": 0.0, "connections": 12000, "seed": 5,
        "keys_text": ("uniform over 10^9 never-written keys (as in the 3x surge): a negative "
                      "cache cannot absorb them"),
    },
}
#: `make demo`: the incident and the 3x surge.
DEMO = ["incident", "surge3"]
#: The README's side-by-side table.
README_SCENARIOS = ["incident", "surge3"]

SETUPS = ["bare", "stock-envoy", "circuit-breaker", "adaptive-concurrency", "admission-control",
          "sessionguard"]
TITLES = {
    "bare": "(a) Envoy, no protection (breakers raised)",
    "stock-envoy": "(b) stock Envoy (default breakers, 1024)",
    "circuit-breaker": f"(c) Envoy circuit breaker (max_requests {CB_MAX_REQUESTS})",
    "adaptive-concurrency": "(d) Envoy adaptive_concurrency",
    "admission-control": "(e) Envoy admission_control",
    "sessionguard": "(f) sessionguard (defaults + memory limit)",
}
README_NAMES = {
    "bare": "Envoy, no protection (breakers raised to 100,000)",
    "stock-envoy": "stock Envoy (default circuit breakers, 1024)",
    "circuit-breaker": f"circuit breaker (`max_requests` {CB_MAX_REQUESTS})",
    "adaptive-concurrency": "`adaptive_concurrency`",
    "admission-control": "`admission_control`",
    "sessionguard": "sessionguard (defaults + the pod's memory limit)",
}
CLASSES = ["reader_miss", "user_get", "write", "delete"]
#: The classes whose failure hurts logged-in users (sessionguard's critical classes, as the
#: client sees them: a read of a live session is critical when the filter knows it exists).
USER_CLASSES = ["user_get", "write", "delete"]


def sessionguard_plugin(limit: int) -> dict:
    """Defaults, plus memory shedding: it is off by default because only the operator knows
    the pod's limit."""
    return {"memory": {"enabled": True, "memory_limit_bytes": limit}}


def envoy_config(setup: str, kask_port: int, limit: int, wasm: Path = harness.WASM) -> dict:
    cfg = harness.load_config("sidecar.yaml")
    if setup == "sessionguard":
        return harness.localize(cfg, upstreams={"sessionstore": [kask_port]},
                                plugin=sessionguard_plugin(limit), wasm=wasm)
    cfg = harness.localize(cfg, upstreams={"sessionstore": [kask_port]})
    if setup == "bare":
        return baselines.bare(cfg)
    if setup == "stock-envoy":
        return baselines.stock(cfg)
    if setup == "circuit-breaker":
        return baselines.circuit_breaker(cfg, CB_MAX_REQUESTS)
    if setup == "adaptive-concurrency":
        return baselines.adaptive_concurrency(cfg)
    if setup == "admission-control":
        return baselines.admission_control(cfg)
    raise ValueError(f"unknown setup {setup!r}; one of {', '.join(SETUPS)}")


def plan(name: str, quick: bool, multiple: float | None = None, rate_scale: float = 1.0) -> list[dict]:
    """The scenario's phases with absolute rates (req/s)."""
    scn = SCENARIOS[name]
    k = scn["multiple"] if multiple is None else multiple

    def rate(x):
        return round((k if x == K else x) * CAPACITY * rate_scale)

    return [{"name": n, "duration_s": d, "rate_from": rate(a), "rate_to": rate(b),
             "x_from": round((k if a == K else a), 3), "x_to": round((k if b == K else b), 3)}
            for n, d, a, b in scn["quick" if quick else "phases"]]


def scenario_toml(name: str, phases: list[dict], keys: dict) -> str:
    scn = SCENARIOS[name]
    text = f"""name = "replay-{name}"
description = "{scn['title']}"
seed = {scn['seed']}
connections = {scn['connections']}
timeout_ms = 3000
connect_timeout_ms = 1200
arrival = "poisson"

[mix]
reader_miss = 0.85
user_get    = 0.10
write       = 0.04
delete      = 0.01

[keys]
reader_space = {scn['reader_space']}
zipf_s = {scn['zipf_s']}
session_pool = {keys['sessions']}
prefill = {keys['prefill']}
prefill_rate = {PREFILL_RATE}
"""
    for p in phases:
        text += f'\n[[phases]]\nname = "{p["name"]}"\nduration_s = {p["duration_s"]}\n'
        if p["rate_from"] == p["rate_to"]:
            text += f"rate = {p['rate_from']}\n"
        else:
            text += f"rate_from = {p['rate_from']}\nrate_to = {p['rate_to']}\n"
    return text


def surge_window(phases: list[dict]) -> tuple[float, float]:
    """Start and end (s from t = 0) of the phase named "surge"."""
    start = 0.0
    for p in phases:
        if p["name"] == "surge":
            return start, start + p["duration_s"]
        start += p["duration_s"]
    raise ValueError("no surge phase")


# ------------------------------------------------------------------------------------------
# The store under supervision, and its memory over time
# ------------------------------------------------------------------------------------------

class SupervisedKask:
    """`kask-sim supervise -- kask-sim ...`: one port across restarts, events in a file."""

    def __init__(self, workdir: Path, flags: list[str]):
        self.workdir = workdir
        self.events_path = workdir / "kask-events.jsonl"
        self.port_file = workdir / "kask-port"
        self.log = workdir / "kask.log"
        self.args = [harness.KASK_SIM, "supervise",
                     "--backoff-initial-ms", BACKOFF_INITIAL_MS, "--backoff-max-ms", BACKOFF_MAX_MS,
                     "--events-file", self.events_path, "--",
                     "--listen", "127.0.0.1:0", "--data-dir", workdir / "kask-data",
                     "--port-file", self.port_file, *flags]
        self.proc = None
        self.port = 0

    def start(self) -> "SupervisedKask":
        self.proc = harness.spawn(self.args, self.log)
        harness.wait_for(lambda: self.port_file.exists() or self.proc.poll() is not None, 20,
                         f"kask-sim to listen (log {self.log})")
        if self.proc.poll() is not None:
            raise RuntimeError(f"kask-sim supervise exited: {self.log.read_text()[-2000:]}")
        self.port = int(self.port_file.read_text().strip())
        harness.wait_for(self._healthy, 10, "kask-sim /healthz")
        return self

    def _healthy(self) -> bool:
        try:
            return harness.request(self.port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
        return out

    def oom_kills(self) -> int:
        return sum(1 for e in self.events() if e.get("event") == "exit" and e.get("oom"))

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod (the supervisor forwards it), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                harness.stop(self.proc)
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        harness.stop(self.proc)


class MemorySampler(threading.Thread):
    """Reads the store's /metrics every SAMPLE_EVERY_S while it runs."""

    FIELDS = {
        "rss": "process_resident_memory_bytes",
        "heap": "go_memstats_heap_inuse_bytes",
        "stack": "go_memstats_stack_inuse_bytes",
        "inflight": "kasksim_inflight_requests",
        "queue": "kasksim_backend_queue_depth",
        "abandoned": "kasksim_abandoned_total",
        "start": "process_start_time_seconds",
        "requests": "http_requests_total",
    }

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[dict] = []
        #: sessionguard's own view (limit, in flight, memory ratio), once a second.
        self.envoy: harness.Envoy | None = None
        self.filter: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        next_filter = 0.0
        while not self.done.is_set():
            t = time.time()
            if self.envoy is not None and t >= next_filter:
                next_filter = t + 1.0
                try:
                    st = self.envoy.stats()
                    self.filter.append({"t": t, **{k.removeprefix("sessionguard."): v
                                                   for k, v in st.items()}})
                except OSError:
                    pass
            sample = {"t": t}
            try:
                text = harness.request(self.port, "GET", "/metrics", timeout=0.5).body.decode()
                for key, name in self.FIELDS.items():
                    sample[key] = harness.metric_value(text, name)
            except OSError:
                sample["down"] = True  # killed, restarting, or too slow to answer
            self.samples.append(sample)
            self.done.wait(max(0.0, SAMPLE_EVERY_S - (time.time() - t)))

    def stop(self) -> list[dict]:
        self.done.set()
        self.join(timeout=5)
        return self.samples

    def latest(self) -> dict:
        return self.samples[-1] if self.samples else {}


def store_requests(samples: list[dict]) -> int:
    """Requests the store answered (Kask's http_requests_total), summed across restarts: the
    counter starts from zero in every process, so take each process's last value."""
    last: dict[float, float] = {}
    for s in samples:
        if s.get("start") is not None and s.get("requests") is not None:
            last[s["start"]] = max(last.get(s["start"], 0.0), s["requests"])
    return int(sum(last.values()))


def store_answer_deltas(samples: list[dict], t0: float) -> list[tuple[float, float]]:
    """(t, answers since the previous sample of the same store process) for every sample, t in
    seconds from t = 0. A process's first sample counts everything since it started (its
    counter starts at zero; kask-sim counts key requests only, not /metrics)."""
    out = []
    prev: dict[float, float] = {}
    for s in samples:
        start, requests = s.get("start"), s.get("requests")
        if start is None or requests is None:
            continue
        out.append((s["t"] - t0, max(0.0, requests - prev.get(start, 0.0))))
        prev[start] = requests
    return out


def abandoned(samples: list[dict]) -> int:
    last: dict[float, float] = {}
    for s in samples:
        if s.get("start") is not None and s.get("abandoned") is not None:
            last[s["start"]] = max(last.get(s["start"], 0.0), s["abandoned"])
    return int(sum(last.values()))


def envoy_cluster_stats(envoy: harness.Envoy) -> dict[str, int]:
    text = harness.request(envoy.admin_port, "GET", "/stats?filter=^cluster.sessionstore.").body
    out = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.removeprefix("cluster.sessionstore.")] = int(value)
    return out


def filter_sheds(stats: dict[str, int]) -> dict | None:
    """sessionguard's own shed counters (`sessionguard.shed.<reason>.<critical|sheddable>`),
    summed over reasons; None when the filter exported none (not sessionguard)."""
    by_reason: dict[str, dict[str, int]] = {}
    for name, value in stats.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[:2] == ["sessionguard", "shed"] \
                and parts[3] in ("critical", "sheddable"):
            by_reason.setdefault(parts[2], {"critical": 0, "sheddable": 0})[parts[3]] += value
    if not by_reason:
        return None
    critical = sum(r["critical"] for r in by_reason.values())
    sheddable = sum(r["sheddable"] for r in by_reason.values())
    requests = {n.removeprefix("sessionguard.requests."): v for n, v in stats.items()
                if n.startswith("sessionguard.requests.")}
    return {"critical": critical, "sheddable": sheddable, "by_reason": by_reason,
            "critical_share_pct": pct(critical, critical + sheddable),
            "requests": requests,
            "negcache_hits": stats.get("sessionguard.negcache.hits", 0)}


# ------------------------------------------------------------------------------------------
# One setup
# ------------------------------------------------------------------------------------------

def run_setup(setup: str, name: str, phases: list[dict], keys: dict, out: Path, limit: int,
              log=print, wasm: Path = harness.WASM) -> dict:
    workdir = out / setup
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("kask-events.jsonl", "kask-port", "summary.json", "timeseries.json"):
        (workdir / stale).unlink(missing_ok=True)
    scenario = workdir / "scenario.toml"
    scenario.write_text(scenario_toml(name, phases, keys))
    flags = ["--memory-limit", str(limit), "--per-request-bytes", PER_REQUEST,
             "--backend-parallelism", str(BACKEND_PARALLELISM),
             "--service-time-ms", str(SERVICE_TIME_MS),
             "--release-delay-secs", str(RELEASE_DELAY_SECS)]
    load_before = os.getloadavg()[0]
    kask = SupervisedKask(workdir, flags).start()
    envoy = None
    sampler = MemorySampler(kask.port)
    sampler.start()
    load_stderr = workdir / "sessionload.log"
    planned = sum(p["duration_s"] for p in phases)
    try:
        envoy = harness.Envoy(workdir, envoy_config(setup, kask.port, limit, wasm),
                              concurrency=2).start()
        if setup == "sessionguard":
            sampler.envoy = envoy
        cmd = [str(harness.SESSIONLOAD), "run", "--scenario", str(scenario),
               "--target", f"http://127.0.0.1:{envoy.port}", "--out", str(workdir)]
        started = time.monotonic()
        last_line = [""]
        with open(load_stderr, "w") as errlog:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)

            def pump():
                for line in proc.stderr:
                    errlog.write(line)
                    if line.startswith("t="):
                        last_line[0] = line.strip()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            next_report = started + 2
            while proc.poll() is None:
                time.sleep(0.2)
                if time.monotonic() >= next_report:
                    next_report += 5 if planned > 30 else 2
                    s = sampler.latest()
                    mem = ("store down" if s.get("down") or s.get("rss") is None
                           else f"store RSS {s['rss'] / MiB:5.1f}/{limit / MiB:.0f} MiB")
                    log(f"  [{setup}] {last_line[0] or 'prefill'} | {mem} | "
                        f"OOM kills {kask.oom_kills()}")
            reader.join(timeout=5)
            if proc.wait() not in (0, 3):
                raise RuntimeError(f"sessionload failed ({proc.returncode}); see {load_stderr}")
        if setup == "sessionguard":
            # The filter exports its counters on its tick (1 s): let the last one land.
            time.sleep(1.5)
        cluster = envoy_cluster_stats(envoy)
        filter_stats = envoy.stats() if setup == "sessionguard" else {}
    finally:
        samples = sampler.stop()
        filter_samples = sampler.filter
        if envoy is not None:
            envoy.stop()
        kask.stop()
    summary = json.loads((workdir / "summary.json").read_text())
    series = json.loads((workdir / "timeseries.json").read_text())
    result = summarize(setup, phases, summary, series, samples, kask.events(), cluster,
                       filter_stats, limit)
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    t0 = series["t0_unix_ms"] / 1000.0
    result["filter_timeline"] = [
        {"t": round(f["t"] - t0, 1), **{k: f.get(k) for k in (
            "limit", "in_flight", "critical_reserve", "min_rtt_us", "sample_rtt_us",
            "memory.ratio_permille", "memory.ceiling", "admission.rejection_permille",
            "negcache.hits")},
         "shed_critical": sum(v for k, v in f.items()
                              if k.startswith("shed.") and k.endswith(".critical")),
         "shed_sheddable": sum(v for k, v in f.items()
                               if k.startswith("shed.") and k.endswith(".sheddable"))}
        for f in filter_samples]
    return result


def pct(num: float, den: float) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def summarize(setup, phases, summary, series, samples, events, cluster, filter_stats,
              limit) -> dict:
    classes = summary["classes"]
    overall = summary["overall"]
    incorrect = summary["correctness"]["incorrect"]
    # Answers a client could act on (not 503s, errors or timeouts): how many were right?
    answered = overall["ok"] + incorrect
    rss = [s["rss"] for s in samples if s.get("rss") is not None]
    t0 = series["t0_unix_ms"] / 1000.0
    kills = [e for e in events if e.get("event") == "exit" and e.get("oom")]
    down = sum(1 for s in samples if s.get("down") and t0 <= s["t"]) * SAMPLE_EVERY_S
    peak = max(rss) if rss else None

    # While the surge holds: what the generator achieved against what it was asked, what the
    # store answered (all key requests, 404s included) and what clients got right.
    s_from, s_to = surge_window(phases)
    s_len = s_to - s_from
    surge_phase = next(p for p in summary["phases"] if p["name"] == "surge")
    deltas = store_answer_deltas(samples, t0)
    in_surge = sum(d for t, d in deltas if s_from < t <= s_to)
    client_ok = sum(sec["ok"] for sec in series["seconds"] if s_from <= sec["t"] < s_to)
    user_ok_sent = [0, 0]
    for sec in series["seconds"]:
        if s_from <= sec["t"] < s_to:
            for c in USER_CLASSES:
                user_ok_sent[0] += sec["classes"].get(c, {}).get("ok", 0)
                user_ok_sent[1] += sec["classes"].get(c, {}).get("sent", 0)
    surge = {
        "from_s": s_from, "to_s": s_to,
        "asked_rate": surge_phase.get("rate_to") or surge_phase.get("rate_from"),
        "achieved_rate": round(surge_phase["sent"] / s_len, 1),
        "planned": surge_phase.get("planned"), "sent": surge_phase["sent"],
        "store_answers_per_s": round(in_surge / s_len, 1),
        "store_share_of_capacity_pct": round(100.0 * in_surge / s_len / CAPACITY, 1),
        "client_ok_per_s": round(client_ok / s_len, 1),
        "user_ok_pct": pct(*user_ok_sent),
    }

    # Per second (t = 0..planned-1): per class [sent, ok, 503, errors + incorrect], what the
    # store answered, and its peak RSS (None: down the whole second).
    n = len(series["seconds"])
    store = [0.0] * n
    for t, d in deltas:
        i = math.ceil(t) - 1  # a sample at t covers (t - 0.25, t]
        if 0 <= i < n:
            store[i] += d
    rss_s: list[float | None] = [None] * n
    down_s = [False] * n
    for s in samples:
        i = math.floor(s["t"] - t0)
        if 0 <= i < n:
            if s.get("down") or s.get("rss") is None:
                down_s[i] = True
            else:
                rss_s[i] = max(rss_s[i] or 0, s["rss"])
    seconds = [{
        "t": sec["t"],
        "c": {c: [v["sent"], v["ok"], v["shed"], v["error"] + v["incorrect"]]
              for c, v in sec["classes"].items()},
        "store": round(store[i]),
        "rss_mib": None if rss_s[i] is None else round(rss_s[i] / MiB, 1),
        "down": down_s[i],
    } for i, sec in enumerate(series["seconds"])]

    shed_user = sum(classes[c]["shed_503"] for c in USER_CLASSES)
    return {
        "setup": setup,
        "title": TITLES[setup],
        "oom_kills": len(kills),
        "restarts": sum(1 for e in events if e.get("event") == "start") - 1,
        "store_down_s": round(down, 1),
        "sent": overall["sent"],
        "classes": {c: {"sent": v["sent"], "ok": v["ok"], "shed_503": v["shed_503"],
                        "errors": v["errors"]["total"], "incorrect": v["incorrect"]["total"],
                        "ok_pct": pct(v["ok"], v["sent"])} for c, v in classes.items()},
        "writer_success_pct": pct(classes["write"]["ok"], classes["write"]["sent"]),
        "user_read_success_pct": pct(classes["user_get"]["ok"], classes["user_get"]["sent"]),
        "reader_miss_success_pct": pct(classes["reader_miss"]["ok"],
                                       classes["reader_miss"]["sent"]),
        "logout_success_pct": pct(classes["delete"]["ok"], classes["delete"]["sent"]),
        "overall_success_pct": pct(overall["ok"], overall["sent"]),
        "correct_pct": pct(overall["ok"], answered),
        "incorrect": summary["correctness"],
        "shed_503": overall["shed_503"],
        "shed_503_user": shed_user,
        "shed_503_user_share_pct": pct(shed_user, overall["shed_503"]),
        "errors": overall["errors"],
        "p50_ms": overall["latency_ms"]["p50"],
        "p99_ms": overall["latency_ms"]["p99"],
        "shed_p50_ms": overall["shed_latency_ms"]["p50"],
        "shed_p99_ms": overall["shed_latency_ms"]["p99"],
        "peak_rss_bytes": peak,
        "peak_rss_ratio": None if peak is None else round(peak / limit, 3),
        "limit_bytes": limit,
        "surge": surge,
        "store_answered": store_requests(samples),
        "store_abandoned": abandoned(samples),
        "envoy_upstream_rq": cluster.get("upstream_rq_total"),
        "envoy_cluster": {k: v for k, v in cluster.items() if k.startswith(
            ("upstream_rq_", "upstream_cx_connect_fail", "upstream_cx_overflow"))
            and not k.startswith("upstream_rq_per_")},
        "filter": filter_stats,
        "filter_shed": filter_sheds(filter_stats),
        "behind_schedule": summary["schedule"]["behind_schedule"],
        "schedule": {k: summary["schedule"].get(k) for k in (
            "late", "p99_lag_ms", "max_lag_ms", "queue_timeouts", "peak_connections")},
        "phases": summary["phases"],
        "seconds": seconds,
        "kills_t": [round(e["t"] / 1000.0 - t0, 2) for e in kills],
        # Raw, for out/ only (not committed): every store sample and sessionload's series.
        "memory": [{
            "t": round(s["t"] - t0, 3),
            **({"down": True} if s.get("down") else {
                "rss": s.get("rss"), "inuse": (s.get("heap") or 0) + (s.get("stack") or 0),
                "inflight": s.get("inflight"), "queue": s.get("queue")}),
        } for s in samples],
        "timeseries": series["seconds"],
    }


#: Fields of a result kept only in out/ (too large for the committed results file).
RAW_ONLY = ("memory", "timeseries")


# ------------------------------------------------------------------------------------------
# Formatting and tables
# ------------------------------------------------------------------------------------------

def fmt_pct(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}%"


def fmt_ms(v):
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_rss(r):
    s = fmt_ratio(r["peak_rss_ratio"])
    return s + " (killed)" if r["oom_kills"] and r["peak_rss_ratio"] is not None else s


def fmt_goodput(r):
    s = r["surge"]
    return f"{s['store_answers_per_s']:,.0f} ({s['store_share_of_capacity_pct']:.0f}%)"


#: The generator "kept up" with a surge when it sent at least this share of the requests asked
#: for while the surge held, with dispatch lag p99 at most SUSTAINED_LAG_MS (sessionload's own
#: `behind_schedule` flag uses 5 ms, which a busy 2-core machine crosses without changing the
#: load a store sees; it is recorded too).
SUSTAINED_SHARE = 0.97
SUSTAINED_LAG_MS = 100.0


#: ...and at most this share of all requests found no free connection before their deadline
#: (`queue_timeouts`: they never left the generator, so the proxy never saw them).
SUSTAINED_NO_CONNECTION = 0.01


def no_connection_share(r) -> float:
    return (r["schedule"].get("queue_timeouts") or 0) / max(1, r["sent"])


def sustained(r) -> bool:
    s = r["surge"]
    lag = r["schedule"].get("p99_lag_ms")
    return (s["achieved_rate"] >= SUSTAINED_SHARE * s["asked_rate"]
            and (lag is None or lag <= SUSTAINED_LAG_MS)
            and no_connection_share(r) <= SUSTAINED_NO_CONNECTION)


def fmt_offered(r):
    s = r["surge"]
    lost = no_connection_share(r)
    return (f"{s['achieved_rate']:,.0f} of {s['asked_rate']:,.0f}"
            + (f"; {lost:.0%} found no connection" if lost >= 0.005 else "")
            + ("" if sustained(r) else " (behind)"))


def fmt_503(r):
    share = r["shed_503_user_share_pct"]
    return f"{r['shed_503']:,}" + ("" if share is None else f" ({share:.1f}%)")


def fmt_store(r):
    up = r["envoy_upstream_rq"]
    return f"{'-' if up is None else f'{up:,}'} ({r['store_answered']:,})"


COLUMNS = [
    # (text header, markdown header, cell)
    ("setup", "setup", lambda r: r["setup"]),
    ("OOM kills", "store OOM kills", lambda r: str(r["oom_kills"])),
    ("peak RSS/limit", "peak store RSS / limit", fmt_rss),
    ("store ans/s in surge", "store answers/s while the surge holds (of capacity)", fmt_goodput),
    ("writes ok", "writes ok", lambda r: fmt_pct(r["writer_success_pct"])),
    ("logged-in reads ok", "logged-in reads ok", lambda r: fmt_pct(r["user_read_success_pct"])),
    ("reader lookups ok", "reader lookups ok", lambda r: fmt_pct(r["reader_miss_success_pct"])),
    ("correct", "answers correct", lambda r: fmt_pct(r["correct_pct"])),
    ("p50 ms", "p50 ms", lambda r: fmt_ms(r["p50_ms"])),
    ("p99 ms", "p99 ms", lambda r: fmt_ms(r["p99_ms"])),
    ("503 p50 ms", "503s: p50 ms", lambda r: fmt_ms(r.get("shed_p50_ms"))),
    ("503s (to users)", "503s sent (share to writes, logged-in reads, logouts)", fmt_503),
    ("offered in surge/s", "offered while the surge holds, req/s", fmt_offered),
    ("reached store (answered)", "reached store (answered)", fmt_store),
]


def table(results: list[dict], markdown: bool) -> str:
    heads = [(md if markdown else tx) for tx, md, _ in COLUMNS]
    rows = [[f(r) for _, _, f in COLUMNS] for r in results]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*heads), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row) for row in rows)])


def shed_table(r: dict) -> str:
    """sessionguard's own shed counters, by reason and class."""
    fs = r.get("filter_shed")
    if not fs:
        return ""
    lines = ["| shed reason | critical (writes, logouts, reads of known sessions) | sheddable |",
             "|---|---|---|"]
    for reason, v in sorted(fs["by_reason"].items()):
        lines.append(f"| {reason} | {v['critical']:,} | {v['sheddable']:,} |")
    lines.append(f"| **all** | **{fs['critical']:,}** ({fmt_pct(fs['critical_share_pct'])} "
                 f"of its 503s) | **{fs['sheddable']:,}** |")
    return "\n".join(lines)


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_version = subprocess.run([str(harness.ENVOY), "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()
    version = "?"
    for word in " ".join(envoy_version).replace("/", " ").split():
        if word.count(".") == 2 and word.replace(".", "").isdigit():
            version = word
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "envoy": version}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def provenance(wasm: Path) -> dict:
    """Which code ran: the checkout's commit, and the filter's (last commit touching its
    sources, whether they had uncommitted changes, and the built module's hash)."""
    filter_paths = ["src", "Cargo.toml", "Cargo.lock"]
    digest = hashlib.sha256(wasm.read_bytes()).hexdigest()[:16] if wasm.exists() else None
    return {
        "commit": git("rev-parse", "--short=10", "HEAD") or None,
        "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "filter": {
            "commit": git("log", "-1", "--format=%h", "--abbrev=10", "--", *filter_paths) or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", *filter_paths)),
            "wasm_sha256": digest,
            "wasm": str(wasm.resolve().relative_to(ROOT)) if wasm.resolve().is_relative_to(ROOT)
            else str(wasm),
        },
    }


def fmt_run(meta: dict) -> str:
    """`command` on date at commit X (filter ...): one line naming a run."""
    f = meta["filter"]
    dirty = " + uncommitted changes" if f.get("dirty") else ""
    nice = f", under `nice -n {meta['nice']}`" if meta.get("nice") else ""
    label = f" ({meta['label']})" if meta.get("label") else ""
    return (f"`{meta['command']}`{label} on {meta['date']}, commit {meta['commit']}"
            f"{' (dirty tree)' if meta.get('tree_dirty') else ''} (filter sources at "
            f"{f['commit']}{dirty}, wasm sha256 {f['wasm_sha256']}){nice}, "
            f"{meta['wall_minutes']:.1f} min")


def findings(results: list[dict]) -> list[str]:
    """Plain statements from the numbers, so the text stays true when the run is repeated."""
    out = []
    for r in results:
        bits = [f"**{r['setup']}**:"]
        if r["oom_kills"]:
            bits.append(f"the store was OOM-killed {r['oom_kills']} time(s) and was down or "
                        f"restarting for ~{r['store_down_s']:.0f} s;")
        else:
            bits.append(f"the store was never killed (peak RSS {fmt_ratio(r['peak_rss_ratio'])} "
                        "of its limit);")
        s = r["surge"]
        bits.append(f"while the surge held it answered {s['store_answers_per_s']:,.0f} key "
                    f"requests/s ({s['store_share_of_capacity_pct']:.0f}% of capacity) and "
                    f"clients got {s['client_ok_per_s']:,.0f} correct answers/s, "
                    f"{fmt_pct(s['user_ok_pct'])} of logged-in users' requests succeeding;")
        bits.append(f"over the run {fmt_pct(r['writer_success_pct'])} of writes, "
                    f"{fmt_pct(r['user_read_success_pct'])} of logged-in reads and "
                    f"{fmt_pct(r['reader_miss_success_pct'])} of reader lookups succeeded;")
        bits.append(f"{r['shed_503']:,} requests got a 503 "
                    f"({r['shed_503_user']:,} of them writes, logged-in reads or logouts), "
                    f"{r['errors']['total']:,} an error or timeout.")
        fs = r.get("filter_shed")
        if fs:
            total = sum(fs["requests"].values())
            bits.append(f"Its own counters: {fs['critical']:,} critical and "
                        f"{fs['sheddable']:,} sheddable requests shed "
                        f"({fmt_pct(fs['critical_share_pct'])} of its 503s critical); its "
                        f"negative cache answered {fs['negcache_hits']:,} lookups "
                        f"({fmt_pct(pct(fs['negcache_hits'], total))} of the requests it saw).")
        out.append(" ".join(bits))
    return out


# ------------------------------------------------------------------------------------------
# The committed results file
# ------------------------------------------------------------------------------------------

def committed(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in RAW_ONLY}


def summary_row(r: dict) -> dict:
    """What an earlier run keeps: the numbers of its table, no time series."""
    keep = ("setup", "oom_kills", "peak_rss_ratio", "writer_success_pct",
            "user_read_success_pct", "reader_miss_success_pct", "correct_pct", "p99_ms",
            "shed_p50_ms", "shed_503", "shed_503_user_share_pct", "behind_schedule", "sent",
            "schedule")
    row = {k: r.get(k) for k in keep}
    row["surge"] = {k: r["surge"][k] for k in ("asked_rate", "achieved_rate",
                                               "store_answers_per_s",
                                               "store_share_of_capacity_pct")}
    fs = r.get("filter_shed")
    row["filter_shed"] = None if not fs else {k: fs[k] for k in (
        "critical", "sheddable", "critical_share_pct", "by_reason")}
    return row


def load_results_file(path: Path = RESULTS_FILE) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"about": "Full runs of scripts/replay.py (make demo, make replay-surge), written "
                     "by that script: the latest run of each scenario, then the runs they "
                     "replaced (summary rows only), newest first. docs/replay.md and the "
                     "README's replay table are generated from this file.",
            "scenarios": {}, "earlier": []}


def record_run(data: dict, name: str, meta: dict, results: list[dict]) -> dict:
    old = data["scenarios"].get(name)
    if old:
        data["earlier"].insert(0, {"scenario": name, "meta": old["meta"],
                                   "rows": [summary_row(r) for r in old["results"]]})
        del data["earlier"][EARLIER_KEPT:]
    data["scenarios"][name] = {"meta": meta, "results": [committed(r) for r in results]}
    data["scenarios"] = {k: data["scenarios"][k] for k in SCENARIOS if k in data["scenarios"]}
    return data


def write_results_file(data: dict, path: Path = RESULTS_FILE) -> None:
    """A run's meta on one line, each setup's results on one line, each earlier run on one
    line: the file stays small and a new run's diff shows which rows changed."""
    def one(v):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)

    parts = []
    for name, entry in data["scenarios"].items():
        rows = ",\n    ".join(one(r) for r in entry["results"])
        parts.append(f'  {one(name)}: {{\n   "meta": {one(entry["meta"])},\n'
                     f'   "results": [\n    {rows}\n   ]\n  }}')
    earlier = ",\n  ".join(one(e) for e in data["earlier"])
    text = ("{\n" f' "about": {one(data["about"])},\n'
            ' "scenarios": {\n' + ",\n".join(parts) + "\n },\n"
            ' "earlier": [' + (f"\n  {earlier}\n " if earlier else "") + "]\n}\n")
    assert json.loads(text) == data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------------
# docs/replay.md and the README's section
# ------------------------------------------------------------------------------------------

README_BEGIN = "<!-- replay:begin (generated by scripts/replay.py from docs/results/replay.json) -->"
README_END = "<!-- replay:end -->"

README_COLUMNS = [
    # (header, value for one result, formatted)
    ("OOM kills", lambda r: str(r["oom_kills"])),
    ("peak RSS / limit", lambda r: fmt_ratio(r["peak_rss_ratio"])),
    ("store answers in surge, of capacity",
     lambda r: f"{r['surge']['store_share_of_capacity_pct']:.0f}%"),
    ("writes ok", lambda r: fmt_pct(r["writer_success_pct"])),
    ("logged-in reads ok", lambda r: fmt_pct(r["user_read_success_pct"])),
    ("reader lookups ok", lambda r: fmt_pct(r["reader_miss_success_pct"])),
    ("503s to logged-in users", lambda r: fmt_pct(r["shed_503_user_share_pct"])),
]


def readme_table(data: dict) -> str:
    names = [n for n in README_SCENARIOS]
    runs = {n: {r["setup"]: r for r in data["scenarios"].get(n, {}).get("results", [])}
            for n in names}
    labels = " / ".join(SCENARIOS[n]["label"] for n in names)
    heads = [f"setup (each cell: {labels})"] + [h for h, _ in README_COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for setup in SETUPS:
        cells = [README_NAMES[setup]]
        for _, f in README_COLUMNS:
            cells.append(" / ".join(f(runs[n][setup]) if setup in runs[n] else "not run"
                                    for n in names))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_section(data: dict) -> str:
    runs = []
    for n in README_SCENARIOS:
        entry = data["scenarios"].get(n)
        if not entry:
            runs.append(f"- {SCENARIOS[n]['label']}: not run yet (`make demo`)")
            continue
        line = f"- {SCENARIOS[n]['label']}: {fmt_run(entry['meta'])}"
        loads = [x for r in entry["results"] for x in r.get("loadavg_1m", [])]
        if loads:
            line += f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores"
        behind = [r for r in entry["results"] if not sustained(r)]
        if behind:
            line += (". The surge was not offered in full to " + ", ".join(
                f"{r['setup']} ({no_connection_share(r):.0%} of requests found no free "
                "connection)" for r in behind) + ": answers came back too slowly (a store "
                "backlog, or a CPU-starved proxy) for the generator's connections, so those "
                "rows describe this machine's limits as much as the setup")
        runs.append(line + ".")
    plots = " and ".join(f"[{SCENARIOS[n]['label']}](docs/img/replay-{n}.png)"
                         for n in README_SCENARIOS if n in data["scenarios"])
    first_plot = next((n for n in ("surge3", "incident") if n in data["scenarios"]), None)
    return f"""{README_BEGIN}

Two replays, each against six setups in turn, each setup with a fresh store that is OOM-killed
like a Kubernetes pod when it passes its memory limit:
- **incident**: the 2020 incident at laboratory scale: steady load at 0.75x of the store's
  capacity, then a surge of x1.33 (the seed's 15k -> 20k requests/s); 85% of requests are reader
  lookups of missing keys whose popular keys repeat, so a negative cache absorbs many of them.
- **3x**: steady 0.75x, then 3x capacity for 30 s, then 0.5x, with reader keys drawn uniformly
  from 10^9, so no cache can absorb them: only shedding the right requests keeps logged-in users
  working.

Each cell is *incident / 3x*, from the last full run recorded in
[docs/results/replay.json](docs/results/replay.json) (this table is generated from that file by
`scripts/replay.py`, and `tests/test_replay.py` fails if they disagree). *Store answers in
surge*: key requests the store answered per second while the surge held, as a share of its
capacity; *503s to logged-in users*: the share of all 503s that went to writes, logged-in reads
and logouts.

{readme_table(data)}

{chr(10).join(runs)}

The machine is shared, so the baselines' numbers move from run to run (earlier runs are listed
in docs/replay.md). Per-class numbers, sessionguard's shed counters (critical vs sheddable),
the 5x surge (`make replay-surge`), how to read the columns and per-second plots
({plots}): [docs/replay.md](docs/replay.md). Memory shedding alone: [docs/memory.md](docs/memory.md).
{f'{chr(10)}![per-second success by class, store answers and memory, one row per setup](docs/img/replay-{first_plot}.png){chr(10)}' if first_plot else ''}
{README_END}"""


def update_readme(data: dict, path: Path = README) -> None:
    text = path.read_text()
    section = readme_section(data)
    if README_BEGIN in text and README_END in text:
        a = text.index(README_BEGIN)
        b = text.index(README_END) + len(README_END)
        text = text[:a] + section + text[b:]
    else:
        # First time: replace the body of "## What `make demo` shows" up to the next heading.
        head = "## What `make demo` shows\n"
        a = text.index(head) + len(head)
        b = text.index("\n## ", a)
        text = text[:a] + "\n" + section + "\n" + text[b:]
    path.write_text(text)


def parse_readme_table(text: str) -> dict[str, dict[str, list[str]]]:
    """The README's generated table: {setup title: {column header: [cell per scenario]}}."""
    a = text.index(README_BEGIN)
    b = text.index(README_END)
    rows = [line for line in text[a:b].splitlines() if line.startswith("|")]
    heads = [h.strip() for h in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = {h: [part.strip() for part in c.split(" / ")]
                         for h, c in zip(heads[1:], cells[1:])}
    return out


def scenario_markdown(name: str, entry: dict, png: str | None) -> str:
    meta, results = entry["meta"], entry["results"]
    scn = SCENARIOS[name]
    rows = []
    for p in meta["phases"]:
        if p["rate_from"] == p["rate_to"]:
            rate = f"{p['rate_from']:,} req/s ({p['x_from']}x capacity)"
        else:
            rate = (f"{p['rate_from']:,} -> {p['rate_to']:,} req/s "
                    f"({p['x_from']}x -> {p['x_to']}x)")
        rows.append(f"| {p['name']} | {p['duration_s']} s | {rate} |")
    sg = next((r for r in results if r["setup"] == "sessionguard"), None)
    shed = ""
    if sg and sg.get("filter_shed"):
        shed = ("sessionguard's own counters (`sessionguard.shed.<reason>.<class>` in Envoy's "
                "`/stats`, read at the end of the run):\n\n" + shed_table(sg) + "\n")
    behind = [r["setup"] for r in results if not sustained(r)]
    gen = ((f"The load generator kept up with the surge in every setup (it sent at least "
            f"{SUSTAINED_SHARE:.0%} of the requests asked for while the surge held, dispatch-lag "
            f"p99 at most {SUSTAINED_LAG_MS:.0f} ms, at most {SUSTAINED_NO_CONNECTION:.0%} of "
            "requests finding no free connection).") if not behind else
           (f"The surge was not offered in full with: {', '.join(behind)} (column *offered*: "
            f"the generator sent less than {SUSTAINED_SHARE:.0%} of the requests asked for, or "
            f"its dispatch-lag p99 exceeded {SUSTAINED_LAG_MS:.0f} ms, or more than "
            f"{SUSTAINED_NO_CONNECTION:.0%} of all requests found none of its "
            f"{meta['connections']:,} connections free before their 3 s deadline, because "
            "responses came back too slowly): those setups saw less load, or later, than the "
            "scenario says, and their numbers describe this machine's limits as much as the "
            "setup."))
    lag = ", ".join(f"{r['setup']} {r['schedule']['p99_lag_ms']:.1f} ms" for r in results
                    if r["schedule"].get("p99_lag_ms") is not None)
    load = ", ".join(f"{r['setup']} {r['loadavg_1m'][0]:.1f}-{r['loadavg_1m'][1]:.1f}"
                     for r in results if r.get("loadavg_1m"))
    return f"""## {scn['title']} (`--scenario {name}`)

Run: {fmt_run(meta)}.
Machine: {meta['machine']['nproc']} cores, {meta['machine']['cpu']}, Linux
{meta['machine']['kernel']}, Envoy {meta['machine']['envoy']}. 1-minute load average before and
after each setup: {load or '-'}.

| phase | duration | rate |
|---|---|---|
{chr(10).join(rows)}

Reader keys: {scn['keys_text']}. {meta['keys']['prefill']:,} sessions written before t = 0.
{gen} Dispatch-lag p99: {lag or '-'}.

{table(results, markdown=True)}

{shed}
What happened, per setup:

{chr(10).join('- ' + f for f in findings(results))}

{f'![per-second success by class, store answers and memory, one row per setup]({png})' if png else ''}
"""


def earlier_markdown(data: dict) -> str:
    if not data["earlier"]:
        return ("No earlier runs are recorded yet: when a full run replaces one, the replaced "
                "run's rows move here.")
    lines = ["Runs replaced by a later one, quoted from `docs/results/replay.json` (newest "
             "first). Each cell: OOM kills, writes ok, logged-in reads ok, store answers in "
             "the surge as a share of capacity; for sessionguard also the share of its 503s "
             "that were critical.", "",
             "| scenario | run | " + " | ".join(SETUPS) + " |",
             "|---|---|" + "---|" * len(SETUPS)]
    for e in data["earlier"]:
        rows = {r["setup"]: r for r in e["rows"]}
        cells = []
        for s in SETUPS:
            r = rows.get(s)
            if r is None:
                cells.append("-")
                continue
            c = (f"{r['oom_kills']}, {fmt_pct(r['writer_success_pct'])}, "
                 f"{fmt_pct(r['user_read_success_pct'])}, "
                 f"{r['surge']['store_share_of_capacity_pct']:.0f}%")
            if r.get("filter_shed"):
                c += f", {fmt_pct(r['filter_shed']['critical_share_pct'])} critical"
            cells.append(c)
        lines.append(f"| {SCENARIOS[e['scenario']]['label']} | {fmt_run(e['meta'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(data: dict, path: Path = DOC) -> None:
    sections = []
    for name, entry in data["scenarios"].items():
        png = f"img/replay-{name}.png" if (ROOT / "docs/img" / f"replay-{name}.png").exists() else None
        sections.append(scenario_markdown(name, entry, png))
    text = f"""# The incident and larger surges, replayed: sessionguard against native Envoy

<!-- Generated by scripts/replay.py from docs/results/replay.json; do not edit by hand.
     `.venv/bin/python scripts/replay.py --docs-only` regenerates it. -->

Every number below comes from a run recorded in
[docs/results/replay.json](results/replay.json), with the command, date, commit and machine of
that run. `make demo` runs the incident and the 3x surge (`scripts/replay.py --scenario
incident,surge3`); `make replay-surge` runs the 5x surge (`--scenario surge5`). A full run of
all six setups replaces the scenario's entry in the results file (the old one moves to
*Earlier runs*) and regenerates this page, the plots and the README's table.

On 2020-06-11 sessionstore's request rate rose from ~15k/s to ~20k/s (x1.33), the Kask pods ran
out of memory, were OOM-killed, restarted and were killed again (CrashLoopBackOff), and every
logged-in edit failed for 44 minutes; ~85% of what the store answered were 404s to readers.
Here that shape, and larger surges whose reader lookups no cache can absorb, are replayed at
laboratory scale against each setup in turn, each with a fresh store process under
`kask-sim supervise` (restarts like Kubernetes, counts OOM kills). The mix is always
sessionload's incident mix: 85% reader GETs of never-written keys, 10% reads of logged-in
sessions, 4% writes (POST), 1% logouts (DELETE); Poisson arrivals, a 3 s client timeout like
MediaWiki's.

{chr(10).join(sections) if sections else 'No full run is recorded yet: run `make demo`.'}
## Earlier runs

{earlier_markdown(data)}

## How to read the tables and plots

- *store answers/s while the surge holds*: key requests the store answered (Kask's
  `http_requests_total`, 404s included, summed across restarts) during the phase named
  `surge`, per second, and as a share of the store's capacity ({CAPACITY:,.0f}/s of the model).
  An unprotected store that is killed answers nothing while it restarts; a protection that
  sheds too much leaves it idle. Where a negative cache answers repeated lookups (the incident's
  Zipf keys, sessionguard), the store needs to answer less for the same success: the findings
  below give the correct answers clients got per second beside it.
- *writes ok* / *logged-in reads ok* / *reader lookups ok*: share of that class answered
  correctly (201; 200 with the right bytes or a correct 404; 404), of all sent in the run.
- *answers correct*: of the answers that were not 503s, errors or timeouts, the share that was
  right (a stale 404 for a session that exists, a wrong body, a phantom 200 are wrong).
- *p50 / p99*: latency of successful requests, measured from the scheduled send time.
- *peak store RSS / limit*: the store's `process_resident_memory_bytes`, sampled every
  {SAMPLE_EVERY_S * 1000:.0f} ms, over its limit; "(killed)": it was OOM-killed (the sample
  just before a kill can be below the limit).
- *503s sent*: all 503s the clients got (from any protection), and in brackets the share that
  went to writes, logged-in reads and logouts: the requests sessionguard calls critical
  (a read of a live session is critical once the filter has seen the session exist).
- *503s: p50 ms*: median latency of the 503s, from the scheduled send time (a fast "no" is the
  point of shedding; a slow one means the proxy itself, or the generator, was the bottleneck).
- *offered while the surge holds*: what the load generator dispatched per second during the
  surge, of what it was asked, and the share of all requests that then found none of its
  connections free before their deadline (they never reached the proxy); "(behind)" when it
  dispatched less than {SUSTAINED_SHARE:.0%}, its dispatch-lag p99 exceeded
  {SUSTAINED_LAG_MS:.0f} ms, or more than {SUSTAINED_NO_CONNECTION:.0%} found no connection
  (then that setup saw less load, or later, than the scenario says). Connections free up as
  answers come back, so a proxy that answers slowly (CPU-starved, or queueing at the store) runs
  the generator out of them.
- *reached store*: requests Envoy sent to the store (cluster `upstream_rq_total`; for
  sessionguard this includes its own `/metrics` polls, one a second), and in brackets those the
  store answered (requests whose client had gone are dropped unanswered, as Go cancels their
  context).
- Plots, one row per setup: left, per-second success of writes, logged-in reads and reader
  lookups (% of that second's requests of the class) and the store's resident memory (right
  axis; dashed: the pod limit; shaded red: store down; red ticks: OOM kills); right, per
  second: requests offered, correct answers, what the store answered (dashed: its
  capacity), and 503s to writes, logged-in reads and logouts. Grey: the surge.

## Setups

All six are `envoy/sidecar.yaml` (2 workers, route timeout 2.5 s, no retries) with one filter
or setting changed (`tests/baselines.py`, `scripts/replay.py`):
- (a) **bare**: only the router; the cluster's circuit breakers raised out of the way (100,000),
  as the shipped sidecar sets them for sessionguard.
- (b) **stock-envoy**: only the router, and no `circuit_breakers` on the store cluster: Envoy's
  defaults (1024 connections, pending requests and requests; 3 retries). What a sidecar without
  sessionguard gets unless someone tunes it.
- (c) **circuit-breaker**: `max_requests` = `max_pending_requests` = {CB_MAX_REQUESTS} on the store
  cluster: at capacity that is ~35 ms of queue, enough to keep the store's {BACKEND_PARALLELISM}
  workers busy through Poisson bursts and far below the ~1,700 requests in flight that kill it.
  The best static value for this store; it needs re-tuning whenever capacity changes.
- (d) **adaptive-concurrency**: Envoy's gradient controller, documented defaults, 100 ms updates.
- (e) **admission-control**: Envoy's SRE throttling, 10 s window, aggression 1.5, success =
  status < 500 (so 404 is a success).
- (f) **sessionguard**: its defaults (adaptive concurrency limit, admission control, negative
  cache, priorities) plus memory shedding: `{json.dumps(sessionguard_plugin(MEMORY_LIMIT))}`.
  Memory shedding is off by default because only the operator knows the pod's limit; the
  filter polls the store's own `/metrics` (1 s by default) and decides on resident memory less
  what Go holds resident but free (`heap_idle − heap_released`), RSS acting as the ceiling
  near the limit (docs/memory.md).

## Calibration

The machine has 2 cores shared by Envoy, the store and the load generator (and, here, by
other work: the load average is recorded per setup), so the store is made small and the load
scaled to it, keeping the incident's ratios. These are the script's settings, not measurements:
- kask-sim `--backend-parallelism {BACKEND_PARALLELISM} --service-time-ms {SERVICE_TIME_MS}`
  (exponential): capacity {CAPACITY:,.0f} key requests/s of the model (the store shares the cores
  with Envoy and the load generator, and durable writes hold a worker longer, so it serves
  somewhat less). Loads are multiples of that.
- `--memory-limit {MEMORY_LIMIT // MiB}Mi --per-request-bytes {PER_REQUEST}`: ~36 KB resident
  per in-flight request (Kask's measured figure), so the pod dies at ~1,700 in flight, a backlog
  an unprotected store reaches within seconds of a surge. `--release-delay-secs
  {RELEASE_DELAY_SECS}`: freed request memory stays resident for the rest of the run, as Go's
  heap does.
- `kask-sim supervise --backoff-initial-ms {BACKOFF_INITIAL_MS} --backoff-max-ms {BACKOFF_MAX_MS}`:
  CrashLoopBackOff scaled to the run.
- Envoy's route timeout (2.5 s) resets requests that waited too long; kask-sim then drops them
  from its backlog, as Kask does when a client goes away (`kasksim_abandoned_total`).
- Connections: the generator opens at most 8,000 (incident) or 12,000 (surges) keep-alive
  connections (the open-file limit here is 20,000 and Envoy holds one per downstream and per
  upstream connection); beyond that requests wait for a connection, and the wait counts in
  their latency and toward their 3 s timeout.
- The surge multiple the generator can offer: *offered* in each table is measured (requests
  sent during the surge per second, of those asked); a surge the generator could not offer is
  marked "(behind)". Where a scenario's multiple is not what ran, its run says so (`--multiple`).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

def plot(name: str, entry: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (tests/requirements.txt); no plot", file=sys.stderr)
        return False
    meta, results = entry["meta"], entry["results"]
    s_from, s_to = surge_window(meta["phases"])
    total = sum(p["duration_s"] for p in meta["phases"])
    fig, axes = plt.subplots(len(results), 2, figsize=(15, 2.5 * len(results) + 0.6),
                             sharex=True, squeeze=False,
                             gridspec_kw={"width_ratios": [1.25, 1]})
    colors = {"write": "tab:blue", "user_get": "tab:green", "reader_miss": "tab:orange"}
    labels = {"write": "writes", "user_get": "logged-in reads", "reader_miss": "reader lookups"}
    for (ax, rate_ax), r in zip(axes, results):
        secs = r["seconds"]
        for a in (ax, rate_ax):
            a.axvspan(s_from, s_to, color="0.92", zorder=0)
            a.set_xlim(-1, total + 1)
        for cls in ("reader_miss", "user_get", "write"):
            xs, ys = [], []
            for sec in secs:
                c = sec["c"].get(cls)
                if c and c[0]:
                    xs.append(sec["t"] + 0.5)
                    ys.append(100.0 * c[1] / c[0])
            ax.plot(xs, ys, color=colors[cls], lw=1.3, label=labels[cls])
        ax.set_ylim(-3, 103)
        ax.set_ylabel("success %")
        ax.set_title(f"{r['title']}: {r['oom_kills']} OOM kills, writes "
                     f"{fmt_pct(r['writer_success_pct'])}, logged-in reads "
                     f"{fmt_pct(r['user_read_success_pct'])}", fontsize=9.5, loc="left")
        mem = ax.twinx()
        xs = [sec["t"] + 0.5 for sec in secs]
        mem.plot(xs, [float("nan") if sec["rss_mib"] is None else sec["rss_mib"] for sec in secs],
                 color="0.25", lw=1.0)
        for sec in secs:
            if sec["down"]:
                mem.axvspan(sec["t"], sec["t"] + 1, color="tab:red", alpha=0.12, lw=0)
        limit = r["limit_bytes"] / MiB
        mem.axhline(limit, color="tab:red", ls="--", lw=1)
        for t in r["kills_t"]:
            mem.axvline(t, color="tab:red", lw=1.2, ymin=0.85)
        mem.set_ylim(0, limit * 1.12)
        mem.set_ylabel("store RSS MiB")

        rate_ax.plot(xs, [sum(c[0] for c in sec["c"].values()) for sec in secs], color="0.6",
                     lw=1.0, label="offered")
        rate_ax.plot(xs, [sum(c[1] for c in sec["c"].values()) for sec in secs],
                     color="tab:green", lw=1.2, label="correct answers")
        rate_ax.plot(xs, [sec["store"] for sec in secs], color="black", lw=1.2,
                     label="store answered")
        rate_ax.plot(xs, [sum(sec["c"].get(c, [0, 0, 0, 0])[2] for c in USER_CLASSES)
                          for sec in secs], color="tab:red", lw=1.2,
                     label="503s to writes, logged-in reads, logouts")
        rate_ax.axhline(CAPACITY, color="black", ls="--", lw=0.8)
        rate_ax.set_ylabel("req/s")
        s = r["surge"]
        rate_ax.set_title(f"surge: store answered {s['store_share_of_capacity_pct']:.0f}% of "
                          f"capacity; {r['shed_503']:,} 503s, "
                          f"{fmt_pct(r['shed_503_user_share_pct'])} to logged-in users",
                          fontsize=9.5, loc="left")
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="0.25", lw=1), plt.Line2D([], [], color="tab:red", ls="--")]
    names += ["store RSS (right axis)", "pod memory limit"]
    h2, n2 = axes[0, 1].get_legend_handles_labels()
    h2 += [plt.Line2D([], [], color="black", ls="--", lw=0.8)]
    n2 += ["store capacity"]
    for a in axes[-1]:
        a.set_xlabel("seconds (grey: surge)")
    fig.suptitle(f"{SCENARIOS[name]['title']}: {meta['date']}, commit {meta['commit']}",
                 fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.045, 1, 0.985))
    fig.legend(handles + h2, names + n2, loc="lower center", ncol=5, frameon=False, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_docs(data: dict) -> None:
    """docs/img/replay-<scenario>.png, docs/replay.md and the README section, all from the
    results file's data."""
    for name, entry in data["scenarios"].items():
        plot(name, entry, ROOT / "docs/img" / f"replay-{name}.png")
    write_markdown(data)
    update_readme(data)


# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="incident",
                    help=f"comma-separated, run in order: {', '.join(SCENARIOS)} "
                         f"(default incident; make demo: {','.join(DEMO)})")
    ap.add_argument("--quick", action="store_true", help="a few seconds per setup (for tests)")
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"comma-separated subset of {','.join(SETUPS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default out/replay, or out/replay-quick)")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="record the run in docs/results/replay.json and regenerate docs/replay.md, "
                         "the plots and the README section (default: full runs of all setups)")
    ap.add_argument("--docs-only", action="store_true",
                    help="regenerate docs/replay.md, the plots and the README section from "
                         "docs/results/replay.json, without running anything")
    ap.add_argument("--multiple", type=float, default=None,
                    help="surge load in multiples of capacity (default: the scenario's)")
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help="multiply every load (keep 1 unless the store's capacity is changed)")
    ap.add_argument("--label", default=None,
                    help="a note recorded with the run (e.g. 'before the priority work')")
    ap.add_argument("--wasm", type=Path, default=harness.WASM,
                    help="sessionguard build to run (default: the release build)")
    args = ap.parse_args(argv)

    if args.docs_only:
        data = load_results_file()
        write_docs(data)
        for name, entry in data["scenarios"].items():
            print(f"{name}: {fmt_run(entry['meta'])}")
            print(table(entry["results"], markdown=False), end="\n\n")
        print("wrote docs/replay.md, docs/img/replay-*.png and the README's replay section")
        return 0

    names = [s.strip() for s in args.scenario.split(",") if s.strip()]
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"--scenario: unknown {n!r}; one of {', '.join(SCENARIOS)}")
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in SETUPS:
            ap.error(f"--setups: unknown setup {s!r}; one of {', '.join(SETUPS)}")
    standard = setups == SETUPS and args.rate_scale == 1.0 and not args.quick
    docs = standard if args.docs is None else args.docs
    if docs and not standard:
        ap.error("--docs records only full runs of all six setups at --rate-scale 1")
    out = args.out or ROOT / ("out/replay-quick" if args.quick else "out/replay")
    for p in (harness.KASK_SIM, harness.SESSIONLOAD, harness.ENVOY) + (
            (args.wasm,) if "sessionguard" in setups else ()):
        if not p.exists():
            print(f"missing {p}: run `make build` first", file=sys.stderr)
            return 2
    keys = QUICK_KEYS if args.quick else FULL_KEYS
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = os.environ.get("SG_REPLAY_COMMAND") or \
        f".venv/bin/python scripts/replay.py {argv_text}".strip()
    prov = provenance(args.wasm)
    data = load_results_file() if docs else None
    began_all = time.monotonic()
    for name in names:
        phases = plan(name, args.quick, args.multiple, args.rate_scale)
        s_from, s_to = surge_window(phases)
        per_setup = sum(p["duration_s"] for p in phases)
        surge_rate = next(p["rate_to"] for p in phases if p["name"] == "surge")
        print(f"{SCENARIOS[name]['title']} (--scenario {name}): {len(setups)} setups x "
              f"{per_setup} s of load ({' -> '.join(str(p['rate_to']) + '/s' for p in phases)}; "
              f"surge {surge_rate}/s for {s_to - s_from:.0f} s), store capacity "
              f"~{CAPACITY:.0f}/s, memory limit {MEMORY_LIMIT // MiB} MiB. "
              f"Results in {out / name}", flush=True)
        began = time.monotonic()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results = []
        for i, setup in enumerate(setups, 1):
            print(f"[{i}/{len(setups)}] {TITLES[setup]}", flush=True)
            r = run_setup(setup, name, phases, keys, out / name, MEMORY_LIMIT,
                          log=lambda line: print(line, flush=True), wasm=args.wasm)
            results.append(r)
            print(f"  -> OOM kills {r['oom_kills']}, writes {fmt_pct(r['writer_success_pct'])}, "
                  f"logged-in reads {fmt_pct(r['user_read_success_pct'])}, store answered "
                  f"{r['surge']['store_share_of_capacity_pct']:.0f}% of capacity in the surge, "
                  f"peak RSS {fmt_rss(r)} of the limit", flush=True)
        meta = {
            "scenario": name,
            "title": SCENARIOS[name]["title"],
            "label": args.label,
            "command": command,
            "date": date,
            **prov,
            "nice": os.nice(0),
            "machine": machine(),
            "quick": args.quick,
            "multiple": SCENARIOS[name]["multiple"] if args.multiple is None else args.multiple,
            "phases": phases,
            "reader_keys": {"space": SCENARIOS[name]["reader_space"],
                            "zipf_s": SCENARIOS[name]["zipf_s"]},
            "keys": keys,
            "connections": SCENARIOS[name]["connections"],
            "capacity": CAPACITY,
            "limit": MEMORY_LIMIT,
            "kask_flags": {"backend_parallelism": BACKEND_PARALLELISM,
                           "service_time_ms": SERVICE_TIME_MS, "per_request_bytes": PER_REQUEST,
                           "release_delay_secs": RELEASE_DELAY_SECS},
            "wall_minutes": round((time.monotonic() - began) / 60, 2),
        }
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "results.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1))
        print()
        print(table(results, markdown=False))
        for r in results:
            if r.get("filter_shed"):
                fs = r["filter_shed"]
                print(f"{r['setup']} shed {fs['critical']:,} critical and {fs['sheddable']:,} "
                      f"sheddable requests ({fmt_pct(fs['critical_share_pct'])} of its 503s "
                      f"critical): " + ", ".join(f"{k} {v['critical']}/{v['sheddable']}"
                                                 for k, v in sorted(fs["by_reason"].items())))
        print(f"\n({name}: {out / name / 'results.json'}; {meta['wall_minutes']:.1f} minutes)\n",
              flush=True)
        plot(name, {"meta": meta, "results": results}, out / name / f"replay-{name}.png")
        if docs:
            record_run(data, name, meta, results)
            write_results_file(data)
            print(f"recorded in {RESULTS_FILE.relative_to(ROOT)}", flush=True)
    if docs:
        write_docs(data)
        print("wrote docs/replay.md, docs/img/replay-*.png and the README's replay section")
    print(f"total {(time.monotonic() - began_all) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
