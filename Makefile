# Two commands matter: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
WASM := target/wasm32-wasip1/release/sessionguard.wasm
PYTEST := .venv/bin/python -m pytest
export PATH := $(CURDIR)/.venv/bin:$(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup build lint test test-rust test-wasm test-envoy validate demo replay-surge replay-docs bench bench-quick clean

setup:
	@scripts/setup.sh

build: setup
	cargo build --release --target wasm32-wasip1 -p sessionguard -p noop-filter
	cargo build --release -p kask-sim -p sessionload
	@echo "sessionguard.wasm: $$(stat -c %s $(WASM)) bytes"

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 -p sessionguard -- -D warnings

test-rust: setup
	cargo test --workspace

# The pure core's tests again, compiled to 32-bit wasm and run under node.
test-wasm: setup
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
		cargo test --target wasm32-unknown-unknown -p sessionguard --lib

test-envoy: build
	$(PYTEST) tests -q

test: lint test-rust test-wasm test-envoy

# Envoy's own validation of every shipped Envoy config (envoy/*.yaml, the ConfigMap in
# deploy/k8s/) with the built filter and throw-away certificates in place of the deployment's
# paths. CONFIGS="your.yaml ..." validates those files instead.
validate: build
	.venv/bin/python scripts/validate_configs.py $(CONFIGS)

distinct-keys: build
	.venv/bin/python scripts/distinct_keys.py

# The incident and the 3x surge against six setups (docs/replay.md). 13 min on this 2-core
# machine on 2026-12-06 (commit aa83041, already built; each scenario's time is recorded in
# docs/results/replay.json).
# Records the run in docs/results/replay.json, regenerates docs/replay.md, the plots and the
# README's replay table from it.
demo: build
	.venv/bin/python scripts/demo.py

# The 5x surge, same six setups; recorded the same way (5.7 min on 2026-12-06, commit 87d7016).
replay-surge: build
	SG_REPLAY_COMMAND="make replay-surge" .venv/bin/python scripts/replay.py --scenario surge5

# docs/replay.md, docs/img/replay-*.png and the README's replay table from the committed
# results, without running anything.
replay-docs: setup
	.venv/bin/python scripts/replay.py --docs-only

# Throughput, latency and CPU per request against the no-op filter and native Envoy,
# then the target pairs as sequential and shared-core duels (~16 minutes; installs wrk
# if missing), then the pure-core microbenchmarks; writes docs/perf.md. bench-quick is
# the smoke variant (1 x 2 s per case, out/perf-quick.md): it checks that every case
# ran and produced numbers, never how fast.
bench: build
	.venv/bin/python scripts/bench.py

bench-quick: build
	.venv/bin/python scripts/bench.py --quick

# Reliability (docs/reliability.md). fuzz: 10 million cases per target of tests/fuzz.rs
# (43 min measured on 2 shared cores; counts appended to out/fuzz-report.jsonl). soak: 30 min
# at ~1x capacity with surges through Envoy + sessionguard, then 100k randomized faults.
.PHONY: fuzz soak
FUZZ_CASES ?= 10000000
fuzz: setup
	mkdir -p out
	CARGO_TARGET_DIR=target/fuzz CARGO_PROFILE_RELEASE_LTO=false \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 SG_FUZZ_CASES=$(FUZZ_CASES) \
	SG_FUZZ_REPORT=$(CURDIR)/out/fuzz-report.jsonl \
		cargo test --release -p sessionguard --test fuzz -- --nocapture

soak: build
	.venv/bin/python scripts/soak.py --minutes 30 --fault-requests 100000

clean:
	cargo clean
	rm -rf .venv .tools
