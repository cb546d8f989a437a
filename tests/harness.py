"""Real processes for the integration tests: kask-sim and Envoy with the built wasm.

Every process is started in its own session (process group) and registered, so
that it is killed when its fixture ends, when a test fails, and at interpreter
exit: no test leaves a process behind.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/sessionguard.wasm"
KASK_SIM = ROOT / "target/release/kask-sim"
SESSIONLOAD = ROOT / "target/release/sessionload"
NOOP_WASM = ROOT / "target/wasm32-wasip1/release/noop_filter.wasm"
ENVOY = ROOT / ".venv/bin/envoy"
ENVOY_DIR = ROOT / "envoy"

_live: list[subprocess.Popen] = []


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


@atexit.register
def kill_all() -> None:
    for proc in list(_live):
        _kill(proc)
        _live.remove(proc)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(
        [str(a) for a in args],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    _live.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc in _live:
        _live.remove(proc)
    _kill(proc)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
    """One HTTP/1.1 request on a fresh connection, with raw access to everything."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("content-length", str(len(body)))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


class KaskSim:
    """A kask-sim process on an ephemeral loopback port."""

    def __init__(self, workdir: Path, *extra: str, data_dir: Path | None = None):
        self.workdir = workdir
        self.data_dir = data_dir or Path(tempfile.mkdtemp(dir=workdir, prefix="kask-data-"))
        self.extra = [str(e) for e in extra]
        self.port_file = Path(tempfile.mktemp(dir=workdir, prefix="kask-port-"))
        self.log = Path(tempfile.mktemp(dir=workdir, prefix="kask-", suffix=".log"))
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, port: int = 0) -> "KaskSim":
        self.port_file.unlink(missing_ok=True)
        self.proc = spawn([KASK_SIM, "--listen", f"127.0.0.1:{port}", "--data-dir", self.data_dir,
                           "--port-file", self.port_file, *self.extra], self.log)
        wait_for(lambda: self.port_file.exists() or self.proc.poll() is not None, 20,
                 f"kask-sim to listen (log {self.log})")
        if self.proc.poll() is not None:
            raise RuntimeError(f"kask-sim exited: {self.log.read_text(errors='replace')[-2000:]}")
        self.port = int(self.port_file.read_text().strip())
        wait_for(lambda: self._healthy(), 10, "kask-sim /healthz")
        return self

    def _healthy(self) -> bool:
        try:
            return request(self.port, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        return request(self.port, "GET", "/metrics").body.decode()

    def control(self, **settings) -> dict:
        r = request(self.port, "POST", "/_sim/control", json.dumps(settings).encode(),
                    {"content-type": "application/json"})
        assert r.status == 200, r
        return json.loads(r.body)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Value of one sample in Prometheus text (sum over samples matching the labels)."""
    total = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if labels:
            have = dict(
                part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
            )
            if any(have.get(k) != f'"{v}"' for k, v in labels.items()):
                continue
        total = (total or 0.0) + float(value)
    return total


def load_config(name: str) -> dict:
    return yaml.safe_load((ENVOY_DIR / name).read_text())


def wasm_filters(config: dict):
    """Every sessionguard wasm filter config (dicts, mutable in place) in an Envoy config."""
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                hcm = f.get("typed_config", {})
                for hf in hcm.get("http_filters", []):
                    if hf.get("name") == "envoy.filters.http.wasm":
                        yield hf["typed_config"]["config"]


def plugin_config(config: dict) -> dict:
    """The JSON plugin configuration of the first sessionguard filter."""
    for wasm in wasm_filters(config):
        return json.loads(wasm["configuration"]["value"])
    raise KeyError("no sessionguard filter in config")


def localize(config: dict, *, upstreams: dict[str, list[int]], plugin: dict | str | None = None,
             wasm: Path = WASM) -> dict:
    """Points a shipped config at this machine: ephemeral ports, our wasm, our upstreams.

    Only addresses, ports, file paths and (optionally) the plugin JSON change; the
    rest of the shipped config is what gets tested.
    """
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    for w in wasm_filters(config):
        w["vm_config"]["code"]["local"]["filename"] = str(wasm)
        if plugin is not None:
            w["configuration"]["value"] = plugin if isinstance(plugin, str) else json.dumps(plugin)
    for cluster in config["static_resources"]["clusters"]:
        ports = upstreams.get(cluster["name"])
        if ports is None:
            continue
        cluster["load_assignment"]["endpoints"] = [{
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in ports
            ]
        }]
    return config


class Envoy:
    """A real Envoy running a (localized) config."""

    def __init__(self, workdir: Path, config: dict, concurrency: int = 2):
        self.workdir = workdir
        self.config_path = Path(tempfile.mktemp(dir=workdir, prefix="envoy-", suffix=".yaml"))
        self.config_path.write_text(yaml.safe_dump(config))
        self.admin_path = Path(tempfile.mktemp(dir=workdir, prefix="envoy-admin-"))
        self.log = Path(tempfile.mktemp(dir=workdir, prefix="envoy-", suffix=".log"))
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.admin_port = 0
        self.ports: dict[str, int] = {}

    def start(self) -> "Envoy":
        # SG_ENVOY_LOG=wasm:info,router:debug,upstream:trace (with SG_KEEP_WORKDIR=1) keeps
        # the logs that show which worker sent a request where.
        components = os.environ.get("SG_ENVOY_LOG", "wasm:info")
        self.proc = spawn([ENVOY, "-c", self.config_path, "--concurrency", str(self.concurrency),
                           "--disable-hot-restart", "--admin-address-path", self.admin_path,
                           "--component-log-level", components, "--log-level", "warning"],
                          self.log)
        wait_for(lambda: (self.admin_path.exists() and self.admin_path.read_text().strip())
                 or self.proc.poll() is not None, 30, f"envoy admin (log {self.log})")
        if self.proc.poll() is not None:
            raise EnvoyFailed(self.log.read_text(errors="replace"))
        self.admin_port = int(self.admin_path.read_text().strip().rsplit(":", 1)[1])
        wait_for(self._ready, 30, "envoy /ready")
        listeners = json.loads(request(self.admin_port, "GET", "/listeners?format=json").body)
        for entry in listeners["listener_statuses"]:
            self.ports[entry["name"]] = entry["local_address"]["socket_address"]["port_value"]
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise EnvoyFailed(self.log.read_text(errors="replace"))
        try:
            return request(self.admin_port, "GET", "/ready", timeout=1).status == 200
        except OSError:
            return False

    @property
    def port(self) -> int:
        """The first (usually only) listener's port."""
        return next(iter(self.ports.values()))

    def stats(self, prefix: str = "sessionguard.") -> dict[str, int]:
        """Counters and gauges whose name starts with `prefix`. Envoy keeps the filter's
        own metrics under `wasmcustom.` in /stats (Prometheus output drops it); the
        returned names drop it too."""
        text = request(self.admin_port, "GET", "/stats").body.decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            name = name.removeprefix("wasmcustom.")
            if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


class EnvoyFailed(RuntimeError):
    pass


def validate(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path)],
                          capture_output=True, text=True, timeout=120)
