#!/usr/bin/env python3
"""`make demo`: kask-sim behind a real Envoy running sessionguard, with a request flow."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import harness  # noqa: E402


def show(port, method, path, body=None):
    r = harness.request(port, method, path, body)
    extra = {k: v for k, v in r.headers.items() if k.startswith("x-sessionguard") or k == "retry-after"}
    print(f"  {method:6} {path:58} -> {r.status} {extra if extra else ''}")
    return r


def main():
    work = Path(tempfile.mkdtemp(prefix="sg-demo-"))
    kask = harness.KaskSim(work).start()
    cfg = harness.localize(harness.load_config("sidecar.yaml"), upstreams={"sessionstore": [kask.port]})
    envoy = harness.Envoy(work, cfg, concurrency=2).start()
    try:
        print(f"kask-sim on 127.0.0.1:{kask.port}, Envoy + sessionguard on 127.0.0.1:{envoy.port}\n")
        key = "/sessions/v1/enwiki%3AMWSession%3Ademo0000000000000000000000000000"
        print("A logged-in user's session:")
        show(envoy.port, "POST", key, b"PHP.c2lnbmF0dXJl.a:1:{s:4:\"user\";s:4:\"Demo\";}")
        show(envoy.port, "GET", key)
        print("A reader without a session, asking again and again:")
        for _ in range(3):
            show(envoy.port, "GET", "/sessions/v1/enwiki%3AMWSession%3Areader000000000000000000000000")
        print("Logout:")
        show(envoy.port, "DELETE", key)
        show(envoy.port, "GET", key)
        print("\nsessionguard metrics (Envoy /stats):")
        for name, value in sorted(envoy.stats().items()):
            print(f"  {name}: {value}")
        text = kask.metrics()
        hits = harness.metric_value(text, "http_requests_total") or 0
        print(f"\nrequests that reached the store: {int(hits)}")
    finally:
        envoy.stop()
        kask.stop()


if __name__ == "__main__":
    main()
