//! Concurrency limit across all Envoy workers, exact through shared-data CAS.
//!
//! # The shape
//!
//! ```text
//! on_http_request_headers:  match limiter.try_acquire(store, crit, now) {
//!                               Acquire::Admitted(p) | Acquire::ShadowShed(p) => keep p in the context,
//!                               Acquire::Shed { severity, .. } => fast 503 (reason "concurrency"),
//!                           }
//! on_log (every ending):    limiter.release(store, permit, Completion { rtt_ms, ending, lane: Lane::Read }, now)
//! drop of the context:      the same, if on_log did not run (backstop)
//! on_tick (every VM):       let leader = election.tick(store, vm_id, now, lease);
//!                           limiter.tick(store, now, leader)
//! ```
//!
//! A [`Permit`] is a `#[must_use]` value that is neither `Clone` nor `Copy`: it is
//! consumed by [`Limiter::release`], so each admitted request gives back its slot
//! exactly once, whichever way it ends.
//!
//! # Shared data: [`INFLIGHT_KEY`]
//!
//! One key holds a table with one slot per VM that currently has requests in flight.
//! Each VM knows its own in-flight count exactly (it holds the permits); the shared
//! slot is that count as of its last successful write. The global in-flight is the
//! sum of the slots. Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SGi1` |
//! | 4 | 4 | number of slots `n` (at most [`MAX_SLOTS`]) |
//! | 8 + 24·i | 8 | slot i: VM id (u64) |
//! | 16 + 24·i | 8 | slot i: last write, ms (u64) — the heartbeat |
//! | 24 + 24·i | 4 | slot i: critical in flight (u32) |
//! | 28 + 24·i | 4 | slot i: sheddable in flight (u32) |
//!
//! A VM's slot exists only while it has requests in flight (it is removed when its
//! count reaches zero), so the table stays as small as the number of busy VMs.
//! Every change is one CAS write of the whole value, so:
//!
//! - **Exact:** an admission is committed only by a CAS on the very table it was
//!   checked against; the total can never pass the limit (while enforcing and while
//!   the CAS loop does not give up, see below).
//! - **Never negative:** counts are the permits a VM holds; a release without a
//!   matching acquisition is a bug, counted in [`LimiterStats::release_underflows`]
//!   and otherwise ignored.
//! - **Self-healing:** whatever happens to the value (garbage from another version,
//!   the create race on an absent key, a VM slot lost), the next write of each VM
//!   puts its exact count back. A VM that died with requests in flight (crash,
//!   reload) leaves a slot nobody writes any more: any VM's tick drops slots whose
//!   heartbeat is older than `max(60 s, 10 × adaptive.interval_ms)`, so leaked
//!   slots come back. Live VMs refresh their heartbeat on tick, so the host must
//!   tick more often than that (every `interval_ms` is plenty).
//! - **Undecodable value** (wrong magic, length or slot count, or this VM's id in
//!   two slots): treated as an empty table and overwritten with this VM's slot;
//!   other VMs reappear on their next write.
//!
//! # When the CAS loop hits its bound (`cas_attempts` conflicts in a row)
//!
//! - **Acquire:** the decision is taken on the last snapshot read. A sheddable
//!   request is shed (reason concurrency). A critical request that fitted in that
//!   snapshot is admitted *untracked*: this VM counts it locally but the shared table
//!   does not show it yet; it is reconciled by this VM's next successful write
//!   (acquire, release or tick), since writes always carry the exact local count.
//!   Until then other VMs may admit into that slot: the overshoot is bounded by the
//!   number of untracked permits, which [`LimiterStats::untracked_admits`] counts.
//!   A critical request that did not fit is shed. In shadow mode nothing is shed.
//! - **Release:** the slot is freed locally at once; the shared table keeps showing it
//!   (conservatively: fewer admissions, never more) until the next successful write,
//!   which the next release, acquire or tick performs ([`LimiterStats::pending_sync`]).
//!   No slot leaks.
//! - **Tick:** the heartbeat/reclaim write and the gradient merge are retried on the
//!   next tick; local RTT samples are kept until they are merged.
//!
//! # Deferred releases, taken back without a write
//!
//! A release and an acquire each cost a read and a CAS write. Under steady traffic a
//! VM releases and acquires at about the same rate, so it keeps some slots it
//! released without writing the table, and its next acquires of the same class take
//! them back, again without a read or a write: the table already counts those slots,
//! and it summed to at most the limit when they were admitted. The allowance is
//! `room / (16 × busy VMs)` ([`DEFER_DIVISOR`]; room: the limit, or the memory ceiling if
//! lower; busy VMs = slots in the table at this VM's last read), so all VMs together overstate by about `limit / 16`: other
//! VMs may shed that much early, nothing is ever admitted beyond the limit. A
//! release past the allowance writes the exact count; so does every tick (within
//! 100 ms, with the count of busy VMs refreshed), and the next acquire or release
//! after the limit or the sheddable share shrank (a kept slot was admitted under
//! the larger limit). Only slots of the request's own class are taken back, so the
//! sheddable cap holds too. Shadow mode takes none back (each request is judged
//! against the table), and when the allowance is below one slot (small limits,
//! many VMs) every release is written at once.
//!
//! # Adaptive limit
//!
//! See [`crate::gradient`]: RTTs are accumulated per VM, merged on tick, and one
//! elected VM moves the limit; every VM caches the limit on its tick.

use std::sync::atomic::{AtomicU32, Ordering};

mod bounds;
pub mod config;
mod sync;
mod table;

pub use bounds::{RESERVE_DECAY, RESERVE_MARGIN, RESERVE_SLACK};
pub use config::{AdaptiveConfig, ConcurrencyConfig, LimitMode};
use sync::{MySlot, Sync};
pub use table::{read_in_flight, InFlight, INFLIGHT_KEY, MAX_SLOTS, MIN_STALE_MS};
use table::{scan, write_mine, HEADER_LEN, SLOT_LEN};

use crate::classify::Criticality;
use crate::gradient::{Controller, Usage, Windows};
use crate::outcome::Completion;
use crate::shared::{SetError, SharedStore};

/// Weight of one decision in the moving shed fraction behind `severity`.
const SHED_EWMA_WEIGHT: f64 = 1.0 / 32.0;

/// A VM may leave `room / DEFER_DIVISOR` releases unwritten (module docs).
pub const DEFER_DIVISOR: u32 = 16;

/// One admitted request's in-flight slot. Give it back with [`Limiter::release`].
#[must_use = "a permit holds an in-flight slot until it is passed to Limiter::release"]
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    crit: Criticality,
    /// The limiter instance that issued it; a permit given to another one is ignored.
    instance: u32,
    /// False when the limiter was disabled: nothing to give back.
    counted: bool,
}

impl Permit {
    pub fn criticality(&self) -> Criticality {
        self.crit
    }
}

/// Which bound a shed request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The concurrency limit (or the sheddable cap under it).
    Concurrency,
    /// The memory ceiling (or the sheddable cap under it) was the tighter bound.
    Memory,
}

/// The decision for one request.
#[derive(Debug, PartialEq)]
#[must_use]
pub enum Acquire {
    /// Go ahead; release the permit when the request ends.
    Admitted(Permit),
    /// Shed by `bound`. `severity` in [0, 1] (for `retry-after`) is the recent
    /// fraction of this VM's requests shed, at least 0.5 for a critical one.
    Shed { severity: f64, bound: Bound },
    /// Shadow mode (`enforce: false`): it would have been shed; it was admitted and
    /// counted anyway. Release the permit like any other.
    ShadowShed(Permit),
}

/// Gauges and counters for metrics. Counters only grow; gauges reflect the last
/// read or tick. Float gauges are NaN until known (export them as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimiterStats {
    /// The limit this VM enforces (cached from the controller at its last tick).
    pub limit: u32,
    /// The memory ceiling on total in flight; 0 = none.
    pub memory_ceiling: u32,
    /// Slots kept free of sheddable requests for critical ones (module docs).
    pub critical_reserve: u32,
    /// Sheddable requests admitted while at most this many are in flight.
    pub sheddable_cap: u32,
    /// Global in-flight at this VM's last read of the table.
    pub in_flight: u32,
    pub in_flight_critical: u32,
    pub in_flight_sheddable: u32,
    /// Requests this VM has in flight (exact).
    pub local_in_flight: u32,
    /// Baseline ("minimum") RTT the controller compares with.
    pub min_rtt_ms: f64,
    /// Median RTT of the last evaluated window.
    pub sample_rtt_ms: f64,
    /// tolerance × min / sample, clamped to [0.5, 2].
    pub gradient: f64,
    pub admitted: u64,
    pub shed_critical: u64,
    pub shed_sheddable: u64,
    /// Shadow mode: requests that would have been shed.
    pub would_have_shed: u64,
    /// Critical requests admitted while the CAS loop gave up (not yet in the table).
    pub untracked_admits: u64,
    pub cas_giveups_acquire: u64,
    pub cas_giveups_release: u64,
    pub cas_giveups_tick: u64,
    /// The table does not show this VM's exact count yet (a write is pending).
    pub pending_sync: bool,
    /// Acquisitions refused because the table had no room for a new VM slot.
    pub table_full: u64,
    /// Releases left for a later write (see "Deferred releases").
    pub releases_deferred: u64,
    /// Acquisitions that took back a deferred release: no read, no write.
    pub acquires_reused: u64,
    /// Releases with nothing in flight for that class: a host bug; ignored.
    pub release_underflows: u64,
    /// Permits from another limiter instance (e.g. before a re-creation); ignored.
    pub foreign_permits: u64,
    /// Slots of dead VMs dropped after their heartbeat went stale.
    pub stale_slots_reclaimed: u64,
    pub rtt_samples: u64,
    /// RTTs refused as NaN, infinite or negative.
    pub rtt_rejected: u64,
    /// Controller steps this VM ran as leader.
    pub limit_steps: u64,
}

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(1);

/// The concurrency limiter of one VM. See the module docs.
#[derive(Debug)]
pub struct Limiter {
    enabled: bool,
    enforce: bool,
    share: f64,
    /// Multiple of the limit critical requests alone may hold.
    critical_headroom: f64,
    attempts: u32,
    id: u64,
    instance: u32,
    controller: Controller,
    stale_ms: u64,
    limit: u32,
    /// The controller's (or fixed) limit, before memory pressure shrinks it.
    base_limit: u32,
    /// Share of `base_limit` allowed under backend memory pressure, in (0, 1].
    pressure_factor: f64,
    /// Hard bound on total in flight from the store's memory headroom.
    ceiling: Option<u32>,
    /// Whether critical requests pass the ceiling: while the store's measured memory
    /// is below the soft line ([`Limiter::spare_critical_from_ceiling`]).
    ceiling_spares_critical: bool,
    sheddable_cap: u32,
    /// Slots sheddable requests leave to critical ones, and the critical peak behind
    /// it: the decayed estimate and the current tick's window.
    reserve: u32,
    critical_peak: f64,
    window_critical_peak: u32,
    /// Permits this VM holds: the truth its slot must show.
    local: InFlight,
    /// What this VM's slot in the table shows.
    slot: MySlot,
    /// The other VMs' counts and the number of slots at this VM's last read.
    others_seen: InFlight,
    slots_seen: u32,
    windows: Windows,
    usage: Usage,
    shed_ewma: f64,
    stats: LimiterStats,
}

impl Limiter {
    /// A limiter for one VM. `vm_id` must be unique among the VMs sharing the store
    /// (draw a random u64 at VM start); `cas_attempts` bounds every CAS loop.
    pub fn new(cfg: &ConcurrencyConfig, cas_attempts: u32, vm_id: u64) -> Self {
        let controller = Controller::new(cfg);
        let mut l = Limiter {
            enabled: cfg.enabled,
            enforce: cfg.enforce,
            share: 0.0,
            critical_headroom: 1.0,
            attempts: cas_attempts.max(1),
            id: vm_id,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            stale_ms: 0,
            limit: 0,
            base_limit: 0,
            pressure_factor: 1.0,
            ceiling: None,
            ceiling_spares_critical: false,
            sheddable_cap: 0,
            reserve: 0,
            critical_peak: 0.0,
            window_critical_peak: 0,
            local: InFlight::default(),
            slot: MySlot::Shows(InFlight::default()),
            others_seen: InFlight::default(),
            slots_seen: 0,
            windows: Windows::default(),
            usage: Usage::default(),
            shed_ewma: 0.0,
            stats: LimiterStats {
                min_rtt_ms: f64::NAN,
                sample_rtt_ms: f64::NAN,
                gradient: 1.0,
                ..LimiterStats::default()
            },
            controller,
        };
        l.reconfigure(cfg);
        l
    }

    /// Applies a new configuration, keeping the permits in flight (they stay valid)
    /// and the cached adaptive limit (clamped to the new bounds until the next tick).
    pub fn reconfigure(&mut self, cfg: &ConcurrencyConfig) {
        self.enabled = cfg.enabled;
        self.enforce = cfg.enforce;
        self.share = if cfg.sheddable_share.is_finite() {
            cfg.sheddable_share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.critical_headroom = if cfg.critical_headroom.is_finite() {
            cfg.critical_headroom.clamp(1.0, 16.0)
        } else {
            1.0
        };
        self.controller = Controller::new(cfg);
        self.stale_ms = MIN_STALE_MS.max(cfg.adaptive.interval_ms.saturating_mul(10));
        let mut state = self.controller.initial_state();
        if self.base_limit > 0 {
            state.limit = f64::from(self.base_limit);
        }
        self.set_limit(self.controller.limit_of(&state));
    }

    /// After a write (attempt): the slot shows `local`, or it may not and the next
    /// write must not wait. Either way no deferred release is outstanding any more.
    fn set_dirty(&mut self, dirty: bool) {
        self.slot = if dirty {
            MySlot::Pending
        } else {
            MySlot::Shows(self.local)
        };
    }

    fn is_dirty(&self) -> bool {
        self.slot != MySlot::Shows(self.local)
    }

    /// Records a read of the table: the other VMs' counts and how many VMs are busy,
    /// and the global in-flight gauges (the others plus this VM's exact count).
    fn seen(&mut self, others: InFlight, slots: usize) {
        self.others_seen = others;
        self.slots_seen = u32::try_from(slots).unwrap_or(u32::MAX);
        let total = others.plus(self.local);
        self.stats.in_flight = total.total();
        self.stats.in_flight_critical = total.critical;
        self.stats.in_flight_sheddable = total.sheddable;
        self.note_critical(total.critical);
    }

    /// Whether a release (already taken off `local`) may stay unwritten: the slot
    /// then overstates this VM by the unwritten releases, at most
    /// `limit / (DEFER_DIVISOR × busy VMs)`, so all VMs together overstate by at
    /// most `room / DEFER_DIVISOR` (module docs).
    fn may_defer_release(&self) -> bool {
        let MySlot::Shows(stored) = self.slot else {
            return false;
        };
        if !self.counting() {
            return false; // permits from before a reconfiguration drain at once
        }
        let busy = self.slots_seen.max(1);
        // Of the room in force: a memory ceiling far below the limit must not let the
        // table overstate by a share of the (larger) limit.
        let allowance = self.room() / DEFER_DIVISOR.saturating_mul(busy);
        stored.total().saturating_sub(self.local.total()) <= allowance
    }

    /// Takes back a slot this VM released without writing, if one of class `crit`
    /// is left: the table already counts it, so no read or write is needed.
    fn try_reuse(&mut self, crit: Criticality, want: InFlight) -> bool {
        let MySlot::Shows(stored) = self.slot else {
            return false;
        };
        // Shadow mode must judge each request against the table; deferred slots
        // were admitted under a limit that is still in force (`apply_pressure`).
        if !self.enforce || stored.count(crit) <= self.local.count(crit) {
            return false;
        }
        // Only while the request would fit now: the limit, the ceiling or the
        // reserve may have tightened since the slot was admitted.
        if self.fits(self.others_seen.plus(self.local), crit).is_err() {
            return false;
        }
        self.local = want;
        self.note_in_flight(self.others_seen.plus(stored).total());
        self.stats.acquires_reused += 1;
        true
    }

    /// The limit currently enforced by this VM.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether one more request of class `crit` fits beside `total` (module docs,
    /// "Priorities"); if not, the bound it met.
    fn fits(&self, total: InFlight, crit: Criticality) -> Result<(), Bound> {
        let ceiling = self.ceiling.unwrap_or(u32::MAX);
        let limit = if self.enabled { self.limit } else { u32::MAX };
        let fits_limit = match crit {
            Criticality::Critical => {
                f64::from(total.critical) < f64::from(limit) * self.critical_headroom
            }
            Criticality::Sheddable => total.total() < limit && total.sheddable < self.sheddable_cap,
        };
        let spared = crit == Criticality::Critical && self.ceiling_spares_critical;
        match (fits_limit, spared || total.total() < ceiling) {
            (true, true) => Ok(()),
            (_, false) => Err(Bound::Memory),
            // The sheddable cap is set by whichever of limit and ceiling is tighter.
            (false, true) if ceiling < limit => Err(Bound::Memory),
            (false, true) => Err(Bound::Concurrency),
        }
    }

    fn permit(&self, crit: Criticality, counted: bool) -> Permit {
        Permit {
            crit,
            instance: self.instance,
            counted,
        }
    }

    fn note_in_flight(&mut self, total: u32) {
        self.usage.peak_in_flight = self.usage.peak_in_flight.max(total);
    }

    /// A request the concurrency limit turned away tells the controller the limit is
    /// in use; one the memory ceiling turned away says nothing about the limit.
    fn note_denied(&mut self, bound: Bound) {
        if bound == Bound::Concurrency {
            self.usage.denied = self.usage.denied.saturating_add(1);
        }
    }

    fn note_decision(&mut self, shed: bool) {
        let x = if shed { 1.0 } else { 0.0 };
        self.shed_ewma += (x - self.shed_ewma) * SHED_EWMA_WEIGHT;
    }

    fn shed(&mut self, crit: Criticality, bound: Bound) -> Acquire {
        self.note_decision(true);
        self.note_denied(bound);
        let severity = match crit {
            Criticality::Critical => {
                self.stats.shed_critical += 1;
                self.shed_ewma.max(0.5)
            }
            Criticality::Sheddable => {
                self.stats.shed_sheddable += 1;
                self.shed_ewma
            }
        };
        Acquire::Shed {
            severity: severity.clamp(0.0, 1.0),
            bound,
        }
    }

    /// Takes a permit for a request now (`now_ms` is the wall clock in ms, the same
    /// clock on every VM). One shared-data read, plus one CAS write if admitted.
    ///
    /// While enforcing, the global in-flight count never passes the limit through this
    /// call, and sheddable requests never pass `sheddable_share` of it; the only
    /// exception is the documented CAS give-up path (critical requests admitted
    /// untracked). A disabled limiter admits everything without touching the store.
    pub fn try_acquire<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        crit: Criticality,
        now_ms: u64,
    ) -> Acquire {
        if !self.counting() {
            self.stats.admitted += 1;
            return Acquire::Admitted(self.permit(crit, false));
        }
        let want = self.local.incremented(crit);
        if self.try_reuse(crit, want) {
            return self.admitted(crit, true);
        }
        let mut last_fit = Err(Bound::Concurrency);
        let mut full = false;
        for _ in 0..self.attempts {
            let (mut buf, cas) = table::fetch(store);
            let scanned = scan(&buf, self.id);
            let others = scanned.map(|s| s.others).unwrap_or_default();
            self.seen(others, scanned.map_or(0, |s| s.slots));
            let total = others.plus(self.local);
            let fits = self.fits(total, crit);
            last_fit = fits;
            if let (Err(bound), true) = (fits, self.enforce) {
                self.note_in_flight(total.total());
                return self.shed(crit, bound);
            }
            if !write_mine(&mut buf, scanned, self.id, now_ms, want) {
                full = true;
                break;
            }
            match store.set(INFLIGHT_KEY, &buf, cas) {
                Ok(()) => {
                    self.local = want;
                    self.set_dirty(false);
                    self.seen(others, buf.len().saturating_sub(HEADER_LEN) / SLOT_LEN);
                    self.note_in_flight(others.plus(want).total());
                    if let Err(bound) = fits {
                        // Shadow mode: counted as if it had been turned away.
                        self.note_denied(bound);
                    }
                    return self.admitted(crit, fits.is_ok());
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => break,
            }
        }
        // The bound was hit (or the host refused, or the table is full).
        if full {
            self.stats.table_full += 1;
        } else {
            self.stats.cas_giveups_acquire += 1;
        }
        let admit_untracked = !self.enforce || (crit == Criticality::Critical && last_fit.is_ok());
        if !admit_untracked {
            return self.shed(crit, last_fit.err().unwrap_or(Bound::Concurrency));
        }
        if let Err(bound) = last_fit {
            self.note_denied(bound);
        }
        self.local = want;
        self.set_dirty(true);
        self.stats.untracked_admits += 1;
        let fits = last_fit.is_ok() && crit == Criticality::Critical;
        self.admitted(crit, fits)
    }

    fn admitted(&mut self, crit: Criticality, fits: bool) -> Acquire {
        self.stats.local_in_flight = self.local.total();
        if fits {
            self.note_decision(false);
            self.stats.admitted += 1;
            Acquire::Admitted(self.permit(crit, true))
        } else {
            self.note_decision(true);
            self.stats.would_have_shed += 1;
            Acquire::ShadowShed(self.permit(crit, true))
        }
    }

    /// Gives a permit back when its request ends, whichever way. Records the RTT for
    /// the adaptive limit when the ending measures the upstream's latency
    /// ([`Ending::is_latency_sample`](crate::outcome::Ending::is_latency_sample)). One read, and one CAS write unless the table
    /// already shows this VM's count. A permit from another limiter instance is
    /// ignored (and counted).
    pub fn release<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        permit: Permit,
        done: Completion,
        now_ms: u64,
    ) {
        if permit.instance != self.instance {
            self.stats.foreign_permits += 1;
            return;
        }
        if !permit.counted {
            return;
        }
        if done.ending.is_latency_sample() {
            if let Some(rtt) = done.rtt_ms {
                let window = self.windows.get_mut(done.lane.index());
                if window.is_some_and(|w| w.record(rtt)) {
                    self.stats.rtt_samples += 1;
                } else {
                    self.stats.rtt_rejected += 1;
                }
            }
        }
        let count = self.local.count_mut(permit.crit);
        if *count == 0 {
            self.stats.release_underflows += 1;
            return;
        }
        *count -= 1;
        self.stats.local_in_flight = self.local.total();
        if self.may_defer_release() {
            self.stats.releases_deferred += 1;
            return;
        }
        match self.sync_in_place(store, now_ms) {
            Sync::Done => {}
            Sync::GaveUp { full: true } => self.stats.table_full += 1,
            Sync::GaveUp { full: false } => self.stats.cas_giveups_release += 1,
        }
    }

    /// Gauges and counters for metrics.
    pub fn stats(&self) -> LimiterStats {
        let mut s = self.stats;
        s.local_in_flight = self.local.total();
        s.pending_sync = self.is_dirty();
        s.limit = self.limit;
        s.sheddable_cap = self.sheddable_cap;
        s.critical_reserve = self.reserve;
        s
    }

    /// Requests this VM has in flight, by criticality (exact).
    pub fn local_in_flight(&self) -> InFlight {
        self.local
    }
}

#[cfg(test)]
mod tests;
