//! Single-flight for concurrent GETs of the same key, per worker.
//!
//! When many readers ask for the same missing session at once (a client retry storm, a
//! page with several requests), only the first one — the *leader* — goes upstream; the
//! others *wait* for it, bounded in number and in time. If the leader's answer is a 404
//! that the negative cache accepted, the waiters are answered with the same 404 at the
//! proxy; anything else (a 200, an error, a reset, a refused fill, a timeout) *releases*
//! them to go upstream themselves.
//!
//! This is a pure data structure keyed by fingerprint; the host keeps the paused HTTP
//! contexts and acts on the ids it returns. Memory is bounded: at most
//! [`Limits::max_keys`] flights and [`Limits::max_total_waiters`] waiters (each flight at
//! most `max_waiters`); a join beyond any bound returns [`Join::Bypass`] (go upstream, not
//! tracked). A leader that never reports back is dropped by [`SingleFlight::expire`] after
//! [`Limits::leader_ttl_ms`].
//!
//! Correctness with the negative cache: answer waiters from a leader's 404 only when that
//! leader's `NegCache::insert_missing` returned `Fill::Inserted`. The insert proves that
//! no write to the key ended between the leader's start and now, and every waiter joined
//! before now, so no waiter gets a 404 that predates a write acknowledged before it
//! started. Pass `outcome_is_404 = false` otherwise.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::rng::splitmix64;
use serde::Deserialize;

use crate::config::check::{check_range, field, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SingleFlightConfig {
    pub enabled: bool,
    /// Requests that may wait on one in-flight lookup; more go upstream.
    pub max_waiters: u32,
    /// Longest a waiter is held before it goes upstream itself.
    pub max_wait_ms: u64,
}

impl Default for SingleFlightConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_waiters: 64,
            max_wait_ms: 1000,
        }
    }
}

impl SingleFlightConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "max_waiters"), self.max_waiters, 0, 10_000)?;
        check_range(&field(section, "max_wait_ms"), self.max_wait_ms, 1, 10_000)
    }
}

/// What a GET should do after [`SingleFlight::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Go upstream, then call `complete` (or `leader_gone`).
    Leader,
    /// Pause; the id will come back from `complete`, `leader_gone` or `expire`.
    Wait,
    /// Go upstream, untracked (single-flight disabled or a bound reached).
    Bypass,
}

/// Bounds on the structure's size and on a silent leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys with a flight in progress.
    pub max_keys: usize,
    /// Waiters over all keys.
    pub max_total_waiters: usize,
    /// A flight whose leader has not reported back after this long is dropped and its
    /// waiters released (the host should always report; this is the safety net).
    pub leader_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_keys: 1024,
            max_total_waiters: 4096,
            leader_ttl_ms: 30_000,
        }
    }
}

/// Counters of one worker's single-flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlightStats {
    /// Flights started.
    pub leaders: u64,
    /// Waiters answered from their leader's 404 (upstream requests saved).
    pub coalesced: u64,
    /// Waiters released to go upstream (leader not 404, gone, or wait timed out).
    pub released: u64,
    /// Joins refused by a bound.
    pub bypassed: u64,
    /// Waiters removed by `cancel` (their stream ended first).
    pub cancelled: u64,
}

/// Passes fingerprints through a mixer: they are already keyed hashes, but test and
/// host code may use small numbers. No `RandomState` (and so no randomness) needed.
#[derive(Default)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = splitmix64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = splitmix64(self.0 ^ n);
    }
}

#[derive(Debug)]
struct Waiter {
    id: u32,
    deadline_ms: u64,
}

/// One key's lookup in flight: its leader and the requests waiting for its answer.
#[derive(Debug)]
struct KeyFlight {
    leader: u32,
    started_ms: u64,
    waiters: Vec<Waiter>,
}

/// One worker's in-flight GETs by fingerprint.
#[derive(Debug)]
pub struct SingleFlight {
    flights: HashMap<u64, KeyFlight, BuildHasherDefault<FpHasher>>,
    max_waiters: usize,
    max_wait_ms: u64,
    limits: Limits,
    total_waiters: usize,
    stats: FlightStats,
}

impl SingleFlight {
    /// A disabled config (or `max_waiters` 0) makes every join a `Bypass`.
    pub fn new(config: &SingleFlightConfig, limits: Limits) -> Self {
        let max_waiters = if config.enabled {
            config.max_waiters as usize
        } else {
            0
        };
        Self {
            flights: HashMap::default(),
            max_waiters,
            max_wait_ms: config.max_wait_ms,
            limits,
            total_waiters: 0,
            stats: FlightStats::default(),
        }
    }

    /// A GET with fingerprint `fp` (request `id`) is about to go upstream.
    pub fn join(&mut self, fp: u64, id: u32, now_ms: u64) -> Join {
        if self.max_waiters == 0 {
            return Join::Bypass;
        }
        if let Some(flight) = self.flights.get_mut(&fp) {
            if flight.waiters.len() < self.max_waiters
                && self.total_waiters < self.limits.max_total_waiters
            {
                flight.waiters.push(Waiter {
                    id,
                    deadline_ms: now_ms.saturating_add(self.max_wait_ms),
                });
                self.total_waiters += 1;
                return Join::Wait;
            }
        } else if self.flights.len() < self.limits.max_keys {
            self.flights.insert(
                fp,
                KeyFlight {
                    leader: id,
                    started_ms: now_ms,
                    waiters: Vec::new(),
                },
            );
            self.stats.leaders += 1;
            return Join::Leader;
        }
        self.stats.bypassed += 1;
        Join::Bypass
    }

    /// The leader `leader` of `fp` got its response. Returns the waiters: to be answered
    /// with a 404 if `outcome_is_404` (see the module docs for when that is allowed),
    /// otherwise to be released upstream. Empty if `leader` does not lead `fp`.
    pub fn complete(&mut self, fp: u64, leader: u32, outcome_is_404: bool) -> Vec<u32> {
        let ids = self.finish(fp, leader);
        if outcome_is_404 {
            self.stats.coalesced += ids.len() as u64;
        } else {
            self.stats.released += ids.len() as u64;
        }
        ids
    }

    /// The leader ended without a usable response (reset, local reply, timeout): its
    /// waiters are released upstream.
    pub fn leader_gone(&mut self, fp: u64, leader: u32) -> Vec<u32> {
        self.complete(fp, leader, false)
    }

    fn finish(&mut self, fp: u64, leader: u32) -> Vec<u32> {
        match self.flights.get(&fp) {
            Some(flight) if flight.leader == leader => {}
            _ => return Vec::new(),
        }
        let Some(flight) = self.flights.remove(&fp) else {
            return Vec::new();
        };
        self.total_waiters -= flight.waiters.len();
        flight.waiters.into_iter().map(|w| w.id).collect()
    }

    /// A waiter's stream ended while it waited; forget it. True if it was waiting.
    pub fn cancel(&mut self, fp: u64, waiter: u32) -> bool {
        let Some(flight) = self.flights.get_mut(&fp) else {
            return false;
        };
        let before = flight.waiters.len();
        flight.waiters.retain(|w| w.id != waiter);
        let removed = before - flight.waiters.len();
        self.total_waiters -= removed;
        self.stats.cancelled += removed as u64;
        removed > 0
    }

    /// Releases waiters whose wait is over, and drops flights whose leader is silent
    /// past `leader_ttl_ms` (releasing their waiters). Call it on every tick, with a
    /// tick period well under `max_wait_ms` (or at [`Self::next_deadline`]).
    pub fn expire(&mut self, now_ms: u64) -> Vec<u32> {
        let mut out = Vec::new();
        let leader_ttl = self.limits.leader_ttl_ms;
        self.flights.retain(|_, flight| {
            if now_ms >= flight.started_ms.saturating_add(leader_ttl) {
                out.extend(flight.waiters.drain(..).map(|w| w.id));
                return false;
            }
            flight.waiters.retain(|w| {
                let due = w.deadline_ms <= now_ms;
                if due {
                    out.push(w.id);
                }
                !due
            });
            true
        });
        self.total_waiters -= out.len();
        self.stats.released += out.len() as u64;
        out
    }

    /// The earliest moment `expire` has something to do, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.flights
            .values()
            .flat_map(|f| {
                let leader = f.started_ms.saturating_add(self.limits.leader_ttl_ms);
                f.waiters.iter().map(|w| w.deadline_ms).chain([leader])
            })
            .min()
    }

    /// Keys with a flight in progress.
    pub fn flights(&self) -> usize {
        self.flights.len()
    }

    /// Waiters over all flights.
    pub fn waiters(&self) -> usize {
        self.total_waiters
    }

    pub fn stats(&self) -> FlightStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg(max_waiters: u32, max_wait_ms: u64) -> SingleFlightConfig {
        SingleFlightConfig {
            enabled: true,
            max_waiters,
            max_wait_ms,
        }
    }

    fn sf(max_waiters: u32) -> SingleFlight {
        SingleFlight::new(&cfg(max_waiters, 100), Limits::default())
    }

    #[test]
    fn first_leads_others_wait_and_get_the_404() {
        let mut s = sf(8);
        assert_eq!(s.join(7, 1, 0), Join::Leader);
        assert_eq!(s.join(7, 2, 1), Join::Wait);
        assert_eq!(s.join(7, 3, 2), Join::Wait);
        assert_eq!(s.join(8, 4, 2), Join::Leader);
        assert_eq!(s.waiters(), 2);
        assert_eq!(s.complete(7, 1, true), vec![2, 3]);
        assert_eq!(s.stats().coalesced, 2);
        assert_eq!(s.flights(), 1);
        assert_eq!(s.waiters(), 0);
        // The next GET of the key starts a new flight.
        assert_eq!(s.join(7, 5, 3), Join::Leader);
    }

    #[test]
    fn anything_but_a_404_releases() {
        let mut s = sf(8);
        s.join(7, 1, 0);
        s.join(7, 2, 0);
        assert_eq!(s.complete(7, 1, false), vec![2]);
        assert_eq!(s.stats().released, 1);
        s.join(7, 3, 0);
        s.join(7, 4, 0);
        assert_eq!(s.leader_gone(7, 3), vec![4]);
        assert_eq!(s.flights(), 0);
    }

    #[test]
    fn only_the_leader_completes_its_flight() {
        let mut s = sf(8);
        s.join(7, 1, 0);
        s.join(7, 2, 0);
        assert!(s.complete(7, 2, true).is_empty());
        assert!(s.complete(9, 1, true).is_empty());
        assert_eq!(s.complete(7, 1, true), vec![2]);
    }

    #[test]
    fn waiters_are_bounded_per_key_and_overall() {
        let mut s = sf(2);
        assert_eq!(s.join(1, 1, 0), Join::Leader);
        assert_eq!(s.join(1, 2, 0), Join::Wait);
        assert_eq!(s.join(1, 3, 0), Join::Wait);
        assert_eq!(s.join(1, 4, 0), Join::Bypass);
        let limits = Limits {
            max_keys: 2,
            max_total_waiters: 3,
            leader_ttl_ms: 1000,
        };
        let mut s = SingleFlight::new(&cfg(10, 100), limits);
        assert_eq!(s.join(1, 1, 0), Join::Leader);
        assert_eq!(s.join(2, 2, 0), Join::Leader);
        assert_eq!(s.join(3, 3, 0), Join::Bypass);
        for id in 10..13 {
            assert_eq!(s.join(1 + u64::from(id % 2), id, 0), Join::Wait);
        }
        assert_eq!(s.join(1, 20, 0), Join::Bypass);
        assert_eq!(s.stats().bypassed, 2);
    }

    #[test]
    fn disabled_or_zero_waiters_always_bypass() {
        let mut s = sf(0);
        assert_eq!(s.join(1, 1, 0), Join::Bypass);
        let mut off = cfg(8, 100);
        off.enabled = false;
        let mut s = SingleFlight::new(&off, Limits::default());
        assert_eq!(s.join(1, 1, 0), Join::Bypass);
        assert_eq!(s.flights(), 0);
    }

    #[test]
    fn waits_time_out_and_silent_leaders_are_dropped() {
        let limits = Limits {
            leader_ttl_ms: 1000,
            ..Limits::default()
        };
        let mut s = SingleFlight::new(&cfg(8, 100), limits);
        s.join(1, 1, 0);
        s.join(1, 2, 10);
        s.join(1, 3, 50);
        assert_eq!(s.next_deadline(), Some(110));
        assert!(s.expire(109).is_empty());
        assert_eq!(s.expire(110), vec![2]);
        assert_eq!(s.expire(150), vec![3]);
        assert_eq!(s.flights(), 1, "the leader is still in flight");
        s.join(1, 4, 990);
        assert_eq!(s.expire(1000), vec![4]);
        assert_eq!(s.flights(), 0);
        assert!(
            s.complete(1, 1, true).is_empty(),
            "late leader finds nothing"
        );
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn cancel_forgets_a_waiter() {
        let mut s = sf(8);
        s.join(1, 1, 0);
        s.join(1, 2, 0);
        s.join(1, 3, 0);
        assert!(s.cancel(1, 2));
        assert!(!s.cancel(1, 2));
        assert!(!s.cancel(5, 2));
        assert_eq!(s.waiters(), 1);
        assert_eq!(s.complete(1, 1, true), vec![3]);
        assert_eq!(s.stats().cancelled, 1);
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        #[derive(Debug, Clone)]
        enum FlightOp {
            Join(u8),
            Complete(u8, bool),
            Gone(u8),
            Cancel(u8, u8),
            Tick(u8),
        }

        fn op() -> impl Strategy<Value = FlightOp> {
            prop_oneof![
                4 => (0u8..6).prop_map(FlightOp::Join),
                2 => (0u8..6, any::<bool>()).prop_map(|(k, b)| FlightOp::Complete(k, b)),
                1 => (0u8..6).prop_map(FlightOp::Gone),
                1 => (0u8..6, 0u8..40).prop_map(|(k, w)| FlightOp::Cancel(k, w)),
                1 => (0u8..50).prop_map(FlightOp::Tick),
            ]
        }

        proptest! {
            /// Every waiter comes back exactly once (or is cancelled), bounds always hold,
            /// and once everything has expired the structure is empty.
            #[test]
            fn every_waiter_returns_exactly_once(ops in proptest::collection::vec(op(), 1..200)) {
                let limits = Limits { max_keys: 3, max_total_waiters: 5, leader_ttl_ms: 300 };
                let mut s = SingleFlight::new(&cfg(3, 40), limits);
                let mut now = 0u64;
                let mut next_id = 0u32;
                let mut waiting: BTreeSet<u32> = BTreeSet::new();
                let mut leaders: std::collections::BTreeMap<u64, u32> = Default::default();
                let back = |ids: Vec<u32>, waiting: &mut BTreeSet<u32>| {
                    for id in ids {
                        prop_assert!(waiting.remove(&id), "id {} returned twice or never waited", id);
                    }
                    Ok(())
                };
                for op in ops {
                    match op {
                        FlightOp::Join(k) => {
                            next_id += 1;
                            match s.join(u64::from(k), next_id, now) {
                                Join::Leader => { leaders.insert(u64::from(k), next_id); }
                                Join::Wait => { waiting.insert(next_id); }
                                Join::Bypass => {}
                            }
                        }
                        FlightOp::Complete(k, is404) => {
                            if let Some(l) = leaders.remove(&u64::from(k)) {
                                back(s.complete(u64::from(k), l, is404), &mut waiting)?;
                            }
                        }
                        FlightOp::Gone(k) => {
                            if let Some(l) = leaders.remove(&u64::from(k)) {
                                back(s.leader_gone(u64::from(k), l), &mut waiting)?;
                            }
                        }
                        FlightOp::Cancel(k, w) => {
                            if s.cancel(u64::from(k), u32::from(w)) {
                                prop_assert!(waiting.remove(&u32::from(w)));
                            }
                        }
                        FlightOp::Tick(dt) => {
                            now += u64::from(dt);
                            back(s.expire(now), &mut waiting)?;
                        }
                    }
                    prop_assert!(s.flights() <= 3);
                    prop_assert!(s.waiters() <= 5);
                    prop_assert_eq!(s.waiters(), waiting.len());
                }
                back(s.expire(now + 1_000), &mut waiting)?;
                prop_assert!(waiting.is_empty());
                prop_assert_eq!(s.flights(), 0);
            }
        }
    }
}
