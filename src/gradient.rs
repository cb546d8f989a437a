//! Adaptive concurrency limit: a latency-gradient controller shared by all workers.
//!
//! # What it does
//!
//! Every `interval_ms`, one elected worker (see [`crate::election`]) compares the
//! *sample RTT* of the last window (the median latency the filter observed) with a
//! *baseline RTT* learned from live traffic, and moves the limit:
//!
//! ```text
//! g      = tolerance * baseline / sample
//! target = L * max(g, 0.5) + sqrt(L)      capped at L   if g < 1  (latency inflated: shrink)
//!        = L * min(g, 2.0) + sqrt(L)                     if g >= 1 and peak in-flight >= L/2
//!        = L                                             otherwise (not using the limit: hold)
//! L      = clamp(L * (1 - smoothing) + target * smoothing, min_limit, max_limit)
//! ```
//!
//! # Reads and writes are judged apart
//!
//! A store's operations can differ in latency by orders of magnitude (Kask in front
//! of Cassandra: reads wait on a quorum, writes may be fast; a test store delaying
//! reads by a second). One baseline for all of them is the wrong model: a burst of
//! fast writes (a prefill, a wave of logins) sets the bar, and reads at their own,
//! stable latency then look like overload and drive the limit to its floor. So each
//! [`Lane`] (reads; writes and deletes) has its own window, baseline ring and
//! gradient, and the step takes the **lowest** lane gradient: a queue in front of the
//! store inflates every lane alike, while a lane's own, stable latency leaves its
//! gradient at `tolerance`. A lane with too few samples keeps accumulating.
//!
//! # Differences from Envoy's `adaptive_concurrency` and Netflix Gradient2
//!
//! - **No probe.** Envoy pins the limit to 3 to re-measure minRTT, which causes 503
//!   dips (envoy issues 8337, 9007, 11579, 18152). The baseline here is learned from
//!   the traffic that flows anyway, or pinned (`pinned_min_rtt_ms`); the limit is
//!   never lowered to measure anything.
//! - **Like is compared with like.** The baseline is the minimum, over the last
//!   `RING_SLOTS * SLOT_WINDOWS` windows, of each window's *median*, not a low
//!   percentile of single requests. A store whose requests have a wide but stable
//!   latency spread (fast 404s, slower Cassandra reads) then has `sample ≈ baseline`
//!   in steady state and the limit is never cut without a queue building up; a
//!   p10-of-requests baseline would make `sample/baseline` equal to the spread
//!   (often > 2) and shrink the limit with no overload at all.
//! - **Decay.** When the ring forgets the old minimum (a permanent latency increase),
//!   the baseline rises at most [`BASELINE_RISE_PER_WINDOW`] per window, so the new
//!   latency is accepted after a few minutes, not at once.
//! - **No creep.** Inflated latency (`g < 1`) can never raise the limit (Gradient2's
//!   queue allowance did, netflix/concurrency-limits PR #134); the `sqrt(L)` allowance
//!   only keeps the shrink from collapsing to the floor on mild inflation.
//! - **Fast recovery, only when needed.** With latency at the baseline, `g` up to 2
//!   grows the limit multiplicatively, but only while the window's peak in-flight
//!   reached half the limit: an idle limit does not drift up to `max_limit`, and in
//!   steady state the limit settles at about twice the offered concurrency.
//!
//! # Where the data lives
//!
//! Workers record RTTs into a per-worker [`RttHistogram`] per [`Lane`] (no hostcall
//! per request), and on each tick CAS-merge them, with their peak in-flight, into the one shared key
//! [`GRADIENT_KEY`], which also holds the controller state. The leader's step runs in
//! the same CAS update, so the window it consumes and the state it writes are one
//! atomic change. Every worker reads the limit back on its tick and caches it.
//!
//! `GRADIENT_KEY` layout (little-endian, 1,248 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SGg2` |
//! | 4 | 8 | limit (f64, fractional, before rounding down) |
//! | 12 | 8 | baseline RTT ms of the lane that decided the last step (f64; NaN = none) |
//! | 20 | 8 | sample RTT ms of that lane's last window (f64; NaN = none yet) |
//! | 28 | 8 | gradient of the last step (f64, clamped to [0.5, 2]) |
//! | 36 | 8 | last step time, ms (u64) |
//! | 44 | 4 | peak global in-flight seen during the window (u32) |
//! | 48 + 600·l | 8 | lane l (0 reads, 1 writes): baseline RTT ms (f64; NaN = not learned yet) |
//! | 56 + 600·l | 8 | lane l: median of its last evaluated window (f64) |
//! | 64 + 600·l | 4 | lane l: ring position (u32) |
//! | 68 + 600·l | 4 | lane l: windows folded into the current ring slot (u32) |
//! | 72 + 600·l | 64 | lane l: ring, 8 × f64 window-median minima (NaN = empty) |
//! | 136 + 600·l | 512 | lane l: RTT histogram of the current window, 128 × u32 counts |
//!
//! Anything else (other length, other magic) decodes as "no state" and is
//! overwritten with a fresh state starting at the configured `limit`.

use crate::classify::Op;
use crate::limiter::{ConcurrencyConfig, LimitMode};
use crate::shared::{update, SharedStore, UpdateError};
use crate::wire::{f64_to_u32, Reader};

/// The shared key holding the controller state and the current RTT window.
pub const GRADIENT_KEY: &str = "sg.v1.gradient";

const MAGIC: [u8; 4] = *b"SGg2";

/// Number of histogram buckets.
pub const BUCKETS: usize = 128;
/// Buckets per doubling of latency: each bucket is 2^(1/6) ≈ 12% wide.
const BUCKETS_PER_OCTAVE: f64 = 6.0;
/// Lower edge of bucket 1; anything faster (including 0) lands in bucket 0.
const MIN_BUCKET_MS: f64 = 0.05;

/// A window with fewer samples than this is not evaluated; it keeps accumulating.
pub const MIN_SAMPLES: u64 = 20;
/// The sample RTT is this percentile of the window.
const SAMPLE_PERCENTILE: f64 = 0.5;
/// The baseline remembers `RING_SLOTS * SLOT_WINDOWS` windows.
pub const RING_SLOTS: usize = 8;
pub const SLOT_WINDOWS: u32 = 8;
/// Upward drift of the baseline per window once the ring has forgotten a lower value.
pub const BASELINE_RISE_PER_WINDOW: f64 = 0.05;
const GRADIENT_MIN: f64 = 0.5;
const GRADIENT_MAX: f64 = 2.0;

const LANE_LEN: usize = 8 * 2 + 4 * 2 + 8 * RING_SLOTS + 4 * BUCKETS;
const STATE_LEN: usize = 4 + 8 * 4 + 8 + 4 + LANE_LEN * LANES;

/// Fixed-size log histogram of RTTs (ms), 0.05 ms .. ~130 s at 12% resolution.
#[derive(Clone, PartialEq, Eq)]
pub struct RttHistogram {
    counts: [u32; BUCKETS],
    total: u64,
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
    fn bucket(rtt_ms: f64) -> Option<usize> {
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
    fn lower_edge(i: usize) -> f64 {
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

    fn recount(&mut self) {
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

/// Which latency a request's RTT is judged against: reads and writes of a store
/// can differ by orders of magnitude (a Cassandra read vs an in-memory write), so
/// each has its own baseline and window, and neither sets the bar for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// GET (and anything that is not a write).
    Read,
    /// POST and DELETE.
    Write,
}

/// Number of [`Lane`]s.
pub const LANES: usize = 2;

impl Lane {
    pub const ALL: [Lane; LANES] = [Lane::Read, Lane::Write];

    pub fn of(op: Op) -> Lane {
        match op {
            Op::Write | Op::Delete => Lane::Write,
            Op::Read | Op::Other => Lane::Read,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One window of RTTs per lane.
pub type Windows = [RttHistogram; LANES];

/// What the controller keeps per lane (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LaneState {
    /// Baseline RTT of this lane (NaN = not learned yet).
    pub baseline_ms: f64,
    /// Median of this lane's last evaluated window (NaN = none yet).
    pub sample_ms: f64,
    ring_pos: u32,
    slot_windows: u32,
    ring: [f64; RING_SLOTS],
    pub window: RttHistogram,
}

impl LaneState {
    fn initial() -> Self {
        Self {
            baseline_ms: f64::NAN,
            sample_ms: f64::NAN,
            ring_pos: 0,
            slot_windows: 0,
            ring: [f64::NAN; RING_SLOTS],
            window: RttHistogram::default(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.baseline_ms, self.sample_ms] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.ring_pos, self.slot_windows] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in self.ring {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for c in self.window.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    /// Decodes one lane; values that make no sense are repaired, not trusted.
    fn decode(r: &mut Reader<'_>) -> Option<Self> {
        let baseline_ms = sane(r.f64()?);
        let sample_ms = sane(r.f64()?);
        let ring_pos = r.u32()?;
        let slot_windows = r.u32()?;
        let mut ring = [f64::NAN; RING_SLOTS];
        for slot in ring.iter_mut() {
            *slot = sane(r.f64()?);
        }
        let mut window = RttHistogram::default();
        for c in window.counts.iter_mut() {
            *c = r.u32()?;
        }
        window.recount();
        Some(Self {
            baseline_ms,
            sample_ms,
            ring_pos: if (ring_pos as usize) < RING_SLOTS {
                ring_pos
            } else {
                0
            },
            slot_windows: slot_windows.min(SLOT_WINDOWS),
            ring,
            window,
        })
    }

    fn ring_min(&self) -> Option<f64> {
        self.ring
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))))
    }

    fn push_window_median(&mut self, sample: f64) {
        let pos = (self.ring_pos as usize) % RING_SLOTS;
        if let Some(slot) = self.ring.get_mut(pos) {
            *slot = if slot.is_finite() {
                slot.min(sample)
            } else {
                sample
            };
        }
        self.slot_windows = self.slot_windows.saturating_add(1);
        if self.slot_windows >= SLOT_WINDOWS {
            let next = (pos + 1) % RING_SLOTS;
            if let Some(slot) = self.ring.get_mut(next) {
                *slot = f64::NAN;
            }
            // next < RING_SLOTS, which fits a u32.
            self.ring_pos = next as u32;
            self.slot_windows = 0;
        }
    }

    /// Evaluates this lane's window, if it has enough samples: its median joins the
    /// baseline ring, the baseline moves, the window starts anew. Returns
    /// `tolerance × baseline / sample` (the lane's gradient, unclamped).
    fn evaluate(&mut self, ctl: &Controller) -> Option<f64> {
        if self.window.total() < MIN_SAMPLES {
            return None;
        }
        let sample = self
            .window
            .percentile(SAMPLE_PERCENTILE)
            .filter(|s| s.is_finite() && *s > 0.0)?;
        self.push_window_median(sample);
        let target = self.ring_min().unwrap_or(sample);
        let old = self.baseline_ms;
        let baseline = match ctl.pinned_ms {
            Some(pinned) => pinned,
            None if !(old.is_finite() && old > 0.0) => target,
            None if target <= old => target,
            None => target.min(old * (1.0 + BASELINE_RISE_PER_WINDOW)),
        };
        self.baseline_ms = baseline;
        self.sample_ms = sample;
        self.window.clear();
        let raw = ctl.tolerance * baseline / sample;
        Some(if raw.is_finite() { raw } else { 1.0 })
    }
}

/// A positive finite value, else NaN.
fn sane(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        f64::NAN
    }
}

/// The controller state shared by all workers (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct GradientState {
    pub limit: f64,
    /// Baseline and sample of the lane that decided the last step.
    pub baseline_ms: f64,
    pub sample_ms: f64,
    pub gradient: f64,
    pub last_step_ms: u64,
    pub peak_in_flight: u32,
    pub lanes: [LaneState; LANES],
}

impl GradientState {
    /// A fresh state: the configured starting limit, nothing learned yet.
    pub fn initial(start_limit: f64) -> Self {
        Self {
            limit: start_limit,
            baseline_ms: f64::NAN,
            sample_ms: f64::NAN,
            gradient: 1.0,
            last_step_ms: 0,
            peak_in_flight: 0,
            lanes: [LaneState::initial(), LaneState::initial()],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(&MAGIC);
        for v in [self.limit, self.baseline_ms, self.sample_ms, self.gradient] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.last_step_ms.to_le_bytes());
        out.extend_from_slice(&self.peak_in_flight.to_le_bytes());
        for lane in &self.lanes {
            lane.encode(&mut out);
        }
        out
    }

    /// Decodes a state; `None` for anything that is not exactly our layout. Values
    /// that decode but make no sense (NaN limit, ring position out of range) are
    /// repaired here, so the controller only ever sees sane numbers.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != STATE_LEN {
            return None;
        }
        let mut r = Reader::new(bytes);
        if r.take::<4>()? != MAGIC {
            return None;
        }
        let limit = r.f64()?;
        let baseline_ms = sane(r.f64()?);
        let sample_ms = sane(r.f64()?);
        let gradient = r.f64()?;
        let last_step_ms = r.u64()?;
        let peak_in_flight = r.u32()?;
        let lanes = [LaneState::decode(&mut r)?, LaneState::decode(&mut r)?];
        if !r.is_done() {
            return None;
        }
        Some(Self {
            limit: if limit.is_finite() { limit } else { f64::NAN },
            baseline_ms,
            sample_ms,
            gradient: if gradient.is_finite() {
                gradient.clamp(GRADIENT_MIN, GRADIENT_MAX)
            } else {
                1.0
            },
            last_step_ms,
            peak_in_flight,
            lanes,
        })
    }

    /// Folds one worker's windows into the shared ones.
    pub fn merge(&mut self, samples: &Windows, peak_in_flight: u32) {
        for (lane, w) in self.lanes.iter_mut().zip(samples) {
            lane.window.merge(w);
        }
        self.peak_in_flight = self.peak_in_flight.max(peak_in_flight);
    }

    /// Samples waiting in the lanes' windows.
    pub fn pending_samples(&self) -> u64 {
        self.lanes.iter().map(|l| l.window.total()).sum()
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The interval has not elapsed since the last step.
    NotDue,
    /// Too few samples in the window; it keeps accumulating.
    TooFewSamples,
    /// The window was evaluated and the limit recomputed.
    Updated,
}

/// The controller: configuration only; the state lives in shared data.
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    adaptive: bool,
    start_limit: f64,
    min_limit: f64,
    max_limit: f64,
    interval_ms: u64,
    pinned_ms: Option<f64>,
    tolerance: f64,
    smoothing: f64,
}

impl Controller {
    pub fn new(cfg: &ConcurrencyConfig) -> Self {
        let min_limit = f64::from(cfg.min_limit.max(1));
        let max_limit = f64::from(cfg.max_limit).max(min_limit);
        let finite_or = |v: f64, d: f64| if v.is_finite() { v } else { d };
        Self {
            adaptive: cfg.mode == LimitMode::Adaptive,
            start_limit: f64::from(cfg.limit).clamp(min_limit, max_limit),
            min_limit,
            max_limit,
            interval_ms: cfg.adaptive.interval_ms.max(1),
            pinned_ms: cfg
                .adaptive
                .pinned_min_rtt_ms
                .filter(|v| v.is_finite() && *v > 0.0),
            tolerance: finite_or(cfg.adaptive.tolerance, 2.0).max(1.0),
            smoothing: finite_or(cfg.adaptive.smoothing, 0.2).clamp(0.0, 1.0),
        }
    }

    pub fn initial_state(&self) -> GradientState {
        GradientState::initial(self.start_limit)
    }

    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// The limit workers enforce for a shared state: the configured one in fixed mode,
    /// else the state's limit rounded down and clamped to this configuration.
    pub fn limit_of(&self, state: &GradientState) -> u32 {
        if !self.adaptive || !state.limit.is_finite() {
            return f64_to_u32(self.start_limit);
        }
        f64_to_u32(state.limit.clamp(self.min_limit, self.max_limit))
    }

    /// True when a step is due at `now_ms`. A clock that went backwards makes it due.
    pub fn is_due(&self, state: &GradientState, now_ms: u64) -> bool {
        now_ms < state.last_step_ms || now_ms - state.last_step_ms >= self.interval_ms
    }

    /// The leader's periodic step: evaluate each lane's window, move the limit, start
    /// new windows. The lane with the lowest gradient decides (a queue in front of
    /// the store inflates every lane; one lane's own latency does not). A lane with
    /// too few samples keeps accumulating. In fixed mode it still measures (for the
    /// gauges) but holds the limit.
    pub fn step(&self, state: &mut GradientState, now_ms: u64) -> Step {
        if !self.is_due(state, now_ms) {
            return Step::NotDue;
        }
        state.last_step_ms = now_ms;
        let mut decided: Option<(f64, usize)> = None;
        for (i, lane) in state.lanes.iter_mut().enumerate() {
            if let Some(raw) = lane.evaluate(self) {
                if decided.is_none_or(|(r, _)| raw < r) {
                    decided = Some((raw, i));
                }
            }
        }
        let Some((raw, lane)) = decided else {
            return Step::TooFewSamples;
        };
        let limit = if state.limit.is_finite() {
            state.limit.clamp(self.min_limit, self.max_limit)
        } else {
            self.start_limit
        };
        let utilised = f64::from(state.peak_in_flight) >= limit * 0.5;
        let proposal = if raw < 1.0 {
            (limit * raw.max(GRADIENT_MIN) + limit.sqrt()).min(limit)
        } else if utilised {
            limit * raw.min(GRADIENT_MAX) + limit.sqrt()
        } else {
            limit
        };
        let smoothed = limit * (1.0 - self.smoothing) + proposal * self.smoothing;
        state.limit = if !self.adaptive {
            self.start_limit
        } else if smoothed.is_finite() {
            smoothed.clamp(self.min_limit, self.max_limit)
        } else {
            limit
        };
        if let Some(l) = state.lanes.get(lane) {
            state.baseline_ms = l.baseline_ms;
            state.sample_ms = l.sample_ms;
        }
        state.gradient = raw.clamp(GRADIENT_MIN, GRADIENT_MAX);
        state.peak_in_flight = 0;
        Step::Updated
    }
}

/// The part of the shared state a worker caches after its tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    pub limit: u32,
    pub baseline_ms: f64,
    pub sample_ms: f64,
    pub gradient: f64,
    /// True when this call ran a step that recomputed the limit.
    pub stepped: bool,
}

/// One worker's tick for the controller: merge the local window into the shared one
/// (if it has anything), run the step if `is_leader` and it is due, and read back
/// what to enforce.
///
/// On success the caller clears its local window and peak (they are in shared data
/// now). On `Err` nothing was written; the caller keeps its local window and retries
/// on the next tick, so no sample is lost to contention.
///
/// Idempotent across VMs: a VM with nothing to merge that is not the leader only
/// reads; a leader that is not due writes nothing new; two workers that both think
/// they lead (the lease's create race) cannot both step one interval, because the
/// step's due check and its write are one CAS update on the same key.
pub fn sync<S: SharedStore + ?Sized>(
    store: &S,
    cas_attempts: u32,
    ctl: &Controller,
    local: &Windows,
    local_peak: u32,
    is_leader: bool,
    now_ms: u64,
) -> Result<Published, UpdateError> {
    let mut seen: Option<GradientState> = None;
    let mut stepped = false;
    update(store, GRADIENT_KEY, cas_attempts, |current| {
        let decoded = current.and_then(GradientState::decode);
        let fresh = decoded.is_none();
        let mut state = decoded.unwrap_or_else(|| ctl.initial_state());
        let has_local = local.iter().any(|w| !w.is_empty()) || local_peak > state.peak_in_flight;
        state.merge(local, local_peak);
        let step = if is_leader {
            ctl.step(&mut state, now_ms)
        } else {
            Step::NotDue
        };
        stepped = step == Step::Updated;
        let write = (fresh || has_local || step != Step::NotDue).then(|| (state.encode(), ()));
        seen = Some(state);
        write
    })?;
    let state = seen.unwrap_or_else(|| ctl.initial_state());
    Ok(Published {
        limit: ctl.limit_of(&state),
        baseline_ms: state.baseline_ms,
        sample_ms: state.sample_ms,
        gradient: state.gradient,
        stepped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::AdaptiveConfig;
    use crate::shared::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg(limit: u32, min: u32, max: u32) -> ConcurrencyConfig {
        ConcurrencyConfig {
            limit,
            min_limit: min,
            max_limit: max,
            ..ConcurrencyConfig::default()
        }
    }

    /// `n` samples spread ±20% around `median_ms`.
    fn spread(median_ms: f64, n: u32) -> RttHistogram {
        let mut h = RttHistogram::new();
        for i in 0..n {
            let spread = 0.8 + 0.4 * f64::from(i) / f64::from(n.max(2) - 1);
            h.record(median_ms * spread);
        }
        h
    }

    /// Windows with `h` as reads, no writes.
    fn reads(h: RttHistogram) -> Windows {
        [h, RttHistogram::new()]
    }

    /// A window of `n` reads spread ±20% around `median_ms`.
    fn window(median_ms: f64, n: u32) -> Windows {
        reads(spread(median_ms, n))
    }

    /// Runs one interval: the window's samples and the peak in-flight seen.
    fn run(ctl: &Controller, st: &mut GradientState, t: &mut u64, rtt: f64, peak: u32) -> Step {
        st.merge(&window(rtt, 200), peak);
        *t += ctl.interval_ms();
        ctl.step(st, *t)
    }

    #[test]
    fn histogram_percentiles_are_close() {
        let mut h = RttHistogram::new();
        for i in 1..=1000 {
            h.record(f64::from(i) * 0.1); // 0.1 .. 100 ms, uniform
        }
        let p50 = h.percentile(0.5).unwrap();
        let p10 = h.percentile(0.1).unwrap();
        assert!((p50 / 50.0 - 1.0).abs() < 0.13, "{p50}");
        assert!((p10 / 10.0 - 1.0).abs() < 0.13, "{p10}");
        assert!(h.percentile(1.0).unwrap() >= 90.0);
        assert_eq!(RttHistogram::new().percentile(0.5), None);
    }

    #[test]
    fn nan_inf_negative_and_zero_rtts_are_safe() {
        let mut h = RttHistogram::new();
        assert!(!h.record(f64::NAN));
        assert!(!h.record(f64::INFINITY));
        assert!(!h.record(f64::NEG_INFINITY));
        assert!(!h.record(-1.0));
        assert!(h.is_empty());
        assert!(h.record(0.0));
        assert!(h.record(1e300));
        assert!(h.record(f64::MIN_POSITIVE));
        assert_eq!(h.total(), 3);
        let p = h.percentile(0.5).unwrap();
        assert!(p.is_finite() && p > 0.0);
        assert!(h.percentile(f64::NAN).unwrap().is_finite());

        // A controller fed only zero RTTs keeps a finite limit within bounds.
        let ctl = Controller::new(&cfg(100, 10, 1000));
        let mut st = ctl.initial_state();
        let mut t = 0;
        for _ in 0..50 {
            let mut zeros = RttHistogram::new();
            for _ in 0..100 {
                zeros.record(0.0);
            }
            st.merge(&reads(zeros), 100);
            t += 1000;
            ctl.step(&mut st, t);
            assert!(st.limit.is_finite() && (10.0..=1000.0).contains(&st.limit));
        }
    }

    #[test]
    fn histogram_saturates_instead_of_overflowing() {
        let mut a = RttHistogram::new();
        a.counts[5] = u32::MAX - 1;
        a.recount();
        a.record(RttHistogram::lower_edge(5) * 1.01);
        a.record(RttHistogram::lower_edge(5) * 1.01);
        assert_eq!(a.counts[5], u32::MAX);
        let b = a.clone();
        a.merge(&b);
        assert_eq!(a.counts[5], u32::MAX);
    }

    #[test]
    fn state_roundtrips_and_garbage_decodes_as_none() {
        let ctl = Controller::new(&cfg(100, 10, 1000));
        let mut st = ctl.initial_state();
        let mut t = 0;
        run(&ctl, &mut st, &mut t, 5.0, 80);
        st.merge(&window(7.0, 30), 12);
        let bytes = st.encode();
        assert_eq!(bytes.len(), STATE_LEN);
        let back = GradientState::decode(&bytes).unwrap();
        assert_eq!(back.limit, st.limit);
        assert_eq!(back.encode(), bytes, "NaNs and all");
        assert_eq!(back.peak_in_flight, 12);
        assert_eq!(GradientState::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(GradientState::decode(b"garbage"), None);
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert_eq!(GradientState::decode(&wrong_magic), None);
        // NaN limit and out-of-range ring position are repaired, not trusted.
        let mut nan = bytes.clone();
        nan[4..12].copy_from_slice(&f64::NAN.to_le_bytes());
        // Lane 0 starts at byte 48: baseline, sample, then its ring position.
        nan[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        let repaired = GradientState::decode(&nan).unwrap();
        assert_eq!(repaired.lanes[0].ring_pos, 0);
        assert_eq!(ctl.limit_of(&repaired), 100);
        let mut st2 = repaired;
        run(&ctl, &mut st2, &mut t, 5.0, 80);
        assert!(st2.limit.is_finite());
    }

    #[test]
    fn steady_latency_never_cuts_the_limit_below_offered_concurrency() {
        // Offered concurrency 150 with a wide but stable latency spread.
        let ctl = Controller::new(&cfg(200, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        for i in 0..500 {
            // Wide spread: fast 404s and slow reads, p90/p10 ≈ 10.
            let mut h = RttHistogram::new();
            for j in 0..200 {
                h.record(if j % 3 == 0 { 20.0 } else { 2.0 } * (1.0 + f64::from(j % 7) / 10.0));
            }
            let peak = 150.min(ctl.limit_of(&st));
            st.merge(&reads(h), peak);
            t += 1000;
            ctl.step(&mut st, t);
            assert!(ctl.limit_of(&st) >= 150, "window {i}: limit {}", st.limit);
        }
        // It settled at about twice the offered concurrency, not at max_limit.
        assert!(ctl.limit_of(&st) <= 400, "{}", st.limit);
    }

    #[test]
    fn idle_limit_does_not_drift_up() {
        let ctl = Controller::new(&cfg(100, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        for _ in 0..200 {
            run(&ctl, &mut st, &mut t, 3.0, 10);
        }
        assert_eq!(ctl.limit_of(&st), 100);
    }

    #[test]
    fn latency_step_5x_cuts_the_limit_then_it_recovers() {
        let ctl = Controller::new(&cfg(256, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        // Offered concurrency follows Little's law: 50 requests/ms-ish of load.
        let offered = |rtt: f64| (40.0 * rtt) as u32;
        for _ in 0..30 {
            let peak = offered(4.0).min(ctl.limit_of(&st));
            run(&ctl, &mut st, &mut t, 4.0, peak);
        }
        let before = ctl.limit_of(&st);
        assert!(before >= 160, "{before}");
        let mut low = before;
        for _ in 0..30 {
            let peak = offered(20.0).min(ctl.limit_of(&st));
            run(&ctl, &mut st, &mut t, 20.0, peak);
            low = low.min(ctl.limit_of(&st));
        }
        assert!(low <= before / 4, "limit only fell to {low} from {before}");
        assert!(low >= 16);
        // The baseline was not dragged up by 30 windows of overload.
        assert!(st.baseline_ms < 5.0, "{}", st.baseline_ms);
        let mut recovered_at = None;
        for i in 0..60 {
            let peak = offered(4.0).min(ctl.limit_of(&st));
            run(&ctl, &mut st, &mut t, 4.0, peak);
            if recovered_at.is_none() && ctl.limit_of(&st) >= offered(4.0) {
                recovered_at = Some(i);
            }
        }
        let at = recovered_at.expect("limit recovered");
        assert!(at <= 30, "recovery took {at} windows");
    }

    #[test]
    fn permanent_latency_increase_is_eventually_accepted() {
        let ctl = Controller::new(&cfg(256, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        for _ in 0..20 {
            run(&ctl, &mut st, &mut t, 4.0, 100);
        }
        for _ in 0..400 {
            let peak = ctl.limit_of(&st);
            run(&ctl, &mut st, &mut t, 20.0, peak);
        }
        assert!(st.baseline_ms > 15.0, "{}", st.baseline_ms);
        assert!(ctl.limit_of(&st) >= 256, "{}", st.limit);
    }

    #[test]
    fn bounds_hold_under_any_latency_sequence() {
        let ctl = Controller::new(&cfg(50, 20, 80));
        let mut st = ctl.initial_state();
        let mut t = 0;
        let rtts = [1.0, 100.0, 0.0, 1e9, 3.0, 0.01, 50.0];
        for i in 0..300 {
            run(&ctl, &mut st, &mut t, rtts[i % rtts.len()], 1000);
            let l = ctl.limit_of(&st);
            assert!((20..=80).contains(&l), "{l}");
        }
    }

    #[test]
    fn pinned_min_rtt_is_used_and_fixed_mode_holds_the_limit() {
        let mut c = cfg(100, 10, 1000);
        c.adaptive = AdaptiveConfig {
            pinned_min_rtt_ms: Some(2.0),
            ..AdaptiveConfig::default()
        };
        let ctl = Controller::new(&c);
        let mut st = ctl.initial_state();
        let mut t = 0;
        for _ in 0..10 {
            run(&ctl, &mut st, &mut t, 10.0, 100);
        }
        assert_eq!(st.baseline_ms, 2.0);
        assert!(ctl.limit_of(&st) < 100);

        c.mode = LimitMode::Fixed;
        let fixed = Controller::new(&c);
        let mut st = fixed.initial_state();
        for _ in 0..10 {
            run(&fixed, &mut st, &mut t, 10.0, 100);
        }
        assert_eq!(fixed.limit_of(&st), 100);
        assert!(st.sample_ms > 8.0, "fixed mode still measures");
    }

    #[test]
    fn sparse_windows_accumulate_until_enough_samples() {
        let ctl = Controller::new(&cfg(100, 10, 1000));
        let mut st = ctl.initial_state();
        st.merge(&window(5.0, 10), 90);
        assert_eq!(ctl.step(&mut st, 1000), Step::TooFewSamples);
        assert_eq!(ctl.step(&mut st, 1500), Step::NotDue);
        st.merge(&window(5.0, 10), 90);
        assert_eq!(ctl.step(&mut st, 2000), Step::Updated);
        assert!(st.lanes[0].window.is_empty());
        // A clock that jumps backwards makes a step due instead of stalling.
        st.merge(&window(5.0, 30), 90);
        assert_eq!(ctl.step(&mut st, 10), Step::Updated);
    }

    #[test]
    fn sync_merges_workers_and_only_the_leader_steps() {
        let store = MemStore::new();
        let ctl = Controller::new(&cfg(100, 10, 1000));
        let w = window(5.0, 15);
        let p = sync(&store, 8, &ctl, &w, 60, false, 1000).unwrap();
        assert_eq!(p.limit, 100);
        assert!(!p.stepped);
        let p = sync(&store, 8, &ctl, &w, 70, false, 1000).unwrap();
        assert!(!p.stepped);
        let (bytes, _) = store.get(GRADIENT_KEY).unwrap();
        let st = GradientState::decode(&bytes).unwrap();
        assert_eq!(st.pending_samples(), 30);
        assert_eq!(st.peak_in_flight, 70);
        // A reader with nothing to merge does not write.
        let writes = store.writes();
        sync(&store, 8, &ctl, &Windows::default(), 0, false, 1500).unwrap();
        assert_eq!(store.writes(), writes);
        // The leader steps once per interval, whoever else also claims to lead.
        let empty = Windows::default();
        assert!(
            sync(&store, 8, &ctl, &empty, 0, true, 2000)
                .unwrap()
                .stepped
        );
        assert!(
            !sync(&store, 8, &ctl, &empty, 0, true, 2000)
                .unwrap()
                .stepped
        );
        let st = GradientState::decode(&store.get(GRADIENT_KEY).unwrap().0).unwrap();
        assert_eq!(st.pending_samples(), 0);
        assert!((st.sample_ms / 5.0 - 1.0).abs() < 0.15);
    }

    #[test]
    fn sync_overwrites_garbage_and_reports_contention() {
        let store = MemStore::new();
        let ctl = Controller::new(&cfg(100, 10, 1000));
        store
            .set(GRADIENT_KEY, b"\x01\x02old version", None)
            .unwrap();
        let p = sync(&store, 4, &ctl, &Windows::default(), 0, false, 0).unwrap();
        assert_eq!(p.limit, 100);
        assert!(GradientState::decode(&store.get(GRADIENT_KEY).unwrap().0).is_some());
        store.set_interference(|_| true);
        let r = sync(&store, 4, &ctl, &window(3.0, 5), 1, false, 0);
        assert_eq!(r, Err(UpdateError::Contended));
    }

    /// Runs `windows` intervals of reads at `read_ms` and writes at `write_ms` (0 =
    /// none of that kind) with the limit fully used; returns the final limit.
    fn lanes(
        ctl: &Controller,
        st: &mut GradientState,
        t: &mut u64,
        n: u32,
        read_ms: f64,
        write_ms: f64,
    ) -> u32 {
        for _ in 0..n {
            let w = [
                if read_ms > 0.0 {
                    spread(read_ms, 200)
                } else {
                    RttHistogram::new()
                },
                if write_ms > 0.0 {
                    spread(write_ms, 50)
                } else {
                    RttHistogram::new()
                },
            ];
            st.merge(&w, ctl.limit_of(st));
            *t += ctl.interval_ms();
            ctl.step(st, *t);
        }
        ctl.limit_of(st)
    }

    #[test]
    fn fast_writes_do_not_set_the_bar_for_slow_reads() {
        // Kask in front of a store whose reads take ~1 s and writes ~0.3 ms: a prefill
        // of writes comes first, then reads join at their own, stable latency.
        let ctl = Controller::new(&cfg(256, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        lanes(&ctl, &mut st, &mut t, 20, 0.0, 0.3);
        let limit = lanes(&ctl, &mut st, &mut t, 60, 950.0, 0.3);
        assert!(limit >= 256, "stable slow reads cut the limit to {limit}");
        // Both lanes learned their own baseline.
        assert!(st.lanes[0].baseline_ms > 500.0 && st.lanes[1].baseline_ms < 1.0);
    }

    #[test]
    fn a_queue_inflates_every_lane_and_the_limit_falls() {
        let ctl = Controller::new(&cfg(256, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        let before = lanes(&ctl, &mut st, &mut t, 20, 5.0, 1.0);
        // A queue in front of the store adds 20 ms to everything.
        let after = lanes(&ctl, &mut st, &mut t, 10, 25.0, 21.0);
        assert!(after < before / 2, "{before} -> {after}");
    }

    #[test]
    fn one_slow_lane_is_enough_to_shrink() {
        // Writes inflate 10x (a write path in trouble); reads are fine. The lane
        // with the lowest gradient decides.
        let ctl = Controller::new(&cfg(256, 16, 2048));
        let mut st = ctl.initial_state();
        let mut t = 0;
        let before = lanes(&ctl, &mut st, &mut t, 20, 5.0, 1.0);
        let after = lanes(&ctl, &mut st, &mut t, 10, 5.0, 10.0);
        assert!(after < before, "{before} -> {after}");
    }
}
