//! The RTT window: a fixed-size log histogram, merged across workers.

use super::{BUCKETS, BUCKETS_PER_OCTAVE, MIN_BUCKET_MS};

/// Fixed-size log histogram of RTTs (ms), 0.05 ms .. ~130 s at 12% resolution.
#[derive(Clone, PartialEq, Eq)]
pub struct RttHistogram {
    pub(super) counts: [u32; BUCKETS],
    pub(super) total: u64,
}

impl Default for RttHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

impl std::fmt::Debug for RttHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RttHistogram")
            .field("total", &self.total)
            .field("p50", &self.percentile(0.5))
            .finish()
    }
}

impl RttHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bucket of a latency; `None` for NaN, infinities and negative values.
    pub(super) fn bucket(rtt_ms: f64) -> Option<usize> {
        if !rtt_ms.is_finite() || rtt_ms < 0.0 {
            return None;
        }
        if rtt_ms < MIN_BUCKET_MS {
            return Some(0);
        }
        let x = (rtt_ms / MIN_BUCKET_MS).log2() * BUCKETS_PER_OCTAVE + 1.0;
        // x >= 1 here; cap before converting so the cast is always in range.
        let last = (BUCKETS - 1) as f64;
        Some(if x >= last { BUCKETS - 1 } else { x as usize })
    }

    /// Lower edge of bucket `i` in ms (bucket 0 starts at 0).
    pub(super) fn lower_edge(i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            MIN_BUCKET_MS * ((i as f64 - 1.0) / BUCKETS_PER_OCTAVE).exp2()
        }
    }

    /// Records one RTT. NaN, infinite and negative values are refused (false); 0 and
    /// sub-0.05 ms values count in the lowest bucket, huge values in the highest.
    pub fn record(&mut self, rtt_ms: f64) -> bool {
        let Some(i) = Self::bucket(rtt_ms) else {
            return false;
        };
        if let Some(c) = self.counts.get_mut(i) {
            if *c < u32::MAX {
                *c += 1;
                self.total += 1;
            }
        }
        true
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Adds `other` into `self`, saturating each bucket.
    pub fn merge(&mut self, other: &RttHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.recount();
    }

    pub(super) fn recount(&mut self) {
        self.total = self.counts.iter().map(|&c| u64::from(c)).sum();
    }

    /// The `q` quantile (0..=1) in ms, interpolated geometrically inside its bucket;
    /// `None` when empty.
    pub fn percentile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            0.5
        };
        // rank in 1..=total; u64 -> f64 is exact below 2^53, far above any count here.
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let c = u64::from(c);
            if c == 0 {
                continue;
            }
            if below + c >= rank {
                let frac = (rank - below) as f64 / c as f64;
                let lo = Self::lower_edge(i).max(MIN_BUCKET_MS * 0.5);
                let hi = Self::lower_edge(i + 1);
                return Some(lo * (hi / lo).powf(frac));
            }
            below += c;
        }
        None
    }
}
