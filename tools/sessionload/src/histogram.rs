//! Fixed-size log-linear histogram of microsecond values (HDR-style).
//!
//! Values below 64 µs are exact; above that each power of two is split into 32
//! equal sub-buckets, so a reported percentile is within 1/64 (~1.6%) of the
//! true value. Values are clamped at 2^40 µs (~12.7 days). Memory is a fixed
//! 1152 counters (9 KiB) whatever the number of samples.

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS; // 32
const MAX_EXP: u32 = 40;
pub const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 1) as usize) * SUB; // 1152
const MAX_VALUE: u64 = (1u64 << MAX_EXP) - 1;

#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish()
    }
}

fn index_of(v: u64) -> usize {
    let v = v.min(MAX_VALUE);
    if v < (2 * SUB) as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 6
    let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    ((e - SUB_BITS + 1) as usize) * SUB + sub
}

/// Lowest value and width of bucket `idx`.
fn bucket_range(idx: usize) -> (u64, u64) {
    if idx < 2 * SUB {
        return (idx as u64, 1);
    }
    let group = (idx / SUB) as u32; // >= 2
    let sub = (idx % SUB) as u64;
    let e = group + SUB_BITS - 1;
    let shift = e - SUB_BITS;
    ((SUB as u64 + sub) << shift, 1u64 << shift)
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0u64; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index_of(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum as f64 / self.total as f64)
    }

    /// The value at percentile `p` (0..=100): the smallest recorded value such
    /// that at least p% of samples are <= it, up to bucket precision. Reported
    /// as the bucket midpoint, clamped to the exact min/max seen.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let p = if p.is_finite() {
            p.clamp(0.0, 100.0)
        } else {
            100.0
        };
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket_range(idx);
                let mid = lo + (width - 1) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// Microseconds to (fractional) milliseconds, for reports.
pub fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn buckets_are_contiguous() {
        let mut prev_end = 0u64;
        for idx in 0..BUCKETS {
            let (lo, w) = bucket_range(idx);
            assert_eq!(lo, prev_end, "bucket {idx}");
            assert_eq!(index_of(lo), idx);
            assert_eq!(index_of(lo + w - 1), idx);
            prev_end = lo + w;
        }
        assert_eq!(prev_end - 1, MAX_VALUE);
        assert_eq!(index_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn empty_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.percentile(50.0), None);
        assert_eq!(h.max(), None);
        assert_eq!(h.mean(), None);
    }

    #[test]
    fn small_values_exact() {
        let mut h = Histogram::new();
        for v in 1..=50 {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), Some(25));
        assert_eq!(h.percentile(90.0), Some(45));
        assert_eq!(h.percentile(100.0), Some(50));
        assert_eq!(h.percentile(0.0), Some(1));
    }

    #[test]
    fn percentiles_within_precision_of_sorted_vector() {
        let mut r = Rng::new(42);
        let mut h = Histogram::new();
        let mut v: Vec<u64> = Vec::new();
        for _ in 0..200_000 {
            // log-uniform between 10 µs and 10 s
            let x = (10f64 * (1e6f64).powf(r.next_f64())) as u64;
            h.record(x);
            v.push(x);
        }
        v.sort_unstable();
        for p in [1.0, 10.0, 50.0, 90.0, 99.0, 99.9] {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            let exact = v[rank - 1] as f64;
            let got = h.percentile(p).unwrap() as f64;
            let err = (got - exact).abs() / exact;
            assert!(err <= 1.0 / 32.0, "p{p}: exact {exact} got {got} err {err}");
        }
        assert_eq!(h.max(), Some(*v.last().unwrap()));
        assert_eq!(h.count(), 200_000);
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for i in 0..1000 {
            a.record(i);
            b.record(i + 1000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2000);
        let p50 = a.percentile(50.0).unwrap() as f64;
        assert!((p50 - 1000.0).abs() / 1000.0 < 0.02, "{p50}");
        assert_eq!(a.max(), Some(1999));
    }

    #[test]
    fn huge_values_clamp() {
        let mut h = Histogram::new();
        h.record(u64::MAX);
        assert!(h.percentile(50.0).is_some());
    }
}
