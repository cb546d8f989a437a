"""What users would run instead of sessionguard, built from the shipped sidecar config.

Each function swaps the sessionguard filter of `envoy/sidecar.yaml` for Envoy's own
alternative, so that comparisons differ in exactly one thing.
"""

from __future__ import annotations

import copy

import harness

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _with_filters(config: dict, filters: list[dict]) -> dict:
    config = copy.deepcopy(config)
    _hcm(config)["http_filters"] = [*filters, ROUTER]
    return config


def _store_cluster(config: dict) -> dict:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == "sessionstore")


def bare(config: dict) -> dict:
    """No protection at all: Envoy with only the router, and the store cluster's circuit
    breakers as the shipped sidecar sets them (raised to 100,000: out of the way)."""
    return _with_filters(config, [])


def stock(config: dict) -> dict:
    """Envoy as it comes: only the router, and no `circuit_breakers` on the store cluster, so
    Envoy's defaults apply (max_connections, max_pending_requests and max_requests 1024,
    max_retries 3): what a sidecar without sessionguard gets unless someone tunes it."""
    config = bare(config)
    _store_cluster(config).pop("circuit_breakers", None)
    return config


def circuit_breaker(config: dict, max_requests: int) -> dict:
    """Envoy's static circuit breaker: at most `max_requests` in flight to the store."""
    config = bare(config)
    _store_cluster(config)["circuit_breakers"] = {"thresholds": [{
        "max_connections": 100000,
        "max_pending_requests": max_requests,
        "max_requests": max_requests,
        "max_retries": 3,
    }]}
    return config


def adaptive_concurrency(config: dict) -> dict:
    """Envoy's gradient controller with its documented defaults and a 100 ms update."""
    return _with_filters(config, [{
        "name": "envoy.filters.http.adaptive_concurrency",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
            "gradient_controller_config": {
                "sample_aggregate_percentile": {"value": 50},
                "concurrency_limit_params": {"concurrency_update_interval": "0.1s"},
                "min_rtt_calc_params": {"interval": "30s", "request_count": 50},
            },
        },
    }])


def admission_control(config: dict) -> dict:
    """Envoy's admission control: default success = status < 500, so 404 is a success."""
    return _with_filters(config, [{
        "name": "envoy.filters.http.admission_control",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl",
            "enabled": {"default_value": True, "runtime_key": "admission_control.enabled"},
            "sampling_window": "10s",
            "aggression": {"default_value": 1.5, "runtime_key": "admission_control.aggression"},
            "sr_threshold": {"default_value": {"value": 95.0}, "runtime_key": "admission_control.sr_threshold"},
            "max_rejection_probability": {"default_value": {"value": 90.0},
                                          "runtime_key": "admission_control.max_rejection_probability"},
            "success_criteria": {"http_criteria": {"http_success_status": [{"start": 100, "end": 500}]}},
        },
    }])


def wasm_only(config: dict, wasm_path: str, plugin_json: str = "{}") -> dict:
    """The sidecar config with a different wasm module (e.g. the no-op filter)."""
    config = copy.deepcopy(config)
    for w in harness.wasm_filters(config):
        w["vm_config"]["code"]["local"]["filename"] = str(wasm_path)
        w["configuration"]["value"] = plugin_json
    return config


ALL = {
    "bare": bare,
    "stock-envoy": stock,
    "circuit-breaker": lambda c: circuit_breaker(c, 64),
    "adaptive-concurrency": adaptive_concurrency,
    "admission-control": admission_control,
}
