//! The `memory` section: what to poll, the limits, the curve's thresholds.

use crate::ceiling::{MAX_BYTES_PER_REQUEST, MIN_BYTES_PER_REQUEST};
use crate::config::check::{check_range, check_unit, field, ConfigError};
use crate::prom::Selector;
use serde::Deserialize;

/// Most metrics endpoints one filter polls.
pub const MAX_ENDPOINTS: usize = 256;
/// Most demand gauges summed.
pub const MAX_DEMAND_GAUGES: usize = 8;
/// Weight of the previous ratio when a sample is lower (module docs, "Smoothing").
pub const FALL_SMOOTHING: f64 = 0.5;
/// The store's start time, read when present: a change is a restart (the per-request
/// estimate then starts a new window, see [`crate::ceiling`]).
pub const START_TIME_GAUGE: &str = "process_start_time_seconds";
/// Idle polls are this many times slower than `poll_interval_ms`...
pub(super) const IDLE_POLL_FACTOR: u64 = 10;
/// ...but at most this far apart.
pub(super) const IDLE_POLL_MAX_MS: u64 = 1000;
/// A demand that grew by more than this share of the limit since the previous sample
/// is rising: poll fast.
pub(super) const RISING_SHARE: f64 = 0.01;
/// A limit below this is surely a unit mistake (MiB written for bytes).
pub(super) const MIN_MEMORY_LIMIT_BYTES: u64 = 1 << 20;

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

impl MetricsEndpoint {
    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(ConfigError::new(
                field(section, "cluster"),
                "must name the Envoy cluster that reaches the store pod",
            ));
        }
        if !self.path.starts_with('/') {
            return Err(ConfigError::new(
                field(section, "path"),
                format!("must start with `/` (like `/metrics`), got {:?}", self.path),
            ));
        }
        if self.authority.trim().is_empty() {
            return Err(ConfigError::new(
                field(section, "authority"),
                "must not be empty (it is sent as `:authority`)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// On when `memory_limit_bytes` is set, unless set to false: the limit is the one
    /// figure only the operator knows, and setting it says what is wanted.
    pub enabled: Option<bool>,
    pub enforce: bool,
    /// The pod's memory limit (e.g. 419430400 for 400Mi).
    pub memory_limit_bytes: u64,
    pub endpoints: Vec<MetricsEndpoint>,
    pub poll_interval_ms: u64,
    pub timeout_ms: u64,
    /// A sample older than this stops driving shedding; a published snapshot older
    /// than this is ignored by the other workers.
    pub max_sample_age_ms: u64,
    /// The ceiling: what the kernel charges the pod (resident memory). A selector:
    /// `name` or `name{label="value",…}`. Acts only at `critical` (see the module docs).
    pub gauge: String,
    /// `[held, released]`: memory the runtime holds but does not use is `held −
    /// released`; demand is `gauge` minus that. Empty: use `demand_gauges`.
    pub retained_gauges: Vec<String>,
    /// Summed, the demand when `retained_gauges` are not available. Empty (and no
    /// retained gauges): decide on `gauge` alone (for services not written in Go).
    pub demand_gauges: Vec<String>,
    pub soft: f64,
    pub hard: f64,
    /// The line the in-flight ceiling keeps the store's demand under (a ratio of
    /// the limit); above it critical traffic is refused too: an OOM kill serves no one.
    pub critical: f64,
    /// The store's memory per request in flight, if the operator knows it; `None`:
    /// learned from the polls (see [`crate::ceiling`]).
    pub bytes_per_request: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            enforce: true,
            memory_limit_bytes: 0,
            endpoints: vec![MetricsEndpoint::default()],
            poll_interval_ms: 100,
            timeout_ms: 500,
            max_sample_age_ms: 5000,
            gauge: "process_resident_memory_bytes".to_string(),
            retained_gauges: vec![
                "go_memstats_heap_idle_bytes".to_string(),
                "go_memstats_heap_released_bytes".to_string(),
            ],
            demand_gauges: vec![
                "go_memstats_heap_inuse_bytes".to_string(),
                "go_memstats_stack_inuse_bytes".to_string(),
            ],
            soft: 0.65,
            hard: 0.78,
            critical: 0.78,
            bytes_per_request: None,
        }
    }
}

impl MemoryConfig {
    /// Whether memory shedding runs: as `enabled` says, else when a limit is set.
    pub fn is_on(&self) -> bool {
        self.enabled.unwrap_or(self.memory_limit_bytes != 0)
    }

    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.enabled == Some(true) && self.memory_limit_bytes == 0 {
            return Err(ConfigError::new(
                field(section, "memory_limit_bytes"),
                "must be set (the store pod's memory limit in bytes) when memory shedding is enabled",
            ));
        }
        if self.memory_limit_bytes != 0 && self.memory_limit_bytes < MIN_MEMORY_LIMIT_BYTES {
            return Err(ConfigError::new(
                field(section, "memory_limit_bytes"),
                format!(
                    "must be in bytes (e.g. 419430400 for 400Mi), got {}",
                    self.memory_limit_bytes
                ),
            ));
        }
        if self.is_on() && self.endpoints.is_empty() {
            return Err(ConfigError::new(
                field(section, "endpoints"),
                "must list at least one metrics endpoint when memory shedding is enabled",
            ));
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(ConfigError::new(
                field(section, "endpoints"),
                format!(
                    "must list at most {MAX_ENDPOINTS} endpoints, got {}",
                    self.endpoints.len()
                ),
            ));
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            endpoint.validate(&format!("{}[{i}]", field(section, "endpoints")))?;
        }
        check_range(
            &field(section, "poll_interval_ms"),
            self.poll_interval_ms,
            100,
            60_000,
        )?;
        check_range(&field(section, "timeout_ms"), self.timeout_ms, 10, 60_000)?;
        check_range(
            &field(section, "max_sample_age_ms"),
            self.max_sample_age_ms,
            self.poll_interval_ms,
            600_000,
        )?;
        if let Err(e) = Selector::parse(&self.gauge) {
            return Err(ConfigError::new(field(section, "gauge"), e.to_string()));
        }
        if !matches!(self.retained_gauges.len(), 0 | 2) {
            return Err(ConfigError::new(
                field(section, "retained_gauges"),
                format!(
                    "must be empty or name two gauges [held, released], got {}",
                    self.retained_gauges.len()
                ),
            ));
        }
        for (i, text) in self.retained_gauges.iter().enumerate() {
            if let Err(e) = Selector::parse(text) {
                let name = format!("{}[{i}]", field(section, "retained_gauges"));
                return Err(ConfigError::new(name, e.to_string()));
            }
        }
        if self.demand_gauges.len() > MAX_DEMAND_GAUGES {
            return Err(ConfigError::new(
                field(section, "demand_gauges"),
                format!(
                    "must list at most {MAX_DEMAND_GAUGES} gauges, got {}",
                    self.demand_gauges.len()
                ),
            ));
        }
        let mut parsed: Vec<Selector> = Vec::with_capacity(self.demand_gauges.len());
        for (i, text) in self.demand_gauges.iter().enumerate() {
            let name = format!("{}[{i}]", field(section, "demand_gauges"));
            let selector =
                Selector::parse(text).map_err(|e| ConfigError::new(&name, e.to_string()))?;
            if parsed.contains(&selector) {
                return Err(ConfigError::new(
                    name,
                    format!("{text:?} is listed twice (it would be counted twice)"),
                ));
            }
            parsed.push(selector);
        }
        check_unit(&field(section, "soft"), self.soft, 0.01, 1.0)?;
        check_unit(&field(section, "hard"), self.hard, self.soft, 1.0)?;
        check_unit(&field(section, "critical"), self.critical, self.hard, 1.0)?;
        if let Some(b) = self.bytes_per_request {
            check_range(
                &field(section, "bytes_per_request"),
                b,
                MIN_BYTES_PER_REQUEST,
                MAX_BYTES_PER_REQUEST,
            )?;
        }
        Ok(())
    }
}
