#!/usr/bin/env python3
"""`make validate`: Envoy's own validation (`envoy --mode validate`) of every shipped Envoy
config, with the built filter in place of the deployment's wasm path and throw-away
certificates in place of its TLS files (nothing else is changed).

Shipped configs: envoy/*.yaml and the `envoy.yaml` of every ConfigMap in deploy/k8s/.
`make validate CONFIGS="a.yaml b.yaml"` validates those files instead (Envoy configs, or
Kubernetes manifests whose ConfigMaps hold an `envoy.yaml`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tlscerts  # noqa: E402

WASM = ROOT / "target/wasm32-wasip1/release/sessionguard.wasm"
ENVOY = ROOT / ".venv/bin/envoy"


def shipped() -> list[Path]:
    """envoy/*.yaml, and the manifests in deploy/k8s/ that hold an Envoy config."""
    k8s = [p for p in sorted(ROOT.glob("deploy/k8s/*.yaml")) if envoy_configs(p)]
    return sorted(ROOT.glob("envoy/*.yaml")) + k8s


def envoy_configs(path: Path) -> list[tuple[str, dict]]:
    """(name, config) of every Envoy config in a file: the file itself, or the `envoy.yaml`
    of each ConfigMap in a Kubernetes manifest."""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not isinstance(doc, dict):
            continue
        if "static_resources" in doc:
            out.append((name, doc))
        elif doc.get("kind") == "ConfigMap" and "envoy.yaml" in doc.get("data", {}):
            out.append((f"{name} (ConfigMap {doc['metadata']['name']})",
                        yaml.safe_load(doc["data"]["envoy.yaml"])))
    return out


def localized(config: dict, workdir: Path, wasm: Path = WASM) -> dict:
    """The config with the built filter and generated certificates (if it has TLS)."""
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf.get("name") == "envoy.filters.http.wasm":
                        hf["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    if any(tlscerts.downstream_tls_contexts(config)):
        tlscerts.localize_tls(config, tlscerts.make_certs(workdir))
    return config


def validate(config: dict, workdir: Path, envoy: Path = ENVOY) -> subprocess.CompletedProcess:
    """`envoy --mode validate` of the localized config, written into workdir."""
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(localized(config, workdir)))
    return subprocess.run([str(envoy), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path, help="files to validate (default: shipped)")
    args = p.parse_args(argv)
    for needed in (WASM, ENVOY):
        if not needed.exists():
            print(f"missing {needed}: run `make build`", file=sys.stderr)
            return 2
    files = [f.resolve() for f in args.configs] or shipped()
    ok = failed = 0
    for f in files:
        configs = envoy_configs(f)
        if not configs:
            print(f"FAIL {f}: no Envoy config in it")
            failed += 1
        for name, config in configs:
            with tempfile.TemporaryDirectory(prefix="sg-validate-") as tmp:
                result = validate(config, Path(tmp))
            if result.returncode == 0:
                ok += 1
                print(f"OK   {name}")
            else:
                failed += 1
                print(f"FAIL {name}\n{(result.stdout + result.stderr)[-3000:]}")
    print(f"{ok} valid, {failed} failed")
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
