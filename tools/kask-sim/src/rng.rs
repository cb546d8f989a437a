//! A small non-cryptographic RNG: fault injection and service times need speed and decent
//! spread, not unpredictability, and this avoids a dependency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static SEQ: AtomicU64 = AtomicU64::new(0);

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(t ^ (u64::from(std::process::id()) << 32))
}

/// A uniform draw in [0, 1) from a process-wide lock-free sequence.
pub fn shared_unit() -> f64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(seed);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    to_unit(splitmix64(base ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

fn to_unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-thread generator (xorshift64*), for the backend workers' service times.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Rng(splitmix64(seed() ^ n).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in (0, 1]: never 0, so `ln` is always finite.
    pub fn unit_open(&mut self) -> f64 {
        1.0 - to_unit(self.next_u64())
    }

    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.unit_open().ln()
    }

    pub fn standard_normal(&mut self) -> f64 {
        let u1 = self.unit_open();
        let u2 = self.unit_open();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_mean_is_close() {
        let mut r = Rng::new();
        let n = 200_000;
        let sum: f64 = (0..n).map(|_| r.exponential(2.0)).sum();
        let mean = sum / n as f64;
        assert!((mean - 2.0).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn shared_unit_in_range() {
        for _ in 0..10_000 {
            let u = shared_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
