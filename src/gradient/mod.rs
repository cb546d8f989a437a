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
//!        = L * min(g, 2.0) + sqrt(L)                     if g >= 1, peak in-flight >= L/2
//!                                                           and the limit turned away > 5%
//!        = max(L * min(g, 2.0) + sqrt(L), start)          if g >= 1, peak >= L/2, <= 5% turned away
//!        = max(L, start)                                 otherwise (not using the limit)
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
//!   steady state the limit settles at about twice the offered concurrency. A limit an
//!   overload cut, once latency is back at the baseline and the limit turns away at
//!   most [`BURST_SHARE`] of a window's requests, returns towards the configured
//!   `limit` (`start` above): after a surge, the calm load's own bursts (a stalled
//!   proxy, a GC pause) reach a limit the surge set, and growing it by the gradient
//!   alone took seconds.
//!
//! # Where the data lives
//!
//! Workers record RTTs into a per-worker [`RttHistogram`] per [`Lane`] (no hostcall
//! per request), and on each tick CAS-merge them, with their peak in-flight, into the one shared key
//! [`GRADIENT_KEY`], which also holds the controller state. The leader's step runs in
//! the same CAS update, so the window it consumes and the state it writes are one
//! atomic change. Every worker reads the limit back on its tick and caches it.
//!
//! `GRADIENT_KEY` layout (little-endian, 1,252 bytes):
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
//! | 48 | 4 | requests the limit turned away during the window (u32, saturating) |
//! | 52 + 600·l | 8 | lane l (0 reads, 1 writes): baseline RTT ms (f64; NaN = not learned yet) |
//! | 60 + 600·l | 8 | lane l: median of its last evaluated window (f64) |
//! | 68 + 600·l | 4 | lane l: ring position (u32) |
//! | 72 + 600·l | 4 | lane l: windows folded into the current ring slot (u32) |
//! | 76 + 600·l | 64 | lane l: ring, 8 × f64 window-median minima (NaN = empty) |
//! | 140 + 600·l | 512 | lane l: RTT histogram of the current window, 128 × u32 counts |
//!
//! Anything else (other length, other magic) decodes as "no state" and is
//! overwritten with a fresh state starting at the configured `limit`.

use crate::classify::Op;
use crate::shared::{update, SharedStore, UpdateError};

mod controller;
mod histogram;
mod state;

pub use controller::{Controller, Step};
pub use histogram::RttHistogram;
pub use state::{GradientState, LaneState, Usage};

/// The shared key holding the controller state and the current RTT window.
pub const GRADIENT_KEY: &str = "sg.v2.gradient";

const MAGIC: [u8; 4] = *b"SGg3";

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
/// A window whose limit turned away at most this share of its requests met bursts,
/// not demand above the limit: after a surge, a calm load's own bursts (a stalled
/// proxy, a GC pause) reach a limit the surge cut, and 3-14 of ~1,350 requests a
/// second were turned away; a surge turns away a third or more.
pub const BURST_SHARE: f64 = 0.05;
const GRADIENT_MIN: f64 = 0.5;
const GRADIENT_MAX: f64 = 2.0;

const LANE_LEN: usize = 8 * 2 + 4 * 2 + 8 * RING_SLOTS + 4 * BUCKETS;
const STATE_LEN: usize = 4 + 8 * 4 + 8 + 4 * 2 + LANE_LEN * LANES;

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
/// On success the caller clears its local window and usage (they are in shared data
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
    local_usage: Usage,
    is_leader: bool,
    now_ms: u64,
) -> Result<Published, UpdateError> {
    let mut seen: Option<GradientState> = None;
    let mut stepped = false;
    update(store, GRADIENT_KEY, cas_attempts, |current| {
        let decoded = current.and_then(GradientState::decode);
        let fresh = decoded.is_none();
        let mut state = decoded.unwrap_or_else(|| ctl.initial_state());
        let before = state.usage;
        state.merge(local, local_usage);
        let has_local = local.iter().any(|w| !w.is_empty()) || state.usage != before;
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
mod tests;
