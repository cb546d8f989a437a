# Two commands matter: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
WASM := target/wasm32-wasip1/release/sessionguard.wasm
PYTEST := .venv/bin/python -m pytest
export PATH := $(CURDIR)/.venv/bin:$(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup build lint test test-rust test-wasm test-envoy demo clean

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

demo: build
	.venv/bin/python scripts/demo.py

clean:
	cargo clean
	rm -rf .venv .tools
