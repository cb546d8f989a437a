//! Client-side admission control from the upstream's recent success rate.
//!
//! The SRE book's adaptive throttling, aggregated across all workers:
//!
//! ```text
//! p = min(max_rejection_probability, max(0, (requests − K·accepts) / (requests + 1)))
//! p = 0 while requests < min_requests (too little evidence)
//! ```
//!
//! over the last `window_secs` seconds. `requests` counts requests forwarded to the
//! store; `accepts` those it answered successfully ([`Ending::upstream_success`]:
//! any status below 500, so a 404 is a success; 5xx, upstream resets and timeouts
//! are failures). Requests answered at the proxy (shed by any mechanism,
//! negative-cache hits) and requests the client abandoned are not counted, so that
//! `p` can fall back to 0 once the store recovers.
//!
//! # Critical and sheddable traffic
//!
//! `p` is the fraction of the offered traffic to turn away, exactly as in the SRE
//! formula, but the victims are chosen in priority order: with `s` the share of
//! sheddable requests among those offered in the window,
//!
//! ```text
//! p ≤ s:  sheddable rejected with p / s,  critical never
//! p > s:  sheddable always rejected,      critical with (p − s) / (1 − s)
//! ```
//!
//! The total rejected fraction is still `p` (so the feedback loop behaves as the
//! SRE one does), but critical requests are rejected only when rejecting every
//! sheddable one is not enough: "critical traffic is shed only when nothing else is
//! left to shed". With Kask's mix (~85% sheddable reader misses), critical writes
//! are untouched until the store fails more than that.
//!
//! Critical requests are judged on the last [`RECENT_SECS`] seconds as well: once
//! `p_recent` falls below half of `p`, their probability comes from `p_recent`. A
//! store that crashed fills the window
//! with failures for `window_secs`; once it answers again, the recent seconds show
//! successes (or too few requests to judge: no rejection) and logged-in users are
//! admitted within two seconds, while sheddable traffic comes back with the window.
//!
//! # Hot path and shared data
//!
//! [`Admission::decide`] and [`Admission::record`] touch only this VM's counters (no
//! hostcall). [`Admission::tick`], on every VM's `on_tick`, CAS-adds those counters
//! into the current second's bucket of a ring in [`ADMISSION_KEY`], sums the window
//! and caches `p` and the split until the next tick. Every VM computes the same
//! numbers from the same data, so the tick is idempotent across VMs and needs no
//! leader. If the CAS loop gives up, the counters stay local and are added on the
//! next tick (nothing is lost, only delayed).
//!
//! `ADMISSION_KEY` layout (little-endian): magic `SGa1`, bucket count `n` (u32, =
//! `window_secs`), then `n` buckets of 20 bytes: second (u32, Unix seconds modulo
//! 2^32), requests, accepts, offered, offered sheddable (u32 each, saturating).
//! Bucket `i` holds second `s` with `s mod n = i`; a bucket counts while
//! `now − s < n` in wrapping u32 arithmetic, so the 2106 wrap-around is harmless and
//! a bucket from the future (clock set back) is ignored. A value that does not
//! decode, or has another bucket count (`window_secs` changed), is replaced by an
//! empty ring.

use serde::Deserialize;

use crate::classify::Criticality;
use crate::config::{check_range, check_unit, field, ConfigError};
use crate::limiter::Ending;
use crate::shared::{update, SharedStore};
use crate::wire::Reader;

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
        check_range(
            &field(section, "min_requests"),
            self.min_requests,
            0,
            1_000_000,
        )
    }
}

/// The shared key holding the ring of per-second buckets.
pub const ADMISSION_KEY: &str = "sg.v1.admission";

const MAGIC: [u8; 4] = *b"SGa1";
/// Critical requests are rejected only while the store also failed in the last
/// this many seconds: a store that came back gets its users' work at once, not when
/// its failures leave the (longer) window.
pub const RECENT_SECS: usize = 2;
const HEADER_LEN: usize = 8;
const BUCKET_LEN: usize = 20;

/// Counts for one second (or one VM's counts since its last flush).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u32,
    pub accepts: u32,
    pub offered: u32,
    pub offered_sheddable: u32,
}

impl Counts {
    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }

    fn add(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.accepts = self.accepts.saturating_add(other.accepts);
        self.offered = self.offered.saturating_add(other.offered);
        self.offered_sheddable = self
            .offered_sheddable
            .saturating_add(other.offered_sheddable);
    }
}

/// The rejection probability of the SRE formula, with the evidence guard and cap.
/// Safe for any input: non-finite `k` or `max_p` give 0.
pub fn rejection_probability(
    requests: u64,
    accepts: u64,
    k: f64,
    max_p: f64,
    min_requests: u32,
) -> f64 {
    if requests == 0 || requests < u64::from(min_requests) || !k.is_finite() || !max_p.is_finite() {
        return 0.0;
    }
    // u64 -> f64 loses precision only above 2^53 requests, which no window holds.
    let n = requests as f64;
    let p = (n - k * accepts as f64) / (n + 1.0);
    if p.is_finite() {
        p.max(0.0).min(max_p.clamp(0.0, 1.0))
    } else {
        0.0
    }
}

/// Splits the overall rejection fraction `p` between the classes, sheddable first
/// (see the module docs). `sheddable_share` is the sheddable fraction of the offered
/// traffic. Returns `(p_sheddable, p_critical)`.
pub fn split(p: f64, sheddable_share: f64) -> (f64, f64) {
    if !(p.is_finite() && p > 0.0) {
        return (0.0, 0.0);
    }
    let p = p.min(1.0);
    let s = if sheddable_share.is_finite() {
        sheddable_share.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if p <= s {
        // s > 0 here since p > 0.
        ((p / s).min(1.0), 0.0)
    } else if s >= 1.0 {
        (1.0, 0.0)
    } else {
        (1.0, ((p - s) / (1.0 - s)).clamp(0.0, 1.0))
    }
}

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Admit,
    /// Shed with reason admission. `severity` in [0, 1] (for `retry-after`) is `p`
    /// relative to `max_rejection_probability`.
    Reject {
        severity: f64,
    },
    /// Shadow mode: it would have been rejected; admitted anyway.
    ShadowReject,
}

/// Gauges and counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdmissionStats {
    /// Overall rejection probability `p` (after the guard and the cap).
    pub rejection_probability: f64,
    pub sheddable_rejection_probability: f64,
    pub critical_rejection_probability: f64,
    /// Sheddable share of the offered traffic in the window.
    pub sheddable_share: f64,
    /// Forwarded requests and successes in the window, all VMs.
    pub window_requests: u64,
    pub window_accepts: u64,
    pub rejected_sheddable: u64,
    pub rejected_critical: u64,
    /// Shadow mode: requests that would have been rejected.
    pub would_have_rejected: u64,
    /// Outcomes this VM recorded.
    pub successes: u64,
    pub failures: u64,
    /// Ticks whose flush gave up (counters kept for the next tick).
    pub flush_giveups: u64,
}

/// Admission control for one VM. See the module docs.
#[derive(Debug, Clone)]
pub struct Admission {
    cfg: AdmissionConfig,
    attempts: u32,
    pending: Counts,
    p: f64,
    p_sheddable: f64,
    p_critical: f64,
    stats: AdmissionStats,
}

fn second_of(now_ms: u64) -> u32 {
    // Unix seconds modulo 2^32: the ring compares seconds with wrapping arithmetic.
    ((now_ms / 1000) & u64::from(u32::MAX)) as u32
}

/// A ring decoded from the shared value.
struct Ring {
    buckets: Vec<(u32, Counts)>,
}

impl Ring {
    fn empty(n: usize) -> Ring {
        Ring {
            buckets: vec![(0, Counts::default()); n],
        }
    }

    fn decode(bytes: &[u8], n: usize) -> Option<Ring> {
        let mut r = Reader::new(bytes);
        if r.take::<4>()? != MAGIC || usize::try_from(r.u32()?).ok()? != n {
            return None;
        }
        if bytes.len() != HEADER_LEN + n * BUCKET_LEN {
            return None;
        }
        let mut buckets = Vec::with_capacity(n);
        for _ in 0..n {
            let sec = r.u32()?;
            let counts = Counts {
                requests: r.u32()?,
                accepts: r.u32()?,
                offered: r.u32()?,
                offered_sheddable: r.u32()?,
            };
            buckets.push((sec, counts));
        }
        Some(Ring { buckets })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.buckets.len() * BUCKET_LEN);
        out.extend_from_slice(&MAGIC);
        // The bucket count is window_secs, a u32.
        out.extend_from_slice(&(self.buckets.len() as u32).to_le_bytes());
        for (sec, c) in &self.buckets {
            for v in [*sec, c.requests, c.accepts, c.offered, c.offered_sheddable] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    fn add(&mut self, now_sec: u32, counts: &Counts) {
        let n = self.buckets.len();
        if n == 0 {
            return;
        }
        // u32 -> usize is lossless on 32- and 64-bit targets.
        let i = (now_sec as usize) % n;
        if let Some(bucket) = self.buckets.get_mut(i) {
            if bucket.0 != now_sec {
                *bucket = (now_sec, Counts::default());
            }
            bucket.1.add(counts);
        }
    }

    /// Sums the buckets of the last `span` seconds (at most the ring's), as u64.
    fn window(&self, now_sec: u32, span: usize) -> [u64; 4] {
        let n = self.buckets.len().min(span);
        let mut sum = [0u64; 4];
        for (sec, c) in &self.buckets {
            if (now_sec.wrapping_sub(*sec) as usize) < n {
                sum[0] += u64::from(c.requests);
                sum[1] += u64::from(c.accepts);
                sum[2] += u64::from(c.offered);
                sum[3] += u64::from(c.offered_sheddable);
            }
        }
        sum
    }
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig, cas_attempts: u32) -> Self {
        Self {
            cfg: cfg.clone(),
            attempts: cas_attempts.max(1),
            pending: Counts::default(),
            p: 0.0,
            p_sheddable: 0.0,
            p_critical: 0.0,
            stats: AdmissionStats::default(),
        }
    }

    /// Applies a new configuration; counters not yet flushed are kept. A new
    /// `window_secs` restarts the shared window empty.
    pub fn reconfigure(&mut self, cfg: &AdmissionConfig) {
        self.cfg = cfg.clone();
        if !cfg.enabled {
            self.pending = Counts::default();
            self.set_probabilities(0.0, 0.0, 0.0);
        }
    }

    fn window_len(&self) -> usize {
        usize::try_from(self.cfg.window_secs.max(1)).unwrap_or(1)
    }

    /// Decides for one request about to be forwarded. `u` is a uniform random number
    /// in [0, 1) from the host's generator. No hostcall.
    pub fn decide(&mut self, crit: Criticality, u: f64) -> Decision {
        if !self.cfg.enabled {
            return Decision::Admit;
        }
        self.pending.offered = self.pending.offered.saturating_add(1);
        let p = match crit {
            Criticality::Critical => self.p_critical,
            Criticality::Sheddable => {
                self.pending.offered_sheddable = self.pending.offered_sheddable.saturating_add(1);
                self.p_sheddable
            }
        };
        // A NaN u never rejects.
        let reject = u.is_finite() && u < p;
        if !reject {
            return Decision::Admit;
        }
        if !self.cfg.enforce {
            self.stats.would_have_rejected += 1;
            return Decision::ShadowReject;
        }
        match crit {
            Criticality::Critical => self.stats.rejected_critical += 1,
            Criticality::Sheddable => self.stats.rejected_sheddable += 1,
        }
        Decision::Reject {
            severity: self.severity(),
        }
    }

    /// Records how a request ended. Only upstream outcomes count (see
    /// [`Ending::upstream_success`]); local replies, client resets and unread
    /// responses are ignored. No hostcall.
    pub fn record(&mut self, ending: Ending) {
        self.record_weighted(ending, 1);
    }

    /// Records one request that stands for `weight` alike, of which only this one was
    /// observed (a timed read among `weight` reads of known keys, see `crate::clock`):
    /// the counts stay unbiased estimates of all of them.
    pub fn record_weighted(&mut self, ending: Ending, weight: u32) {
        if !self.cfg.enabled {
            return;
        }
        let Some(success) = ending.upstream_success() else {
            return;
        };
        self.pending.requests = self.pending.requests.saturating_add(weight);
        if success {
            self.pending.accepts = self.pending.accepts.saturating_add(weight);
            self.stats.successes += u64::from(weight);
        } else {
            self.stats.failures += u64::from(weight);
        }
    }

    /// On every VM's `on_tick`: flush this VM's counters into the shared ring and
    /// recompute the cached probabilities from the whole window.
    pub fn tick<S: SharedStore + ?Sized>(&mut self, store: &S, now_ms: u64) {
        if !self.cfg.enabled {
            return;
        }
        let n = self.window_len();
        let now_sec = second_of(now_ms);
        let pending = self.pending;
        let mut sums = None;
        let result = update(store, ADMISSION_KEY, self.attempts, |current| {
            let decoded = current.and_then(|b| Ring::decode(b, n));
            let rewrite = current.is_some() && decoded.is_none();
            let mut ring = decoded.unwrap_or_else(|| Ring::empty(n));
            ring.add(now_sec, &pending);
            sums = Some((ring.window(now_sec, n), ring.window(now_sec, RECENT_SECS)));
            (rewrite || !pending.is_zero()).then(|| (ring.encode(), ()))
        });
        match result {
            Ok(Some(())) => self.pending = Counts::default(),
            Ok(None) => {}
            Err(_) => self.stats.flush_giveups += 1,
        }
        // On a give-up the window was still read (without our counters): use it.
        let Some(([requests, accepts, offered, offered_sheddable], recent)) = sums else {
            return;
        };
        self.stats.window_requests = requests;
        self.stats.window_accepts = accepts;
        let share = if offered == 0 {
            0.0
        } else {
            offered_sheddable as f64 / offered as f64
        };
        self.stats.sheddable_share = share;
        let p = rejection_probability(
            requests,
            accepts,
            self.cfg.k,
            self.cfg.max_rejection_probability,
            self.cfg.min_requests,
        );
        let [recent_requests, recent_accepts, ..] = recent;
        let p_recent = rejection_probability(
            recent_requests,
            recent_accepts,
            self.cfg.k,
            self.cfg.max_rejection_probability,
            self.cfg.min_requests,
        );
        self.set_probabilities(p, share, p_recent);
    }

    /// `p` over the window splits between the classes; critical requests are judged
    /// on the last [`RECENT_SECS`] seconds instead once those show less than half the
    /// window's failures (a recovery). Taking the lower of the two at all times would
    /// bias critical rejection low in a steady failure: two noisy estimates of the
    /// same rate, and the minimum of them.
    fn set_probabilities(&mut self, p: f64, share: f64, p_recent: f64) {
        let (ps, _) = split(p, share);
        let recovering = p_recent < p * 0.5;
        let (_, pc) = split(if recovering { p_recent } else { p }, share);
        self.p = p;
        self.p_sheddable = ps;
        self.p_critical = pc;
        self.stats.rejection_probability = p;
        self.stats.sheddable_rejection_probability = ps;
        self.stats.critical_rejection_probability = pc;
    }

    /// How severe the current throttling is, in [0, 1], for `retry-after`.
    pub fn severity(&self) -> f64 {
        let cap = self.cfg.max_rejection_probability;
        if cap.is_finite() && cap > 0.0 {
            (self.p / cap).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const C: Criticality = Criticality::Critical;
    const S: Criticality = Criticality::Sheddable;

    fn cfg(window_secs: u32, min_requests: u32) -> AdmissionConfig {
        AdmissionConfig {
            window_secs,
            min_requests,
            ..AdmissionConfig::default()
        }
    }

    fn formula(n: f64, acc: f64, k: f64, cap: f64) -> f64 {
        ((n - k * acc) / (n + 1.0)).max(0.0).min(cap)
    }

    /// `n` forwarded requests on each VM, a fraction `f` of them failing.
    fn traffic(vms: &mut [Admission], n: u32, f: f64) {
        let failures = (f64::from(n) * f).round() as u32;
        for a in vms.iter_mut() {
            for i in 0..n {
                let crit = if i % 4 == 0 { C } else { S };
                // Offered, and forwarded whatever the decision (the formula's inputs).
                let _ = a.decide(crit, 0.5);
                a.record(if i < failures {
                    Ending::Response(503)
                } else {
                    Ending::Response(404)
                });
            }
        }
    }

    fn tick_all(vms: &mut [Admission], store: &MemStore, now_ms: u64) {
        for a in vms.iter_mut() {
            a.tick(store, now_ms);
        }
    }

    #[test]
    fn computed_p_matches_the_formula_across_workers() {
        for f in [0.0, 0.1, 0.3, 0.5, 0.8, 1.0] {
            let store = MemStore::new();
            let mut vms: Vec<_> = (0..3).map(|_| Admission::new(&cfg(10, 50), 8)).collect();
            for s in 0..5u64 {
                // Before the window is full p lags; check it at the end.
                traffic(&mut vms, 40, f);
                tick_all(&mut vms, &store, s * 1000 + 500);
            }
            tick_all(&mut vms, &store, 4_900);
            let n = 3.0 * 40.0 * 5.0;
            let acc = n - 3.0 * 5.0 * (40.0 * f).round();
            let want = formula(n, acc, 1.5, 0.9);
            for a in &vms {
                let st = a.stats();
                assert_eq!(st.window_requests, 600);
                assert!(
                    (st.rejection_probability - want).abs() < 1e-9,
                    "f={f}: {} vs {want}",
                    st.rejection_probability
                );
                assert!((st.sheddable_share - 0.75).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn formula_edges_and_garbage_inputs() {
        assert_eq!(rejection_probability(0, 0, 1.5, 0.9, 0), 0.0);
        assert_eq!(rejection_probability(100, 100, 1.5, 0.9, 0), 0.0);
        assert_eq!(rejection_probability(100, 0, 1.5, 0.9, 0), 0.9);
        assert!((rejection_probability(100, 0, 1.5, 1.0, 0) - 100.0 / 101.0).abs() < 1e-12);
        assert_eq!(
            rejection_probability(49, 0, 1.5, 0.9, 50),
            0.0,
            "min_requests"
        );
        assert_eq!(rejection_probability(50, 0, 1.5, 0.9, 50), 0.9);
        assert_eq!(rejection_probability(100, 0, f64::NAN, 0.9, 0), 0.0);
        assert_eq!(rejection_probability(100, 0, 1.5, f64::INFINITY, 0), 0.0);
        assert_eq!(rejection_probability(u64::MAX, 0, 1.5, 0.9, 0), 0.9);
    }

    #[test]
    fn min_requests_is_honoured_on_the_whole_window() {
        let store = MemStore::new();
        let mut vms: Vec<_> = (0..2).map(|_| Admission::new(&cfg(10, 50), 8)).collect();
        traffic(&mut vms, 20, 1.0); // 40 requests, all failing
        tick_all(&mut vms, &store, 1000);
        assert_eq!(vms[0].stats().rejection_probability, 0.0);
        traffic(&mut vms, 5, 1.0); // 50 in the window: enough evidence
        tick_all(&mut vms, &store, 2000);
        // The last VM to tick sees everything; the first sees it on its next tick.
        assert_eq!(vms[1].stats().rejection_probability, 0.9);
        tick_all(&mut vms, &store, 2500);
        assert_eq!(vms[1].stats().rejection_probability, 0.9);
    }

    #[test]
    fn window_slides_and_p_returns_to_zero() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(5, 10), 8);
        for s in 0..5u64 {
            traffic(std::slice::from_mut(&mut a), 100, 1.0);
            a.tick(&store, s * 1000);
        }
        assert_eq!(a.stats().rejection_probability, 0.9);
        // The store recovers: successes only. Old seconds fall out one by one.
        let mut last = 1.0;
        for s in 5..11u64 {
            traffic(std::slice::from_mut(&mut a), 100, 0.0);
            a.tick(&store, s * 1000);
            let p = a.stats().rejection_probability;
            assert!(p <= last);
            last = p;
        }
        assert_eq!(a.stats().rejection_probability, 0.0);
        assert_eq!(a.stats().window_requests, 500);
        // Nothing at all for a whole window: empty.
        a.tick(&store, 30_000);
        assert_eq!(a.stats().window_requests, 0);
    }

    #[test]
    fn endings_count_as_the_store_sees_them() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(10, 0), 8);
        for e in [
            Ending::Response(200),
            Ending::Response(404),
            Ending::Response(201),
            Ending::Response(499),
        ] {
            a.record(e);
        }
        for e in [
            Ending::Response(500),
            Ending::Response(503),
            Ending::UpstreamTimeout,
            Ending::UpstreamReset,
        ] {
            a.record(e);
        }
        // Shed or cached at the proxy, abandoned by the client, or not read: not
        // requests.
        for e in [Ending::LocalReply, Ending::DownstreamReset, Ending::Unread] {
            a.record(e);
        }
        a.tick(&store, 0);
        let st = a.stats();
        assert_eq!((st.window_requests, st.window_accepts), (8, 4));
        assert_eq!((st.successes, st.failures), (4, 4));
        // One observed request standing for ten counts ten times.
        a.record_weighted(Ending::Response(200), 10);
        a.record_weighted(Ending::Response(503), 10);
        a.record_weighted(Ending::Unread, 10);
        a.tick(&store, 0);
        let st = a.stats();
        assert_eq!((st.window_requests, st.window_accepts), (28, 14));
        assert_eq!((st.successes, st.failures), (14, 14));
    }

    #[test]
    fn split_sheds_sheddable_first() {
        assert_eq!(split(0.0, 0.85), (0.0, 0.0));
        assert_eq!(split(f64::NAN, 0.5), (0.0, 0.0));
        let (s, c) = split(0.425, 0.85);
        assert!((s - 0.5).abs() < 1e-12 && c == 0.0);
        let (s, c) = split(0.85, 0.85);
        assert!((s - 1.0).abs() < 1e-12 && c == 0.0);
        let (s, c) = split(0.9, 0.85);
        assert!(s == 1.0 && (c - 1.0 / 3.0).abs() < 1e-9);
        // No sheddable traffic: critical takes the whole p.
        assert_eq!(split(0.4, 0.0), (1.0, 0.4));
        assert_eq!(split(0.4, 1.0), (0.4, 0.0));
        assert_eq!(split(0.4, f64::NAN), (1.0, 0.4));
    }

    #[test]
    fn decide_rejects_in_priority_order_and_with_the_right_rates() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(10, 10), 8);
        // 80% sheddable offered, store failing every request: p = 0.9 (cap).
        for i in 0..1000 {
            let crit = if i % 5 == 0 { C } else { S };
            let _ = a.decide(crit, 0.999_999);
            a.record(Ending::Response(500));
        }
        a.tick(&store, 0);
        let st = a.stats();
        assert_eq!(st.rejection_probability, 0.9);
        assert_eq!(st.sheddable_rejection_probability, 1.0);
        assert!((st.critical_rejection_probability - 0.5).abs() < 1e-9);
        let mut rejected = [0u32; 2];
        for i in 0..1000 {
            let u = (f64::from(i) + 0.5) / 1000.0;
            for (j, crit) in [C, S].into_iter().enumerate() {
                if let Decision::Reject { severity } = a.decide(crit, u) {
                    assert_eq!(severity, 1.0);
                    rejected[j] += 1;
                }
            }
        }
        assert_eq!(rejected, [500, 1000]);
        assert_eq!(a.stats().rejected_critical, 500);
        // Non-finite randomness never rejects.
        assert_eq!(a.decide(C, f64::NAN), Decision::Admit);
    }

    #[test]
    fn critical_is_untouched_while_sheddable_suffices() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(10, 10), 8);
        // 85% sheddable, 40% of requests failing: p = (1000 - 1.5*600)/1001 ≈ 0.1.
        for i in 0..1000 {
            let crit = if i % 20 < 3 { C } else { S };
            let _ = a.decide(crit, 0.999_999);
            a.record(if i % 5 < 2 {
                Ending::Response(503)
            } else {
                Ending::Response(404)
            });
        }
        a.tick(&store, 0);
        let st = a.stats();
        assert!(st.rejection_probability > 0.09 && st.rejection_probability < 0.11);
        assert_eq!(st.critical_rejection_probability, 0.0);
        for i in 0..1000 {
            assert_eq!(a.decide(C, f64::from(i) / 1000.0), Decision::Admit);
        }
    }

    #[test]
    fn critical_requests_come_back_within_seconds_of_a_recovery() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(10, 10), 8);
        // Half the traffic critical, each request forwarded whatever the decision.
        let second = |a: &mut Admission, now: &mut u64, failing: bool| {
            for tenth in 0..10 {
                for i in 0..10 {
                    let _ = a.decide(if i % 2 == 0 { C } else { S }, 0.999);
                    a.record(Ending::Response(if failing { 503 } else { 200 }));
                }
                a.tick(&store, *now + tenth * 100);
            }
            *now += 1000;
        };
        // The store is down for the whole window: rejecting every sheddable request
        // is not enough (p = 0.9 > s = 0.5), so critical ones are rejected too.
        let mut now = 0;
        for _ in 0..10 {
            second(&mut a, &mut now, true);
        }
        assert!(a.stats().critical_rejection_probability > 0.5);
        // It is back. The window holds failures for seconds yet (it alone would
        // admit critical requests again after ~4 s), the last two seconds are clean.
        let mut back_after = None;
        for s in 1..=10u64 {
            second(&mut a, &mut now, false);
            if back_after.is_none() && a.stats().critical_rejection_probability == 0.0 {
                back_after = Some(s);
                assert!(a.stats().sheddable_rejection_probability > 0.0);
            }
        }
        assert!(
            matches!(back_after, Some(s) if s <= 2),
            "critical requests admitted again after {back_after:?} s"
        );
    }

    #[test]
    fn shadow_mode_only_counts() {
        let store = MemStore::new();
        let mut c = cfg(10, 0);
        c.enforce = false;
        let mut a = Admission::new(&c, 8);
        for _ in 0..100 {
            a.record(Ending::UpstreamTimeout);
        }
        a.tick(&store, 0);
        assert_eq!(a.decide(S, 0.0), Decision::ShadowReject);
        assert_eq!(a.stats().would_have_rejected, 1);
        assert_eq!(a.stats().rejected_sheddable, 0);
    }

    #[test]
    fn disabled_is_free() {
        let store = MemStore::new();
        let mut c = cfg(10, 0);
        c.enabled = false;
        let mut a = Admission::new(&c, 8);
        a.record(Ending::Response(500));
        assert_eq!(a.decide(S, 0.0), Decision::Admit);
        a.tick(&store, 0);
        assert_eq!(store.writes(), 0);
        assert!(store.get(ADMISSION_KEY).is_none());
    }

    #[test]
    fn seconds_wrap_around_u32() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(4, 0), 8);
        let wrap_ms = (u64::from(u32::MAX) + 1) * 1000;
        for s in [wrap_ms - 2000, wrap_ms - 1000, wrap_ms, wrap_ms + 1000] {
            for _ in 0..10 {
                a.record(Ending::Response(500));
            }
            a.tick(&store, s);
        }
        assert_eq!(second_of(wrap_ms), 0);
        assert_eq!(a.stats().window_requests, 40);
        a.tick(&store, wrap_ms + 2000);
        assert_eq!(a.stats().window_requests, 30);
        // A bucket from the future (clock set back) does not count.
        a.tick(&store, wrap_ms - 10_000);
        assert_eq!(a.stats().window_requests, 0);
    }

    #[test]
    fn garbage_or_resized_rings_are_replaced() {
        let store = MemStore::new();
        store
            .set(ADMISSION_KEY, b"SGa1\xff\xff\xff\xffjunk", None)
            .unwrap();
        let mut a = Admission::new(&cfg(10, 0), 8);
        a.record(Ending::Response(200));
        a.tick(&store, 0);
        assert_eq!(a.stats().window_requests, 1);
        let len = store.get(ADMISSION_KEY).unwrap().0.len();
        assert_eq!(len, HEADER_LEN + 10 * BUCKET_LEN);
        // Another window size: restarts empty with the new size.
        a.reconfigure(&cfg(3, 0));
        a.tick(&store, 1000);
        assert_eq!(a.stats().window_requests, 0);
        assert_eq!(
            store.get(ADMISSION_KEY).unwrap().0.len(),
            HEADER_LEN + 3 * BUCKET_LEN
        );
    }

    #[test]
    fn contention_delays_but_never_loses_counts() {
        let store = MemStore::new();
        let mut a = Admission::new(&cfg(10, 0), 3);
        for _ in 0..7 {
            a.record(Ending::Response(200));
        }
        store.set_interference(|_| true);
        a.tick(&store, 0);
        assert_eq!(a.stats().flush_giveups, 1);
        store.clear_interference();
        a.record(Ending::Response(200));
        a.tick(&store, 1000);
        assert_eq!(a.stats().window_requests, 8);
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn split_rejects_exactly_p_and_stays_in_range(p in 0.0f64..=1.0, s in 0.0f64..=1.0) {
                let (ps, pc) = split(p, s);
                prop_assert!((0.0..=1.0).contains(&ps) && (0.0..=1.0).contains(&pc));
                if s > 0.0 {
                    prop_assert!((s * ps + (1.0 - s) * pc - p).abs() < 1e-9);
                }
                if p <= s {
                    prop_assert_eq!(pc, 0.0);
                }
            }

            #[test]
            fn p_is_bounded(req in any::<u64>(), acc in any::<u64>(), k in 1.0f64..100.0, cap in 0.0f64..=1.0) {
                let p = rejection_probability(req, acc, k, cap, 0);
                prop_assert!((0.0..=cap).contains(&p));
            }
        }
    }
}
