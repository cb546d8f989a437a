#!/usr/bin/env python3
"""The 2020-06-11 sessionstore incident, replayed side by side (issue 7).

One open-loop load (sessionload, the incident's mix: ~85% reader 404s, logged-in session reads,
a steady stream of writes and logouts) rises from 0.75x the store's capacity by x1.33 (as
15k -> 20k req/s in 2020; that is the model's full capacity, more than the store actually
serves on a 2-core machine shared with Envoy and the load generator), holds, and falls back.
It is replayed against the same store emulator (kask-sim with a memory limit, restarted like
Kubernetes' CrashLoopBackOff by `kask-sim supervise`) behind five Envoy front ends that
differ in one filter only:

  bare                  no protection (what sessionstore had in 2020)
  circuit-breaker       Envoy's static circuit breaker, max_requests tuned to the capacity
  adaptive-concurrency  Envoy's gradient controller
  admission-control     Envoy's admission control (SRE throttling, 404 = success)
  sessionguard          this filter: defaults + memory shedding with the pod's limit

For each it reports store OOM kills, writer and logged-in reader success, correctness,
latency, peak store memory against the limit and requests that reached the store; prints a
table, writes results.json, and (full run) docs/replay.md and docs/img/replay.png.

    .venv/bin/python scripts/replay.py            # the full replay, ~8 minutes
    .venv/bin/python scripts/replay.py --quick    # a few seconds per setup (tests)
    .venv/bin/python scripts/replay.py --plot-only out/replay/results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import baselines  # noqa: E402
import harness  # noqa: E402

MiB = 1 << 20

# ------------------------------------------------------------------------------------------
# Calibration (see docs/replay.md "Calibration"): this machine has 2 cores shared by Envoy,
# kask-sim and the load generator, so the store is made small and the load scaled to it.
# ------------------------------------------------------------------------------------------

#: The store's backend: 4 workers x 2.2 ms (exponential) = 1,818 key requests/s.
BACKEND_PARALLELISM = 4
SERVICE_TIME_MS = 2.2
CAPACITY = BACKEND_PARALLELISM * 1000 / SERVICE_TIME_MS
#: The pod's memory limit. kask-sim holds ~36 KB per in-flight request (Kask's figure), so
#: 64 MiB is ~1,700 requests in flight: the surge's backlog reaches that in seconds.
MEMORY_LIMIT = 64 * MiB
PER_REQUEST = "20Ki"
#: How long freed request memory stays resident (Go's lazy scavenging); longer than the run.
RELEASE_DELAY_SECS = 120
#: Steady load 0.75x capacity; the surge is 1.33x steady (as 15k -> 20k req/s in 2020).
STEADY_RATE = round(0.75 * CAPACITY)
SURGE_RATE = round(STEADY_RATE * 4 / 3)
#: Envoy's static circuit breaker for (b): in flight enough to keep the 4 workers busy
#: through Poisson bursts (~35 ms of queue at capacity), far below what hurts memory.
CB_MAX_REQUESTS = 64
#: CrashLoopBackOff, scaled from Kubernetes' 10 s..5 min to this run's length.
BACKOFF_INITIAL_MS = 1000
BACKOFF_MAX_MS = 8000
#: How often the store's /metrics is sampled for the plots and the peak.
SAMPLE_EVERY_S = 0.25

#: Sessions written before t = 0 go at PREFILL_RATE: durable writes (fsync, group commit) hold
#: a backend worker longer than reads, so a fast prefill would itself overload the small store.
FULL = {"steady": 20, "ramp": 5, "surge": 40, "after": 20, "prefill": 2000, "sessions": 20000}
QUICK = {"steady": 2, "ramp": 1, "surge": 3, "after": 2, "prefill": 200, "sessions": 2000}
PREFILL_RATE = 500

SETUPS = ["bare", "circuit-breaker", "adaptive-concurrency", "admission-control", "sessionguard"]
TITLES = {
    "bare": "(a) Envoy, no protection",
    "circuit-breaker": f"(b) Envoy circuit breaker (max_requests {CB_MAX_REQUESTS})",
    "adaptive-concurrency": "(c) Envoy adaptive_concurrency",
    "admission-control": "(d) Envoy admission_control",
    "sessionguard": "(e) sessionguard (defaults + memory limit)",
}
CLASSES = ["reader_miss", "user_get", "write", "delete"]


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
    if setup == "circuit-breaker":
        return baselines.circuit_breaker(cfg, CB_MAX_REQUESTS)
    if setup == "adaptive-concurrency":
        return baselines.adaptive_concurrency(cfg)
    if setup == "admission-control":
        return baselines.admission_control(cfg)
    raise ValueError(f"unknown setup {setup!r}; one of {', '.join(SETUPS)}")


def scenario_toml(shape: dict, steady: int, surge: int) -> str:
    """The incident scenario (tools/sessionload/scenarios/incident.toml), durations scaled."""
    return f"""name = "incident-replay"
description = "steady {steady}/s, ramp to {surge}/s, hold, back to steady"
seed = 20200611
connections = 8000
timeout_ms = 3000
connect_timeout_ms = 1200
arrival = "poisson"

[mix]
reader_miss = 0.85
user_get    = 0.10
write       = 0.04
delete      = 0.01

[keys]
reader_space = 1000000
zipf_s = 1.0
session_pool = {shape["sessions"]}
prefill = {shape["prefill"]}
prefill_rate = {PREFILL_RATE}

[[phases]]
name = "steady"
duration_s = {shape["steady"]}
rate = {steady}

[[phases]]
name = "surge-ramp"
duration_s = {shape["ramp"]}
rate_from = {steady}
rate_to = {surge}

[[phases]]
name = "surge"
duration_s = {shape["surge"]}
rate = {surge}

[[phases]]
name = "after"
duration_s = {shape["after"]}
rate = {steady}
"""


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


# ------------------------------------------------------------------------------------------
# One setup
# ------------------------------------------------------------------------------------------

def run_setup(setup: str, shape: dict, out: Path, limit: int, steady: int, surge: int,
              log=print, wasm: Path = harness.WASM) -> dict:
    workdir = out / setup
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("kask-events.jsonl", "kask-port", "summary.json", "timeseries.json"):
        (workdir / stale).unlink(missing_ok=True)
    scenario = workdir / "scenario.toml"
    scenario.write_text(scenario_toml(shape, steady, surge))
    flags = ["--memory-limit", str(limit), "--per-request-bytes", PER_REQUEST,
             "--backend-parallelism", str(BACKEND_PARALLELISM),
             "--service-time-ms", str(SERVICE_TIME_MS),
             "--release-delay-secs", str(RELEASE_DELAY_SECS)]
    kask = SupervisedKask(workdir, flags).start()
    envoy = None
    sampler = MemorySampler(kask.port)
    sampler.start()
    load_stderr = workdir / "sessionload.log"
    try:
        envoy = harness.Envoy(workdir, envoy_config(setup, kask.port, limit, wasm),
                              concurrency=2).start()
        if setup == "sessionguard":
            sampler.envoy = envoy
        planned = shape["steady"] + shape["ramp"] + shape["surge"] + shape["after"]
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
    result = summarize(setup, summary, series, samples, kask.events(), cluster, filter_stats,
                       limit)
    t0 = series["t0_unix_ms"] / 1000.0
    result["filter_timeline"] = [
        {"t": round(f["t"] - t0, 2), **{k: f.get(k) for k in (
            "limit", "in_flight", "memory.ratio_permille", "admission.rejection_permille",
            "shed.concurrency.critical", "shed.concurrency.sheddable", "shed.memory.critical",
            "shed.memory.sheddable", "shed.admission.critical", "shed.admission.sheddable",
            "negcache.hits")}} for f in filter_samples]
    return result


def pct(num: float, den: float) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def summarize(setup, summary, series, samples, events, cluster, filter_stats, limit) -> dict:
    classes = summary["classes"]
    overall = summary["overall"]
    incorrect = summary["correctness"]["incorrect"]
    # Answers a client could act on (not 503s, errors or timeouts): how many were right?
    answered = overall["ok"] + incorrect
    rss = [s["rss"] for s in samples if s.get("rss") is not None]
    t0 = series["t0_unix_ms"] / 1000.0
    kills = [e for e in events if e.get("event") == "exit" and e.get("oom")]
    down = sum(1 for s in samples if s.get("down") and t0 <= s["t"]) * SAMPLE_EVERY_S
    return {
        "setup": setup,
        "title": TITLES[setup],
        "oom_kills": len(kills),
        "restarts": sum(1 for e in events if e.get("event") == "start") - 1,
        "store_down_s": round(down, 1),
        "sent": overall["sent"],
        "writer_success_pct": pct(classes["write"]["ok"], classes["write"]["sent"]),
        "user_read_success_pct": pct(classes["user_get"]["ok"], classes["user_get"]["sent"]),
        "reader_miss_success_pct": pct(classes["reader_miss"]["ok"],
                                       classes["reader_miss"]["sent"]),
        "logout_success_pct": pct(classes["delete"]["ok"], classes["delete"]["sent"]),
        "overall_success_pct": pct(overall["ok"], overall["sent"]),
        "correct_pct": pct(overall["ok"], answered),
        "incorrect": summary["correctness"],
        "shed_503": overall["shed_503"],
        "errors": overall["errors"],
        "p50_ms": overall["latency_ms"]["p50"],
        "p99_ms": overall["latency_ms"]["p99"],
        "peak_rss_bytes": max(rss) if rss else None,
        "limit_bytes": limit,
        "store_answered": store_requests(samples),
        "store_abandoned": abandoned(samples),
        "envoy_upstream_rq": cluster.get("upstream_rq_total"),
        "envoy_cluster": {k: v for k, v in cluster.items() if k.startswith(
            ("upstream_rq_", "upstream_cx_connect_fail", "upstream_cx_overflow"))
            and not k.startswith("upstream_rq_per_")},
        "filter": filter_stats,
        "behind_schedule": summary["schedule"]["behind_schedule"],
        "schedule": {k: summary["schedule"][k] for k in ("late", "p99_lag_ms", "max_lag_ms")},
        "phases": summary["phases"],
        "timeseries": [{
            "t": sec["t"], "phase": sec["phase"], "sent": sec["sent"], "ok": sec["ok"],
            "shed": sec["shed"], "error": sec["error"], "incorrect": sec["incorrect"],
            "classes": {c: {"sent": v["sent"], "ok": v["ok"]} for c, v in sec["classes"].items()},
        } for sec in series["seconds"]],
        "memory": [{
            "t": round(s["t"] - t0, 3),
            **({"down": True} if s.get("down") else {
                "rss": s.get("rss"), "inuse": (s.get("heap") or 0) + (s.get("stack") or 0),
                "inflight": s.get("inflight"), "queue": s.get("queue")}),
        } for s in samples],
        "kills_t": [round(e["t"] / 1000.0 - t0, 2) for e in kills],
    }


# ------------------------------------------------------------------------------------------
# Output: table, markdown, plots
# ------------------------------------------------------------------------------------------

COLUMNS = [
    ("setup", "setup", lambda r: r["setup"]),
    ("oom", "store OOM kills", lambda r: str(r["oom_kills"])),
    ("write", "writers ok", lambda r: fmt_pct(r["writer_success_pct"])),
    ("uget", "logged-in reads ok", lambda r: fmt_pct(r["user_read_success_pct"])),
    ("miss", "reader 404s ok", lambda r: fmt_pct(r["reader_miss_success_pct"])),
    ("correct", "answers correct", lambda r: fmt_pct(r["correct_pct"])),
    ("p50", "p50 ms", lambda r: fmt_ms(r["p50_ms"])),
    ("p99", "p99 ms", lambda r: fmt_ms(r["p99_ms"])),
    ("rss", "peak store RSS / limit", lambda r: fmt_rss(r)),
    ("store", "reached store (answered)", lambda r: fmt_store(r)),
]


def fmt_pct(v):
    return "-" if v is None else f"{v:.1f}%"


def fmt_ms(v):
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def fmt_rss(r):
    if r["peak_rss_bytes"] is None:
        return "-"
    s = f"{r['peak_rss_bytes'] / MiB:.0f} / {r['limit_bytes'] / MiB:.0f} MiB"
    return s + " (killed)" if r["oom_kills"] else s


def fmt_store(r):
    up = r["envoy_upstream_rq"]
    return f"{up if up is not None else '-'} ({r['store_answered']})"


def table(results: list[dict], markdown: bool) -> str:
    heads = [h for _, h, _ in COLUMNS]
    rows = [[f(r) for _, _, f in COLUMNS] for r in results]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*heads), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row) for row in rows)])


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


def findings(results: list[dict]) -> list[str]:
    """Plain statements from the numbers, so the text stays true when the run is repeated."""
    out = []
    for r in results:
        bits = [f"**{r['setup']}**:"]
        if r["oom_kills"]:
            bits.append(f"the store was OOM-killed {r['oom_kills']} time(s) and was down or "
                        f"restarting for ~{r['store_down_s']:.0f} s;")
        else:
            peak = r["peak_rss_bytes"] or 0
            bits.append(f"the store was never killed (peak RSS {100 * peak / r['limit_bytes']:.0f}% "
                        "of its limit);")
        bits.append(f"{fmt_pct(r['writer_success_pct'])} of writes (logins, session updates) and "
                    f"{fmt_pct(r['user_read_success_pct'])} of logged-in reads succeeded;")
        bits.append(f"{r['shed_503']} requests got a 503, {r['errors']['total']} an error or "
                    f"timeout; the store was sent {fmt_store(r).split(' ')[0]} requests.")
        out.append(" ".join(bits))
    return out


def write_markdown(path: Path, meta: dict, results: list[dict], png: str | None) -> None:
    m = meta["machine"]
    shape = meta["shape"]
    envoy = next((w for w in m["envoy"].replace("/", " ").split()
                  if w.count(".") == 2 and w.replace(".", "").isdigit()), m["envoy"])
    text = f"""# The incident, replayed: sessionguard against native Envoy

Generated by `{meta['command']}` on {meta['date']} (machine: {m['nproc']} cores, {m['cpu']},
Linux {m['kernel']}, Envoy {envoy}). Raw numbers: `out/replay/results.json`.
Re-run with `make demo` (build + this replay, ~{meta['wall_minutes']:.0f} minutes here).

On 2020-06-11 sessionstore's request rate rose from ~15k/s to ~20k/s (x1.33), the Kask pods ran
out of memory, were OOM-killed, restarted and were killed again (CrashLoopBackOff), and every
logged-in edit failed for 44 minutes; ~85% of what the store answered were 404s to readers.
Here the same shape is replayed at laboratory scale against each setup in turn, each with a
fresh store process under `kask-sim supervise` (restarts like Kubernetes, counts OOM kills):

| phase | duration | rate |
|---|---|---|
| steady | {shape['steady']} s | {meta['steady_rate']} req/s (0.75x capacity) |
| ramp | {shape['ramp']} s | to {meta['surge_rate']} req/s |
| surge | {shape['surge']} s | {meta['surge_rate']} req/s (x{meta['surge_rate'] / meta['steady_rate']:.2f} steady, {meta['surge_rate'] / meta['capacity']:.2f}x capacity) |
| after | {shape['after']} s | {meta['steady_rate']} req/s |

Mix (sessionload's incident mix, Poisson arrivals, 3 s client timeout like MediaWiki's):
85% reader GETs of never-written keys (Zipf over 10^6 keys: popular ones repeat), 10% reads of
logged-in sessions, 4% writes (POST), 1% logouts (DELETE); {shape['prefill']} sessions written
before t = 0.

## Results

{table(results, markdown=True)}

- *writers ok* / *logged-in reads ok* / *reader 404s ok*: share of that class answered
  correctly (201; 200 with the right bytes or a correct 404; 404), of all sent.
- *answers correct*: of the answers that were not 503s, errors or timeouts, the share that was
  right (a stale 404 for a session that exists, a wrong body, a phantom 200 are wrong).
- *p50 / p99*: latency of successful requests, measured from the scheduled send time.
- *peak store RSS*: the store's `process_resident_memory_bytes`, sampled every
  {SAMPLE_EVERY_S * 1000:.0f} ms; "(killed)": it crossed the limit and was OOM-killed (the
  sample just before a kill can be below the limit).
- *reached store*: requests Envoy sent to the store (cluster `upstream_rq_total`; for
  sessionguard this includes its own `/metrics` polls, one a second), and in brackets those the
  store answered (Kask's `http_requests_total`, summed across restarts; requests whose client
  had gone are dropped unanswered, as Go cancels their context).

What happened, per setup:

{chr(10).join('- ' + f for f in findings(results))}

{f'![per-second success by class and store memory, one panel per setup]({png})' if png else ''}

Each panel: per-second success of writes, logged-in reads and reader 404s (left axis, % of
that second's requests of the class), the store's resident memory (right axis, MiB; the dashed
line is the pod limit, shaded where the store was down), red ticks at OOM kills, the surge
shaded grey.

## Setups

All five are `envoy/sidecar.yaml` (2 workers, route timeout 2.5 s, no retries) with one filter
changed (`tests/baselines.py`, `scripts/replay.py`):
- (a) **bare**: only the router; the cluster's circuit breakers raised out of the way (100,000).
- (b) **circuit-breaker**: `max_requests` = `max_pending_requests` = {CB_MAX_REQUESTS} on the store
  cluster: at capacity ({meta['capacity']:.0f}/s) that is ~35 ms of queue, enough to keep the
  store's {BACKEND_PARALLELISM} workers busy through Poisson bursts and far below the ~1,700 requests
  in flight that kill it. The best static value for this store; it needs re-tuning whenever
  capacity changes.
- (c) **adaptive-concurrency**: Envoy's gradient controller, documented defaults, 100 ms updates.
- (d) **admission-control**: Envoy's SRE throttling, 10 s window, aggression 1.5, success =
  status < 500 (so 404 is a success).
- (e) **sessionguard**: its defaults (adaptive concurrency limit, admission control, negative
  cache, priorities) plus memory shedding: `{json.dumps(sessionguard_plugin(meta['limit']))}`.
  Memory shedding is off by default because only the operator knows the pod's limit; the
  filter polls the store's own `/metrics` (1 s by default) and decides on resident memory less
  what Go holds resident but free (`heap_idle − heap_released`), RSS acting as the ceiling
  near the limit (docs/memory.md).

## Calibration

This machine has {m['nproc']} cores, shared by Envoy, the store and the load generator, so the store is
made small and the load scaled to it, keeping the incident's ratios:
- kask-sim `--backend-parallelism {BACKEND_PARALLELISM} --service-time-ms {SERVICE_TIME_MS}` (exponential):
  capacity {meta['capacity']:.0f} key requests/s (of the model: the store shares 2 cores with Envoy
  and the load generator, and durable writes hold a worker longer, so it serves somewhat
  less). Steady load {meta['steady_rate']}/s is 0.75x that, the surge
  x{meta['surge_rate'] / meta['steady_rate']:.2f} of steady = {meta['surge_rate']}/s,
  {meta['surge_rate'] / meta['capacity']:.2f}x capacity: arrivals exceed service, so without
  protection the backlog (and with it memory) grows through the surge.
- `--memory-limit {meta['limit'] // MiB}Mi --per-request-bytes {PER_REQUEST}`: ~36 KB resident per
  in-flight request (Kask's measured figure), so the pod dies at ~1,700 in flight, a backlog
  an unprotected store reaches within seconds of surge. `--release-delay-secs {RELEASE_DELAY_SECS}`: freed
  request memory stays resident for the rest of the run, as Go's heap does.
- `kask-sim supervise --backoff-initial-ms {BACKOFF_INITIAL_MS} --backoff-max-ms {BACKOFF_MAX_MS}`:
  CrashLoopBackOff scaled to the run.
- Envoy's route timeout (2.5 s) resets requests that waited too long; kask-sim then drops them
  from its backlog, as Kask does when a client goes away (`kasksim_abandoned_total`).

## Run-to-run variance, and what it shows about priorities

The machine is shared: other jobs build and test on the same 2 cores while this runs. When
they take CPU, latency through Envoy inflates with no queue at the store, the latency-driven
limits (Envoy's adaptive_concurrency, sessionguard's adaptive limit) shrink and shed, and
the static circuit breaker overflows on stalls. So the baselines' numbers move a lot from
run to run, and so does their order; sessionguard's did not (first, never killed). Two
earlier full runs here (2026-11-25):

| run (UTC) | load average | bare | circuit-breaker | adaptive-concurrency | admission-control | sessionguard |
|---|---|---|---|---|---|---|
| 17:27-17:35 | ~7 | 6 kills, writers 52% | 0, 85% | 0, 71% | 2 kills, 12% | 0, 94% |
| 18:09-18:17 | ~5 | 5 kills, 26% | 0, 65% | 0, 70% | 2 kills, 89% | 0, 96% |

(kills, writers ok.) On a quiet machine sessionguard sheds nothing in this scenario (its
negative cache answers ~45% of requests, so the store runs at ~0.5x capacity) and every class
succeeds 100%. When it does shed under CPU contention, it sheds critical requests (writes,
reads of known sessions) almost as often as sheddable ones: in both runs above ~24% of its
503s were critical, about their share of what reached the limiter. The adaptive limit had
shrunk to 20-60 (sample RTT ~4x its baseline), and `sheddable_share` 0.8 caps the *sheddable
requests in flight* at 80% of the limit; behind the negative cache, critical requests were
~27% of the traffic, more than the 20% that cap leaves them, so both classes hit the full
limit together. Reserving the top of the limit for critical traffic instead (sheddable
admitted only while the *total* in flight is below `sheddable_share` x limit) would keep the
shedding on the sheddable class (not changed here: src/limiter.rs).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot(results: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (tests/requirements.txt); no plot", file=sys.stderr)
        return False
    shape = meta["shape"]
    surge_from = shape["steady"]
    surge_to = shape["steady"] + shape["ramp"] + shape["surge"]
    total = surge_to + shape["after"]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results)), sharex=True,
                             squeeze=False)
    colors = {"write": "tab:blue", "user_get": "tab:green", "reader_miss": "tab:orange"}
    labels = {"write": "writes", "user_get": "logged-in reads", "reader_miss": "reader 404s"}
    for ax, r in zip(axes[:, 0], results):
        ax.axvspan(surge_from, surge_to, color="0.92", zorder=0)
        for cls in ("reader_miss", "user_get", "write"):
            xs, ys = [], []
            for sec in r["timeseries"]:
                c = sec["classes"].get(cls, {})
                if c.get("sent"):
                    xs.append(sec["t"] + 0.5)
                    ys.append(100.0 * c["ok"] / c["sent"])
            ax.plot(xs, ys, color=colors[cls], lw=1.4, label=labels[cls])
        ax.set_ylim(-3, 103)
        ax.set_ylabel("success %")
        ax.set_title(f"{r['title']}: {r['oom_kills']} OOM kills, writes {fmt_pct(r['writer_success_pct'])}, "
                     f"logged-in reads {fmt_pct(r['user_read_success_pct'])}", fontsize=10, loc="left")
        mem = ax.twinx()
        # NaN where the store was down, so the line breaks there.
        xs = [s["t"] for s in r["memory"]]
        ys = [float("nan") if s.get("down") or s.get("rss") is None else s["rss"] / MiB
              for s in r["memory"]]
        mem.plot(xs, ys, color="0.25", lw=1.0, label="store RSS")
        for s in r["memory"]:
            if s.get("down"):
                mem.axvspan(s["t"] - SAMPLE_EVERY_S / 2, s["t"] + SAMPLE_EVERY_S / 2,
                            color="tab:red", alpha=0.12, lw=0)
        mem.axhline(r["limit_bytes"] / MiB, color="tab:red", ls="--", lw=1)
        for t in r["kills_t"]:
            mem.axvline(t, color="tab:red", lw=1.2, ymin=0.85)
        mem.set_ylim(0, r["limit_bytes"] / MiB * 1.12)
        mem.set_ylabel("store RSS MiB")
        ax.set_xlim(-1, total + 1)
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="0.25", lw=1), plt.Line2D([], [], color="tab:red", ls="--")]
    names += ["store RSS (right)", "pod memory limit"]
    fig.legend(handles, names, loc="upper center", ncol=5, frameon=False, fontsize=9)
    axes[-1, 0].set_xlabel("seconds (grey: surge)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per setup (for tests)")
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"comma-separated subset of {','.join(SETUPS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default out/replay, or out/replay-quick)")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/replay.md and docs/img/replay.png (default: full runs only)")
    ap.add_argument("--plot-only", type=Path, metavar="RESULTS_JSON",
                    help="redraw the plot and docs from an earlier results.json")
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help="multiply the load (keep 1 unless the store's capacity is changed)")
    ap.add_argument("--surge-factor", type=float, default=4 / 3,
                    help="surge rate / steady rate (default 1.33, as in 2020; 3 = surge-3x)")
    ap.add_argument("--wasm", type=Path, default=harness.WASM,
                    help="sessionguard build to run (default: the release build)")
    args = ap.parse_args(argv)

    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        plot(data["results"], data["meta"], ROOT / "docs/img/replay.png")
        write_markdown(ROOT / "docs/replay.md", data["meta"], data["results"], "img/replay.png")
        print(table(data["results"], markdown=False))
        return 0

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in SETUPS:
            ap.error(f"--setups: unknown setup {s!r}; one of {', '.join(SETUPS)}")
    shape = QUICK if args.quick else FULL
    out = args.out or ROOT / ("out/replay-quick" if args.quick else "out/replay")
    out.mkdir(parents=True, exist_ok=True)
    docs = (not args.quick) if args.docs is None else args.docs
    steady = round(STEADY_RATE * args.rate_scale)
    surge = round(STEADY_RATE * args.surge_factor * args.rate_scale)
    for p in (harness.WASM, harness.KASK_SIM, harness.SESSIONLOAD, harness.ENVOY):
        if not p.exists():
            print(f"missing {p}: run `make build` first", file=sys.stderr)
            return 2
    per_setup = shape["steady"] + shape["ramp"] + shape["surge"] + shape["after"]
    print(f"Incident replay: {len(setups)} setups x {per_setup} s of load "
          f"(steady {steady}/s -> surge {surge}/s -> steady), store capacity ~{CAPACITY:.0f}/s, "
          f"memory limit {MEMORY_LIMIT // MiB} MiB. Results in {out}", flush=True)
    began = time.monotonic()
    results = []
    for i, setup in enumerate(setups, 1):
        print(f"[{i}/{len(setups)}] {TITLES[setup]}", flush=True)
        r = run_setup(setup, shape, out, MEMORY_LIMIT, steady, surge,
                      log=lambda line: print(line, flush=True), wasm=args.wasm)
        results.append(r)
        print(f"  -> OOM kills {r['oom_kills']}, writers {fmt_pct(r['writer_success_pct'])}, "
              f"logged-in reads {fmt_pct(r['user_read_success_pct'])}, "
              f"peak RSS {fmt_rss(r)}", flush=True)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": ("make demo" if os.environ.get("SG_DEMO") else
                    f".venv/bin/python scripts/replay.py {argv_text}".strip()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "quick": args.quick,
        "shape": shape,
        "capacity": CAPACITY,
        "steady_rate": steady,
        "surge_rate": surge,
        "limit": MEMORY_LIMIT,
        "kask_flags": {"backend_parallelism": BACKEND_PARALLELISM,
                       "service_time_ms": SERVICE_TIME_MS, "per_request_bytes": PER_REQUEST,
                       "release_delay_secs": RELEASE_DELAY_SECS},
        "wall_minutes": (time.monotonic() - began) / 60,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print(table(results, markdown=False))
    print(f"\n(results: {out / 'results.json'}; {meta['wall_minutes']:.1f} minutes)")
    png = out / "replay.png"
    plotted = plot(results, meta, png)
    if docs:
        if plotted:
            target = ROOT / "docs/img/replay.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png.read_bytes())
        write_markdown(ROOT / "docs/replay.md", meta, results, "img/replay.png" if plotted else None)
        print("wrote docs/replay.md" + (" and docs/img/replay.png" if plotted else ""))
    elif plotted:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
