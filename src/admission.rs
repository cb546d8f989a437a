//! Client-side admission control from the upstream's recent success rate.

use serde::Deserialize;

use crate::config::{check_range, check_unit, field, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    pub enabled: bool,
    pub enforce: bool,
    /// Length of the sliding window of request/success counts.
    pub window_secs: u32,
    /// The `K` of p = max(0, (requests - K * accepts) / (requests + 1)).
    pub k: f64,
    pub max_rejection_probability: f64,
    /// Below this many requests in the window, never reject (too little evidence).
    pub min_requests: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            enforce: true,
            window_secs: 10,
            k: 1.5,
            max_rejection_probability: 0.9,
            min_requests: 50,
        }
    }
}

impl AdmissionConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "window_secs"), self.window_secs, 1, 600)?;
        check_unit(&field(section, "k"), self.k, 1.0, 100.0)?;
        check_unit(
            &field(section, "max_rejection_probability"),
            self.max_rejection_probability,
            0.0,
            1.0,
        )?;
        check_range(&field(section, "min_requests"), self.min_requests, 0, 1_000_000)
    }
}
