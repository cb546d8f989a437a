//! The limit this VM enforces and its two caps: the sheddable cap and the critical reserve,
//! and what memory pressure takes off them.
//!
//! ## Priorities: sheddable requests get what critical traffic leaves
//!
//! With `room = min(limit, memory ceiling)`:
//!
//! ```text
//! critical:   admitted while  critical < critical_headroom × limit  and  total < ceiling
//! sheddable:  admitted while  total < room      and  sheddable < sheddable_cap
//! sheddable_cap = min(floor(sheddable_share × room), room − reserve)
//! reserve       = ceil(RESERVE_MARGIN × recent peak of critical in flight) + RESERVE_SLACK
//! ```
//!
//! Critical requests are judged against their own count, not the total: a flood of
//! sheddable requests already in flight cannot shut them out. And they get
//! `critical_headroom` (default 2) times the limit: the limit follows latency, and
//! latency that is not the store's (a proxy starved of CPU at a surge's onset holds
//! every request it admitted longer) inflates the count of critical requests in
//! flight like any other. Shedding a logged-in user's request is the failure this
//! filter exists to prevent; a store overloaded by critical traffic alone still
//! shows it in its latency, and the limit, and this bound with it, fall. The total
//! may pass the limit by the critical requests beyond it and the sheddable ones
//! admitted before, for one round trip: no new sheddable request is admitted while
//! the total is at the limit.
//! The memory ceiling is a hard bound on the total (memory is what kills the pod),
//! and the reserve keeps room for critical traffic inside it.
//!
//! The reserve follows the critical concurrency seen across all VMs (every read of
//! the table shows it): it rises at once when critical traffic passes it, and decays
//! by [`RESERVE_DECAY`] per tick, so a step of critical demand takes room from
//! sheddable traffic within one request, and gives it back within a second. Static
//! shares cannot do this: with a sheddable share of 0.8 and a surge whose critical
//! part needs more than 20% of the limit, an endless supply of sheddable requests
//! holds 80% of the slots and critical requests are shed as often as sheddable ones.

use super::sync::MySlot;
use super::Limiter;
use crate::wire::f64_to_u32;

/// The critical reserve is this multiple of the recent peak of critical in flight,
/// plus [`RESERVE_SLACK`] slots: Poisson arrivals overshoot their mean, and a reserve
/// that critical traffic fills exactly sheds the next critical request.
pub const RESERVE_MARGIN: f64 = 1.25;
pub const RESERVE_SLACK: u32 = 2;
/// Per tick, the remembered peak of critical in flight decays by this factor
/// (half-life ~0.4 s at 100 ms ticks) unless the last tick's window saw more. The
/// peak is taken in a latency spike (a proxy stall holds every critical request
/// longer); with a half-life of seconds (0.97), a 3x replay held reserves near the
/// shrunken limit for seconds after the spike and the store went idle behind it. A
/// critical burst after the reserve has decayed is still admitted by its own count
/// (`critical_headroom`).
pub const RESERVE_DECAY: f64 = 0.85;

impl Limiter {
    pub(super) fn set_limit(&mut self, limit: u32) {
        self.base_limit = limit;
        self.apply_pressure();
    }

    pub(super) fn apply_pressure(&mut self) {
        let shrunk = f64_to_u32(f64::from(self.base_limit) * self.pressure_factor);
        // Never 0: one request at a time still lets the store make progress.
        let limit = shrunk.clamp(1, self.base_limit.max(1));
        self.set_caps(limit);
    }

    /// Slots of the tighter of the limit and the memory ceiling.
    pub(super) fn room(&self) -> u32 {
        let limit = if self.enabled { self.limit } else { u32::MAX };
        self.ceiling.map_or(limit, |c| c.min(limit))
    }

    /// Sets the enforced limit and derives the sheddable cap from it, the memory
    /// ceiling and the critical reserve.
    pub(super) fn set_caps(&mut self, limit: u32) {
        let (old_limit, old_cap) = (self.limit, self.sheddable_cap);
        self.limit = limit;
        let room = self.room();
        let by_share = f64_to_u32(self.share * f64::from(room));
        self.sheddable_cap = by_share.min(room.saturating_sub(self.reserve));
        self.stats.limit = self.limit;
        self.stats.sheddable_cap = self.sheddable_cap;
        self.stats.critical_reserve = self.reserve;
        if self.limit < old_limit || self.sheddable_cap < old_cap {
            // Unwritten releases were admitted under the larger limit: taking them
            // back without a look at the table could exceed the new one.
            self.withdraw_deferred();
        }
    }

    /// Caps the global in-flight count at `ceiling` requests (memory headroom turned
    /// into requests); `None` = no memory cap. Critical requests keep their reserve
    /// inside it. While a ceiling is set, requests are counted even with the
    /// concurrency limit disabled.
    pub fn set_memory_ceiling(&mut self, ceiling: Option<u32>) {
        // Never 0: one request at a time still lets the store make progress.
        let ceiling = ceiling.map(|c| c.max(1));
        if ceiling.unwrap_or(u32::MAX) < self.ceiling.unwrap_or(u32::MAX) {
            // Unwritten releases were admitted under the higher ceiling.
            self.withdraw_deferred();
        }
        self.ceiling = ceiling;
        self.stats.memory_ceiling = self.ceiling.unwrap_or(0);
        self.set_caps(self.limit);
    }

    /// While `spare` holds, critical requests are not bounded by the memory ceiling
    /// (sheddable ones still are, less the reserve). The host spares them while the
    /// store's measured memory is below the soft line: the memory itself then says there
    /// is room, and a ceiling below the count in flight says the per-request estimate
    /// is too high (it rises at once to a steep window), not that memory is short.
    /// Shedding a logged-in user on an estimate the measurement contradicts is the
    /// failure this filter exists to prevent. Above the soft line, or without a fresh
    /// sample, the ceiling binds every request.
    pub fn spare_critical_from_ceiling(&mut self, spare: bool) {
        self.ceiling_spares_critical = spare;
    }

    /// Whether requests are counted in the shared table at all.
    pub(super) fn counting(&self) -> bool {
        self.enabled || self.ceiling.is_some()
    }

    /// The reserve for `peak` critical requests in flight: none before any critical
    /// request was seen (the sheddable share alone keeps room then).
    pub(super) fn reserve_for(peak: f64) -> u32 {
        if peak < 1.0 {
            return 0;
        }
        f64_to_u32((peak * RESERVE_MARGIN).ceil()).saturating_add(RESERVE_SLACK)
    }

    /// Notes the critical requests in flight across all VMs: a count past the
    /// reserve raises it at once (a step of critical demand takes room from
    /// sheddable traffic within one request).
    pub(super) fn note_critical(&mut self, critical: u32) {
        self.window_critical_peak = self.window_critical_peak.max(critical);
        if critical > 0 && critical > self.reserve.saturating_sub(RESERVE_SLACK) {
            self.critical_peak = self.critical_peak.max(f64::from(critical));
            self.reserve = Self::reserve_for(self.critical_peak);
            self.set_caps(self.limit);
        }
    }

    /// Once per tick: the critical peak decays unless the last window saw more.
    pub(super) fn decay_reserve(&mut self) {
        let window = f64::from(std::mem::take(&mut self.window_critical_peak));
        self.critical_peak = window.max(self.critical_peak * RESERVE_DECAY);
        self.reserve = Self::reserve_for(self.critical_peak);
        self.set_caps(self.limit);
    }

    /// Writes deferred releases at the next acquire, release or tick.
    pub(super) fn withdraw_deferred(&mut self) {
        if matches!(self.slot, MySlot::Shows(stored) if stored != self.local) {
            self.slot = MySlot::Pending;
        }
    }

    /// Shrinks the enforced limit to `factor` of the controller's limit while the
    /// store is under memory pressure (1.0 = no pressure). NaN or out-of-range
    /// factors are clamped to (0, 1].
    pub fn set_pressure_factor(&mut self, factor: f64) {
        self.pressure_factor = if factor.is_finite() {
            factor.clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.apply_pressure();
    }
}
