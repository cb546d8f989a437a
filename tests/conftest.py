import os
import shutil
import tempfile
from pathlib import Path

import pytest

import harness


def pytest_sessionstart(session):
    missing = [p for p in (harness.WASM, harness.NOOP_WASM, harness.KASK_SIM, harness.SESSIONLOAD,
                         harness.ENVOY) if not p.exists()]
    if missing:
        pytest.exit(f"build first (make build): missing {', '.join(map(str, missing))}", 2)


def pytest_sessionfinish(session, exitstatus):
    harness.kill_all()


@pytest.fixture
def workdir(request):
    path = Path(tempfile.mkdtemp(prefix="sg-test-"))
    yield path
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        # Show the logs of every process of a failed test.
        for log in sorted(path.glob("*.log")):
            print(f"----- {log.name} (tail) -----")
            print(log.read_text(errors="replace")[-4000:])
    if os.environ.get("SG_KEEP_WORKDIR") is None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def kask(workdir):
    """Factory: kask(*flags) starts a kask-sim; all are stopped after the test."""
    started = []

    def make(*flags, data_dir=None):
        k = harness.KaskSim(workdir, *flags, data_dir=data_dir).start()
        started.append(k)
        return k

    yield make
    for k in started:
        k.stop()


@pytest.fixture
def envoy(workdir):
    """Factory: envoy(config_dict, concurrency=2) starts a real Envoy; stopped after the test."""
    started = []

    def make(config, concurrency=2):
        e = harness.Envoy(workdir, config, concurrency=concurrency).start()
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()


@pytest.fixture
def sidecar(kask, envoy):
    """Factory: kask-sim + Envoy running envoy/sidecar.yaml with an optional plugin config."""

    def make(plugin=None, kask_flags=(), concurrency=2):
        k = kask(*kask_flags)
        cfg = harness.localize(harness.load_config("sidecar.yaml"),
                               upstreams={"sessionstore": [k.port]}, plugin=plugin)
        return k, envoy(cfg, concurrency=concurrency)

    return make
