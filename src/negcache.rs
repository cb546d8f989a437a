//! Negative cache: answer repeated lookups of known-missing keys at the proxy.

use serde::Deserialize;

use crate::config::{check_range, field, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NegativeCacheConfig {
    pub enabled: bool,
    pub enforce: bool,
    /// How long a 404 is remembered.
    pub ttl_ms: u64,
    pub single_flight: SingleFlightConfig,
}

impl Default for NegativeCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            enforce: true,
            ttl_ms: 10_000,
            single_flight: SingleFlightConfig::default(),
        }
    }
}

impl NegativeCacheConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "ttl_ms"), self.ttl_ms, 1, 86_400_000)?;
        self.single_flight
            .validate(&field(section, "single_flight"))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SingleFlightConfig {
    pub enabled: bool,
    /// Requests that may wait on one in-flight lookup; more go upstream.
    pub max_waiters: u32,
    /// Longest a waiter is held before it goes upstream itself.
    pub max_wait_ms: u64,
}

impl Default for SingleFlightConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_waiters: 64,
            max_wait_ms: 200,
        }
    }
}

impl SingleFlightConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "max_waiters"), self.max_waiters, 0, 10_000)?;
        check_range(&field(section, "max_wait_ms"), self.max_wait_ms, 1, 10_000)
    }
}
