#!/usr/bin/env python3
"""Soak: Envoy + sessionguard in front of kask-sim at ~1x the store's capacity, with
periodic surges, for a fixed time; then (optionally) a randomized fault storm.

    .venv/bin/python scripts/soak.py --minutes 30 --fault-requests 100000   # make soak
    .venv/bin/python scripts/soak.py --minutes 2                           # the test's size

Loopback only; every phase is bounded in time and count. Measures and prints (and
writes to --out as JSON):
- Envoy's and kask-sim's resident memory, sampled every few seconds, and its trend in
  KB/min (least-squares slope after the warm-up);
- the filter's in-flight gauge at the end (must be 0: no leaked slot);
- every response by kind; "errors" are anything but 200/201/204/404 and the filter's
  own shed 503s (`x-sessionguard-shed`), so a 5xx from anywhere else counts;
- acknowledged writes read back at the end.
Exit status 1 if a check fails (see `verdict`).

The store's capacity is set by kask-sim's backend model: `--backend-parallelism 2
--service-time-ms 6` serves about 333 requests/s; the base rate is 1x that, a surge
multiplies it by --surge-factor for --surge-seconds every --surge-every seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import faultmix  # noqa: E402
import harness  # noqa: E402

CAPACITY_RPS = 333  # 2 backend workers x 1 / 6 ms


def plugin_config() -> dict:
    return {
        "concurrency": {"mode": "adaptive", "limit": 24, "min_limit": 8, "max_limit": 256,
                        "sheddable_share": 0.8},
        "negative_cache": {"ttl_ms": 5000},
        "key_table": {"capacity": 16384, "shard_slots": 64},
    }


class Load:
    """Open-loop requests over a pool of keep-alive connections."""

    def __init__(self, port: int, seed: int, max_conns: int = 400, timeout: float = 5.0):
        self.port = port
        self.rng = random.Random(seed)
        self.idle: list = []
        self.open = 0
        self.max_conns = max_conns
        self.timeout = timeout
        self.counts: Counter = Counter()
        self.errors: list = []
        self.written: dict[str, bytes] = {}
        self.pending = set()
        self.serial = 0

    async def _conn(self):
        if self.idle:
            return self.idle.pop()
        if self.open >= self.max_conns:
            return None
        self.open += 1
        try:
            return await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.open -= 1
            raise

    def _drop(self, conn, rst=False):
        self.open -= 1
        reader, writer = conn
        if rst:
            faultmix._abort_with_rst(writer)
        else:
            writer.close()

    def _pick(self):
        r = self.rng.random()
        if r < 0.80:
            # Readers' lookups of missing sessions: a long tail with repeats.
            key = f"reader%3A{int(self.rng.paretovariate(1.2)) % 200_000}"
            return "GET", key, None
        if r < 0.90 and self.written:
            key = self.rng.choice(list(self.written)[-2000:])
            return "GET", key, None
        if r < 0.98:
            self.serial += 1
            return "POST", f"user%3A{self.serial}", f"PHP.sig.{self.serial}".encode()
        return "DELETE", f"gone%3A{self.rng.randrange(1000)}", None

    async def one(self):
        method, key, body = self._pick()
        reset = self.rng.random() < 0.005
        try:
            conn = await self._conn()
        except OSError as e:
            self.counts["connect_error"] += 1
            self.errors.append(repr(e))
            return
        if conn is None:
            self.counts["client_overflow"] += 1
            return
        reader, writer = conn
        head = [f"{method} /sessions/v1/{key} HTTP/1.1", "host: sessionstore"]
        if body is not None:
            head += [f"content-length: {len(body)}", "content-type: application/octet-stream"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        if reset:
            await asyncio.sleep(self.rng.uniform(0, 0.01))
            self._drop(conn, rst=True)
            self.counts["client_reset"] += 1
            return
        try:
            status, headers, data = await asyncio.wait_for(faultmix._read_response(reader),
                                                           self.timeout)
        except asyncio.TimeoutError:
            self._drop(conn)
            self.counts["client_timeout"] += 1
            self.errors.append(f"timeout {method} {key}")
            return
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            self._drop(conn)
            self.counts["conn_error"] += 1
            self.errors.append(f"{method} {key}: {e!r}")
            return
        if headers.get("connection", "").lower() == "close":
            self._drop(conn)
        else:
            self.idle.append(conn)
        shed = headers.get("x-sessionguard-shed")
        if shed:
            self.counts[f"shed_{shed}"] += 1
            return
        self.counts[f"{method}_{status}"] += 1
        ok = {"GET": (200, 404), "POST": (201,), "DELETE": (204,)}[method]
        if status not in ok:
            self.errors.append(f"{method} {key} -> {status}")
        elif method == "POST":
            self.written[key] = body

    async def run(self, seconds: float, rate_at, sampler=None, sample_every: float = 5.0):
        start = time.monotonic()
        next_sample = start
        sent = 0.0
        last = start
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            sent += rate_at(now - start) * (now - last)
            last = now
            while sent >= 1:
                sent -= 1
                t = asyncio.ensure_future(self.one())
                self.pending.add(t)
                t.add_done_callback(self.pending.discard)
            if sampler and now >= next_sample:
                sampler(now - start)
                next_sample += sample_every
            await asyncio.sleep(0.005)
        if self.pending:
            await asyncio.wait(self.pending, timeout=self.timeout + 5)
        for reader, writer in self.idle:
            writer.close()
        self.idle.clear()


def envoy_heap_kb(envoy) -> int:
    """Envoy's heap in use (tcmalloc's allocated bytes): RSS without the allocator's
    retained pages, so a leak shows here first."""
    text = harness.request(envoy.admin_port, "GET",
                           "/stats?filter=server.memory_allocated").body.decode()
    for line in text.splitlines():
        if line.startswith("server.memory_allocated:"):
            return int(line.split(":")[1]) // 1024
    return 0


def run(minutes: float, fault_requests: int = 0, rate: float = CAPACITY_RPS,
        surge_factor: float = 2.0, surge_every: float = 120.0, surge_seconds: float = 20.0,
        sample_every: float = 5.0, seed: int = 1, workdir: Path | None = None,
        log=print) -> dict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sg-soak-"))
    faults = faultmix.FaultServer().start()
    kask = harness.KaskSim(workdir, "--backend-parallelism", "2", "--service-time-ms", "6",
                           "--release-delay-secs", "10").start()
    slow = harness.KaskSim(workdir, "--get-delay-ms", "3000").start()
    cfg = harness.localize(harness.load_config("sidecar.yaml"),
                           upstreams={"sessionstore": [kask.port]}, plugin=plugin_config())
    faultmix.add_fault_routes(cfg, faults.port, slow.port)
    envoy = harness.Envoy(workdir, cfg, concurrency=2).start()
    samples = []
    try:
        def rate_at(t: float) -> float:
            in_surge = surge_every > 0 and (t % surge_every) >= surge_every - surge_seconds
            return rate * (surge_factor if in_surge else 1.0)

        def sampler(t: float) -> None:
            stats = envoy.stats()
            samples.append({
                "t": round(t, 1),
                "envoy_rss_kb": faultmix.rss_kb(envoy.proc.pid),
                "kask_rss_kb": faultmix.rss_kb(kask.proc.pid),
                "envoy_heap_kb": envoy_heap_kb(envoy),
                "in_flight": stats.get("sessionguard.in_flight"),
                "limit": stats.get("sessionguard.limit"),
            })
            if len(samples) % max(1, int(60 / sample_every)) == 0:
                log(f"t={t:6.0f}s {samples[-1]}")

        load = Load(envoy.port, seed)
        began = time.monotonic()
        asyncio.run(load.run(minutes * 60, rate_at, sampler, sample_every))
        elapsed = time.monotonic() - began
        faultmix.wait_idle(envoy, timeout=30)
        end_stats = envoy.stats()

        # Acknowledged writes read back (a sample of them).
        keys = list(load.written)
        random.Random(seed).shuffle(keys)
        lost = [k for k in keys[:300]
                if harness.request(envoy.port, "GET", "/sessions/v1/" + k).body != load.written[k]]

        fault_summary = None
        if fault_requests:
            log(f"fault storm: {fault_requests} randomized requests")
            # A generous client timeout: the filter's own bound is max_wait_ms (1 s) plus
            # the route timeout (2.5 s); beyond that only a starved machine is measured.
            mix = faultmix.run_mix(envoy.port, fault_requests, concurrency=96, seed=seed + 7,
                                   timeout=20.0)
            lost_writes = len(faultmix.verify_acked(envoy.port, mix))
            faultmix.wait_idle(envoy, timeout=30)  # the gauge lags a tick behind the GETs
            fault_summary = {
                "requests": mix.sent,
                "outcomes": dict(mix.outcomes),
                "unexpected": [str(u) for u in mix.unexpected[:20]],
                "unexpected_count": len(mix.unexpected),
                "client_resets": sum(v for k, v in mix.outcomes.items()
                                     if k.startswith("client_rst")),
                "upstream_faults": sum(v for k, v in mix.outcomes.items() if k.startswith("up_")),
                "lost_acked_writes": lost_writes,
                "in_flight_after": envoy.stats().get("sessionguard.in_flight"),
                "envoy_rss_kb_after": faultmix.rss_kb(envoy.proc.pid),
            }

        # Envoy and kask-sim grow their pools for the first minute or so: the trend is
        # taken after max(60 s, 20% of the run).
        warm = [s for s in samples if s["t"] >= max(60.0, 0.2 * minutes * 60)]
        slope = lambda key: round(faultmix.linear_slope(  # noqa: E731
            [(s["t"] / 60, s[key]) for s in warm]), 1)
        # Requests the generator could not send (all its connections busy) are not
        # requests; they are reported as the generator falling behind.
        total = sum(v for k, v in load.counts.items() if k != "client_overflow")
        summary = {
            "minutes": round(elapsed / 60, 2),
            "requests": total,
            "mean_rate_rps": round(total / elapsed, 1),
            "base_rate_rps": rate,
            "surge": {"factor": surge_factor, "every_s": surge_every, "seconds": surge_seconds},
            "counts": dict(load.counts),
            "not_sent_client_overflow": load.counts.get("client_overflow", 0),
            "errors": len(load.errors),
            "error_examples": load.errors[:10],
            "shed": sum(v for k, v in load.counts.items() if k.startswith("shed_")),
            "in_flight_end": end_stats.get("sessionguard.in_flight"),
            "envoy_rss_kb": {"first": samples[0]["envoy_rss_kb"] if samples else None,
                             "last": samples[-1]["envoy_rss_kb"] if samples else None,
                             "max": max((s["envoy_rss_kb"] for s in samples), default=None),
                             "slope_kb_per_min": slope("envoy_rss_kb")},
            "envoy_heap_kb": {"first": samples[0]["envoy_heap_kb"] if samples else None,
                              "last": samples[-1]["envoy_heap_kb"] if samples else None,
                              "slope_kb_per_min": slope("envoy_heap_kb")},
            "kask_rss_kb": {"first": samples[0]["kask_rss_kb"] if samples else None,
                            "last": samples[-1]["kask_rss_kb"] if samples else None,
                            "max": max((s["kask_rss_kb"] for s in samples), default=None),
                            "slope_kb_per_min": slope("kask_rss_kb")},
            "acked_writes_checked": min(300, len(keys)),
            "acked_writes_lost": len(lost),
            "panics": faultmix.panicked(envoy),
            "wasm_failures": faultmix.envoy_wasm_failures(envoy),
            "faults": fault_summary,
            "samples": samples,
        }
        return summary
    finally:
        envoy.stop()
        kask.stop()
        slow.stop()
        faults.stop()


def verdict(s: dict, max_envoy_slope: float, max_kask_slope: float) -> list[str]:
    problems = []
    if s["errors"]:
        problems.append(f"{s['errors']} errors beyond sheds: {s['error_examples'][:3]}")
    if s["in_flight_end"] != 0:
        problems.append(f"in-flight gauge {s['in_flight_end']} at the end (leaked slots)")
    if s["acked_writes_lost"]:
        problems.append(f"{s['acked_writes_lost']} acknowledged writes not readable")
    if s["panics"] or any(s["wasm_failures"].values()):
        problems.append(f"wasm trouble: {s['panics'][:2]} {s['wasm_failures']}")
    if s["envoy_rss_kb"]["slope_kb_per_min"] > max_envoy_slope:
        problems.append(f"Envoy RSS grows {s['envoy_rss_kb']['slope_kb_per_min']} KB/min")
    if s["kask_rss_kb"]["slope_kb_per_min"] > max_kask_slope:
        problems.append(f"kask-sim RSS grows {s['kask_rss_kb']['slope_kb_per_min']} KB/min")
    f = s.get("faults")
    if f:
        if f["unexpected_count"] or f["lost_acked_writes"] or f["in_flight_after"] != 0:
            problems.append(f"fault storm: {f['unexpected_count']} unexpected, "
                            f"{f['lost_acked_writes']} lost, in-flight {f['in_flight_after']}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--rate", type=float, default=CAPACITY_RPS, help="base requests/s (1x)")
    p.add_argument("--surge-factor", type=float, default=2.0)
    p.add_argument("--surge-every", type=float, default=120.0)
    p.add_argument("--surge-seconds", type=float, default=20.0)
    p.add_argument("--fault-requests", type=int, default=0)
    p.add_argument("--max-envoy-slope", type=float, default=256.0, help="KB/min")
    p.add_argument("--max-kask-slope", type=float, default=1024.0, help="KB/min")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "out/soak.json")
    a = p.parse_args(argv)
    s = run(a.minutes, a.fault_requests, a.rate, a.surge_factor, a.surge_every,
            a.surge_seconds, seed=a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(s, indent=2))
    brief = {k: v for k, v in s.items() if k != "samples"}
    print(json.dumps(brief, indent=2))
    problems = verdict(s, a.max_envoy_slope, a.max_kask_slope)
    for problem in problems:
        print("FAIL:", problem)
    print("soak:", "FAILED" if problems else "passed", f"(samples in {a.out})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
