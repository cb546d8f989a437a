#!/usr/bin/env python3
"""Throughput and latency of sessionguard against the ABI floor and native Envoy.

One run, side by side, on loopback: a real Envoy (`--concurrency 1`, every thread
pinned to core 0) runs each configuration; wrk (closed loop, fixed connections) and
the upstream (a second Envoy answering with `direct_response`, so the store costs
next to nothing) share core 1. Every case runs `--reps` times, interleaved (case A,
B, C, A, B, C, ...) so that drift on the machine hits all cases alike, and the
median is reported. A round still spans minutes, so the four target comparisons are
then measured again as duels: the two cases alone, in short back-to-back runs in the
order A B B A A B B A ..., one ratio per adjacent pair (sequential duels); and both
at the same time on core 0, each proxy with its own wrk (shared-core duels): CFS
splits the core evenly between two saturated proxies, so the machine's drift hits
both alike and the throughput ratio is the inverse ratio of CPU per request. The
verdict is the shared-core ratio when at least 3 of its runs had core 0 saturated
and split evenly, else the sequential duel's.

Cases: bare Envoy; the no-op wasm filter (ABI floor); sessionguard's pass path (GETs
spread over thousands of live sessions, the headline, and GETs of one hot key), write
path, negative-cache hit and shed path; Envoy's own admission_control and
adaptive_concurrency; and a direct_response 503 from bare Envoy (the cheapest local
reply Envoy can make) as the floor for the local-reply paths.

Each case is checked, not just timed: statuses are probed before the run, every
response of the run must have the expected class, and for sessionguard the filter's
own counters must have grown by the number of requests (a crashed VM under
FAIL_OPEN would otherwise look like a very fast filter).

    scripts/bench.py            full run (3 x 10 s per case, duels of 4 pairs x 3 s,
                                shared-core duels of 8 runs x 3 s), writes
                                docs/perf.md, then the pure-core microbenchmarks
                                (cargo bench)
    scripts/bench.py --quick    smoke run (1 x 2 s per case, duels of 2 pairs x 1 s,
                                shared-core duels of 2 runs x 1 s),
                                writes out/perf-quick.md;
                                checks that every case ran and produced numbers,
                                asserts nothing about speed

Loopback only; every process it starts is stopped at the end (tests/harness.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import baselines  # noqa: E402
import harness  # noqa: E402

NOOP_WASM = ROOT / "target/wasm32-wasip1/release/noop_filter.wasm"
HOSTCALLS = ROOT / "scripts/hostcalls.mjs"

KNOWN_PATH = "/sessions/v1/enwiki%3AMWSession%3Aq2vk4bs7nd3m6ftn3uxla6r8cj5ph2wy"
MISSING_PATH = "/sessions/v1/missing%3AMWSession%3Azz0000000000000000000000000000zz"
UNKNOWN_PATH = "/sessions/v1/enwiki%3AMWSession%3Aunknown00000000000000000000000"
LOCAL_PATH = "/local-503"
# The pass path's headline: reads spread over many live sessions, as in production. Each key
# comes back once every SPREAD_KEYS requests, far longer than a worker reuses its read of a
# key (`key_table.local_reuse_ms`, REUSE_WINDOW_S by default), so every read pays the
# key-table lookup; the one-hot-key case (KNOWN_PATH) is the other extreme.
SPREAD_KEYS = 8192
SPREAD_PREFIX = "/sessions/v1/enwiki%3AMWSession%3Aspread"
REUSE_WINDOW_S = 0.1


def spread_path(i: int) -> str:
    return f"{SPREAD_PREFIX}{i:08d}q2vk4bs7nd3m6ftn3uxl"
VALUE = b'PHP.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmE=.a:2:{s:4:"user";i:42;s:5:"token";s:32:"0123456789abcdef0123456789abcdef";}'

# Plugin configurations: every mechanism on. Pass: limits far above the load (the
# adaptive limit still runs its controller). Shed: a fixed limit of 1 and no share for
# sheddable requests, so every GET of an unknown key is shed (reason concurrency).
# scripts/hostcalls.mjs counts hostcalls with the same two configurations.
MEMORY = {"enabled": True, "memory_limit_bytes": 400 << 20,
          "endpoints": [{"cluster": "sessionstore", "path": "/metrics", "authority": "sessionstore"}]}
PASS_PLUGIN = {
    "concurrency": {"mode": "adaptive", "limit": 1024, "min_limit": 512, "max_limit": 4096},
    "admission": {"enabled": True},
    "negative_cache": {"enabled": True, "ttl_ms": 3_600_000},
    "memory": MEMORY,
}
SHED_PLUGIN = {
    **PASS_PLUGIN,
    "concurrency": {"mode": "fixed", "limit": 1, "min_limit": 1, "sheddable_share": 0.0},
}

PROBLEM_404 = ('{\n  "type": "https://www.mediawiki.org/wiki/Kask/errors/not_found",\n'
               '  "title": "Not found",\n  "detail": "The value you requested was not found",\n'
               '  "instance": "/sessions/v1/missing:MWSession:zz0000000000000000000000000000zz"\n}\n')
METRICS_BODY = """# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 8.47872e+06
# HELP go_memstats_stack_inuse_bytes Number of bytes in use by the stack allocator.
# TYPE go_memstats_stack_inuse_bytes gauge
go_memstats_stack_inuse_bytes 1.114112e+06
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 4.5318144e+07
"""


# ---------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per-CPU (busy, total, steal) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            steal = v[7] if len(v) > 7 else 0
            out[int(m.group(1))] = (sum(v) - idle - steal, sum(v), steal)
    return out


def busy_share(before, after, cpu, what: int = 0) -> float | None:
    """Share of a CPU's time that was busy (what=0) or stolen by the hypervisor (what=2)."""
    if cpu not in before or cpu not in after:
        return None
    part = after[cpu][what] - before[cpu][what]
    total = after[cpu][1] - before[cpu][1]
    return part / total if total else None


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, in ns (schedstat: ns resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def pin(pid: int, cpu: int) -> bool:
    """Pins every thread of `pid` to `cpu`; False if taskset is missing or refuses."""
    if not shutil.which("taskset") or os.cpu_count() < 2:
        return False
    r = subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                       capture_output=True, text=True)
    return r.returncode == 0


# ---------------------------------------------------------------------------------
# Setup: wrk, the upstream, the proxies
# ---------------------------------------------------------------------------------

def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("bench: wrk is missing; install it (Debian: apt-get install -y wrk)")
    print("bench: installing wrk (apt-get)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which("wrk")
    if not path:
        sys.exit("bench: wrk still missing after apt-get install")
    return path


def _hcm(routes: list[dict], prefix: str) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "route_config": {"name": prefix, "virtual_hosts": [{"name": prefix, "domains": ["*"], "routes": routes}]},
            # The store reads the whole request before it answers. Without this a
            # direct_response answers a POST before its body arrives, and Envoy then
            # closes the connection: every POST would pay a new upstream connection.
            "http_filters": [{
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1 << 20,
                },
            }, copy.deepcopy(baselines.ROUTER)],
        },
    }


def _direct(match: dict, status: int, body: bytes | str | None, headers: dict[str, str]) -> dict:
    route = {"match": match, "direct_response": {"status": status}}
    if body:
        route["direct_response"]["body"] = {"inline_string": body.decode() if isinstance(body, bytes) else body}
    if headers:
        route["response_headers_to_add"] = [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in headers.items()
        ]
    return route


def _method(name: str) -> list[dict]:
    return [{"name": ":method", "string_match": {"exact": name}}]


def upstream_config() -> dict:
    """A store stand-in that costs next to nothing: Kask's answers as direct responses."""
    problem = {"content-type": "application/json", "x-content-type-options": "nosniff"}
    routes = [
        _direct({"path": "/metrics"}, 200, METRICS_BODY, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}),
        _direct({"prefix": "/sessions/v1/missing", "headers": _method("GET")}, 404, PROBLEM_404, problem),
        _direct({"prefix": "/sessions/v1/", "headers": _method("GET")}, 200, VALUE,
                {"content-type": "application/octet-stream"}),
        _direct({"prefix": "/sessions/v1/", "headers": _method("POST")}, 201, None, {}),
        _direct({"prefix": "/sessions/v1/", "headers": _method("DELETE")}, 204, None, {}),
        _direct({"prefix": "/"}, 404, "404 page not found\n", {"content-type": "text/plain; charset=utf-8"}),
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "store",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [_hcm(routes, "store")]}],
            }],
            "clusters": [],
        },
    }


def sidecar(upstream_port: int, plugin: dict | None = None) -> dict:
    cfg = harness.load_config("sidecar.yaml")
    return harness.localize(cfg, upstreams={"sessionstore": [upstream_port]},
                            plugin=plugin if plugin is not None else PASS_PLUGIN)


def bare_local_reply(cfg: dict) -> dict:
    """Bare Envoy whose route answers 503 itself: the cheapest local reply there is."""
    cfg = baselines.bare(cfg)
    vhost = baselines._hcm(cfg)["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [_direct({"prefix": "/"}, 503, "overloaded\n", {"x-envoy-overloaded": "true"})]
    return cfg


@dataclass
class Proxy:
    name: str
    config: dict
    envoy: harness.Envoy | None = None
    pinned: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Case:
    name: str
    label: str
    proxy: str
    method: str
    path: str
    expect: int              # status every response must have
    sessionguard: bool = False
    counter: str | None = None   # sessionguard counter that must grow by the requests
    baseline: str | None = None  # case whose throughput this one is compared with
    probe_header: tuple[str, str] | None = None
    note: str = ""
    group: str = "main"          # "main" table, or "mechanism" (cost of each mechanism alone)
    keys: int = 1                # > 1: the requests cycle over this many keys (spread_path)


CASES = [
    Case("bare", "bare Envoy (router only)", "bare", "GET", KNOWN_PATH, 200),
    Case("noop", "no-op wasm filter (ABI floor)", "noop", "GET", KNOWN_PATH, 200, baseline="noop"),
    Case("noop-spread", f"no-op wasm filter: GETs spread over {SPREAD_KEYS:,} keys", "noop", "GET",
         spread_path(0), 200, baseline="noop-spread", keys=SPREAD_KEYS),
    Case("sg-pass-spread", f"sessionguard pass: GETs spread over {SPREAD_KEYS:,} known keys", "sg", "GET",
         spread_path(0), 200, sessionguard=True, counter="requests.read_known", baseline="noop-spread",
         keys=SPREAD_KEYS),
    Case("sg-pass", "sessionguard pass: GET of one hot known key", "sg", "GET", KNOWN_PATH, 200,
         sessionguard=True, counter="requests.read_known", baseline="noop"),
    Case("sg-neg-hit", "sessionguard negative-cache hit (local 404)", "sg", "GET", MISSING_PATH, 404,
         sessionguard=True, counter="negcache.hits", baseline="noop",
         probe_header=("x-sessionguard-cache", "hit")),
    Case("sg-shed", "sessionguard shed (local 503, concurrency)", "sg-shed", "GET", UNKNOWN_PATH, 503,
         sessionguard=True, counter="shed.concurrency.sheddable", baseline="noop",
         probe_header=("x-sessionguard-shed", "concurrency")),
    Case("noop-post", "no-op wasm filter: POST", "noop", "POST", KNOWN_PATH, 201, baseline="noop-post"),
    Case("sg-write", "sessionguard write: POST", "sg", "POST", KNOWN_PATH, 201,
         sessionguard=True, counter="requests.write", baseline="noop-post"),
    Case("native-admission", "Envoy admission_control", "native-admission", "GET", KNOWN_PATH, 200,
         baseline="noop"),
    Case("native-adaptive", "Envoy adaptive_concurrency", "native-adaptive", "GET", KNOWN_PATH, 200,
         baseline="noop", note="its minRTT probe (every 30 s) pins the limit to 3 and answers 503s"),
    Case("bare-local-503", "bare Envoy direct_response 503 (local-reply floor)", "bare-local", "GET",
         LOCAL_PATH, 503),
    # What each mechanism costs alone on the pass path (GET of a known key).
    Case("sg-off", "every mechanism off (classify + key-table lookup)", "sg-off", "GET", KNOWN_PATH, 200,
         sessionguard=True, counter="requests.read_known", baseline="noop", group="mechanism"),
    Case("sg-negcache", "negative cache only", "sg-negcache", "GET", KNOWN_PATH, 200,
         sessionguard=True, counter="requests.read_known", baseline="noop", group="mechanism"),
    Case("sg-admission", "admission control only", "sg-admission", "GET", KNOWN_PATH, 200,
         sessionguard=True, counter="requests.read_known", baseline="noop", group="mechanism"),
    Case("sg-limiter", "concurrency limit only (adaptive)", "sg-limiter", "GET", KNOWN_PATH, 200,
         sessionguard=True, counter="requests.read_known", baseline="noop", group="mechanism"),
]

ALL_OFF = {"concurrency": {"enabled": False}, "admission": {"enabled": False},
           "negative_cache": {"enabled": False}, "memory": {"enabled": False}}


def build_proxies(upstream_port: int, memory_ok: bool) -> dict[str, Proxy]:
    pass_plugin = PASS_PLUGIN if memory_ok else {**PASS_PLUGIN, "memory": {"enabled": False}}
    shed_plugin = SHED_PLUGIN if memory_ok else {**SHED_PLUGIN, "memory": {"enabled": False}}
    base = sidecar(upstream_port)
    return {
        "bare": Proxy("bare", baselines.bare(base)),
        "bare-local": Proxy("bare-local", bare_local_reply(base)),
        "noop": Proxy("noop", baselines.wasm_only(base, str(NOOP_WASM), "")),
        "sg": Proxy("sg", sidecar(upstream_port, pass_plugin)),
        "sg-shed": Proxy("sg-shed", sidecar(upstream_port, shed_plugin)),
        "native-admission": Proxy("native-admission", baselines.admission_control(base)),
        "native-adaptive": Proxy("native-adaptive", baselines.adaptive_concurrency(base)),
        "sg-off": Proxy("sg-off", sidecar(upstream_port, ALL_OFF)),
        "sg-negcache": Proxy("sg-negcache", sidecar(upstream_port, {
            **ALL_OFF, "negative_cache": PASS_PLUGIN["negative_cache"]})),
        "sg-admission": Proxy("sg-admission", sidecar(upstream_port, {
            **ALL_OFF, "admission": PASS_PLUGIN["admission"]})),
        "sg-limiter": Proxy("sg-limiter", sidecar(upstream_port, {
            **ALL_OFF, "concurrency": PASS_PLUGIN["concurrency"]})),
    }


def vm_crashed(e: harness.Envoy) -> str | None:
    for line in e.log_text().splitlines():
        if "panicked" in line or "Uncaught RuntimeError" in line or "failed: " in line and "wasm" in line:
            return line.strip()[-300:]
    return None


def stats(e: harness.Envoy) -> dict[str, int]:
    """sessionguard's counters (Envoy shows them as wasmcustom.sessionguard.*)."""
    text = harness.request(e.admin_port, "GET", "/stats").body.decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        name = name.removeprefix("wasmcustom.")
        if name.startswith("sessionguard.") and value.strip().isdigit():
            out[name.removeprefix("sessionguard.")] = int(value)
    return out


# ---------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------

WRK_LUA = r"""
wrk.method = "%(method)s"
%(body)s
%(spread)s
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"connect_errors":%%d,' ..
    '"read_errors":%%d,"write_errors":%%d,"timeouts":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"mean_us":%%.1f,"max_us":%%d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


# Requests over case.keys keys, built once (a prepared request costs wrk next to nothing),
# taken in turn by every connection of the thread.
WRK_SPREAD = r"""
local reqs = {}
local n = 0
init = function(args)
  for i = 0, %(keys)d - 1 do
    reqs[#reqs + 1] = wrk.format(nil, string.format("%(prefix)s%%08d%(suffix)s", i))
  end
end
request = function()
  n = n %% #reqs + 1
  return reqs[n]
end
"""


def wrk_script(workdir: Path, case: Case) -> Path:
    body = spread = ""
    if case.method == "POST":
        body = ('wrk.body = "%s"\nwrk.headers["Content-Type"] = "application/octet-stream"'
                % VALUE.decode().replace("\\", "\\\\").replace('"', '\\"'))
    if case.keys > 1:
        prefix, suffix = spread_path(0).split("00000000")
        # Lua's string.format reads `%3A` as a conversion: the path's escapes are doubled.
        spread = WRK_SPREAD % {"keys": case.keys, "prefix": prefix.replace("%", "%%"),
                               "suffix": suffix.replace("%", "%%")}
    path = workdir / f"wrk-{case.name}.lua"
    path.write_text(WRK_LUA % {"method": case.method, "body": body, "spread": spread})
    return path


def start_wrk(args, workdir: Path, case: Case, port: int, duration: float,
              log_name: str) -> tuple[subprocess.Popen, Path]:
    cmd = []
    if args.pin:
        cmd += ["taskset", "-c", "1"]
    cmd += [args.wrk, "-t1", f"-c{args.connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
            "-s", str(wrk_script(workdir, case)), f"http://127.0.0.1:{port}{case.path}"]
    log = workdir / log_name
    return harness.spawn(cmd, log), log


def wrk_result(case: Case, duration: float, proc: subprocess.Popen, log: Path) -> dict:
    try:
        proc.wait(timeout=duration + 30)
    finally:
        harness.stop(proc)
    text = log.read_text(errors="replace")
    m = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk produced no result for {case.name}:\n{text[-2000:]}")
    return json.loads(m.group(1))


def run_wrks(args, workdir: Path, runs: list[tuple[Case, Proxy]], duration: float, tag: str) -> list[dict]:
    """One wrk per (case, proxy), all running at the same time (started in the order given,
    a few ms apart); their results in that order. The cases must differ: each wrk's Lua script
    and log are named after its case."""
    if len({c.name for c, _ in runs}) != len(runs):
        raise ValueError(f"run_wrks: the same case twice in {[c.name for c, _ in runs]}")
    started: list[tuple[subprocess.Popen, Path]] = []
    try:
        for case, proxy in runs:
            started.append(start_wrk(args, workdir, case, proxy.envoy.port, duration, f"wrk-{case.name}-{tag}.log"))
        return [wrk_result(case, duration, *s) for (case, _), s in zip(runs, started)]
    finally:
        for proc, _ in started:
            harness.stop(proc)


def probe(case: Case, port: int) -> str | None:
    """One request by hand: None if it looks right, else what is wrong."""
    body = VALUE if case.method == "POST" else None
    hdrs = {"content-type": "application/octet-stream"} if body else {}
    r = harness.request(port, case.method, case.path, body, hdrs)
    if r.status != case.expect:
        return f"probe got {r.status}, expected {case.expect}"
    if case.probe_header and r.headers.get(case.probe_header[0]) != case.probe_header[1]:
        return f"probe lacks {case.probe_header[0]}: {case.probe_header[1]} (headers {r.headers})"
    return None


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None
    upstream_cpu_us: float | None
    core0: float | None
    core1: float | None
    steal0: float | None
    other0: float | None   # core 0 busy with anything but the proxy (other work = noise)
    requests: int
    unexpected: int
    filter_seen: float | None


@dataclass
class Mark:
    """CPU counters at one instant; a run's CPU numbers are the differences between two marks."""
    t: float
    cores: dict[int, tuple[int, int, int]]
    proxy_ns: dict[str, int]   # by proxy name: CPU time of all its threads so far (all on core 0)
    upstream_ns: int


def mark(proxies: list[Proxy], upstream: Proxy) -> Mark:
    return Mark(time.monotonic(), cpu_times(), {p.name: process_cpu_ns(p.envoy.proc.pid) for p in proxies},
                process_cpu_ns(upstream.envoy.proc.pid))


def filter_count(case: Case, proxy: Proxy) -> int | None:
    """The sessionguard counter that must grow by the run's requests (None: not a sessionguard case)."""
    return stats(proxy.envoy).get(case.counter, 0) if case.sessionguard else None


def filter_seen(case: Case, proxy: Proxy, before: int | None, n: int) -> float | None:
    """How much of the n requests the filter's own counter saw."""
    if before is None:
        return None
    # Counts reach Envoy's stats on the filter's next tick (100 ms); allow a slow one.
    deadline = time.monotonic() + 3.0
    while True:
        time.sleep(0.15)
        grew = filter_count(case, proxy) - before
        if grew >= n or time.monotonic() > deadline:
            break
    return grew / n if n else 0.0


def end_sample(case: Case, proxy: Proxy, result: dict, count_before: int | None, before: Mark,
               after: Mark) -> Sample:
    """One case's numbers from its wrk result and the marks around the measured run."""
    n = result["requests"]
    seen = filter_seen(case, proxy, count_before, n)
    crash = vm_crashed(proxy.envoy) if case.sessionguard else None
    if crash:
        raise RuntimeError(f"{case.name}: the wasm VM crashed: {crash}")
    # wrk counts statuses >= 400 as errors; a case expecting 404/503 expects all of them.
    unexpected = (n - result["status_errors"]) if case.expect >= 400 else result["status_errors"]
    unexpected += result["connect_errors"] + result["read_errors"] + result["write_errors"] + result["timeouts"]
    secs = result["duration_us"] / 1e6
    wall = after.t - before.t
    cpu_ns = after.proxy_ns[proxy.name] - before.proxy_ns[proxy.name]
    proxies_ns = sum(after.proxy_ns.values()) - sum(before.proxy_ns.values())
    busy0 = busy_share(before.cores, after.cores, 0)
    # The upstream's CPU is this case's only when no other proxy sent it requests meanwhile.
    alone = len(after.proxy_ns) == 1
    return Sample(
        rps=n / secs if secs else 0.0,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        cpu_us=cpu_ns / 1000 / n if n else None,
        upstream_cpu_us=(after.upstream_ns - before.upstream_ns) / 1000 / n if n and alone else None,
        core0=busy0,
        core1=busy_share(before.cores, after.cores, 1),
        steal0=busy_share(before.cores, after.cores, 0, what=2),
        other0=max(0.0, (busy0 or 0.0) - proxies_ns / 1e9 / wall) if wall > 0 else None,
        requests=n,
        unexpected=unexpected,
        filter_seen=seen,
    )


def prefill_spread(proxy: Proxy) -> None:
    """Every key of the spread cases read once through the proxy (a 200 each): the filter
    knows them all to exist (live sessions), whatever `key_table.known_ttl_ms` let expire."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.envoy.port, timeout=10)
    try:
        for i in range(SPREAD_KEYS):
            conn.request("GET", spread_path(i))
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"prefill of {proxy.name}: {spread_path(i)} answered {r.status}")
    finally:
        conn.close()


def measure_together(args, workdir: Path, runs: list[tuple[Case, Proxy]], upstream: Proxy, tag: str,
                     warmup: float, duration: float) -> list[Sample]:
    """Probes each case, then warms up and measures all of them at the same time, one wrk
    each (started in the order given); one Sample per case, in that order."""
    for case, proxy in runs:
        if case.keys > 1 and case.sessionguard:
            prefill_spread(proxy)
        problem = probe(case, proxy.envoy.port)
        if problem:
            raise RuntimeError(f"{case.name}: {problem}")
    # Warm-up: connections, V8 tiers, caches, the adaptive limit.
    run_wrks(args, workdir, runs, warmup, f"{tag}-warm")
    time.sleep(0.25)  # let a tick export the warm-up's counts
    counts = [filter_count(case, proxy) for case, proxy in runs]
    proxies = [proxy for _, proxy in runs]
    before = mark(proxies, upstream)
    results = run_wrks(args, workdir, runs, duration, tag)
    after = mark(proxies, upstream)
    return [end_sample(case, proxy, result, count, before, after)
            for (case, proxy), result, count in zip(runs, results, counts)]


def measure(args, workdir: Path, case: Case, proxy: Proxy, upstream: Proxy, tag: str,
            warmup: float, duration: float) -> Sample:
    """One case alone: the proxy has core 0 to itself."""
    return measure_together(args, workdir, [(case, proxy)], upstream, tag, warmup, duration)[0]


def sample_problems(case: Case, x: Sample) -> list[str]:
    """What makes a run's numbers not mean what they say (nothing about speed)."""
    out = []
    if not (x.rps > 0 and x.p50_ms > 0 and x.p99_ms >= x.p50_ms and x.requests > 0):
        out.append(f"{case.name}: incomplete numbers {x}")
    if case.name != "native-adaptive" and x.unexpected > 0.001 * x.requests:
        out.append(f"{case.name}: {x.unexpected} of {x.requests} responses were not {case.expect}")
    if case.keys > 1 and x.rps and case.keys / x.rps <= REUSE_WINDOW_S:
        out.append(f"{case.name}: each key came back every {1000 * case.keys / x.rps:.0f} ms, within "
                   "the reuse window: the run measured reuse, not spread reads")
    if case.sessionguard and (x.filter_seen is None or x.filter_seen < 0.95):
        out.append(f"{case.name}: sessionguard counted {fmt(x.filter_seen and 100 * x.filter_seen)}% "
                   f"of the requests in `{case.counter}`")
    return out


# ---------------------------------------------------------------------------------
# Duels: the target comparisons, back to back
# ---------------------------------------------------------------------------------

# (target, case, baseline, least acceptable throughput of the case / the baseline's)
TARGETS = [
    (f"pass path, GETs spread over {SPREAD_KEYS:,} known keys >= 0.90x the no-op filter", "sg-pass-spread",
     "noop-spread", 0.90),
    ("pass path, one hot key >= 0.90x the no-op filter", "sg-pass", "noop", 0.90),
    ("write path >= 0.90x the no-op filter (POST)", "sg-write", "noop-post", 0.90),
    ("negative-cache hit >= 1.5x the pass path", "sg-neg-hit", "sg-pass", 1.5),
    ("shed >= 1.5x the pass path", "sg-shed", "sg-pass", 1.5),
]
# The proxies are warm from the rounds; this re-opens wrk's connections and lets the
# adaptive limit settle after the proxy sat idle during the other case's run.
DUEL_WARMUP = 1

Pair = tuple[Sample, Sample]  # (case, baseline), whichever of the two ran first


def duel(args, workdir: Path, case: Case, base: Case, proxies: dict[str, Proxy], upstream: Proxy) -> list[Pair]:
    """`--duel-pairs` pairs of adjacent runs, in the order A B, B A, A B, ...: the two runs
    of a pair are seconds apart, and a drift that is linear in time favours the first run
    of a pair as often as the second, so it cancels out over the pairs."""
    pairs = []
    for i in range(args.duel_pairs):
        order = (case, base) if i % 2 == 0 else (base, case)
        got = {c.name: measure(args, workdir, c, proxies[c.proxy], upstream, f"duel{i}", DUEL_WARMUP,
                               args.duel_seconds) for c in order}
        pairs.append((got[case.name], got[base.name]))
        rps, cpu = duel_ratios(pairs[-1:])
        print(f"bench: duel {case.name} vs {base.name} [{i + 1}/{args.duel_pairs}, {order[0].name} first]: "
              f"throughput {spread(rps)}, implied by proxy CPU {spread(cpu)}", flush=True)
    return pairs


def for_targets(what: str, selected: list[Case], failures: list[str], run) -> dict[tuple[str, str], list]:
    """run(case, baseline) for each target whose two cases were both selected (their proxies
    are up); a failure is recorded and the next target runs."""
    chosen = {c.name: c for c in selected}
    out = {}
    for _, a, b, _ in TARGETS:
        missing = [n for n in (a, b) if n not in chosen]
        if missing:
            print(f"bench: {what} {a} vs {b} skipped: {', '.join(missing)} not among the cases", flush=True)
            continue
        try:
            out[(a, b)] = run(chosen[a], chosen[b])
        except Exception as exc:  # noqa: BLE001 - report every target, fail at the end
            failures.append(f"{what} {a} vs {b}: {exc}")
            print(f"bench: {what} {a} vs {b}: FAILED: {exc}", flush=True)
    return out


def run_duels(args, workdir: Path, selected: list[Case], proxies: dict[str, Proxy], upstream: Proxy,
              failures: list[str]) -> dict[tuple[str, str], list[Pair]]:
    return for_targets("duel", selected, failures,
                       lambda a, b: duel(args, workdir, a, b, proxies, upstream))


# Shared-core duels: the two proxies of a target at the same time, both on core 0, each
# with its own wrk. A run is flagged when CFS cannot have split the core evenly: core 0
# not saturated, or the two proxies' CPU seconds further apart than this.
SHARED_MIN_BUSY = 0.90
SHARED_MAX_SPLIT = 0.15
SHARED_MIN_RUNS = 3  # unflagged runs needed for the shared-core duel to give the verdict


@dataclass
class SharedRun:
    case: Sample
    base: Sample
    first: str                  # the case whose wrk was started first
    cpu_s: tuple[float, float]  # CPU seconds of the case's proxy and the baseline's during the run
    flag: str | None            # why the core was not split evenly (the throughput ratio is then off)


def shared_pairs(runs: list[SharedRun], unflagged: bool = False) -> list[Pair]:
    return [(r.case, r.base) for r in runs if not (unflagged and r.flag)]


def shared_flag(x: Sample, y: Sample) -> tuple[tuple[float, float], str | None]:
    cpu = tuple((s.cpu_us or 0.0) * s.requests / 1e6 for s in (x, y))
    why = []
    if x.core0 is None or x.core0 < SHARED_MIN_BUSY:
        why.append(f"core 0 busy {fmt(x.core0 and 100 * x.core0, '{:.0f}%')}")
    if min(cpu) <= 0 or max(cpu) / min(cpu) > 1 + SHARED_MAX_SPLIT:
        why.append(f"CPU split {cpu[0]:.2f} s / {cpu[1]:.2f} s")
    return cpu, "; ".join(why) or None


def start_proxy(workdir: Path, proxy: Proxy, pin_it: bool) -> Proxy:
    proxy.envoy = harness.Envoy(workdir, proxy.config, concurrency=1).start()
    proxy.pinned = pin_it and pin(proxy.envoy.proc.pid, 0)
    return proxy


PRIMED = ("sg", "sg-off", "sg-negcache", "sg-admission", "sg-limiter")


def prime(proxy: Proxy) -> None:
    """The known key known to exist, the missing one cached missing."""
    harness.request(proxy.envoy.port, "GET", KNOWN_PATH)
    harness.request(proxy.envoy.port, "GET", MISSING_PATH)
    time.sleep(0.2)


def shared_duel(args, workdir: Path, case: Case, base: Case, proxies: dict[str, Proxy],
                upstream: Proxy) -> list[SharedRun]:
    """`--shared-runs` runs of both cases at the same time on core 0, each proxy driven by its
    own wrk, the one started first alternating. When both are saturated CFS gives each half
    the core, so drift of the machine hits both alike and the throughput ratio is the inverse
    ratio of CPU per request. Two cases of one proxy get a twin of it for the baseline."""
    pa, pb = proxies[case.proxy], proxies[base.proxy]
    twin = None
    try:
        if pa is pb:
            twin = pb = Proxy(f"{pb.name}-twin", pb.config)
            start_proxy(workdir, twin, args.pin)
            if pa.name in PRIMED:
                prime(twin)
            # As much traffic as one round gave the original (V8 tiers, the adaptive limit).
            run_wrks(args, workdir, [(base, twin)], args.duration, "twin-warm")
        runs = []
        for i in range(args.shared_runs):
            order = [(case, pa), (base, pb)] if i % 2 == 0 else [(base, pb), (case, pa)]
            got = measure_together(args, workdir, order, upstream, f"shared{i}", DUEL_WARMUP, args.shared_seconds)
            x, y = got if order[0][0] is case else got[::-1]
            cpu, flag = shared_flag(x, y)
            runs.append(SharedRun(x, y, order[0][0].name, cpu, flag))
            rps, ratio = duel_ratios([(x, y)])
            print(f"bench: shared-core duel {case.name} vs {base.name} [{i + 1}/{args.shared_runs}, "
                  f"{order[0][0].name} first]: throughput {spread(rps)}, implied by proxy CPU {spread(ratio)}, "
                  f"core 0 busy {fmt(x.core0 and 100 * x.core0, '{:.0f}%')} "
                  f"(other work {fmt(x.other0 is not None and 100 * x.other0, '{:.0f}%')}), "
                  f"CPU {cpu[0]:.2f} s / {cpu[1]:.2f} s{f'; FLAGGED: {flag}' if flag else ''}", flush=True)
        return runs
    finally:
        if twin and twin.envoy:
            twin.envoy.stop()


def run_shared_duels(args, workdir: Path, selected: list[Case], proxies: dict[str, Proxy], upstream: Proxy,
                     failures: list[str]) -> dict[tuple[str, str], list[SharedRun]]:
    if not args.shared_runs:
        return {}
    return for_targets("shared-core duel", selected, failures,
                       lambda a, b: shared_duel(args, workdir, a, b, proxies, upstream))


def duel_ratios(pairs: list[Pair]) -> tuple[list[float], list[float]]:
    """Per pair: the case's throughput / the baseline's, and the same ratio as the proxy's CPU
    per request implies it (baseline µs / case µs), which does not depend on how busy the load
    generator kept the proxy."""
    rps = [x.rps / y.rps for x, y in pairs if y.rps]
    cpu = [y.cpu_us / x.cpu_us for x, y in pairs if x.cpu_us and y.cpu_us]
    return rps, cpu


def spread(ratios: list[float]) -> str:
    if not ratios:
        return "–"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"


# ---------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec="{:.0f}", none="–"):
    return none if v is None else spec.format(v)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}"
    except OSError:
        return "unknown"


def envoy_version() -> str:
    r = subprocess.run([str(harness.ENVOY), "--version"], capture_output=True, text=True)
    m = re.search(r"version: (\S+)", r.stdout + r.stderr)
    return m.group(1) if m else "unknown"


def round_ratios(samples: dict[str, list[Sample]], a: str, b: str) -> list[float]:
    """a's throughput / b's in each round (rounds are interleaved, so the two ran seconds to a
    minute apart): drift of the machine between rounds cancels out, drift within one does not."""
    return [x.rps / y.rps for x, y in zip(samples.get(a) or [], samples.get(b) or []) if y.rps]


def paired_ratio(samples: dict[str, list[Sample]], a: str, b: str) -> float | None:
    return med(round_ratios(samples, a, b))


def results_table(samples: dict[str, list[Sample]], group: str = "main") -> tuple[list[str], dict[str, dict]]:
    rows = {}
    for case in CASES:
        s = samples.get(case.name) or []
        if not s:
            continue
        rows[case.name] = {
            "rps": med([x.rps for x in s]),
            "rps_all": [x.rps for x in s],
            "p50": med([x.p50_ms for x in s]),
            "p99": med([x.p99_ms for x in s]),
            "cpu": med([x.cpu_us for x in s]),
            "up_cpu": med([x.upstream_cpu_us for x in s]),
            "core0": med([x.core0 for x in s]),
            "core1": med([x.core1 for x in s]),
            "steal0": med([x.steal0 for x in s]),
            "other0": med([x.other0 for x in s]),
            "unexpected": sum(x.unexpected for x in s),
            "requests": sum(x.requests for x in s),
            "seen": med([x.filter_seen for x in s]),
        }
    lines = [
        "| case | req/s (median) | runs | vs no-op | vs bare | p50 ms | p99 ms | proxy CPU µs/req | upstream CPU µs/req | core 0 busy (other work) | core 1 busy | unexpected | filter saw |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        r = rows.get(case.name)
        if not r or case.group != group:
            continue
        ratio = paired_ratio(samples, case.name, case.baseline or "noop")
        vs = fmt(ratio, "{:.2f}x")
        if case.baseline and case.baseline != "noop":
            vs += f" ({case.baseline})"
        lines.append(
            f"| {case.label} | {r['rps']:,.0f} | {' / '.join(f'{x:,.0f}' for x in r['rps_all'])} | {vs} | "
            f"{fmt(paired_ratio(samples, case.name, 'bare'), '{:.2f}x')} | {fmt(r['p50'], '{:.2f}')} | {fmt(r['p99'], '{:.2f}')} | "
            f"{fmt(r['cpu'], '{:.1f}')} | {fmt(r['up_cpu'], '{:.1f}')} | {fmt(r['core0'] and 100 * r['core0'], '{:.0f}%')} ({fmt(r['other0'] is not None and 100 * r['other0'], '{:.0f}%')}) | "
            f"{fmt(r['core1'] and 100 * r['core1'], '{:.0f}%')} | {r['unexpected']:,} of {r['requests']:,} | "
            f"{fmt(r['seen'] and 100 * r['seen'], '{:.0f}%')} |")
    return lines, rows


def verdict(samples: dict[str, list[Sample]], duels: dict[tuple[str, str], list[Pair]],
            shared: dict[tuple[str, str], list[SharedRun]], a: str, b: str) -> tuple[float | None, str]:
    """a's throughput / b's as the Targets table's verdict gives it, and by which measurement."""
    s_rps, _ = duel_ratios(shared_pairs(shared.get((a, b), []), unflagged=True))
    if len(s_rps) >= SHARED_MIN_RUNS:
        return med(s_rps), "shared core"
    rps, _ = duel_ratios(duels.get((a, b), []))
    if rps:
        return med(rps), "sequential duel"
    return med(round_ratios(samples, a, b)), "rounds"


def headline(samples: dict[str, list[Sample]], duels: dict[tuple[str, str], list[Pair]],
             shared: dict[tuple[str, str], list[SharedRun]]) -> list[str]:
    """The ratios to quote, from this run's verdicts (see Targets for how each was measured)."""
    out = []
    for what, a, b in (
            (f"Pass path, GETs spread over {SPREAD_KEYS:,} live sessions (the headline)", "sg-pass-spread",
             "noop-spread"),
            ("Pass path, one hot key (every read within the reuse window)", "sg-pass", "noop"),
            ("Write path (POST)", "sg-write", "noop-post")):
        ratio, by = verdict(samples, duels, shared, a, b)
        if ratio is not None:
            out.append(f"- {what}: **{ratio:.2f}x** the throughput of the no-op wasm filter ({by}).")
    for what, a in (("a negative-cache hit", "sg-neg-hit"), ("a shed request", "sg-shed")):
        ratio, by = verdict(samples, duels, shared, a, "sg-pass")
        if ratio is not None:
            out.append(f"- {what[0].upper()}{what[1:]}: {ratio:.2f}x the hot-key pass path ({by}).")
    return out


def targets(samples: dict[str, list[Sample]], duels: dict[tuple[str, str], list[Pair]],
            shared: dict[tuple[str, str], list[SharedRun]]) -> list[str]:
    """Table rows. The verdict is the shared-core duel's median throughput ratio over its
    unflagged runs when there are at least SHARED_MIN_RUNS of them, else the sequential duel's
    median, else (`--duel-pairs 0`) the rounds'; the cell says which."""
    out = []
    for what, a, b, want in TARGETS:
        rounds = round_ratios(samples, a, b)
        rps, cpu = duel_ratios(duels.get((a, b), []))
        runs = shared.get((a, b), [])
        s_rps, _ = duel_ratios(shared_pairs(runs, unflagged=True))
        _, s_cpu = duel_ratios(shared_pairs(runs))
        ratio, by = verdict(samples, duels, shared, a, b)
        if ratio is None:
            continue
        outcome = f"{'met' if ratio >= want else '**not met**'} ({by})"
        each = f"{med(rounds):.2f}x ({' / '.join(f'{r:.2f}' for r in rounds)})" if rounds else "–"
        flagged = f"{sum(1 for r in runs if r.flag)} of {len(runs)}" if runs else "–"
        out.append(f"| {what} | {spread(rps)} | {spread(cpu)} | {spread(s_rps)} | {spread(s_cpu)} | {flagged} | "
                   f"{each} | {outcome} |")
    return out


def cpu_breakdown(rows: dict[str, dict]) -> list[str]:
    def cpu(name):
        return rows.get(name, {}).get("cpu")
    lines = []
    bare, noop = cpu("bare"), cpu("noop")
    if bare and noop:
        lines.append(f"- The ABI floor (no-op filter) adds {noop - bare:.1f} µs of proxy CPU per request to bare Envoy's {bare:.1f} µs.")
    if cpu("noop-spread") and cpu("sg-pass-spread"):
        lines.append(f"- sessionguard's pass path adds {cpu('sg-pass-spread') - cpu('noop-spread'):.1f} µs on top of "
                     f"the floor for GETs spread over {SPREAD_KEYS:,} keys.")
    if noop and cpu("sg-pass"):
        lines.append(f"- sessionguard's pass path adds {cpu('sg-pass') - noop:.1f} µs on top of the floor (GET of one hot key).")
    if cpu("noop-post") and cpu("sg-write"):
        lines.append(f"- The write path adds {cpu('sg-write') - cpu('noop-post'):.1f} µs on top of the floor (POST).")
    if cpu("sg-neg-hit") and noop:
        lines.append(f"- A negative-cache hit costs {cpu('sg-neg-hit'):.1f} µs in all ({cpu('sg-neg-hit') / noop:.2f} of a forwarded request through the no-op filter); "
                     f"Envoy's own direct_response 503 costs {fmt(cpu('bare-local-503'), '{:.1f}')} µs.")
    if cpu("sg-shed"):
        lines.append(f"- A shed request costs {cpu('sg-shed'):.1f} µs in all.")
    return lines


def hostcall_section(hc: dict | None) -> list[str]:
    if not hc:
        return ["(hostcall counter did not run: node missing or it failed)"]
    out = [
        "| path | hostcalls | allocation callbacks | first request after a tick (hostcalls, allocations) | per callback |",
        "|---|---:|---:|---:|---|",
    ]
    for p in hc["paths"]:
        detail = "; ".join(
            f"{phase}: " + ", ".join(f"{k.removeprefix('proxy_')}×{v}" for k, v in calls.items()
                                     if k != "(alloc callback)")
            for phase, calls in p["byPhase"].items())
        flag = "" if p["ok"] else " (**path check failed**)"
        out.append(f"| {p['name']}{flag} | {p['total']:g} | {p['allocs']:g} | {p['first_total']}, {p['first_allocs']} "
                   f"| {detail or '–'} |")
    t = hc.get("tick")
    if t:
        out.append("")
        out.append(f"Per tick (every 100 ms, on the elected VM, all mechanisms on): {t['per_tick']:.1f} hostcalls: "
                   + ", ".join(f"{k.removeprefix('proxy_')}×{v:g}" for k, v in t["by_name"].items()) + ".")
    mp = hc.get("memory_poll")
    if mp and not mp["ok"]:
        out.append("")
        out.append(f"**Memory poll: the VM crashes when the metrics response arrives**: `{mp['error'].splitlines()[0]}`"
                   f" — see \"Bugs found\" below.")
    return out


def run_hostcalls() -> dict | None:
    if not shutil.which("node"):
        return None
    r = subprocess.run(["node", str(HOSTCALLS), "--json", str(harness.WASM), str(NOOP_WASM)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        print(f"bench: hostcall counter failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}", file=sys.stderr)
        return None


def run_criterion(quick: bool) -> list[str]:
    """Runs benches/core.rs and returns table lines of median ns per op."""
    cmd = ["cargo", "bench", "-p", "sessionguard", "--bench", "core"]
    if quick:
        cmd += ["--", "--quick"]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        cmd = ["taskset", "-c", "0", *cmd]  # the runs, like the proxy, on core 0
    print(f"bench: {' '.join(cmd)}", flush=True)
    since = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return [f"(cargo bench failed: {r.stderr[-1500:]})"]
    base = ROOT / "target/criterion"
    rows = []
    for est in sorted(base.glob("**/new/estimates.json")):
        if est.stat().st_mtime < since:
            continue  # a benchmark that no longer exists
        bench_dir = est.parent.parent
        info = bench_dir / "new/benchmark.json"
        try:
            meta = json.loads(info.read_text())
            name = meta.get("full_id") or str(bench_dir.relative_to(base))
            median = json.loads(est.read_text())["median"]["point_estimate"]
        except (OSError, ValueError, KeyError):
            continue
        rows.append((name, median))
    lines = ["| benchmark | median |", "|---|---:|"]
    for name, ns in rows:
        value = f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"
        lines.append(f"| `{name}` | {value} |")
    return lines


# ---------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 x 2 s per case (after 1 s of warm-up), duels of 2 pairs x 1 s, "
                         "shared-core duels of 2 runs x 1 s, no criterion")
    ap.add_argument("--reps", type=int, help="runs per case (default 3; quick 1)")
    ap.add_argument("--duration", type=int, help="seconds per measured run (default 10; quick 2)")
    ap.add_argument("--warmup", type=int, help="seconds of warm-up before each run (default 2; quick 1)")
    ap.add_argument("--duel-pairs", type=int,
                    help="pairs of back-to-back runs per target duel (default 4; quick 2; 0: none; "
                         "an even number balances the order)")
    ap.add_argument("--duel-seconds", type=int, help="seconds per measured duel run (default 3; quick 1)")
    ap.add_argument("--shared-runs", type=int,
                    help="runs per target of the shared-core duel, both proxies at the same time on core 0 "
                         "(default 8; quick 2; 0: none; an even number balances which wrk starts first)")
    ap.add_argument("--shared-seconds", type=int, help="seconds per measured shared-core run (default 3; quick 1)")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections (closed loop)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ",".join(c.name for c in CASES))
    ap.add_argument("--out", help="report path (default docs/perf.md; quick out/perf-quick.md)")
    ap.add_argument("--no-criterion", action="store_true", help="skip the pure-core microbenchmarks")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin with taskset")
    ap.add_argument("--max-other", type=float, default=0.08,
                    help="a run during which more than this share of core 0 went to other work is repeated")
    ap.add_argument("--retries", type=int, help="repeats of a disturbed run (default 2; quick 0)")
    ap.add_argument("--wait-quiet", type=int, default=0, metavar="SECONDS",
                    help="first wait up to this long for the 1-minute load average to fall below 0.5")
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    args.retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    args.duration = args.duration or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.duel_pairs = args.duel_pairs if args.duel_pairs is not None else (2 if args.quick else 4)
    args.duel_seconds = args.duel_seconds or (1 if args.quick else 3)
    args.shared_runs = args.shared_runs if args.shared_runs is not None else (2 if args.quick else 8)
    args.shared_seconds = args.shared_seconds or (1 if args.quick else 3)
    out_path = Path(args.out) if args.out else ROOT / ("out/perf-quick.md" if args.quick else "docs/perf.md")
    args.pin = args.pin and bool(shutil.which("taskset")) and (os.cpu_count() or 1) >= 2
    selected = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    if not selected:
        sys.exit(f"bench: no such case in --cases {args.cases}")
    for p in (harness.ENVOY, harness.WASM, NOOP_WASM):
        if not p.exists():
            sys.exit(f"bench: missing {p}: run `make build` first")
    args.wrk = ensure_wrk()

    deadline = time.monotonic() + args.wait_quiet
    while float(loadavg().split()[0]) >= 0.5 and time.monotonic() < deadline:
        print(f"bench: waiting for a quiet machine (load {loadavg()})", flush=True)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))

    command = "scripts/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = loadavg()
    print(f"bench: {command.strip()} | {os.cpu_count()} CPUs, {cpu_model()} | load {load_start}", flush=True)
    if float(load_start.split()[0]) > 0.5 and not args.quick:
        print("bench: WARNING: the machine is not quiet (load average above 0.5); numbers will be noisy",
              flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    failures: list[str] = []
    samples: dict[str, list[Sample]] = {}
    notes: list[str] = []
    retried: list[str] = []
    memory_ok = True
    upstream = Proxy("upstream", upstream_config())
    proxies: dict[str, Proxy] = {}
    duels: dict[tuple[str, str], list[Pair]] = {}
    shared: dict[tuple[str, str], list[SharedRun]] = {}
    try:
        upstream.envoy = harness.Envoy(workdir, upstream.config, concurrency=1).start()
        if args.pin:
            pin(upstream.envoy.proc.pid, 1)
        up_port = upstream.envoy.port
        # The store stand-in answers as the proxies expect.
        for path, method, want in ((KNOWN_PATH, "GET", 200), (MISSING_PATH, "GET", 404), ("/metrics", "GET", 200)):
            r = harness.request(up_port, method, path)
            if r.status != want:
                raise RuntimeError(f"upstream answers {path} with {r.status}, expected {want}")
        if harness.request(up_port, "GET", MISSING_PATH).headers.get("content-type") != "application/json":
            raise RuntimeError("upstream 404 lacks content-type: application/json (the cache would not fill)")

        # Memory polling on, unless the filter cannot survive it (then say so).
        probe_proxy = Proxy("memory-probe", sidecar(up_port, PASS_PLUGIN))
        probe_proxy.envoy = harness.Envoy(workdir, probe_proxy.config, concurrency=1).start()
        time.sleep(2.5)
        crash = vm_crashed(probe_proxy.envoy)
        probe_proxy.envoy.stop()
        if crash:
            memory_ok = False
            notes.append("**Memory pressure was turned off for the sessionguard cases**: with `memory.enabled` the "
                         f"VM crashes on the first metrics response (`{crash.split('wasm log ')[-1]}`); under "
                         "FAIL_OPEN the filter would then be skipped and look free. See \"Bugs found\".")
            print("bench: memory polling crashes the VM; sessionguard cases run with memory disabled", flush=True)

        needed = {c.proxy for c in selected}
        for name, proxy in build_proxies(up_port, memory_ok).items():
            if name not in needed:
                continue
            proxies[name] = start_proxy(workdir, proxy, args.pin)
        # Prime the caches: the known key is known to exist, the missing one cached missing.
        for name in PRIMED:
            if name in proxies:
                prime(proxies[name])

        for rep in range(args.reps):
            for case in selected:
                label = f"[{rep + 1}/{args.reps}] {case.name}"
                for attempt in range(args.retries + 1):
                    try:
                        s = measure(args, workdir, case, proxies[case.proxy], upstream, str(rep),
                                    args.warmup, args.duration)
                    except Exception as exc:  # noqa: BLE001 - report every case, fail at the end
                        failures.append(f"{label}: {exc}")
                        print(f"bench: {label}: FAILED: {exc}", flush=True)
                        s = None
                        break
                    print(f"bench: {label}: {s.rps:,.0f} req/s, p50 {s.p50_ms:.2f} ms, p99 {s.p99_ms:.2f} ms, "
                          f"proxy {fmt(s.cpu_us, '{:.1f}')} µs/req, unexpected {s.unexpected}, "
                          f"filter saw {fmt(s.filter_seen and 100 * s.filter_seen, '{:.0f}%')}, "
                          f"other work on core 0 {fmt(s.other0 and 100 * s.other0, '{:.0f}%')}", flush=True)
                    if s.other0 is None or s.other0 <= args.max_other or attempt == args.retries:
                        break
                    retried.append(f"{case.name} run {rep + 1}: {100 * s.other0:.0f}% of core 0 went to other work")
                    print(f"bench: {label}: core 0 was shared with other work; measuring again", flush=True)
                    time.sleep(2)
                if s is not None:
                    samples.setdefault(case.name, []).append(s)
        duels = run_duels(args, workdir, selected, proxies, upstream, failures)
        shared = run_shared_duels(args, workdir, selected, proxies, upstream, failures)
    finally:
        for p in proxies.values():
            if p.envoy:
                p.envoy.stop()
        if upstream.envoy:
            upstream.envoy.stop()
        harness.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)

    # Checks that make the numbers mean what they say (not speed).
    for case in selected:
        s = samples.get(case.name, [])
        if len(s) != args.reps:
            failures.append(f"{case.name}: {len(s)} of {args.reps} runs produced numbers")
            continue
        failures += [p for x in s for p in sample_problems(case, x)]
    cases = {c.name: c for c in CASES}
    for what, (a, b), pairs in [*(("duel", k, v) for k, v in duels.items()),
                                *(("shared-core duel", k, shared_pairs(v)) for k, v in shared.items())]:
        failures += [f"{what}: {p}" for x, y in pairs
                     for p in sample_problems(cases[a], x) + sample_problems(cases[b], y)]

    if retried:
        notes.append(f"Runs measured again because more than {100 * args.max_other:.0f}% of core 0 went to other "
                     f"work (the machine was shared): {'; '.join(retried)}.")
    # Duel runs are not repeated (that would put time between the two runs of a pair): the
    # median over pairs absorbs a disturbed one, but the reader should know.
    disturbed = sum(1 for pairs in duels.values() for pair in pairs for x in pair
                    if x.other0 is not None and x.other0 > args.max_other)
    if disturbed:
        notes.append(f"{disturbed} duel run(s) had more than {100 * args.max_other:.0f}% of core 0 go to other work.")
    steal = [x.steal0 for v in samples.values() for x in v if x.steal0]
    if steal and max(steal) > 0.01:
        notes.append(f"Hypervisor steal on core 0 reached {100 * max(steal):.0f}% in some runs.")

    hc = run_hostcalls()
    memory_crash = not memory_ok or bool(hc and not hc.get("memory_poll", {}).get("ok", True))
    if memory_crash:
        failures_note = BUG_HTTP_CALL
    else:
        failures_note = ""
    crit = [] if (args.quick or args.no_criterion) else run_criterion(False)
    table, rows = results_table(samples)
    mech_table, _ = results_table(samples, "mechanism")
    finished = datetime.datetime.now(datetime.timezone.utc)
    report = render(args, command, started, finished, load_start, loadavg(), table, mech_table, rows, samples,
                    duels, shared, hc, crit, notes, failures) + failures_note
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(report)
    raw = ROOT / "out" / ("bench-quick" if args.quick else "bench")
    raw.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{raw}-samples.json").write_text(json.dumps({k: [vars(x) for x in v] for k, v in samples.items()}, indent=1))
    Path(f"{raw}-duels.json").write_text(json.dumps(
        {f"{a} vs {b}": [{a: vars(x), b: vars(y)} for x, y in pairs] for (a, b), pairs in duels.items()}, indent=1))
    Path(f"{raw}-shared.json").write_text(json.dumps(
        {f"{a} vs {b}": [{a: vars(r.case), b: vars(r.base), "first": r.first, "cpu_s": r.cpu_s, "flag": r.flag}
                         for r in runs] for (a, b), runs in shared.items()}, indent=1))
    print("\n".join(table))
    print("\n".join(targets(samples, duels, shared)))
    print(f"bench: wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")
    if failures:
        print("bench: FAILED checks:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def render(args, command, started, finished, load_start, load_end, table, mech_table, rows, samples, duels, shared,
           hc, crit, notes, failures) -> str:
    make = "make bench-quick" if args.quick else "make bench"
    pinned = "every Envoy thread pinned with `taskset -a -p -c 0`; wrk and the upstream on core 1" if args.pin \
        else "not pinned (taskset missing or a single CPU)"
    lines = [
        "# Performance: sessionguard against the ABI floor and native Envoy",
        "",
        "<!-- Written by scripts/bench.py; do not edit by hand, run it again. -->",
        "",
        f"- **Command:** `{make}` (runs `{command.strip()}`{'' if args.quick else ' and `cargo bench -p sessionguard --bench core`'})",
        f"- **Date:** {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC",
        f"- **Machine:** {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}; "
        f"load average {load_start} at start, {load_end} at the end",
        f"- **Software:** Envoy {envoy_version()} (V8), sessionguard {git_state()}, "
        f"`sessionguard.wasm` {harness.WASM.stat().st_size:,} bytes",
        f"- **Setup:** one Envoy per configuration, `--concurrency 1`, {pinned}. Upstream: a second Envoy "
        "(`--concurrency 1`) answering Kask's responses with `direct_response` (200 with a session value, "
        "404 problem, 201, 204, `/metrics`). Load: wrk, closed loop, "
        f"{args.connections} connections, 1 thread, {args.warmup:g} s warm-up then {args.duration:g} s measured, "
        f"{args.reps} run(s) per case, cases interleaved; medians reported.",
        "- **Proxy CPU** is the CPU time of all the proxy's threads (`/proc/<pid>/task/*/schedstat`) during "
        "the measured run divided by the requests completed: the cost of one request, independent of "
        "whether the load generator kept the proxy busy.",
        "- **Checks:** each case is probed by hand first (status, and `x-sessionguard-cache: hit` / "
        "`x-sessionguard-shed: concurrency`); `unexpected` counts responses with another status or socket "
        "errors; `filter saw` is the growth of sessionguard's own counter for that path divided by the "
        "requests (a crashed VM under FAIL_OPEN would show ~0%).",
        "",
        *(["## Headline", "", *headline(samples, duels, shared), ""] if headline(samples, duels, shared) else []),
        "## Results",
        "",
        *table,
        "",
        "`vs no-op` compares with the no-op filter for the same method (GET, or POST for the write path). "
        "Ratios are medians of per-round ratios (the two cases ran seconds to a minute apart); the Targets table "
        "measures the target pairs again, back to back and side by side on one core. req/s, latency and CPU are medians over runs.",
        "",
        READING_NOTE,
        "",
    ]
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    t = targets(samples, duels, shared)
    if t:
        lines += ["## Targets", "", targets_method(args), "",
                  "| target | sequential duel: throughput ratio, median (min–max) | sequential duel: ratio implied "
                  "by proxy CPU | shared core: throughput ratio (unflagged runs) | shared core: ratio implied by "
                  "proxy CPU (all runs) | shared core: flagged runs | rounds: median (each round) | verdict (by) |",
                  "|---|---:|---:|---:|---:|---:|---|---|", *t, ""]
    cb = cpu_breakdown(rows)
    if cb:
        lines += ["## Where the CPU goes", "", *cb, ""]
    if len(mech_table) > 2:
        lines += [
            "## Cost of each mechanism alone (GET of a known key)",
            "",
            "sessionguard with one request-path mechanism on and the others off (memory pressure has no "
            "per-request hostcall: it is polled on tick). \"Every mechanism off\" still reads `:method` and "
            "`:path`, classifies, fingerprints, looks the key up in the key table (priorities need it) and reads "
            "`:status`: the filter's fixed cost.",
            "",
            *mech_table,
            "",
        ]
        noop = rows.get("noop", {}).get("cpu")
        if noop:
            for name in ("sg-off", "sg-negcache", "sg-admission", "sg-limiter", "sg-pass"):
                r = rows.get(name)
                if r and r.get("cpu"):
                    label = next(c.label for c in CASES if c.name == name)
                    lines.append(f"- {label}: +{r['cpu'] - noop:.1f} µs of proxy CPU per request over the no-op filter")
            lines.append("")
    lines += [
        "## Hostcalls per request",
        "",
        "Counted by `node scripts/hostcalls.mjs` (run by this script): a minimal proxy-wasm host in Node "
        "that loads the same `.wasm`, implements the ABI as Envoy does for the calls sessionguard makes, drives "
        "whole request lifecycles with the benchmark's plugin configurations and counts every import the module "
        "calls, per callback, as the mean over 100 requests after a tick of 320 requests (a loaded VM: it "
        f"then times {timed_share(hc)}, see `src/clock.rs`, and its limiter takes back unwritten releases); "
        "the first request after a tick, which may write what the tick settled, is shown apart. "
        "*Allocation callbacks* are the host's calls back into the module "
        "(`proxy_on_memory_allocate`) to hand over returned data (header values, shared-data values): each is "
        "another V8 boundary crossing. Both filters also receive the same 7 callbacks per request "
        "(context create, request headers, response headers, response body, log, done, delete): that is the "
        "ABI floor the no-op filter measures.",
        "",
        *hostcall_section(hc),
        "",
    ]
    if crit:
        lines += [
            "## Pure-core microbenchmarks (native, criterion)",
            "",
            "`cargo bench -p sessionguard --bench core` (benches/core.rs; release profile: `opt-level = 3`, "
            "LTO). The shared store is the in-memory `MemStore`, which copies values in and out like Envoy's "
            "shared data; no hostcall costs are included. `decision/*` is the core's whole work for one request "
            "on each path, in the order `src/host/http.rs` runs it. Target: < 1 µs per request decision.",
            "",
            *crit,
            "",
        ]
    if failures:
        lines += ["## Failed checks", "", *(f"- {f}" for f in failures), ""]
    lines += [*hot_path_notes(hc, rows), "", HISTORY_NOTE, ""]
    return "\n".join(lines)


def targets_method(args) -> str:
    """Two paragraphs: the sequential duel, then the shared-core duel and the verdict."""
    sequential = (
        f"Each target is first a *sequential duel*: the two cases alone, {args.duel_pairs} pairs of "
        f"back-to-back runs ({args.duel_seconds} s measured after {DUEL_WARMUP} s of warm-up) in the order "
        "A B, B A, A B, …, so the runs of a pair are seconds apart and drift that is linear in time favours "
        "each case equally often. Per pair: the throughput ratio, and the ratio the proxy CPU per request "
        "implies (the baseline's µs / the case's); median and range over the pairs. `rounds` repeats the "
        "Results table's per-round ratios for comparison. On this VM the speed drifts by tens of percent "
        "within seconds, which a sequential duel cannot cancel; hence the shared-core duel."
    ) if args.duel_pairs else (
        "`rounds`: throughput ratios, each the median over rounds of the ratio within a round; no "
        "sequential duels were run (`--duel-pairs 0`).")
    shared = (
        "The *shared-core duel* runs the two proxies of a target at the same time, both pinned to core 0, "
        f"each driven by its own wrk on core 1 ({args.connections} connections each, started together, the "
        f"one started first alternating): {args.shared_runs} runs of {args.shared_seconds} s after "
        f"{DUEL_WARMUP} s of warm-up. While both proxies are saturated the scheduler (CFS) gives each half of "
        "core 0, so whatever the machine's speed does during a run it does to both alike and cancels out of "
        "the ratio; the throughput ratio is then the inverse ratio of CPU per request. Two cases of one "
        "proxy (negative-cache hit and pass path) get a twin Envoy of the same configuration for the "
        f"baseline. A run is *flagged* when core 0 was less than {100 * SHARED_MIN_BUSY:.0f}% busy or the "
        f"two proxies' CPU seconds differ by more than {100 * SHARED_MAX_SPLIT:.0f}%: then the core was not "
        "split evenly and the throughput ratio is not the CPU ratio (the CPU-implied ratio still is). The "
        "throughput column is over the unflagged runs, the CPU-implied one over all. **Verdict:** the "
        f"shared-core median throughput ratio when at least {SHARED_MIN_RUNS} runs are unflagged, else the "
        "sequential duel's median (else the rounds'); the verdict column names which."
    ) if args.shared_runs else (
        "No shared-core duels were run (`--shared-runs 0`): the verdict is the sequential duel's median "
        "throughput ratio (the rounds' where there was no duel either).")
    return f"{sequential}\n\n{shared}"


READING_NOTE = (
    "**Reading these numbers.** On a shared VM the absolute CPU per request can drift by tens of percent "
    "between rounds even when the guest sees no other work on core 0 (contention on the host); the `runs` "
    "column shows it. Compare cases measured close together in time, as the Targets table's duels do, rather "
    "than medians of absolute numbers across rounds; small differences in the mechanism table are within that "
    "drift.")

BUG_HTTP_CALL = """
## Bugs found

**Memory polling aborts the VM** (`src/host/root.rs` `poll_memory` -> `src/host/abi.rs` `http_call`).
`abi::http_call` calls `proxy_http_call` directly, so the SDK's dispatcher never registers the token
(`dispatcher::register_callout`, which only `proxy_wasm::hostcalls::dispatch_http_call` does). When Envoy
delivers the metrics response, the SDK's `proxy_on_http_call_response` runs
`callouts.remove(&token_id).expect("invalid token_id")` (proxy-wasm 0.2.5 `dispatcher.rs:413`) *before*
`Root::on_http_call_response` is reached: panic, `panic = "abort"`, the VM is dead. Under `FAIL_OPEN` every
later request on that worker skips the filter, so `memory.enabled: true` silently turns sessionguard off
about one second after start (reproduced here in Envoy 1.40 and by `node scripts/hostcalls.mjs`).
Fix: start the poll through the SDK so that the token is registered, e.g. in `poll_memory`
`proxy_wasm::hostcalls::dispatch_http_call(&ep.cluster, vec![(":method", "GET"), (":path", &ep.path),
(":authority", &ep.authority), ("accept", "text/plain")], None, vec![], Duration::from_millis(timeout))`
(it returns `Err` for the statuses Envoy uses: BadArgument, InternalFailure), and keep `self.polls`. A test
with `memory.enabled` in real Envoy that checks the log for "panicked" and the filter's counters after two
poll intervals would have caught it.
"""


def timed_share(hc: dict | None) -> str:
    """How many of the hot pass path's requests the VM timed in the hostcall count (a timed
    request reads the clock on its request headers)."""
    hot = hostcall_path(hc, "pass: GET of a known key")
    clock = (hot or {}).get("byPhase", {}).get("request_headers", {}).get("proxy_get_current_time_nanoseconds")
    return f"about one request in {1 / clock:.0f}" if clock else "only some requests"


def hostcall_path(hc: dict | None, prefix: str) -> dict | None:
    return next((p for p in (hc or {}).get("paths", []) if p["name"].startswith(prefix)), None)


def hot_path_notes(hc: dict | None, rows: dict[str, dict]) -> list[str]:
    """What each call on the pass path is for; every count is this run's (hostcall table
    above, Results table), none is kept in this script."""
    hot = hostcall_path(hc, "pass: GET of a known key")
    cold = hostcall_path(hc, "pass, key not read by this worker")
    tick = (hc or {}).get("tick")
    lines = [
        "## Reading the hot path (src/host/http.rs)",
        "",
        "What each call on the pass path is for (GET of a key known to exist; counts in the table above):",
        "- `on_http_request_headers`: the request header map in one `get_header_map_pairs` (`:method` and "
        "`:path`; one hostcall and one allocation callback where two single reads cost two of each), classified "
        "first so that requests that are not key operations stop there. The key-table `lookup` is one "
        "shared-data get of the key's shard, *unless this worker read that key marked Exists within "
        "`key_table.local_reuse_ms`*: then it reuses that read (src/negcache/recent.rs; only fresh Exists reads are "
        "reused, and this worker's own writes forget them, so the no-stale-404 guarantee holds; a key deleted "
        "through another worker is forwarded instead of answered from the cache for up to that window). Only "
        "every k-th request reads the clock (`src/clock.rs`); the others use the VM's last reading. The "
        "limiter's acquire usually takes back a slot this VM released without writing (src/limiter/, "
        "\"Deferred releases\"): no shared-data call.",
        "- `on_http_response_headers`: nothing for an untimed read of a key whose Exists mark is fresh: its "
        "status is not needed (no RTT sample, no mark to refresh; the timed reads stand for it in admission "
        "control, weighted by the stride). Timed requests read the clock and `:status`; `content-type` only "
        "for 404s.",
        "- `on_log`: nothing (the release stays unwritten within the allowance).",
        "",
        "A negative-cache hit is the header map, the shard get and `send_local_response`. A shed adds the "
        "in-flight table get that finds no room. A write (POST or DELETE) adds `begin_write` and `end_write`, "
        "a get and a CAS set of the shard each, and reads `:status`. The first GET of an unknown key adds "
        "`:status`, `content-type` and `insert_missing` (get + set). A request that is not a key operation "
        "(`/healthz`, `/metrics`) costs the header map read.",
    ]
    if hot and cold:
        lines += [
            "",
            f"Reads spread over many sessions (the headline case: {SPREAD_KEYS:,} keys, each back once every "
            f"{SPREAD_KEYS:,} requests) pay the shard get on every read: {cold['total']:g} hostcalls and "
            f"{cold['allocs']:g} allocation callbacks per request in this build, against {hot['total']:g} and "
            f"{hot['allocs']:g} for one hot key read again within the reuse window.",
        ]
        spread_rps = rows.get("sg-pass-spread", {}).get("rps")
        if spread_rps:
            lines[-1] += (f" At this run's median {spread_rps:,.0f} req/s each spread key came back every "
                          f"{1000 * SPREAD_KEYS / spread_rps:.0f} ms, outside the default reuse window of "
                          f"{1000 * REUSE_WINDOW_S:.0f} ms.")
    if tick:
        lines += ["", f"Per tick the elected VM made {tick['per_tick']:g} hostcalls in this build (table above)."]
    return lines


HISTORY_NOTE = (
    "Earlier measurements that this script does not repeat (a bisection of the pass path's cost over builds "
    "cut short at successive points, and earlier hostcall counts) are kept, each with its date, commit and "
    "command, in [docs/perf-history.md](perf-history.md).")


if __name__ == "__main__":
    sys.exit(main())
