"""Fault injection for the real-Envoy reliability tests and the soak (loopback only).

- `FaultServer`: a misbehaving upstream (and metrics endpoint) in a background thread.
  Per request, the `x-fault` header says what to do: `reset` (RST after reading the
  request), `reset_body` (headers and part of the body, then RST), `hang` (never answer),
  `trickle` (the status line one byte at a time, forever), `garbage` (not HTTP),
  `close` (FIN without a response). `/metrics` answers as `metrics_mode` says.
- `run_mix`: an asyncio client sending a randomized mix of normal requests, client
  resets (before and during the body), slow bodies and the upstream faults above, and
  counting every outcome. Bounded in count; every request has a timeout.
- `rss_kb`, `linear_slope`: memory sampling and its trend.

Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import harness

RST = struct.pack("ii", 1, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def linear_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (y per unit of x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else 0.0


# ---------------------------------------------------------------------------------
# The misbehaving upstream
# ---------------------------------------------------------------------------------

class FaultServer:
    """An asyncio server on 127.0.0.1 in its own thread; see the module docs."""

    def __init__(self):
        self.port = 0
        self.metrics_mode = "ok"          # ok | hang | garbage | error | close | huge
        self.metrics_body = b""           # served when metrics_mode == "ok"
        self.counts: Counter = Counter()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server = None

    def start(self) -> "FaultServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def boot():
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                      backlog=1024)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(boot())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                if path.startswith("/metrics"):
                    keep = await self._metrics(writer)
                else:
                    keep = await self._fault(headers.get("x-fault", ""), writer, sock)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _metrics(self, writer) -> bool:
        mode = self.metrics_mode
        self.counts["metrics:" + mode] += 1
        if mode == "hang":
            await asyncio.sleep(3600)
            return False
        if mode == "close":
            return False
        if mode == "garbage":
            body = bytes(random.getrandbits(8) for _ in range(512)) + b"\x00{{{not prometheus"
        elif mode == "huge":
            body = b"# padding\n" * 700_000  # ~7 MB, beyond the filter's 4 MiB read cap
        elif mode == "error":
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops")
            await writer.drain()
            return True
        else:
            body = self.metrics_body
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        return True

    async def _fault(self, fault: str, writer, sock) -> bool:
        self.counts[fault or "none"] += 1
        if fault == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            writer.transport.abort()
            return False
        if fault == "reset_body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                         b"content-length: 100\r\n\r\n0123456789")
            await writer.drain()
            await asyncio.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            writer.transport.abort()
            return False
        if fault == "hang":
            await asyncio.sleep(30)
            return False
        if fault == "trickle":
            for b in b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 200:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.2)
            return False
        if fault == "garbage":
            writer.write(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
            await writer.drain()
            return False
        if fault == "close":
            return False
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        return True


def fault_cluster(name: str, port: int, timeout_s: float = 1.0) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": f"{timeout_s}s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}}}}]}]},
    }


def add_fault_routes(config: dict, faulty_port: int, slow_port: int | None = None) -> dict:
    """Requests with `x-fault: slow` go to a slow kask-sim, other `x-fault` values to the
    fault server; everything else to the store. The filter sees the same paths."""
    clusters = config["static_resources"]["clusters"]
    clusters.append(fault_cluster("faulty", faulty_port))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    store_route = vhost["routes"][-1]
    timeout = store_route["route"].get("timeout", "2.5s")
    routes = []
    if slow_port is not None:
        clusters.append(fault_cluster("slowstore", slow_port))
        routes.append({"match": {"prefix": "/", "headers": [
            {"name": "x-fault", "string_match": {"exact": "slow"}}]},
            "route": {"cluster": "slowstore", "timeout": timeout}})
    routes.append({"match": {"prefix": "/", "headers": [
        {"name": "x-fault", "present_match": True}]},
        "route": {"cluster": "faulty", "timeout": timeout}})
    vhost["routes"] = routes + vhost["routes"]
    return config


# ---------------------------------------------------------------------------------
# The client mix
# ---------------------------------------------------------------------------------

# (kind, weight). "up_*" go to the fault server or the slow store, the rest to kask-sim.
DEFAULT_MIX = [
    ("ok", 55),
    ("client_rst", 8),
    ("client_rst_body", 6),
    ("client_slow_body", 3),
    ("up_reset", 5),
    ("up_reset_body", 4),
    ("up_hang", 2),
    ("up_trickle", 2),
    ("up_garbage", 4),
    ("up_close", 4),
    ("up_slow_kask", 3),
    ("oversized", 2),
    ("header_flood", 2),
]


@dataclass
class MixResult:
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list = field(default_factory=list)
    acked: dict = field(default_factory=dict)    # key -> value of a POST answered 201
    deleted: set = field(default_factory=set)
    sent: int = 0

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return status, headers, body


def _request_bytes(method: str, path: str, body: bytes | None, extra: dict[str, str],
                   declared_length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: sessionstore", "connection: close"]
    if body is not None or declared_length is not None:
        lines.append(f"content-length: {declared_length if declared_length is not None else len(body)}")
        lines.append("content-type: application/octet-stream")
    for k, v in extra.items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    except OSError:
        pass
    writer.transport.abort()


class Mix:
    """Randomized requests against `port`; counts outcomes in `result`."""

    def __init__(self, port: int, seed: int, mix=DEFAULT_MIX, keys: int = 400,
                 base: str = "/sessions/v1/", timeout: float = 8.0):
        self.port = port
        self.rng = random.Random(seed)
        self.kinds = [k for k, _ in mix]
        self.weights = [w for _, w in mix]
        self.keys = keys
        self.base = base
        self.timeout = timeout
        self.result = MixResult()
        self._serial = 0

    def _key(self) -> str:
        # A small pool (single-flight, repeated misses) and unique keys (table churn).
        if self.rng.random() < 0.5:
            return f"pool%3A{self.rng.randrange(self.keys)}"
        self._serial += 1
        return f"uniq%3A{self.rng.getrandbits(40):x}-{self._serial}"

    def _bump(self, kind: str, outcome: str) -> None:
        self.result.outcomes[f"{kind}:{outcome}"] += 1

    async def one(self, kind: str) -> None:
        self.result.sent += 1
        rng = self.rng
        try:
            await asyncio.wait_for(self._one(kind, rng), self.timeout)
        except asyncio.TimeoutError:
            self._bump(kind, "client_timeout")
            if kind == "ok":
                self.result.unexpected.append((kind, "client timeout"))
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            # Only the upstream faults that cut a response short may end like this.
            self._bump(kind, "conn_error")
            if kind not in ("up_reset_body", "client_rst", "client_rst_body", "oversized",
                            "header_flood"):
                self.result.unexpected.append((kind, repr(e)))

    async def _one(self, kind: str, rng: random.Random) -> None:
        key = self._key()
        path = self.base + key
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if kind == "ok":
                op = rng.random()
                if op < 0.7:
                    method, body = "GET", None
                elif op < 0.9:
                    method, body = "POST", f"PHP.v.{rng.getrandbits(32)}".encode()
                else:
                    method, body = "DELETE", None
                writer.write(_request_bytes(method, path, body, {}))
                await writer.drain()
                status, headers, resp = await _read_response(reader)
                self._check_ok(method, key, body, status, headers)
            elif kind in ("client_rst", "client_rst_body"):
                if kind == "client_rst":
                    # A request that the store holds (slow route), reset while in flight.
                    writer.write(_request_bytes("GET", path, None, {"x-fault": "slow"}))
                else:
                    writer.write(_request_bytes("POST", path, b"PHP.partial", {},
                                                declared_length=1000))
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                _abort_with_rst(writer)
                self._bump(kind, "reset_sent")
            elif kind == "client_slow_body":
                body = f"PHP.slow.{rng.getrandbits(32)}".encode()
                req = _request_bytes("POST", path, body, {})
                head, rest = req[: -len(body)], body
                writer.write(head)
                await writer.drain()
                for i in range(0, len(rest), 4):
                    writer.write(rest[i:i + 4])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                status, headers, _ = await _read_response(reader)
                self._check_ok("POST", key, body, status, headers)
                self._bump(kind, str(status))
            elif kind.startswith("up_"):
                fault = {"up_slow_kask": "slow"}.get(kind, kind[3:])
                method = rng.choice(["GET", "GET", "POST", "DELETE"])
                body = b"PHP.fault" if method == "POST" else None
                writer.write(_request_bytes(method, path, body, {"x-fault": fault}))
                await writer.drain()
                status, headers, _ = await _read_response(reader)
                shed = headers.get("x-sessionguard-shed")
                if shed:
                    self._bump(kind, f"shed_{shed}")
                elif status == 404 and headers.get("x-sessionguard-cache") == "hit":
                    self._bump(kind, "cached_404")  # answered at the proxy
                elif status in (502, 503, 504) or (kind == "up_slow_kask" and status in (404, 201, 204, 200)):
                    self._bump(kind, str(status))
                else:
                    self._bump(kind, f"unexpected_{status}")
                    self.result.unexpected.append((kind, status))
            elif kind == "oversized":
                big = "a" * (61 * 1024)
                writer.write(_request_bytes("GET", path, None, {"x-big": big}))
                await writer.drain()
                status, _, _ = await _read_response(reader)
                self._bump(kind, str(status))
                if status != 431:
                    self.result.unexpected.append((kind, status))
            elif kind == "header_flood":
                flood = {f"x-h{i}": "v" for i in range(120)}
                writer.write(_request_bytes("GET", path, None, flood))
                await writer.drain()
                status, _, _ = await _read_response(reader)
                self._bump(kind, str(status))
                if status != 431:
                    self.result.unexpected.append((kind, status))
        finally:
            if not writer.is_closing():
                writer.close()

    def _check_ok(self, method: str, key: str, body: bytes | None, status: int,
                  headers: dict) -> None:
        shed = headers.get("x-sessionguard-shed")
        if shed:
            self._bump("ok", f"shed_{shed}")
            return
        expected = {"GET": (200, 404), "POST": (201,), "DELETE": (204,)}[method]
        self._bump("ok", f"{method}_{status}")
        if status not in expected:
            self.result.unexpected.append((method, key, status))
            return
        if method == "POST":
            self.result.acked[key] = body
            self.result.deleted.discard(key)
        elif method == "DELETE":
            self.result.acked.pop(key, None)
            self.result.deleted.add(key)

    async def run(self, total: int, concurrency: int) -> MixResult:
        queue = [self.rng.choices(self.kinds, self.weights)[0] for _ in range(total)]
        sem = asyncio.Semaphore(concurrency)

        async def guarded(kind):
            async with sem:
                await self.one(kind)

        await asyncio.gather(*(guarded(k) for k in queue))
        return self.result


def run_mix(port: int, total: int, concurrency: int = 64, seed: int = 1, **kw) -> MixResult:
    return asyncio.run(Mix(port, seed, **kw).run(total, concurrency))


def verify_acked(port: int, result: MixResult, base: str = "/sessions/v1/") -> list:
    """Every key whose last acknowledged operation was a POST reads back its value.

    Keys of the shared pool may have been written by several concurrent requests; only
    keys written exactly once (unique keys) are checked against their value."""
    wrong = []
    for key, value in result.acked.items():
        if not key.startswith("uniq"):
            continue
        r = harness.request(port, "GET", base + key)
        if r.status != 200 or r.body != value:
            wrong.append((key, r.status, r.body[:40]))
    return wrong


def envoy_wasm_failures(envoy) -> dict[str, int]:
    """Envoy's own counters of wasm VM trouble (all must stay 0)."""
    text = harness.request(envoy.admin_port, "GET", "/stats").body.decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("wasm.") and any(w in name for w in ("fail", "crash", "abort")):
            if value.strip().isdigit():
                out[name] = int(value)
    return out


def panicked(envoy) -> list[str]:
    return [line for line in envoy.log_text().splitlines()
            if "panicked" in line or "Wasm VM failed" in line or "Uncaught" in line
            or "wasm trap" in line.lower()]


def wait_idle(envoy, timeout: float = 15.0) -> None:
    harness.wait_for(lambda: envoy.stats().get("sessionguard.in_flight") == 0, timeout,
                     "sessionguard.in_flight back to 0")


async def _flood(port: int, n: int, conns: int, prefix: str) -> Counter:
    counts: Counter = Counter()
    next_i = iter(range(n))

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in next_i:
                writer.write(f"GET /sessions/v1/{prefix}%3A{i} HTTP/1.1\r\n"
                             f"host: sessionstore\r\n\r\n".encode())
                status, headers, _ = await asyncio.wait_for(_read_response(reader), 10)
                counts[status] += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return counts


def flood_distinct(port: int, n: int, conns: int = 32, prefix: str = "flood") -> Counter:
    """GETs of n distinct (missing) keys over keep-alive connections; status counts."""
    return asyncio.run(_flood(port, n, conns, prefix))
