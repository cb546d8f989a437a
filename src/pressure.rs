//! Backend memory pressure: from the store's own memory to a shed probability.

use serde::Deserialize;

use crate::config::{check_range, check_unit, field, ConfigError};

/// One metrics endpoint to poll (one per store pod).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsEndpoint {
    /// Envoy cluster name that reaches the pod.
    pub cluster: String,
    pub path: String,
    pub authority: String,
}

impl Default for MetricsEndpoint {
    fn default() -> Self {
        Self {
            cluster: "sessionstore".to_string(),
            path: "/metrics".to_string(),
            authority: "sessionstore".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Off by default: it needs `memory_limit_bytes`, which only the operator knows.
    pub enabled: bool,
    pub enforce: bool,
    /// The pod's memory limit (e.g. 419430400 for 400Mi).
    pub memory_limit_bytes: u64,
    pub endpoints: Vec<MetricsEndpoint>,
    pub poll_interval_ms: u64,
    pub timeout_ms: u64,
    /// A sample older than this stops driving shedding.
    pub max_sample_age_ms: u64,
    /// Gauge that decides (live demand).
    pub gauge: String,
    pub soft: f64,
    pub hard: f64,
    /// Above this ratio even critical traffic is shed: an OOM kill serves no one.
    pub critical: f64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            enforce: true,
            memory_limit_bytes: 0,
            endpoints: vec![MetricsEndpoint::default()],
            poll_interval_ms: 1000,
            timeout_ms: 500,
            max_sample_age_ms: 5000,
            gauge: "process_resident_memory_bytes".to_string(),
            soft: 0.70,
            hard: 0.85,
            critical: 0.95,
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.enabled && self.memory_limit_bytes == 0 {
            return Err(ConfigError::new(
                field(section, "memory_limit_bytes"),
                "must be set (the store pod's memory limit in bytes) when memory shedding is enabled",
            ));
        }
        if self.enabled && self.endpoints.is_empty() {
            return Err(ConfigError::new(
                field(section, "endpoints"),
                "must list at least one metrics endpoint when memory shedding is enabled",
            ));
        }
        check_range(&field(section, "poll_interval_ms"), self.poll_interval_ms, 100, 60_000)?;
        check_range(&field(section, "timeout_ms"), self.timeout_ms, 10, 60_000)?;
        check_range(
            &field(section, "max_sample_age_ms"),
            self.max_sample_age_ms,
            self.poll_interval_ms,
            600_000,
        )?;
        check_unit(&field(section, "soft"), self.soft, 0.01, 1.0)?;
        check_unit(&field(section, "hard"), self.hard, self.soft, 1.0)?;
        check_unit(&field(section, "critical"), self.critical, self.hard, 2.0)
    }
}
