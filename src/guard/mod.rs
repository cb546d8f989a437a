//! The decision pipeline for one key request: what the filter does with it, decided
//! in one place, with no host types. The host (`src/host/http.rs`) only carries the
//! verdict out: sends the reply, pauses the stream, or forwards it holding the permit.
//!
//! Order, cheapest and most certain first:
//!
//! 1. **Negative cache**: a key known missing is answered with the store's own 404;
//!    it costs the store nothing, so it comes before any shedding.
//! 2. **Class and criticality**: a read of a key known to exist is a logged-in user's
//!    (critical by default); a read of any other key is sheddable.
//! 3. **Memory pressure** (the store's memory curve), then **admission control**
//!    (the store's success rate), then the **concurrency limit and memory ceiling**
//!    (which take a slot, so they come last: a request shed before them holds none).
//! 4. **Single flight** for reads of unknown keys: one goes upstream, the others wait.
//!
//! Shadow mode is the same for every mechanism: a mechanism with `enforce: false`
//! counts what it would have shed ([`Tally::would_shed`]) and the pipeline goes on.

use std::rc::Rc;

use crate::admission::{Admission, Decision};
use crate::classify::{Class, Criticality, Op};
use crate::config::Config;
use crate::limiter::{Acquire, Bound, Limiter, Permit};
use crate::negcache::{Fill, Lookup, Mark, NegCache, WriteTicket};
use crate::pressure::PressureSnapshot;
use crate::reply::ShedReason;
use crate::rng::Rng;
use crate::shared::SharedStore;
use crate::singleflight::{Join, Limits, SingleFlight};

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

/// What this VM decided, exported as metric deltas on each tick, so the request
/// path makes no metric hostcalls.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub requests: [u64; Class::ALL.len()],
    /// Shed, by reason and criticality ([`crit_index`]).
    pub shed: [[u64; 2]; ShedReason::ALL.len()],
    pub would_shed: [u64; ShedReason::ALL.len()],
    pub cache_hits: u64,
    pub cache_would_hit: u64,
    pub coalesced: u64,
}

/// Column of a criticality in [`Tally::shed`]: 0 critical, 1 sheddable.
pub fn crit_index(crit: Criticality) -> usize {
    usize::from(crit == Criticality::Sheddable)
}

/// Counts one more in a [`Tally`] cell (the indexes come from enums, so the cell is
/// always there).
fn bump(cell: Option<&mut u64>) {
    if let Some(n) = cell {
        *n += 1;
    }
}

/// A key request as the host parsed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRequest {
    /// Never [`Op::Other`]: those pass untouched without a decision.
    pub op: Op,
    /// The key's fingerprint ([`NegCache::fingerprint`]).
    pub fp: u64,
    /// The host's stream id (single-flight waiters are named by it).
    pub id: u32,
}

/// Where a forwarded read stands in its key's single flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flight {
    /// Not in a flight (not a read of an unknown key, or the flight was bypassed).
    None,
    /// Goes upstream; the others for the key wait for its answer.
    Leader,
    /// Pause the stream until the leader's answer wakes it.
    Wait,
}

/// A request that goes on to the store (or waits behind one that does).
#[derive(Debug)]
pub struct Forward {
    pub class: Class,
    /// Release it when the request ends, whichever way (`Limiter::release`).
    pub permit: Option<Permit>,
    /// The negative cache's answer for a read, kept for the response.
    pub lookup: Option<Lookup>,
    /// A write or delete began invalidating its key; it must end it.
    pub write: Option<WriteTicket>,
    pub flight: Flight,
}

impl Forward {
    /// The permit to release at the end, and what to settle when the store answers.
    pub fn into_parts(self) -> (Option<Permit>, Outstanding) {
        let outstanding = Outstanding {
            write: self.write,
            lookup: self.lookup,
            leader: self.flight == Flight::Leader,
        };
        (self.permit, outstanding)
    }
}

/// What a forwarded request leaves to settle when the store answers.
#[derive(Debug)]
pub struct Outstanding {
    pub write: Option<WriteTicket>,
    pub lookup: Option<Lookup>,
    pub leader: bool,
}

/// Waiters of a single flight to wake once the leader's exchange is over.
#[derive(Debug, PartialEq, Eq)]
pub struct Wake {
    pub ids: Vec<u32>,
    /// Answer them with the leader's 404 (it was cached); else send them upstream.
    pub found_missing: bool,
}

/// What to do with a key request.
#[derive(Debug)]
pub enum Verdict {
    /// Answer with the store's own 404: the key is known missing.
    CachedMissing,
    /// Answer with a 503: `retry-after` seconds from the shedding mechanism's state.
    Shed {
        reason: ShedReason,
        crit: Criticality,
        retry_after_secs: u32,
    },
    Forward(Forward),
}

/// The mechanisms of one VM, borrowed for one decision.
pub struct Guard<'a> {
    pub config: &'a Config,
    /// The store's memory as last published (none until the first poll).
    pub pressure: Option<&'a PressureSnapshot>,
    pub admission: &'a mut Admission,
    pub limiter: &'a mut Limiter,
    pub cache: &'a mut NegCache,
    pub flights: &'a mut SingleFlight,
    pub rng: &'a mut Rng,
    pub tally: &'a mut Tally,
}

impl Guard<'_> {
    /// Decides what to do with `req` at `now_ms` (wall clock, the same on every VM).
    pub fn decide<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        req: KeyRequest,
        now_ms: u64,
    ) -> Verdict {
        let cache_on = self.config.negative_cache.enabled;
        let cache_enforce = cache_on && self.config.negative_cache.enforce;
        let mut lookup = None;
        let mut known = false;
        if req.op == Op::Read {
            let l = self.cache.lookup(store, req.fp, now_ms);
            lookup = Some(l);
            match l.mark {
                Mark::Missing if cache_enforce => {
                    bump(self.tally.requests.get_mut(Class::ReadUnknown.index()));
                    self.tally.cache_hits += 1;
                    return Verdict::CachedMissing;
                }
                Mark::Missing if cache_on => self.tally.cache_would_hit += 1,
                Mark::Exists => known = true,
                _ => {}
            }
        }
        let class = Class::of(req.op, known);
        bump(self.tally.requests.get_mut(class.index()));
        let crit = self.config.priorities.of(class);
        let permit = match self.protect(store, crit, now_ms) {
            Ok(permit) => permit,
            Err((reason, severity)) => {
                bump(
                    self.tally
                        .shed
                        .get_mut(reason.index())
                        .and_then(|row| row.get_mut(crit_index(crit))),
                );
                let u = self.rng.next_f64();
                return Verdict::Shed {
                    reason,
                    crit,
                    retry_after_secs: self.config.retry_after.seconds(severity, u),
                };
            }
        };
        let mut write = None;
        let mut flight = Flight::None;
        match req.op {
            Op::Write | Op::Delete => write = Some(self.cache.begin_write(store, req.fp, now_ms)),
            Op::Read if class == Class::ReadUnknown && cache_enforce => {
                flight = match self.flights.join(req.fp, req.id, now_ms) {
                    Join::Leader => Flight::Leader,
                    Join::Wait => Flight::Wait,
                    Join::Bypass => Flight::None,
                };
            }
            _ => {}
        }
        Verdict::Forward(Forward {
            class,
            permit,
            lookup,
            write,
            flight,
        })
    }

    /// Settles what the store's answer (`status`; `None` if the stream ended without
    /// one) means for the key: ends a write, fills or marks the cache, and says which
    /// waiters to wake. `store_404` tells whether a 404 is the store's own (its
    /// problem body), asked only for a 404. The host runs this before the client sees
    /// the response, so that once a POST's 201 has been received no GET can be
    /// answered from a 404 cached before it.
    pub fn settle<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        req: KeyRequest,
        outstanding: Outstanding,
        status: Option<u32>,
        store_404: impl FnOnce() -> bool,
        now_ms: u64,
    ) -> Option<Wake> {
        let fp = req.fp;
        match (req.op, outstanding.write) {
            (Op::Write, Some(_)) => {
                let success = status.is_some_and(|s| (200..300).contains(&s));
                self.cache.end_write(store, fp, success, now_ms);
            }
            (Op::Delete, Some(ticket)) => {
                self.cache
                    .end_delete(store, fp, ticket, status == Some(204), now_ms);
            }
            (Op::Read, _) => {
                let lookup = outstanding.lookup?;
                let mut cached = false;
                if status == Some(404) && self.config.negative_cache.enabled && store_404() {
                    cached = self
                        .cache
                        .insert_missing(store, fp, lookup.generation, now_ms)
                        == Fill::Inserted;
                } else if status == Some(200) {
                    self.cache.mark_exists(store, fp, &lookup, now_ms);
                }
                if outstanding.leader {
                    // Waiters get the 404 only if it could be cached: a write that
                    // touched the key meanwhile sends them to the store instead.
                    return Some(Wake {
                        ids: self.flights.complete(fp, req.id, cached),
                        found_missing: cached,
                    });
                }
            }
            _ => {}
        }
        None
    }

    /// Memory pressure, admission control, then the limit and the memory ceiling:
    /// the permit to go upstream, or the first enforcing mechanism that sheds.
    fn protect<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        crit: Criticality,
        now_ms: u64,
    ) -> Result<Option<Permit>, (ShedReason, f64)> {
        let memory = &self.config.memory;
        if memory.is_on() {
            let u = self.rng.next_f64();
            if let Some(severity) = self.pressure.and_then(|p| p.decide(crit, u)) {
                self.enforce(ShedReason::Memory, memory.enforce, severity)?;
            }
        }
        let u = self.rng.next_f64();
        match self.admission.decide(crit, u) {
            Decision::Admit => {}
            Decision::Reject { severity } => return Err((ShedReason::Admission, severity)),
            Decision::ShadowReject => self.enforce(ShedReason::Admission, false, 0.0)?,
        }
        match self.limiter.try_acquire(store, crit, now_ms) {
            Acquire::Admitted(permit) => Ok(Some(permit)),
            Acquire::ShadowShed(permit) => {
                self.enforce(ShedReason::Concurrency, false, 0.0)?;
                Ok(Some(permit))
            }
            Acquire::Shed { severity, bound } => Err((reason_of(bound), severity)),
        }
    }

    /// A mechanism wants to shed: it does if it enforces; in shadow mode it is
    /// counted and the request goes on.
    fn enforce(
        &mut self,
        reason: ShedReason,
        enforce: bool,
        severity: f64,
    ) -> Result<(), (ShedReason, f64)> {
        if enforce {
            return Err((reason, severity));
        }
        bump(self.tally.would_shed.get_mut(reason.index()));
        Ok(())
    }
}

/// The shed reason a client sees for a limiter bound.
fn reason_of(bound: Bound) -> ShedReason {
    match bound {
        Bound::Concurrency => ShedReason::Concurrency,
        Bound::Memory => ShedReason::Memory,
    }
}

/// One VM's mechanisms, owned: what a [`Guard`] borrows, for code that has no host
/// worker around it (benchmarks, the simulations in the tests).
pub struct Vm {
    /// Shared with the host's root context, which reads it too.
    pub config: Rc<Config>,
    pub pressure: Option<PressureSnapshot>,
    pub admission: Admission,
    pub limiter: Limiter,
    pub cache: NegCache,
    pub flights: SingleFlight,
    pub rng: Rng,
    pub tally: Tally,
}

/// The negative cache of a whole configuration: its own section, the key table's and the
/// CAS bound. `key_seed` is the deployment's fingerprint seed, `rng_seed` any per-worker random.
pub fn negative_cache(config: &Config, key_seed: u64, rng_seed: u64) -> NegCache {
    NegCache::new(
        &config.negative_cache,
        &config.key_table,
        config.cas_attempts,
        key_seed,
        rng_seed,
    )
}

impl Vm {
    /// A VM with `config`; `vm_id` names it in shared tables, `seed` seeds its
    /// randomness (the key-hash seed is shared: `key_seed`).
    pub fn new(config: impl Into<Rc<Config>>, vm_id: u64, key_seed: u64, seed: u64) -> Self {
        let config = config.into();
        let mut rng = Rng::new(seed);
        Self {
            cache: negative_cache(&config, key_seed, rng.next_u64()),
            limiter: Limiter::new(&config.concurrency, config.cas_attempts, vm_id),
            admission: Admission::new(&config.admission, config.cas_attempts),
            flights: SingleFlight::new(&config.negative_cache.single_flight, Limits::default()),
            pressure: None,
            tally: Tally::default(),
            rng,
            config,
        }
    }

    pub fn guard(&mut self) -> Guard<'_> {
        Guard {
            config: &self.config,
            pressure: self.pressure.as_ref(),
            admission: &mut self.admission,
            limiter: &mut self.limiter,
            cache: &mut self.cache,
            flights: &mut self.flights,
            rng: &mut self.rng,
            tally: &mut self.tally,
        }
    }
}
