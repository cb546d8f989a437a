//! Fault-injection knobs and the optional `POST /_sim/control` endpoint that changes them while
//! a test or replay runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Longest injectable delay, so a typo cannot park every request for days.
const MAX_DELAY_MS: u64 = 3_600_000;

pub struct Knobs {
    delay_ms: AtomicU64,
    error_rate_bits: AtomicU64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlRequest {
    delay_ms: Option<u64>,
    error_rate: Option<f64>,
    reset_peak: Option<bool>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Settings {
    pub delay_ms: u64,
    pub error_rate: f64,
}

/// What a control request asked for beyond the knobs themselves.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub reset_peak: bool,
}

pub fn validate_error_rate(r: f64) -> Result<f64, String> {
    if r.is_finite() && (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("error_rate must be between 0 and 1, got {r}"))
    }
}

pub fn validate_delay_ms(d: u64) -> Result<u64, String> {
    if d <= MAX_DELAY_MS {
        Ok(d)
    } else {
        Err(format!("delay_ms must be at most {MAX_DELAY_MS}, got {d}"))
    }
}

impl Knobs {
    pub fn new(delay_ms: u64, error_rate: f64) -> Knobs {
        Knobs {
            delay_ms: AtomicU64::new(delay_ms),
            error_rate_bits: AtomicU64::new(error_rate.to_bits()),
        }
    }

    pub fn delay_ms(&self) -> u64 {
        self.delay_ms.load(Ordering::Relaxed)
    }

    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed))
    }

    pub fn settings(&self) -> Settings {
        Settings {
            delay_ms: self.delay_ms(),
            error_rate: self.error_rate(),
        }
    }

    /// Validates the whole request before changing anything, so a bad field leaves the knobs
    /// as they were.
    pub fn apply(&self, body: &[u8]) -> Result<Applied, String> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(
                "empty body: expected a JSON object with any of delay_ms, error_rate, reset_peak"
                    .into(),
            );
        }
        let req: ControlRequest =
            serde_json::from_slice(body).map_err(|e| format!("invalid control request: {e}"))?;
        let delay = req.delay_ms.map(validate_delay_ms).transpose()?;
        let rate = req.error_rate.map(validate_error_rate).transpose()?;
        if let Some(d) = delay {
            self.delay_ms.store(d, Ordering::Relaxed);
        }
        if let Some(r) = rate {
            self.error_rate_bits.store(r.to_bits(), Ordering::Relaxed);
        }
        Ok(Applied {
            reset_peak: req.reset_peak.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_valid_requests() {
        let k = Knobs::new(0, 0.0);
        let a = k
            .apply(br#"{"delay_ms": 50, "error_rate": 0.1, "reset_peak": true}"#)
            .unwrap();
        assert!(a.reset_peak);
        assert_eq!(
            k.settings(),
            Settings {
                delay_ms: 50,
                error_rate: 0.1
            }
        );
        k.apply(br#"{"error_rate": 0}"#).unwrap();
        assert_eq!(k.delay_ms(), 50);
        assert_eq!(k.error_rate(), 0.0);
    }

    #[test]
    fn rejects_bad_requests_without_partial_changes() {
        let k = Knobs::new(5, 0.5);
        let e = k.apply(br#"{"delay_ms": 7, "bogus": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = k.apply(br#"{"delay_ms": 7, "error_rate": 2}"#).unwrap_err();
        assert!(e.contains("error_rate"), "{e}");
        assert!(k.apply(b"{not json").is_err());
        assert!(k.apply(b"").is_err());
        assert!(k.apply(br#"{"delay_ms": -1}"#).is_err());
        assert_eq!(k.delay_ms(), 5);
        assert_eq!(k.error_rate(), 0.5);
    }
}
