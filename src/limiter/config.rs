//! The `concurrency` section: how the limit is chosen, and the adaptive controller's
//! settings. Its own module because both the limiter and the gradient controller read it.

use serde::Deserialize;

use crate::config::check::{check_range, check_unit, field, ConfigError};

/// How the concurrency limit is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// `limit` is the limit.
    Fixed,
    /// A gradient controller moves the limit between `min_limit` and `max_limit`,
    /// starting from `limit`.
    Adaptive,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrencyConfig {
    pub enabled: bool,
    /// false = shadow mode: count what would be shed, shed nothing.
    pub enforce: bool,
    pub mode: LimitMode,
    /// Fixed limit, or the starting point of the adaptive one.
    pub limit: u32,
    pub min_limit: u32,
    pub max_limit: u32,
    /// Share of the limit that sheddable requests may occupy, so critical ones always find room.
    pub sheddable_share: f64,
    /// Critical requests are shed by the limit only once they alone hold this many
    /// times it (see `bounds`, "Priorities").
    pub critical_headroom: f64,
    pub adaptive: AdaptiveConfig,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            enforce: true,
            mode: LimitMode::Adaptive,
            limit: 256,
            min_limit: 16,
            max_limit: 2048,
            sheddable_share: 0.8,
            critical_headroom: 2.0,
            adaptive: AdaptiveConfig::default(),
        }
    }
}

impl ConcurrencyConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "min_limit"), self.min_limit, 1, 1_000_000)?;
        check_range(
            &field(section, "max_limit"),
            self.max_limit,
            self.min_limit,
            1_000_000,
        )?;
        check_range(
            &field(section, "limit"),
            self.limit,
            self.min_limit,
            self.max_limit,
        )?;
        check_unit(
            &field(section, "sheddable_share"),
            self.sheddable_share,
            0.0,
            1.0,
        )?;
        check_unit(
            &field(section, "critical_headroom"),
            self.critical_headroom,
            1.0,
            16.0,
        )?;
        self.adaptive.validate(&field(section, "adaptive"))
    }
}

/// Gradient controller settings (see the gradient module).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// How often the elected worker recomputes the limit.
    pub interval_ms: u64,
    /// Pin the minimum RTT instead of learning it from traffic.
    pub pinned_min_rtt_ms: Option<f64>,
    /// Sample RTT may exceed the minimum RTT by this factor before the limit shrinks.
    pub tolerance: f64,
    /// Weight of the new value in the exponential smoothing of the limit.
    pub smoothing: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            pinned_min_rtt_ms: None,
            tolerance: 2.0,
            smoothing: 0.2,
        }
    }
}

impl AdaptiveConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(
            &field(section, "interval_ms"),
            self.interval_ms,
            100,
            60_000,
        )?;
        if let Some(ms) = self.pinned_min_rtt_ms {
            check_unit(&field(section, "pinned_min_rtt_ms"), ms, 0.001, 60_000.0)?;
        }
        check_unit(&field(section, "tolerance"), self.tolerance, 1.0, 100.0)?;
        check_unit(&field(section, "smoothing"), self.smoothing, 0.01, 1.0)
    }
}
