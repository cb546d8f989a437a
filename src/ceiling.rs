//! The memory guard's in-flight ceiling: the store's memory headroom turned into a
//! number of requests the filter may have in flight to it.
//!
//! # The model
//!
//! A Kask pod's memory is a base plus a cost per request it holds (DESIGN.md §6):
//! `memory ≈ base + per_request × in_flight`. The filter knows `in_flight` exactly,
//! across workers (the limiter's shared table), at any moment; it sees `memory` only
//! at each poll of the store's `/metrics`. So at each poll it records the pair
//! `(in_flight_at_poll, memory_at_poll)` and, between polls, admits a request only
//! while
//!
//! ```text
//! in_flight < ceiling = in_flight_at_poll + (line − memory_at_poll) / per_request
//! ```
//!
//! where `line` is the memory the store must stay under (a share of its pod limit).
//! A step surge is then stopped at the first request that would cross the line, not
//! at the next poll. The formula is anchored on the last measurement, so memory that
//! grows without requests (a leak, idle connections, a cache) lowers the next
//! ceiling: it is seen one poll late, never forgotten. Written as
//! `(line − (memory_at_poll − per_request × in_flight_at_poll)) / per_request`, it is
//! the headroom above the store's current base, in requests.
//!
//! # Learning `per_request` ([`Estimator`])
//!
//! From the polls' pairs over a window of [`WINDOW`] polls, by least squares (the
//! slope of memory against in-flight), but only when the window's in-flight values
//! spread over at least [`MIN_SPREAD`] requests and explain most of memory's variance
//! ([`MIN_FIT`]): at a steady load the in-flight count hardly moves, and a heap that
//! grows and is collected whatever the load moves memory more than a few dozen
//! requests do; in both cases the slope is noise. Until then, and whenever the window says
//! nothing, the estimate stays where it was, starting at a conservative prior
//! ([`PRIOR_BYTES_PER_REQUEST`], about twice Kask's measured ~36 KB). The estimate
//! rises at once to a larger slope (memory costs more than thought: act now). A
//! smaller slope never lowers it: while memory lags a rising count (requests the store
//! has not taken in yet) the slope is too flat. It falls only towards the cost seen
//! at a steady load ([`Estimator::steady_cost`]: count and memory both still for
//! [`STEADY_POLLS`] polls, so the store holds what the filter counts), by
//! [`FALL_WEIGHT`] of the way per poll, so that a store whose requests are cheap fills
//! its headroom; never below [`MIN_BYTES_PER_REQUEST`]. An operator who knows the
//! figure can fix it (`memory.bytes_per_request`).
//!
//! With several replicas that show their own count of requests, the in-flight values
//! are that count instead of the filter's, and the ceiling is in the replica's own
//! requests; `pressure/replica.rs` turns it into a bound on the filter's count.
//!
//! Least squares underestimates a slope when the in-flight values themselves are
//! noisy (the count read at the poll is not exactly the count the store had when it
//! measured its memory); the host reads the in-flight count when the poll is sent
//! and when its answer arrives and records the smaller one, which keeps the error on
//! the conservative side while the count rises.
//!
//! # Restarts
//!
//! A store that restarts has a new base. When its body has
//! `process_start_time_seconds` (Go's client and kask-sim export it), a change of it
//! clears the window; the estimate of `per_request` is kept (it is a property of the
//! store's code, not of the process). Without it, the points from before and after a
//! restart make the slope steeper for one window (a lower memory at a lower
//! in-flight): the error is conservative and rolls out of the window.
//!
//! # Fail safe
//!
//! - The ceiling is never below [`MIN_CEILING`] requests: the store always makes
//!   progress, and requests in flight end, so nothing is shed forever.
//! - It is never above [`MAX_CEILING`], and never unset while memory shedding is on:
//!   without a fresh sample the tracker falls back to the headroom at rest
//!   ([`Estimator::rest_memory`]), or with no sample ever, to the whole line at the
//!   prior cost ([`blind_ceiling`]). Nothing is admitted without bound.
//! - NaN, infinite or negative inputs are ignored or clamped, never a panic.

/// The cost of a request in flight assumed until the polls say otherwise (bytes):
/// about twice Kask's ~33-40 KB, so a surge before anything is learned is stopped
/// early rather than late.
pub const PRIOR_BYTES_PER_REQUEST: u64 = 64 * 1024;
/// No estimate goes below this (bytes): a Go request costs at least its goroutine's
/// stack, and a tiny estimate would turn a small headroom into a huge ceiling.
pub const MIN_BYTES_PER_REQUEST: u64 = 4 * 1024;
/// Largest accepted estimate or override (bytes).
pub const MAX_BYTES_PER_REQUEST: u64 = 1 << 30;
/// The ceiling never goes below this many requests, so that the store makes
/// progress and critical requests find room (the limiter keeps a share of the
/// ceiling for them).
pub const MIN_CEILING: u32 = 8;
/// Nor above this many (a bound that is a number, not "none").
pub const MAX_CEILING: u32 = 1 << 24;
/// Polls in the learning window.
pub const WINDOW: usize = 32;
/// The window's in-flight values must span at least this many requests to learn.
pub const MIN_SPREAD: f64 = 16.0;
/// The window teaches something only when the in-flight count explains at least this
/// share of memory's variance (r²). A Go heap moves by megabytes between collections
/// whatever the load; with in-flight values spread over a few dozen requests, that
/// noise alone makes slopes of 100 KB+ per request, and a noise slope adopted at once
/// (a larger estimate is) shrinks the ceiling below what the store needs to stay busy.
pub const MIN_FIT: f64 = 0.5;
/// A steady load ([`Estimator::steady_cost`]): this many polls in a row...
pub const STEADY_POLLS: usize = 8;
/// ...with memory within this share of its lowest value (not still rising behind the
/// count)...
pub const STEADY_MEMORY_SPREAD: f64 = 0.05;
/// ...and the in-flight count within this share of its lowest (the Poisson noise of a
/// steady load of a few hundred requests is ~10% between the extremes of 8 polls)...
pub const STEADY_COUNT_SPREAD: f64 = 0.15;
/// ...and at least this many in flight...
pub const MIN_STEADY_IN_FLIGHT: f64 = 64.0;
/// ...and at most this share of them at the lightest poll, the anchor.
pub const STEADY_ANCHOR_SHARE: f64 = 0.5;
/// Polls needed in the window to learn: with fewer, a fit of [`MIN_FIT`] happens by
/// chance too often (at 16 points, about once in a thousand windows of unrelated data).
const MIN_POINTS: usize = 16;
/// Share of the way a smaller estimate moves it per poll (polls come every 100 ms
/// while memory moves: from 64 KiB towards 32 KiB takes ~1.4 s to go half-way).
const FALL_WEIGHT: f64 = 0.05;
/// At most this many in flight, a poll measures the store's base (memory at rest).
pub const QUIET_IN_FLIGHT: u32 = 16;

/// A start time that moved by more than this (seconds) is a restart.
const RESTART_EPSILON_S: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Point {
    in_flight: f64,
    memory: f64,
}

/// Counters of an [`Estimator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EstimatorStats {
    /// Polls that moved the estimate.
    pub updates: u64,
    /// Restarts seen (a new `process_start_time_seconds`).
    pub restarts: u64,
}

/// Learns the store's memory per request in flight from the polls (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Estimator {
    fixed: bool,
    per_request: f64,
    points: [Point; WINDOW],
    len: usize,
    next: usize,
    start_time: Option<f64>,
    rest: Option<f64>,
    /// `memory − per_request × in_flight` at the last quiet poll.
    quiet: Option<f64>,
    /// The poll with the fewest in flight since the store started (the latest of
    /// equals): the anchor of [`Self::steady_cost`].
    lightest: Option<Point>,
    stats: EstimatorStats,
}

impl Estimator {
    /// `fixed`: the operator's figure in bytes, never learned over (clamped to
    /// [`MIN_BYTES_PER_REQUEST`]..=[`MAX_BYTES_PER_REQUEST`]); `None`: learn, from
    /// [`PRIOR_BYTES_PER_REQUEST`].
    pub fn new(fixed: Option<u64>) -> Estimator {
        let start = fixed
            .unwrap_or(PRIOR_BYTES_PER_REQUEST)
            .clamp(MIN_BYTES_PER_REQUEST, MAX_BYTES_PER_REQUEST);
        Estimator {
            fixed: fixed.is_some(),
            per_request: start as f64,
            points: [Point::default(); WINDOW],
            len: 0,
            next: 0,
            start_time: None,
            rest: None,
            quiet: None,
            lightest: None,
            stats: EstimatorStats::default(),
        }
    }

    /// Records one poll: the filter's in-flight count, the store's memory (bytes)
    /// and its start time if the body had one. Returns true if it saw a restart.
    /// A memory that is not a finite, non-negative number is ignored.
    pub fn observe(&mut self, in_flight: u32, memory: f64, start_time: Option<f64>) -> bool {
        if !(memory.is_finite() && memory >= 0.0) {
            return false;
        }
        let start_time = start_time.filter(|s| s.is_finite());
        let restarted = self.restarted_by(start_time);
        if restarted {
            self.len = 0;
            self.next = 0;
            self.rest = None;
            self.quiet = None;
            self.lightest = None;
            self.stats.restarts = self.stats.restarts.saturating_add(1);
        }
        if start_time.is_some() {
            self.start_time = start_time;
        }
        let point = Point {
            in_flight: f64::from(in_flight),
            memory,
        };
        if let Some(slot) = self.points.get_mut(self.next) {
            *slot = point;
        }
        if self.lightest.is_none_or(|l| point.in_flight <= l.in_flight) {
            self.lightest = Some(point);
        }
        self.next = (self.next + 1) % WINDOW;
        self.len = (self.len + 1).min(WINDOW);
        if !self.fixed {
            self.learn();
        }
        let b = self.per_request;
        if in_flight <= QUIET_IN_FLIGHT {
            self.quiet = Some((memory - b * f64::from(in_flight)).max(0.0));
        }
        self.rest = self
            .window()
            .iter()
            .map(|p| (p.memory - b * p.in_flight).max(0.0))
            .reduce(f64::min);
        restarted
    }

    /// Whether a sample with this start time comes from a restarted store.
    pub fn restarted_by(&self, start_time: Option<f64>) -> bool {
        let start_time = start_time.filter(|s| s.is_finite());
        matches!((self.start_time, start_time),
            (Some(old), Some(new)) if (new - old).abs() > RESTART_EPSILON_S)
    }

    fn window(&self) -> &[Point] {
        self.points.get(..self.len).unwrap_or_default()
    }

    /// Least-squares slope of the window, if it says anything (enough points, spread
    /// and a positive, finite slope).
    pub fn window_slope(&self) -> Option<f64> {
        let pts = self.window();
        if pts.len() < MIN_POINTS {
            return None;
        }
        let (lo, hi) = pts.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
            (lo.min(p.in_flight), hi.max(p.in_flight))
        });
        if hi - lo < MIN_SPREAD {
            return None;
        }
        let n = pts.len() as f64;
        let mean_x = pts.iter().map(|p| p.in_flight).sum::<f64>() / n;
        let mean_y = pts.iter().map(|p| p.memory).sum::<f64>() / n;
        let (sxx, sxy, syy) = pts.iter().fold((0.0, 0.0, 0.0), |(sxx, sxy, syy), p| {
            let (dx, dy) = (p.in_flight - mean_x, p.memory - mean_y);
            (sxx + dx * dx, sxy + dx * dy, syy + dy * dy)
        });
        let slope = sxy / sxx;
        let fit = sxy * sxy / (sxx * syy);
        (slope.is_finite() && slope > 0.0 && fit >= MIN_FIT).then_some(slope)
    }

    /// Moves the estimate: at once up to a larger window slope (memory costs more than
    /// thought: act now); down only towards the cost measured at a steady load
    /// ([`Self::steady_cost`]), by [`FALL_WEIGHT`] of the way per poll, never below
    /// [`MIN_BYTES_PER_REQUEST`]. A smaller *slope* never lowers it: while memory lags
    /// a rising count (requests the store has not taken in yet) the slope is too flat,
    /// and the ceiling would follow it up.
    fn learn(&mut self) {
        let before = self.per_request;
        if let Some(slope) = self.window_slope().filter(|&slope| slope > before) {
            self.per_request = slope.min(MAX_BYTES_PER_REQUEST as f64);
        } else if let Some(cost) = self.steady_cost().filter(|&cost| cost < before) {
            self.per_request =
                before + FALL_WEIGHT * (cost.max(MIN_BYTES_PER_REQUEST as f64) - before);
        }
        if self.per_request != before {
            self.stats.updates = self.stats.updates.saturating_add(1);
        }
    }

    /// What a request costs at a steady load: over the last [`STEADY_POLLS`] polls the
    /// in-flight count (at least [`MIN_STEADY_IN_FLIGHT`]) moved by at most
    /// [`STEADY_COUNT_SPREAD`] of itself and memory by at most [`STEADY_MEMORY_SPREAD`],
    /// so memory is not still rising behind the count (the store has taken in what the
    /// filter counts), and `(memory − base) / in_flight` is their cost, with the base
    /// under the lightest poll since the store started (at most
    /// [`STEADY_ANCHOR_SHARE`] of the load). `None` while anything moves.
    pub fn steady_cost(&self) -> Option<f64> {
        let lightest = self.lightest?;
        if self.len < STEADY_POLLS {
            return None;
        }
        let recent: Vec<Point> = (1..=STEADY_POLLS)
            .filter_map(|back| self.points.get((self.next + WINDOW - back) % WINDOW))
            .copied()
            .collect();
        let steady = |value: fn(&Point) -> f64, spread: f64| {
            let (lo, hi) = recent
                .iter()
                .map(value)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
            (hi - lo <= spread * lo).then_some(lo)
        };
        let fewest = steady(|p| p.in_flight, STEADY_COUNT_SPREAD)?;
        steady(|p| p.memory, STEADY_MEMORY_SPREAD)?;
        if fewest < MIN_STEADY_IN_FLIGHT || lightest.in_flight > STEADY_ANCHOR_SHARE * fewest {
            return None;
        }
        let n = recent.len() as f64;
        let in_flight = recent.iter().map(|p| p.in_flight).sum::<f64>() / n;
        let memory = recent.iter().map(|p| p.memory).sum::<f64>() / n;
        // The base under the lightest poll, at the current estimate: an estimate
        // above the true cost puts it too low and the cost found too high, by
        // (estimate − cost) × its share of the load, so repeated polls converge on
        // the cost from above.
        let base = lightest.memory - self.per_request * lightest.in_flight;
        let cost = (memory - base) / in_flight;
        (cost.is_finite() && cost > 0.0).then_some(cost)
    }

    /// Bytes per request in flight, as estimated now (or fixed).
    pub fn per_request(&self) -> f64 {
        self.per_request
    }

    /// The lowest `memory − per_request × in_flight` in the window: what the store
    /// holds with nothing in flight. `None` before the first poll or just after a
    /// restart.
    pub fn rest_memory(&self) -> Option<f64> {
        self.rest
    }

    /// The store's base now: memory less the cost of the requests in flight, but
    /// never below the base measured at the last quiet poll. The filter counts a
    /// request from the moment it sends it; the store pays for it only once it has
    /// taken it in, so during a surge `memory − per_request × in_flight` can be far
    /// below the real base; the quiet base bounds that error. Memory that grows
    /// without requests raises the first term.
    pub fn base(&self, in_flight: u32, memory: f64) -> f64 {
        let now = memory - self.per_request * f64::from(in_flight);
        now.max(self.quiet.unwrap_or(0.0)).max(0.0)
    }

    /// The in-flight ceiling this poll gives: `(line − base) / per_request`, with the
    /// base of [`Self::base`] (module docs).
    pub fn ceiling(&self, in_flight: u32, memory: f64, line: f64) -> u32 {
        ceiling(0, self.base(in_flight, memory), line, self.per_request)
    }

    /// Whether the estimate is the operator's.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    pub fn stats(&self) -> EstimatorStats {
        self.stats
    }
}

/// In-flight requests allowed: `in_flight + (line − memory) / per_request`, rounded
/// down, within [`MIN_CEILING`]..=[`MAX_CEILING`]. A memory already over the line
/// gives a ceiling below `in_flight` (nothing new until enough requests end), but
/// never below the minimum. Garbage (NaN, a cost that is not positive) gives the
/// minimum.
pub fn ceiling(in_flight: u32, memory: f64, line: f64, per_request: f64) -> u32 {
    if !(per_request.is_finite() && per_request > 0.0) {
        return MIN_CEILING;
    }
    let c = (f64::from(in_flight) + (line - memory) / per_request).floor();
    if c.is_nan() {
        return MIN_CEILING;
    }
    // In range, so the cast is exact.
    c.clamp(f64::from(MIN_CEILING), f64::from(MAX_CEILING)) as u32
}

/// The ceiling with no sample at all: the whole line at the estimate's cost (as if
/// the store held nothing at rest). Bounded, and above any ceiling a real sample
/// would give.
pub fn blind_ceiling(line: f64, per_request: f64) -> u32 {
    ceiling(0, 0.0, line, per_request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const KI: f64 = 1024.0;
    const MI: f64 = 1024.0 * 1024.0;

    /// A store with `base` bytes at rest and `b` bytes per request, plus noise.
    fn store(base: f64, b: f64, n: u32, noise: f64) -> f64 {
        base + b * f64::from(n) + noise
    }

    /// Deterministic noise in [-amp, amp].
    fn noise(i: u32, amp: f64) -> f64 {
        let x = (i.wrapping_mul(2_654_435_761) >> 8) % 1000;
        amp * (f64::from(x) / 500.0 - 1.0)
    }

    #[test]
    fn ceiling_formula() {
        // 64 MiB line, 16 MiB used with 100 in flight, 32 KiB each: 100 + 1536.
        assert_eq!(ceiling(100, 16.0 * MI, 64.0 * MI, 32.0 * KI), 1636);
        // Over the line: below the current in-flight, never below the minimum.
        assert_eq!(ceiling(100, 65.0 * MI, 64.0 * MI, 32.0 * KI), 68);
        assert_eq!(ceiling(10, 80.0 * MI, 64.0 * MI, 32.0 * KI), MIN_CEILING);
        // Bounded above.
        assert_eq!(ceiling(u32::MAX, 0.0, 1e30, 1.0), MAX_CEILING);
        // Garbage never panics and never admits without bound.
        for b in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(ceiling(100, 0.0, 64.0 * MI, b), MIN_CEILING);
        }
        assert_eq!(ceiling(100, f64::NAN, 64.0 * MI, 1.0), MIN_CEILING);
        assert_eq!(ceiling(100, f64::INFINITY, 64.0 * MI, 1.0), MIN_CEILING);
        assert_eq!(ceiling(0, f64::NEG_INFINITY, 64.0 * MI, 1.0), MAX_CEILING);
        assert_eq!(blind_ceiling(64.0 * MI, 64.0 * KI), 1024);
    }

    #[test]
    fn a_step_surge_stops_at_the_line() {
        // The property the ceiling exists for: whatever the in-flight count at the
        // poll, filling up to the ceiling lands memory on the line (true cost known).
        let (base, b, line) = (8.0 * MI, 36.0 * KI, 0.8 * 64.0 * MI);
        for n0 in [0, 10, 500, 1000] {
            let c = ceiling(n0, store(base, b, n0, 0.0), line, b);
            let at_ceiling = store(base, b, c, 0.0);
            assert!(at_ceiling <= line && at_ceiling > line - b, "{n0}: {c}");
        }
    }

    const PRIOR: f64 = PRIOR_BYTES_PER_REQUEST as f64;

    #[test]
    fn learns_a_larger_cost_from_a_rise_and_a_smaller_one_only_at_a_steady_load() {
        let (base, b) = (10.0 * MI, 100.0 * KI);
        let mut e = Estimator::new(None);
        assert_eq!(e.per_request(), PRIOR);
        assert_eq!(e.rest_memory(), None);
        // Steady: in flight 3..8, noisy memory: nothing learned.
        for i in 0..40 {
            let n = 3 + i % 6;
            e.observe(n, store(base, b, n, noise(i, 200.0 * KI)), Some(1.0));
        }
        assert_eq!(e.per_request(), PRIOR);
        assert_eq!(e.stats().updates, 0);
        // A surge: in flight rises by ~90 per poll; memory noisy by ±200 KiB. The
        // larger cost is adopted within a few polls.
        for i in 0..6 {
            let n = 5 + 90 * i;
            e.observe(n, store(base, b, n, noise(i, 200.0 * KI)), Some(1.0));
        }
        assert!(
            (e.per_request() - b).abs() < 0.05 * b,
            "{}",
            e.per_request()
        );
        // The memory at rest is the base, within the noise.
        let rest = e.rest_memory().unwrap();
        assert!((rest - base).abs() < 1.0 * MI, "{}", rest / MI);
        // A cheaper phase (80 KiB): its swings teach nothing (a flatter slope may be
        // requests the store has not taken in)...
        let before = e.per_request();
        for i in 0..40 {
            let n = 5 + 30 * (i % 30);
            e.observe(n, store(base, 80.0 * KI, n, 0.0), Some(1.0));
        }
        assert_eq!(e.per_request(), before);
        // ...a load that holds still moves it down gradually.
        for i in 0..40 {
            let n = 400 + i % 3;
            e.observe(n, store(base, 80.0 * KI, n, 0.0), Some(1.0));
        }
        assert!(
            e.per_request() < 0.9 * before && e.per_request() > 80.0 * KI,
            "{}",
            e.per_request()
        );
        for i in 0..200 {
            let n = 400 + i % 3;
            e.observe(n, store(base, 80.0 * KI, n, 0.0), Some(1.0));
        }
        assert!((e.per_request() - 80.0 * KI).abs() < 0.01 * 80.0 * KI);
    }

    #[test]
    fn a_cheaper_store_is_learned_at_a_steady_load_and_fills_its_headroom() {
        // Kask's ~36 KB, below the prior: a ramp teaches nothing (its slope may be a
        // surge the store has not taken in yet); a load that holds still does.
        let line = 0.78 * 64.0 * MI;
        let b = 36.0 * KI;
        let mut e = Estimator::new(None);
        for i in 0..10 {
            e.observe(3, store(8.0 * MI, b, 3, noise(i, 50.0 * KI)), None);
        }
        for i in 0..40 {
            let n = 20 * i;
            e.observe(n, store(8.0 * MI, b, n, noise(i, 50.0 * KI)), None);
            assert_eq!(e.per_request(), PRIOR, "a rise taught it at poll {i}");
        }
        // The ceiling binds and the load holds at it: the cost is learned, and the
        // ceiling opens towards the headroom at that cost, never past it.
        let mut n = e.ceiling(3, store(8.0 * MI, b, 3, 0.0), line);
        for i in 0..300 {
            let held = n.saturating_sub(i % 7);
            e.observe(held, store(8.0 * MI, b, held, noise(i, 50.0 * KI)), None);
            assert!(
                e.per_request() >= 0.95 * b,
                "{} at poll {i}",
                e.per_request()
            );
            n = e.ceiling(held, store(8.0 * MI, b, held, 0.0), line);
        }
        let headroom = (line - 8.0 * MI) / b;
        assert!(e.per_request() < 1.1 * b, "{}", e.per_request());
        assert!(
            f64::from(n) > 0.9 * headroom && f64::from(n) <= 1.05 * headroom,
            "{n} vs {headroom}"
        );
        let mut fixed = Estimator::new(Some(36 * 1024));
        fixed.observe(0, 8.0 * MI, None);
        let c = fixed.ceiling(0, 8.0 * MI, 0.78 * 64.0 * MI);
        assert_eq!(c, ((0.78 * 64.0 * MI - 8.0 * MI) / (36.0 * KI)) as u32);
    }

    #[test]
    fn a_heap_that_moves_whatever_the_load_teaches_nothing() {
        // The 3x replay's failure: a Go heap growing and collected by megabytes while
        // the in-flight count wanders over a few dozen requests. Windows of that fit
        // slopes of hundreds of KB; adopted at once, they cut the ceiling to a few
        // dozen requests and the store went idle. The count explains none of it.
        let mut e = Estimator::new(None);
        let mut rng = crate::rng::Rng::new(7);
        for i in 0..400u32 {
            let n = rng.below(41) as u32;
            let heap = f64::from(i % 13) * 600.0 * KI;
            e.observe(n, store(20.0 * MI, 36.0 * KI, n, heap), None);
            assert_eq!(e.per_request(), PRIOR, "poll {i}");
        }
    }

    #[test]
    fn requests_the_store_has_not_taken_in_do_not_raise_the_ceiling() {
        let line = 0.78 * 64.0 * MI;
        let b = 36.0 * KI;
        let mut e = Estimator::new(None);
        for i in 0..20 {
            e.observe(5, store(8.0 * MI, b, 5, noise(i, 100.0 * KI)), None);
        }
        // A step: the filter has sent 1,500 requests; the store has taken in 50.
        let c = e.ceiling(1500, store(8.0 * MI, b, 50, 0.0), line);
        // The naive anchor would allow 1,500 + the whole headroom; the quiet base
        // allows the headroom above the base once.
        let headroom = (line - 8.0 * MI) / PRIOR;
        assert!(f64::from(c) <= headroom + 3.0, "{c} vs {headroom}");
        // Memory then lags the count for many polls: the estimate never falls.
        for i in 0..50 {
            e.observe(1500, store(8.0 * MI, b, 50 + 20 * i, 0.0), None);
            assert_eq!(e.per_request(), PRIOR);
        }
    }

    #[test]
    fn a_larger_cost_is_adopted_at_once() {
        // A surge rising by 50 requests per poll (500/s at fast polls): adopted as soon
        // as the window holds enough polls to be trusted.
        let mut e = Estimator::new(None);
        for i in 0..16 {
            let n = 50 * i;
            e.observe(n, store(5.0 * MI, 200.0 * KI, n, 0.0), None);
        }
        assert!(
            (e.per_request() - 200.0 * KI).abs() < 1.0,
            "{}",
            e.per_request()
        );
    }

    #[test]
    fn memory_that_falls_as_requests_rise_teaches_nothing() {
        let mut e = Estimator::new(None);
        for i in 0..10 {
            e.observe(100 * i, 50.0 * MI - f64::from(i) * MI, None);
        }
        assert_eq!(e.per_request(), PRIOR);
        assert_eq!(e.window_slope(), None);
    }

    #[test]
    fn garbage_is_ignored() {
        let mut e = Estimator::new(None);
        for m in [f64::NAN, f64::INFINITY, -1.0] {
            assert!(!e.observe(10, m, Some(f64::NAN)));
        }
        assert_eq!(e.rest_memory(), None);
        assert_eq!(e.window().len(), 0);
        assert_eq!(e.per_request(), PRIOR);
        // Every in-flight value equal: zero variance, no division by zero.
        for _ in 0..10 {
            e.observe(7, 1.0 * MI, None);
        }
        assert_eq!(e.window_slope(), None);
    }

    #[test]
    fn a_restart_clears_the_window_and_keeps_the_cost() {
        let b = 100.0 * KI;
        let mut e = Estimator::new(None);
        for i in 0..WINDOW as u32 {
            let n = 40 * (i % 16);
            e.observe(n, store(30.0 * MI, b, n, 0.0), Some(1000.0));
        }
        assert!((e.per_request() - b).abs() < 0.01 * b);
        assert!((e.rest_memory().unwrap() - 30.0 * MI).abs() < 0.1 * MI);
        assert!((e.base(0, 30.0 * MI) - 30.0 * MI).abs() < 0.1 * MI);
        // Restarted: a lower base. The window and the quiet base start over, the
        // cost stays.
        assert!(e.observe(0, 6.0 * MI, Some(2000.0)));
        assert_eq!(e.stats().restarts, 1);
        assert!((e.rest_memory().unwrap() - 6.0 * MI).abs() < 1.0);
        assert!((e.base(0, 6.0 * MI) - 6.0 * MI).abs() < 1.0);
        assert!((e.per_request() - b).abs() < 0.01 * b);
        // The same start time again is not a restart; a missing one neither.
        assert!(!e.observe(0, 6.0 * MI, Some(2000.2)));
        assert!(!e.observe(0, 6.0 * MI, None));
        assert_eq!(e.stats().restarts, 1);
    }

    #[test]
    fn a_restart_without_a_start_time_errs_on_the_safe_side() {
        let b = 100.0 * KI;
        let mut learn = Estimator::new(None);
        let mut fixed = Estimator::new(Some(b as u64));
        for i in 0..WINDOW as u32 {
            let n = 40 * (i % 16);
            learn.observe(n, store(30.0 * MI, b, n, 0.0), None);
            fixed.observe(n, store(30.0 * MI, b, n, 0.0), None);
        }
        let before = learn.per_request();
        // After the restart: low memory at low in-flight. The slope can only rise.
        for i in 0..8 {
            learn.observe(i, store(6.0 * MI, b, i, 0.0), None);
        }
        assert!(
            learn.per_request() >= before * 0.99,
            "{}",
            learn.per_request()
        );
        // A fixed cost never moves.
        for i in 0..8 {
            fixed.observe(i * 100, store(6.0 * MI, 1.0 * MI, i * 100, 0.0), None);
        }
        assert!(fixed.is_fixed());
        assert_eq!(fixed.per_request(), b);
    }

    #[test]
    fn memory_without_requests_lowers_the_ceiling() {
        let line = 0.78 * 64.0 * MI;
        let mut e = Estimator::new(None);
        e.observe(5, 8.0 * MI, None);
        let calm = e.ceiling(5, 8.0 * MI, line);
        // The store grew by 20 MiB with the same requests (a leak, idle connections).
        let leak = e.ceiling(5, 28.0 * MI, line);
        assert_eq!(calm - leak, (20.0 * MI / PRIOR) as u32);
        // Past the line: the minimum, not zero.
        assert_eq!(e.ceiling(5, 60.0 * MI, line), MIN_CEILING);
    }

    #[test]
    fn overrides_are_clamped() {
        assert_eq!(
            Estimator::new(Some(1)).per_request(),
            MIN_BYTES_PER_REQUEST as f64
        );
        assert_eq!(
            Estimator::new(Some(u64::MAX)).per_request(),
            MAX_BYTES_PER_REQUEST as f64
        );
    }

    #[test]
    fn the_window_is_bounded() {
        let mut e = Estimator::new(None);
        for i in 0..10_000u32 {
            e.observe(i % 1000, f64::from(i), None);
        }
        assert_eq!(e.window().len(), WINDOW);
    }
}
