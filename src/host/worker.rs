//! State of one Envoy worker's VM, shared by its root context and its requests.
//!
//! A VM is single-threaded, so requests borrow it in turn; anything that must hold
//! across workers lives in shared data and is reached through [`HostStore`].

use std::collections::HashMap;
use std::rc::Rc;

use crate::ceiling::{self, MAX_CEILING};
use crate::clock::Clock;
use crate::config::Config;
use crate::election::Election;
use crate::fingerprint::{init_seed, read_seed};
use crate::guard::{negative_cache, Vm};
use crate::keytable::OccupancyScan;
use crate::pressure::{PressureSnapshot, PressureTracker};
use crate::rng::Rng;

use super::abi;
use super::metrics::Metrics;
use super::store::HostStore;

/// A request paused behind another one for the same missing key.
pub struct Paused {
    pub fp: u64,
    pub path: String,
}

/// How a paused waiter was woken, kept until its own context notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Answered with its leader's 404.
    Answered,
    /// Sent on to the store at this time (ns): its round trip starts here, not at
    /// its response (which would record a 0 ms RTT for the adaptive limit).
    Resumed { at_ns: u64 },
}

pub struct Worker {
    /// This VM's mechanisms, what a [`Guard`] borrows.
    pub vm: Vm,
    pub metrics: Metrics,
    /// Identity of this VM in shared tables (random, so restarts never collide).
    pub vm_id: u64,
    pub election: Election,
    /// The key-hash seed shared by all workers (see `check_seed`).
    seed: u64,
    /// Ticks until the next seed check.
    seed_check_in: u32,
    pub waiters: HashMap<u32, Paused>,
    /// Woken waiters, until their own context notices.
    pub woken: HashMap<u32, Woken>,
    /// Which requests read the clock; the last reading for the others.
    pub clock: Clock,
    /// The last in-flight ceiling published by the memory poller, held while no
    /// snapshot can be read (see `adopt_pressure`).
    memory_ceiling: Option<u32>,
    occupancy: OccupancyScan,
}

/// Ticks the occupancy scan takes to cover the whole table (30 s at 100 ms). Every
/// shard read costs a hostcall and a call back into the module for its copy (what a
/// faster scan cost under load: docs/perf-history.md), for a gauge that is read on
/// dashboards every 15-60 s.
const SCAN_TICKS: u32 = 300;

/// Ticks between two checks of the shared key-hash seed (1 s).
const SEED_CHECK_TICKS: u32 = 10;

impl Worker {
    pub fn new(config: Rc<Config>, metrics: Metrics) -> Self {
        let mut rng = Rng::new(random_seed());
        let vm_id = rng.next_u64();
        let store = HostStore;
        // Envoy configures the main thread's VM before any worker's, so the first
        // configure creates the seed and every worker adopts it.
        let seed = init_seed(&store, rng.next_u64());
        let election = Election::new(config.cas_attempts);
        let mut vm = Vm::new(config, vm_id, seed, rng.next_u64());
        // Allocate the whole table now: its memory is fixed from start-up, and
        // creating a shard that already exists is a no-op.
        let _ = vm.cache.table_mut().create_all(&store);
        Self {
            vm,
            metrics,
            vm_id,
            election,
            seed,
            seed_check_in: 0,
            waiters: HashMap::new(),
            woken: HashMap::new(),
            clock: Clock::default(),
            memory_ceiling: None,
            occupancy: OccupancyScan::new(),
        }
    }

    /// A new plugin configuration on a live VM: keep in-flight accounting, adopt limits.
    pub fn reconfigure(&mut self, config: Rc<Config>) {
        self.vm.limiter.reconfigure(&config.concurrency);
        self.vm.admission.reconfigure(&config.admission);
        if config.key_table != self.vm.config.key_table
            || config.negative_cache != self.vm.config.negative_cache
            || config.cas_attempts != self.vm.config.cas_attempts
        {
            self.seed = init_seed(&HostStore, self.vm.rng.next_u64());
            self.vm.cache = negative_cache(&config, self.seed, self.vm.rng.next_u64());
            let _ = self.vm.cache.table_mut().create_all(&HostStore);
        }
        self.vm.config = config;
    }
}

impl Worker {
    /// Workers must hash keys with the same seed or a write through one would not
    /// clear another's 404. The create protocol makes a split all but impossible;
    /// should it happen anyway, every worker converges on the stored seed within
    /// [`SEED_CHECK_TICKS`] ticks (a read each tick would cost a hostcall and an
    /// allocation callback for a value that is written once).
    pub fn check_seed(&mut self, store: &HostStore) {
        if self.seed_check_in > 0 {
            self.seed_check_in -= 1;
            return;
        }
        self.seed_check_in = SEED_CHECK_TICKS - 1;
        if let Some(stored) = read_seed(store) {
            if stored != self.seed {
                self.seed = stored;
                self.vm.cache = negative_cache(&self.vm.config, stored, self.vm.rng.next_u64());
            }
        }
    }

    /// Advances the occupancy scan of the key table by a few shards.
    pub fn scan_occupancy(&mut self, store: &HostStore, now_ms: u64) {
        let shards_per_tick = self.vm.cache.table().layout().shards.div_ceil(SCAN_TICKS);
        if let Some(done) =
            self.occupancy
                .step(self.vm.cache.table(), store, now_ms, shards_per_tick)
        {
            self.metrics.cache_occupancy.set(done.live());
        }
    }

    /// Adopts the memory snapshot read from shared data on this tick (`None`: none
    /// could be read, or it expired): the pressure curve for the next requests, and
    /// the in-flight ceiling for the limiter. Without a snapshot the curve sheds
    /// nothing, but the ceiling stays the last one published (before the first, the
    /// whole line at the prior cost): an unreadable key must not lift the bound,
    /// and a held ceiling cannot shed forever, as requests in flight end. In shadow
    /// mode (`memory.enforce: false`) the limiter gets a ceiling that never binds,
    /// so that it counts in-flight requests and the poller can learn.
    pub fn adopt_pressure(&mut self, loaded: Option<PressureSnapshot>) {
        let memory = &self.vm.config.memory;
        self.vm.pressure = loaded;
        if !memory.is_on() {
            self.memory_ceiling = None;
            self.vm.limiter.set_memory_ceiling(None);
            return;
        }
        let published = loaded.and_then(|p| p.max_in_flight());
        let line = memory.memory_limit_bytes as f64 * memory.critical;
        let before_any = ceiling::blind_ceiling(
            line,
            memory
                .bytes_per_request
                .unwrap_or(ceiling::PRIOR_BYTES_PER_REQUEST) as f64,
        );
        let held = published.or(self.memory_ceiling).unwrap_or(before_any);
        self.memory_ceiling = Some(held);
        let applied = if memory.enforce { held } else { MAX_CEILING };
        self.vm.limiter.set_memory_ceiling(Some(applied));
        let below_soft = loaded.is_some_and(|p| p.is_active() && p.ratio() < memory.soft);
        self.vm.limiter.spare_critical_from_ceiling(below_soft);
    }

    /// Forwards what the core counted since the last tick to Envoy's stats.
    pub fn export_metrics(&mut self, now_ms: u64, tracker: Option<&PressureTracker>) {
        let m = &mut self.metrics;
        let c = &self.vm.tally;
        for (counter, total) in m.requests.iter_mut().zip(c.requests) {
            counter.export(total);
        }
        for (per_reason, totals) in m.shed.iter_mut().zip(c.shed) {
            for (counter, total) in per_reason.iter_mut().zip(totals) {
                counter.export(total);
            }
        }
        for (counter, total) in m.would_shed.iter_mut().zip(c.would_shed) {
            counter.export(total);
        }
        let cache = self.vm.cache.stats();
        m.cache_hits.export(c.cache_hits);
        m.cache_would_hit.export(c.cache_would_hit);
        m.cache_misses.export(cache.misses);
        m.cache_inserts.export(cache.inserts);
        m.cache_invalidations.export(cache.invalidations);
        m.cache_evictions.export(cache.table.evictions);
        m.cache_stale_fills.export(cache.stale_fills);
        m.cache_coalesced.export(c.coalesced);

        let lim = self.vm.limiter.stats();
        let adm = self.vm.admission.stats();
        m.cas_giveups.export(
            lim.cas_giveups_acquire
                + lim.cas_giveups_release
                + lim.cas_giveups_tick
                + adm.flush_giveups
                + cache.table.contended,
        );
        m.in_flight.set(u64::from(lim.in_flight));
        m.limit.set(u64::from(lim.limit));
        m.critical_reserve.set(u64::from(lim.critical_reserve));
        m.min_rtt_us.set_scaled(lim.min_rtt_ms, 1000.0);
        m.sample_rtt_us.set_scaled(lim.sample_rtt_ms, 1000.0);
        m.rejection_permille
            .set_scaled(adm.rejection_probability, 1000.0);

        if let Some(tracker) = tracker {
            let p = tracker.stats(now_ms);
            m.memory_scrape_failures.export(p.scrape_failures);
        }
        if let Some(snap) = &self.vm.pressure {
            m.memory_ratio_permille.set_scaled(snap.ratio(), 1000.0);
            m.memory_sample_age_ms
                .set(snap.sample_age_ms(now_ms).unwrap_or(0));
            m.memory_bytes_per_request
                .set(u64::from(snap.bytes_per_request()));
        }
        m.memory_ceiling
            .set(u64::from(self.memory_ceiling.unwrap_or(0)));
    }
}

fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        // WASI random_get failing is not expected from Envoy; the clock still
        // separates VMs, and decisions only need uniform numbers, not secrets.
        Err(_) => abi::now_ns() ^ 0x5851_f42d_4c95_7f2d,
    }
}
