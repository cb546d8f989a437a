"""Shipped Envoy configs validate, and Envoy refuses a bad plugin configuration
with a log line that names the field."""

import copy
import sys

import pytest
import yaml

import harness

sys.path.insert(0, str(harness.ROOT / "scripts"))

import validate_configs  # noqa: E402

SHIPPED = [c for f in validate_configs.shipped() for c in validate_configs.envoy_configs(f)]


@pytest.mark.parametrize("name,config", SHIPPED, ids=[name for name, _ in SHIPPED])
def test_shipped_envoy_config_validates(name, config, workdir):
    """`make validate`'s check: the config as shipped, but for the wasm and TLS file paths."""
    result = validate_configs.validate(copy.deepcopy(config), workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


def test_validation_can_fail(workdir):
    name, config = SHIPPED[0]
    config = copy.deepcopy(config)
    config["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
    assert validate_configs.validate(config, workdir).returncode != 0, name


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
