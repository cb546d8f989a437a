//! Negative cache: answer repeated lookups of known-missing keys at the proxy.
//!
//! Built on the shared [`KeyTable`](crate::keytable): a key's slot says Missing (a 404
//! is cached until expiry), Exists (the key was seen to exist; reads of it are critical
//! for priorities) or nothing. Every worker holds a [`NegCache`] handle; all state is in
//! shared data.
//!
//! # Protocol (what the host calls, and what it costs)
//!
//! | request  | at request start                           | at response / ending                                  |
//! |----------|--------------------------------------------|-------------------------------------------------------|
//! | GET      | [`lookup`](NegCache::lookup): 1 get (0 when this worker's recent Exists read is reused, `negcache/recent.rs`); Missing → answer 404 locally | 404: [`insert_missing`](NegCache::insert_missing)(generation from the lookup); 200: [`mark_exists`](NegCache::mark_exists) (0 hostcalls if already known) |
//! | POST     | [`begin_write`](NegCache::begin_write)      | [`end_write`](NegCache::end_write)(2xx?) on *every* ending (reset and timeout included) |
//! | DELETE   | [`begin_write`](NegCache::begin_write) (keep the ticket) | [`end_delete`](NegCache::end_delete)(ticket, 2xx?)  |
//!
//! Every write costs one get and one set when uncontended (three more hostcalls the first
//! time a shard is created).
//!
//! # The guarantee
//!
//! **Once `end_write(fp, true)` has returned (before the POST's 2xx is passed on), no
//! lookup through this Envoy returns Missing for that key until a 404 or 204 observed
//! *after* that point is cached** — i.e. no stale 404 after an acknowledged write.
//!
//! Proof sketch. Generations belong to buckets and only change by +1 (CAS writers) or by
//! a random jump of at least 2^24 (blind fallbacks, see `KeyTable::overwrite`); they are
//! never reset by eviction, so equality with a value read earlier means "no write
//! committed to this bucket since" (up to 2^24 bumps within one request, or a 2^-32
//! coincidence of jumps). `end_write` clears every entry of the key and changes the
//! bucket's generation in one shard write (CAS or blind). After it, a Missing entry for
//! the key can only come from:
//! - `insert_missing(g)`: commits only if the bucket's generation is still `g`. A GET that
//!   read `g` before `end_write` finds another generation and is refused; a GET that read
//!   it after started after the acknowledgement, so its 404 is the store's current truth.
//! - `end_delete(ticket)`: the ticket is the generation *written* by that DELETE's
//!   `begin_write`; it commits only if unchanged. A DELETE whose `begin_write` preceded
//!   our `end_write` is refused; one that began after was sent after the POST was
//!   acknowledged, so its 204 means the key really is gone.
//! - a blind fallback: never contains a Missing entry.
//! - a CAS write by anyone: rewrites the version it read (which already lacks the entry)
//!   plus its own change. Absent shards are created with a real create-if-absent, and a
//!   shard that does not decode is replaced through a CAS on its token, so no write is
//!   ever lost to the host's "any CAS on an absent key" rule.
//!
//! A shard that is absent or garbage has no generation to compare with, so no 404 is
//! cached into it: the fill lays down a fresh shard (random generations, no Missing
//! entry) and is refused, and the key's next 404 can be cached. Comparing "absent or
//! garbage then" with "absent or garbage now" is not enough: a foreign writer that
//! corrupts or empties a shard right after our write would let a GET from before that
//! write cache its 404 (the race simulation found this sequence).
//! A single-flight waiter answered with its leader's 404 is covered too, if the host
//! answers waiters only when the leader's `insert_missing` returned [`Fill::Inserted`]:
//! the waiter joined before that insert, and the insert proves no write ended since the
//! leader started.
//!
//! `begin_write` also clears and bumps, so while a write is in flight lookups of its key
//! go upstream (a GET that started before it cannot insert after it). The guarantee is per
//! Envoy: a write through another Envoy cannot reach this table, and there staleness is
//! bounded by `ttl_ms` (route by key hash to remove it).
//!
//! # When the CAS bound is hit
//!
//! - `insert_missing`, `end_delete`, `mark_exists`: give up (a cache miss later; safe).
//! - `begin_write`, `end_write`: blind overwrite of the shard with every Missing entry
//!   cleared and every generation jumped (see `KeyTable::overwrite`): it may lose other
//!   keys' updates but can never create or resurrect a Missing entry. Counted as
//!   `fallbacks`. Only a host error on that write ([`Invalidation::Failed`]) leaves the
//!   guarantee unprotected for that key until `ttl_ms` passes; count and log it.

use serde::Deserialize;

use crate::config::check::{check_range, field, ConfigError};
use crate::fingerprint::Fingerprinter;
use crate::keytable::{Commit, KeyTable, KeyTableConfig, Origin, SlotState, TableStats};
mod recent;

use crate::shared::SharedStore;
use crate::singleflight::SingleFlightConfig;
use recent::RecentKnown;

pub use crate::keytable::Generation;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NegativeCacheConfig {
    pub enabled: bool,
    pub enforce: bool,
    /// How long a 404 is remembered.
    pub ttl_ms: u64,
    pub single_flight: SingleFlightConfig,
}

impl Default for NegativeCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            enforce: true,
            ttl_ms: 10_000,
            single_flight: SingleFlightConfig::default(),
        }
    }
}

impl NegativeCacheConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "ttl_ms"), self.ttl_ms, 1, 86_400_000)?;
        self.single_flight
            .validate(&field(section, "single_flight"))
    }
}

/// What the table says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// Nothing live: go upstream.
    Unknown,
    /// Known missing: answer 404 at the proxy.
    Missing,
    /// Known to exist: the read is critical.
    Exists,
}

/// The result of [`NegCache::lookup`]; keep it for the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub mark: Mark,
    /// Expiry of the mark (0 for Unknown).
    pub expires_at: u64,
    /// The bucket generation to hand back to [`NegCache::insert_missing`].
    pub generation: Generation,
}

/// What a DELETE's [`NegCache::begin_write`] wrote, for its [`NegCache::end_delete`].
/// `None` inside (the write failed) never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTicket(Option<u32>);

/// Outcome of a conditional insert of Missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The key is now cached as missing.
    Inserted,
    /// A write touched the key's bucket since the generation was read: not cached.
    Stale,
    /// Every slot of the key's bucket holds a live session: a 404 does not displace
    /// them (`BucketMut::put_missing`); not cached.
    Protected,
    /// Nothing to do (a DELETE that did not succeed).
    Skipped,
    /// The CAS bound was hit: not cached (safe).
    Contended,
    /// The host refused the write: not cached (safe).
    HostError,
}

/// Outcome of an invalidation (`begin_write`, `end_write`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Committed with a CAS.
    Committed,
    /// Committed by the blind fallback after the CAS bound.
    Fallback,
    /// The host refused even the blind write: the key may stay cached as missing for up
    /// to `ttl_ms`. Log it.
    Failed,
}

/// Counters of one worker's handle; the host exports them as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub lookups: u64,
    /// Lookups answered Missing (a 404 served at the proxy).
    pub hits: u64,
    /// Lookups that found the key known to exist.
    pub known: u64,
    /// Of those, lookups that reused this worker's recent read (`negcache/recent.rs`).
    pub reused: u64,
    /// Lookups that found nothing live.
    pub misses: u64,
    /// Missing entries written (GET 404 and DELETE 204).
    pub inserts: u64,
    /// Conditional inserts refused because a write intervened.
    pub stale_fills: u64,
    /// 404s not cached because their bucket held only live sessions.
    pub protected_fills: u64,
    /// Invalidations committed (`begin_write` and `end_write`, fallbacks included).
    pub invalidations: u64,
    /// Invalidations the host refused altogether.
    pub failed_invalidations: u64,
    /// Exists marks written.
    pub exists_marks: u64,
    /// The key table's own counters (evictions, fallbacks, contention, host errors,
    /// created and rebuilt shards).
    pub table: TableStats,
}

/// One worker's handle on the negative cache.
#[derive(Debug, Clone)]
pub struct NegCache {
    table: KeyTable,
    fingerprinter: Fingerprinter,
    ttl_ms: u64,
    known_ttl_ms: u64,
    cas_attempts: u32,
    /// This worker's recent reads of known keys, reused for `local_reuse_ms`.
    recent: RecentKnown,
    stats: CacheStats,
    /// Deliberate bugs, so tests can show that the race oracle catches them.
    #[cfg(test)]
    pub(crate) sabotage: Sabotage,
}

#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sabotage {
    /// Insert Missing whatever the generation.
    pub skip_generation_check: bool,
    /// `end_write` neither bumps the generation nor clears the entry.
    pub skip_end_write: bool,
    /// Blind fallbacks clear Missing entries but do not jump generations.
    pub fallback_without_jump: bool,
    /// The local reuse window keeps Missing reads too.
    pub reuse_missing: bool,
}

impl NegCache {
    /// `seed` is the deployment's fingerprint seed (from
    /// [`init_seed`](crate::fingerprint::init_seed)); `rng_seed` is any per-worker random.
    pub fn new(
        cache: &NegativeCacheConfig,
        table: &KeyTableConfig,
        cas_attempts: u32,
        seed: u64,
        rng_seed: u64,
    ) -> Self {
        Self::with_table(
            KeyTable::new(table, rng_seed),
            Fingerprinter::new(seed),
            cache.ttl_ms,
            table.known_ttl_ms,
            cas_attempts,
        )
        .with_local_reuse(table.local_reuse_ms)
    }

    /// Reuse this worker's reads of keys marked Exists for `max_age_ms` (see
    /// `negcache/recent.rs`); [`Self::with_table`] builds a cache without reuse.
    pub fn with_local_reuse(mut self, max_age_ms: u64) -> Self {
        self.recent = RecentKnown::new(max_age_ms);
        self
    }

    pub fn with_table(
        table: KeyTable,
        fingerprinter: Fingerprinter,
        ttl_ms: u64,
        known_ttl_ms: u64,
        cas_attempts: u32,
    ) -> Self {
        Self {
            table,
            fingerprinter,
            ttl_ms,
            known_ttl_ms,
            cas_attempts: cas_attempts.max(1),
            recent: RecentKnown::new(0),
            stats: CacheStats::default(),
            #[cfg(test)]
            sabotage: Sabotage::default(),
        }
    }

    /// The fingerprint of a decoded key (`classify` gives the decoded bytes).
    pub fn fingerprint(&self, key: &[u8]) -> u64 {
        self.fingerprinter.fingerprint(key)
    }

    pub fn table(&self) -> &KeyTable {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut KeyTable {
        &mut self.table
    }

    /// Cumulative counters of this handle.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            table: self.table.stats(),
            ..self.stats
        }
    }

    /// What the table says about `fp`: one shared-data get, or none when this worker
    /// read the key marked Exists within its reuse window (`negcache/recent.rs`). Keep the
    /// result: its generation conditions the fill when the response arrives.
    pub fn lookup<S: SharedStore + ?Sized>(&mut self, store: &S, fp: u64, now_ms: u64) -> Lookup {
        let reused = self
            .recent
            .get(fp, now_ms)
            .filter(|seen| self.reusable(seen, now_ms));
        let lookup = match reused {
            Some(seen) => {
                self.stats.reused += 1;
                seen
            }
            None => {
                let lookup = self.read(store, fp, now_ms);
                if self.reusable(&lookup, now_ms) {
                    self.recent.put(fp, now_ms, lookup);
                }
                lookup
            }
        };
        self.stats.lookups += 1;
        match lookup.mark {
            Mark::Missing => self.stats.hits += 1,
            Mark::Exists => self.stats.known += 1,
            Mark::Unknown => self.stats.misses += 1,
        }
        lookup
    }

    fn read<S: SharedStore + ?Sized>(&self, store: &S, fp: u64, now_ms: u64) -> Lookup {
        let probe = self.table.probe(store, fp, now_ms);
        let (mark, expires_at) = match probe.slot {
            Some(slot) if slot.state == SlotState::Missing => (Mark::Missing, slot.expires_at),
            Some(slot) if slot.state == SlotState::Exists => (Mark::Exists, slot.expires_at),
            _ => (Mark::Unknown, 0),
        };
        Lookup {
            mark,
            expires_at,
            generation: probe.generation,
        }
    }

    /// Only a fresh Exists mark is reused: reusing a Missing one could answer a 404
    /// after another worker's acknowledged write.
    fn reusable(&self, seen: &Lookup, now_ms: u64) -> bool {
        #[cfg(test)]
        if self.sabotage.reuse_missing && seen.mark == Mark::Missing {
            return true;
        }
        self.exists_is_fresh(seen, now_ms)
    }

    /// A GET answered 404 by the store: cache it for `ttl_ms`, but only if no write
    /// touched the key's bucket since `seen` was read at the start of that GET.
    pub fn insert_missing<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        seen: Generation,
        now_ms: u64,
    ) -> Fill {
        let expires_at = now_ms.saturating_add(self.ttl_ms);
        self.conditional_insert(store, fp, now_ms, expires_at, move |current| {
            current == seen
        })
    }

    /// A DELETE answered: if it succeeded (2xx) and no other write touched the bucket
    /// since its `begin_write`, cache the key as missing for `ttl_ms`.
    pub fn end_delete<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        ticket: WriteTicket,
        success: bool,
        now_ms: u64,
    ) -> Fill {
        if !success || ticket.0.is_none() {
            return Fill::Skipped;
        }
        let expires_at = now_ms.saturating_add(self.ttl_ms);
        self.conditional_insert(store, fp, now_ms, expires_at, move |current| {
            current.0.is_some() && current.0 == ticket.0
        })
    }

    fn conditional_insert<S, P>(
        &mut self,
        store: &S,
        fp: u64,
        now_ms: u64,
        expires_at: u64,
        still_current: P,
    ) -> Fill
    where
        S: SharedStore + ?Sized,
        P: Fn(Generation) -> bool,
    {
        self.recent.forget(fp);
        let (shard, bucket) = self.table.layout().locate(fp);
        #[cfg(test)]
        let still_current = {
            let skip = self.sabotage.skip_generation_check;
            move |g| skip || still_current(g)
        };
        let commit = self
            .table
            .modify(store, shard, self.cas_attempts, now_ms, |view, origin| {
                let mut b = view.bucket(bucket);
                let current = match origin {
                    Origin::Valid => Generation(Some(b.generation())),
                    // No history to compare with (module docs): lay down the fresh
                    // shard, so that the key's next 404 can be cached, but not this one.
                    Origin::Absent | Origin::Garbage => return (true, Fill::Stale),
                };
                if !still_current(current) {
                    return (false, Fill::Stale);
                }
                if !b.put_missing(fp, expires_at) {
                    return (false, Fill::Protected);
                }
                (true, Fill::Inserted)
            });
        match commit {
            Commit::Written(Fill::Inserted) => {
                self.stats.inserts += 1;
                Fill::Inserted
            }
            Commit::Written(fill) => {
                self.stats.stale_fills += 1;
                fill
            }
            Commit::Declined(Fill::Protected) => {
                self.stats.protected_fills += 1;
                Fill::Protected
            }
            Commit::Declined(fill) => {
                self.stats.stale_fills += 1;
                fill
            }
            Commit::Contended => Fill::Contended,
            Commit::Host => Fill::HostError,
        }
    }

    /// A GET answered 200: mark the key as existing for `known_ttl_ms` (no generation
    /// change). Skipped, at no hostcall, when `seen` already says Exists for at least
    /// half of `known_ttl_ms`. Returns whether it wrote. Gives up under contention.
    pub fn mark_exists<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        seen: &Lookup,
        now_ms: u64,
    ) -> bool {
        if self.exists_is_fresh(seen, now_ms) {
            return false;
        }
        self.recent.forget(fp);
        let expires_at = now_ms.saturating_add(self.known_ttl_ms);
        let (shard, bucket) = self.table.layout().locate(fp);
        let commit = self
            .table
            .modify(store, shard, self.cas_attempts, now_ms, |view, _| {
                view.bucket(bucket).put(fp, SlotState::Exists, expires_at);
                (true, ())
            });
        let wrote = matches!(commit, Commit::Written(()));
        self.stats.exists_marks += u64::from(wrote);
        wrote
    }

    /// Whether `seen` marks the key as existing for at least half of `known_ttl_ms`
    /// more: a 200 then needs no new mark ([`Self::mark_exists`] writes nothing).
    pub fn exists_is_fresh(&self, seen: &Lookup, now_ms: u64) -> bool {
        seen.mark == Mark::Exists && seen.expires_at >= now_ms.saturating_add(self.known_ttl_ms / 2)
    }

    /// A POST or DELETE is about to be forwarded: clear the key's entry and bump its
    /// bucket's generation. The ticket matters to DELETEs only ([`Self::end_delete`]).
    pub fn begin_write<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        now_ms: u64,
    ) -> WriteTicket {
        let (ticket, _) = self.invalidate(store, fp, now_ms, None);
        ticket
    }

    /// A POST's response arrived, or the POST ended any other way (`success` = 2xx):
    /// clear the key's entry and bump the generation again; on success also mark the key
    /// as existing for `known_ttl_ms`. Must complete before the 2xx is passed on.
    pub fn end_write<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        success: bool,
        now_ms: u64,
    ) -> Invalidation {
        #[cfg(test)]
        if self.sabotage.skip_end_write {
            return Invalidation::Committed;
        }
        let exists_until = success.then(|| now_ms.saturating_add(self.known_ttl_ms));
        let (_, outcome) = self.invalidate(store, fp, now_ms, exists_until);
        outcome
    }

    fn invalidate<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        fp: u64,
        now_ms: u64,
        exists_until: Option<u64>,
    ) -> (WriteTicket, Invalidation) {
        self.recent.forget(fp);
        let (shard, bucket) = self.table.layout().locate(fp);
        let apply = |view: &mut crate::keytable::ShardMut<'_>, bump: bool| {
            let mut b = view.bucket(bucket);
            // Only a Missing entry could answer a stale 404; an Exists mark stays, so a
            // logged-in user's reads stay critical while their session is written.
            b.remove_missing(fp);
            if let Some(until) = exists_until {
                b.put(fp, SlotState::Exists, until);
            }
            if bump {
                b.bump_generation()
            } else {
                b.generation()
            }
        };
        let commit = self
            .table
            .modify(store, shard, self.cas_attempts, now_ms, |view, _| {
                (true, apply(view, true))
            });
        let result = match commit {
            Commit::Written(g) => (WriteTicket(Some(g)), Invalidation::Committed),
            // The change always writes; Declined cannot happen. Contended and Host: the
            // blind overwrite clears and jumps everything (the jump is the bump).
            Commit::Declined(_) | Commit::Contended | Commit::Host => {
                match self
                    .table
                    .overwrite(store, shard, now_ms, |view| apply(view, false))
                {
                    Ok(g) => (WriteTicket(Some(g)), Invalidation::Fallback),
                    Err(_) => (WriteTicket(None), Invalidation::Failed),
                }
            }
        };
        if exists_until.is_some() && result.1 != Invalidation::Failed {
            self.stats.exists_marks += 1;
        }
        match result.1 {
            Invalidation::Failed => self.stats.failed_invalidations += 1,
            _ => self.stats.invalidations += 1,
        }
        result
    }
}

#[cfg(test)]
mod hit_rate;
#[cfg(test)]
mod race;
#[cfg(test)]
mod tests;
