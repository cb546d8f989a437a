//! From a memory ratio to a shed probability per criticality.

use super::config::MemoryConfig;

/// Ratio → shed probability of sheddable traffic and severity (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Curve {
    pub soft: f64,
    pub hard: f64,
    pub critical: f64,
}

impl Curve {
    pub fn from_config(cfg: &MemoryConfig) -> Curve {
        Curve {
            soft: cfg.soft,
            hard: cfg.hard,
            critical: cfg.critical,
        }
    }

    /// Probability of shedding a sheddable request: 0 up to `soft`, `x²` in the band,
    /// 1 from `hard`.
    pub fn sheddable(&self, r: f64) -> f64 {
        if r.is_nan() || r <= self.soft {
            0.0
        } else if r >= self.hard {
            1.0
        } else {
            let x = (r - self.soft) / (self.hard - self.soft);
            unit(x * x)
        }
    }

    /// How severe the overload is, in [0, 1]: 0 at `soft`, 1 at `critical`.
    pub fn severity(&self, r: f64) -> f64 {
        if r.is_nan() || r <= self.soft {
            0.0
        } else if r >= self.critical {
            1.0
        } else {
            unit((r - self.soft) / (self.critical - self.soft))
        }
    }
}

/// Clamps to [0, 1]; NaN becomes 0.
pub(super) fn unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}
