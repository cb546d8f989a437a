//! The controller's state per lane and as a whole, and its byte layout in shared data
//! (see "Where the data lives" in [`super`]).

use super::histogram::RttHistogram;
use super::{
    Windows, BURST_SHARE, GRADIENT_MAX, GRADIENT_MIN, LANES, MAGIC, RING_SLOTS, SLOT_WINDOWS,
    STATE_LEN,
};
use crate::wire::Reader;

/// What the controller keeps per lane (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LaneState {
    /// Baseline RTT of this lane (NaN = not learned yet).
    pub baseline_ms: f64,
    /// Median of this lane's last evaluated window (NaN = none yet).
    pub sample_ms: f64,
    pub(super) ring_pos: u32,
    slot_windows: u32,
    ring: [f64; RING_SLOTS],
    pub window: RttHistogram,
}

impl LaneState {
    pub(super) fn initial() -> Self {
        Self {
            baseline_ms: f64::NAN,
            sample_ms: f64::NAN,
            ring_pos: 0,
            slot_windows: 0,
            ring: [f64::NAN; RING_SLOTS],
            window: RttHistogram::default(),
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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
    pub(super) fn decode(r: &mut Reader<'_>) -> Option<Self> {
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

    pub(super) fn ring_min(&self) -> Option<f64> {
        self.ring
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))))
    }

    pub(super) fn push_window_median(&mut self, sample: f64) {
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
}

/// A positive finite value, else NaN.
pub(super) fn sane(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        f64::NAN
    }
}

/// What a window saw of the limit's use, besides its RTTs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// The highest global in-flight count seen.
    pub peak_in_flight: u32,
    /// Requests the concurrency limit turned away (or would have, in shadow mode).
    pub denied: u32,
}

impl Usage {
    /// Folds another window's usage into this one.
    pub fn merge(&mut self, other: Usage) {
        self.peak_in_flight = self.peak_in_flight.max(other.peak_in_flight);
        self.denied = self.denied.saturating_add(other.denied);
    }

    /// Whether the limit turned away more than [`BURST_SHARE`] of the window's
    /// requests (`answered` = those admitted and answered): demand above the limit,
    /// not a burst reaching it.
    pub fn turns_away(&self, answered: u64) -> bool {
        let denied = f64::from(self.denied);
        denied > BURST_SHARE * (denied + answered as f64)
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
    pub usage: Usage,
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
            usage: Usage::default(),
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
        out.extend_from_slice(&self.usage.peak_in_flight.to_le_bytes());
        out.extend_from_slice(&self.usage.denied.to_le_bytes());
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
        let usage = Usage {
            peak_in_flight: r.u32()?,
            denied: r.u32()?,
        };
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
            usage,
            lanes,
        })
    }

    /// Folds one worker's windows into the shared ones.
    pub fn merge(&mut self, samples: &Windows, usage: Usage) {
        for (lane, w) in self.lanes.iter_mut().zip(samples) {
            lane.window.merge(w);
        }
        self.usage.merge(usage);
    }

    /// Samples waiting in the lanes' windows.
    pub fn pending_samples(&self) -> u64 {
        self.lanes.iter().map(|l| l.window.total()).sum()
    }
}
