//! The gradient step: pure arithmetic on a [`GradientState`], no store.

use super::state::{GradientState, LaneState, Usage};
use super::{BASELINE_RISE_PER_WINDOW, GRADIENT_MAX, GRADIENT_MIN, MIN_SAMPLES, SAMPLE_PERCENTILE};
use crate::limiter::config::{ConcurrencyConfig, LimitMode};
use crate::wire::f64_to_u32;

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
    pub(super) adaptive: bool,
    pub(super) start_limit: f64,
    pub(super) min_limit: f64,
    pub(super) max_limit: f64,
    pub(super) interval_ms: u64,
    pub(super) pinned_ms: Option<f64>,
    pub(super) tolerance: f64,
    pub(super) smoothing: f64,
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

    /// True when a step is due at `now_ms`: an interval has passed (a clock that went
    /// backwards makes it due), or half of one has and the window already shows an
    /// overload is over ([`Controller::recovery_shown`]).
    pub fn is_due(&self, state: &GradientState, now_ms: u64) -> bool {
        let Some(elapsed) = now_ms.checked_sub(state.last_step_ms) else {
            return true;
        };
        elapsed >= self.interval_ms
            || (elapsed >= self.interval_ms / 2 && self.recovery_shown(state))
    }

    /// Whether the window so far shows the end of an overload: a limit below the
    /// configured one, latency at the baseline in every lane with enough samples,
    /// and at most bursts turned away. After a surge the first window holds the
    /// surge's tail (and a store still digesting it); waiting a whole second more for
    /// a calm one left the surge's limit in place 2 s after it in about half of the
    /// 1.5x runs, and the calm load's bursts met it. Steps stay a second apart while
    /// the limit is cut or turning demand away: faster ones (a 500 ms interval) cost
    /// a 3x replay 5 points of store goodput.
    fn recovery_shown(&self, state: &GradientState) -> bool {
        // A NaN limit reads as the configured one: nothing to recover.
        let cut = state.limit.is_finite() && state.limit < self.start_limit;
        if !self.adaptive || !cut || state.usage.turns_away(state.pending_samples()) {
            return false;
        }
        let gradients = state.lanes.iter().filter_map(|lane| {
            let baseline = self.pinned_ms.unwrap_or(lane.baseline_ms);
            let sample = Self::window_sample(lane)?;
            (baseline.is_finite() && baseline > 0.0).then(|| self.tolerance * baseline / sample)
        });
        let mut seen = false;
        for g in gradients {
            if g.is_nan() || g < 1.0 {
                return false;
            }
            seen = true;
        }
        seen
    }

    /// The sample RTT of a lane's window, once it has enough samples.
    fn window_sample(lane: &LaneState) -> Option<f64> {
        if lane.window.total() < MIN_SAMPLES {
            return None;
        }
        lane.window
            .percentile(SAMPLE_PERCENTILE)
            .filter(|s| s.is_finite() && *s > 0.0)
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
        // Before the evaluation empties the windows.
        let turning_away = state.usage.turns_away(state.pending_samples());
        let mut decided: Option<(f64, usize)> = None;
        for (i, lane) in state.lanes.iter_mut().enumerate() {
            if let Some(raw) = self.evaluate(lane) {
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
        let utilised = f64::from(state.usage.peak_in_flight) >= limit * 0.5;
        let proposal = if raw < 1.0 {
            (limit * raw.max(GRADIENT_MIN) + limit.sqrt()).min(limit)
        } else {
            // Traffic that does not use the limit cannot raise it past the configured one.
            let target = if utilised {
                limit * raw.min(GRADIENT_MAX) + limit.sqrt()
            } else {
                limit
            };
            // Latency at the baseline and the limit not turning demand away (or unused):
            // an overload is over, and the limit it set heads back to the configured
            // one. Growing it by the gradient alone took 5-7 s after a 3x surge, at a
            // limit (28-46) the calm load's own bursts reach: a burst 4-7 s after the
            // surge was shed. A limit turning demand away grows by the gradient only.
            if utilised && turning_away {
                target
            } else {
                target.max(self.start_limit)
            }
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
        state.usage = Usage::default();
        Step::Updated
    }

    /// Evaluates a lane's window, if it has enough samples: its median joins the
    /// baseline ring, the baseline moves, the window starts anew. Returns
    /// `tolerance × baseline / sample` (the lane's gradient, unclamped).
    pub(super) fn evaluate(&self, lane: &mut LaneState) -> Option<f64> {
        let sample = Self::window_sample(lane)?;
        lane.push_window_median(sample);
        let target = lane.ring_min().unwrap_or(sample);
        let old = lane.baseline_ms;
        let baseline = match self.pinned_ms {
            Some(pinned) => pinned,
            None if !(old.is_finite() && old > 0.0) => target,
            None if target <= old => target,
            None => target.min(old * (1.0 + BASELINE_RISE_PER_WINDOW)),
        };
        lane.baseline_ms = baseline;
        lane.sample_ms = sample;
        lane.window.clear();
        let raw = self.tolerance * baseline / sample;
        Some(if raw.is_finite() { raw } else { 1.0 })
    }
}
