"""Shipped Envoy configs validate, and Envoy refuses a bad plugin configuration
with a log line that names the field."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml

import harness
import tlscerts

SHIPPED = sorted(p.name for p in harness.ENVOY_DIR.glob("*.yaml") if "compose" not in p.name)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_envoy_config_validates(name, workdir):
    cfg = harness.load_config(name)
    for w in harness.wasm_filters(cfg):
        w["vm_config"]["code"]["local"]["filename"] = str(harness.WASM)
    # Envoy's validation reads certificate files: give TLS listeners generated ones.
    if any(tlscerts.downstream_tls_contexts(cfg)):
        tlscerts.localize_tls(cfg, tlscerts.make_certs(workdir))
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg))
    result = harness.validate(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


BAD_CONFIGS = [
    ('{"concurrency": {"limit": 10, "bogus": 1}}', "concurrency.bogus", "unknown field"),
    ('{"admission": {"k": "two"}}', "admission.k", "invalid type"),
    ('{"concurrency": {"sheddable_share": 1.5}}', "concurrency.sheddable_share", "between 0 and 1"),
    ('{"negative_cache": {"ttl_ms": 0}}', "negative_cache.ttl_ms", "between 1 and"),
    ('{"base_uri": "sessions"}', "base_uri", "must start and end with"),
    ('{"memory": {"enabled": true}}', "memory.memory_limit_bytes", "must be set"),
    ('{"memory": {"retained_gauges": ["a"]}}', "memory.retained_gauges", "two gauges"),
    ('{"not json', None, "not valid JSON"),
    ('[]', None, "JSON object"),
]


@pytest.mark.parametrize("plugin,field,message", BAD_CONFIGS)
def test_envoy_refuses_bad_plugin_config(plugin, field, message, workdir, envoy):
    cfg = harness.localize(harness.load_config("sidecar.yaml"),
                           upstreams={"sessionstore": [9]}, plugin=plugin)
    with pytest.raises(harness.EnvoyFailed) as failed:
        envoy(cfg, concurrency=1)
    log = str(failed.value)
    line = next((l for l in log.splitlines() if "invalid plugin configuration" in l), None)
    assert line is not None, log[-3000:]
    if field:
        assert f"field `{field}`" in line, line
    assert message in line, line


def test_good_plugin_config_is_accepted(sidecar):
    _, e = sidecar(plugin={"concurrency": {"mode": "fixed", "limit": 64}})
    assert "configuration accepted" in e.log_text()


@pytest.mark.parametrize("name", sorted(__import__("baselines").ALL))
def test_comparison_baseline_configs_validate(name, workdir):
    import baselines
    cfg = baselines.ALL[name](harness.load_config("sidecar.yaml"))
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = harness.validate(path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
