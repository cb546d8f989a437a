//! Fixed-size table of recently seen keys, in shared data.
//!
//! Envoy cannot delete shared-data keys, so a cache with one key per session would grow
//! forever. This table uses a fixed set of keys (*shards*) fixed by the configuration,
//! each holding a packed array of slots, so memory is bounded and known at start-up
//! whatever the number of distinct session keys.
//!
//! # Keys
//!
//! Shard `i` (0-based) lives at `sg.kt.v1.<capacity>.<shard_slots>.<i>` — the version of
//! the byte layout and the two sizing parameters are part of the name, so a configuration
//! with another size (or a future layout) never reads an old layout: it starts with
//! fresh keys. [`ANCHOR_KEY`] (`sg.anchor.v1`) is a helper for [`create_if_absent`].
//!
//! # Sizing
//!
//! `ways` = min(4, `shard_slots`), `buckets` per shard = `shard_slots / ways`,
//! `shards` = `capacity / shard_slots` (at least 1). Slots that do not fill a whole bucket
//! or shard are not allocated: [`Layout::slots`] says how many are (65,536 by default).
//!
//! # Byte layout (little-endian), version 1
//!
//! ```text
//! shard  = header(8) bucket{buckets}
//! header = "SGKT" version:u8=1 ways:u8 buckets:u16
//! bucket = generation:u32 slot{ways}                 slot 0 = most recently inserted
//! slot   = fingerprint:u64 meta:u64
//! meta   = expiry_ms (bits 0..48) | reserved = 0 (bits 48..56) | state (bits 56..64)
//! state  = 0 Empty | 1 Missing (until expiry) | 2 Exists (until expiry)
//! ```
//!
//! **16 bytes per slot plus a 4-byte generation per 4-way bucket = 17 bytes per slot**,
//! plus 8 bytes per shard. The default (capacity 65,536, 64 slots per shard) is
//! 1,024 shards of 8 + 16 × 68 = 1,096 bytes: **1,122,304 bytes (1.07 MiB)** of values,
//! plus the host's per-key bookkeeping (key name, CAS, map node: ~100 bytes × 1,024).
//! A lookup copies one shard (1,096 bytes) out of the host. Expiry is absolute
//! milliseconds on the caller's clock, 48 bits (8,900 years of Unix time): no wrap-around.
//!
//! A shard that does not decode (wrong length, magic, version, shape, reserved bits or
//! state) is treated as empty and rewritten on the next write to it; it never panics.
//!
//! # Replacement
//!
//! Set-associative: a fingerprint selects a shard (high 32 bits) and a bucket (low 32
//! bits) and may live in any of the bucket's `ways` slots. Slots are kept in insertion
//! order; an insert goes to the front and takes, in order of preference, the slot already
//! holding the fingerprint, an empty slot, the oldest expired slot, the oldest slot
//! (least recently inserted: FIFO within the bucket). Lookups never write, so a hit costs
//! one shared-data get; the price is FIFO instead of LRU within a bucket (see the
//! hit-rate test in `negcache`). Displacing a live entry counts as an eviction.
//!
//! # Generations
//!
//! The generation belongs to the *bucket*, not to a slot or a key: it is never reset when
//! slots are evicted or reused, so "nothing written to this bucket since I read
//! generation g" stays checkable even when the key's slot was evicted and reused in
//! between. Writers bump it by one (wrapping); it is only ever compared for equality.
//! See `negcache` for the protocol built on it.
//!
//! # Updates
//!
//! Every change is a bounded compare-and-swap loop on one shard (one get and one set when
//! uncontended). An absent shard is created with [`create_if_absent`] rather than the
//! host's "any CAS accepted on an absent key", so no update is ever lost on creation. When
//! the bound is hit, write paths that must not give up use a blind overwrite whose
//! content is safe by construction (no Missing entries, every generation moved far away);
//! see `KeyTable::overwrite`.

use serde::Deserialize;

use crate::config::check::{check_range, field, ConfigError};
use crate::rng::Rng;
use crate::shared::{SetError, SharedStore};

mod bucket;
mod layout;
mod occupancy;
mod slot;

use crate::wire::put_u32_at;
pub use bucket::{BucketMut, Generation, Probe, ShardMut};
pub use layout::{Layout, ShardKey};
pub use occupancy::{Occupancy, OccupancyScan};
use slot::{read_u32, slots_in};
pub use slot::{Slot, SlotState};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyTableConfig {
    /// Total number of slots (entries) across all shards.
    pub capacity: u32,
    /// Slots per shared-data key; a shard is read and written as one value.
    pub shard_slots: u32,
    /// How long a key seen to exist (200/201) stays critical for priorities.
    pub known_ttl_ms: u64,
    /// How long a worker reuses its own read of a key marked Exists instead of
    /// reading the shard again (see `negcache/recent.rs`); 0 = never.
    pub local_reuse_ms: u64,
}

impl Default for KeyTableConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            shard_slots: 64,
            known_ttl_ms: 600_000,
            local_reuse_ms: 100,
        }
    }
}

impl KeyTableConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "shard_slots"), self.shard_slots, 1, 4096)?;
        check_range(
            &field(section, "capacity"),
            self.capacity,
            self.shard_slots,
            16_777_216,
        )?;
        check_range(
            &field(section, "known_ttl_ms"),
            self.known_ttl_ms,
            1,
            86_400_000,
        )?;
        check_range(
            &field(section, "local_reuse_ms"),
            self.local_reuse_ms,
            0,
            1_000,
        )
    }
}

/// Slots per bucket (at most; fewer when `shard_slots` is smaller).
pub const MAX_WAYS: u32 = 4;
/// Bytes of one slot.
pub const SLOT_BYTES: usize = 16;
/// Bytes of a bucket's generation.
pub const BUCKET_HEADER_BYTES: usize = 4;
/// Bytes of a shard's header.
pub const SHARD_HEADER_BYTES: usize = 8;
/// Prefix of the shard keys; the layout version is part of it.
pub const KEY_PREFIX: &str = "sg.kt.v1";
/// Key rewritten by [`create_if_absent`] to obtain a fresh CAS token.
pub const ANCHOR_KEY: &str = "sg.anchor.v1";
/// Largest storable expiry (48 bits of milliseconds).
pub const MAX_EXPIRY_MS: u64 = (1 << 48) - 1;

const MAGIC: &[u8; 4] = b"SGKT";
const VERSION: u8 = 1;
const ANCHOR_VALUE: &[u8] = b"sessionguard anchor";
const STATE_SHIFT: u32 = 56;
const MAX_SHARD_SLOTS: u32 = 4096;
const MAX_CAPACITY: u32 = 16_777_216;
/// Attempts of a blind overwrite (only a test store can make one fail with a mismatch).
const BLIND_ATTEMPTS: u32 = 4;

/// What a read-modify-write found in the store before applying its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A well-formed shard.
    Valid,
    /// No shard yet; the change applies to a fresh empty one.
    Absent,
    /// A shard that does not decode; the change applies to a fresh empty one.
    Garbage,
}

/// How a read-modify-write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit<T> {
    /// The change was written.
    Written(T),
    /// The change function declined to write.
    Declined(T),
    /// Every attempt lost a CAS race; nothing was written.
    Contended,
    /// The host refused the write.
    Host,
}

/// Counters of a table handle (one per worker); the host turns them into metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableStats {
    /// Live entries displaced by an insert.
    pub evictions: u64,
    /// Blind overwrites after the CAS bound was hit.
    pub fallbacks: u64,
    /// Read-modify-writes that hit the CAS bound.
    pub contended: u64,
    /// Writes the host refused.
    pub host_errors: u64,
    /// Shards created (absent before).
    pub created: u64,
    /// Shards that did not decode (or existed but were empty) and were rewritten.
    pub rebuilt: u64,
}

/// 32 random bits: fresh generations.
fn next_u32(rng: &mut Rng) -> u32 {
    (rng.next_u64() >> 32) as u32
}

/// A random distance in [2^24, 2^32 - 2^24): far from any generation a reader could
/// have seen recently, in either direction.
fn jump(rng: &mut Rng) -> u32 {
    const MARGIN: u32 = 1 << 24;
    MARGIN + next_u32(rng) % (u32::MAX - 2 * MARGIN)
}

/// Creates `key` with `value` only if it does not exist yet; `Ok(false)` if it does.
///
/// The host accepts any CAS for an absent key and rejects a CAS that differs from an
/// existing key's token. The anchor key is rewritten first and its new token read back:
/// that token was just issued by the host's global counter to the anchor, so `key` cannot
/// hold it (short of 2^32 host writes having wrapped the counter onto `key`'s last write)
/// and the set succeeds exactly when `key` is absent. Costs three hostcalls; used only on
/// start-up and for shards never written before.
pub fn create_if_absent<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    value: &[u8],
) -> Result<bool, SetError> {
    store.set(ANCHOR_KEY, ANCHOR_VALUE, None)?;
    let Some((_, token)) = store.get(ANCHOR_KEY) else {
        return Err(SetError::Host);
    };
    match store.set(key, value, Some(token)) {
        Ok(()) => Ok(true),
        Err(SetError::CasMismatch) => Ok(false),
        Err(SetError::Host) => Err(SetError::Host),
    }
}

/// A handle on the table for one worker: the layout, a generator for fresh generations,
/// and this worker's counters. All shared state is in the store.
#[derive(Debug, Clone)]
pub struct KeyTable {
    layout: Layout,
    /// Built once: every access needs a shard key.
    key_prefix: ShardKey,
    rng: Rng,
    stats: TableStats,
    /// Deliberate bug for the race oracle's own test: fallbacks do not jump generations.
    #[cfg(test)]
    pub(crate) sabotage_no_jump: bool,
}

impl KeyTable {
    /// `rng_seed` only feeds fresh generations and fallback jumps; give each worker a
    /// different random one.
    pub fn new(config: &KeyTableConfig, rng_seed: u64) -> Self {
        Self::with_layout(Layout::from_config(config), rng_seed)
    }

    pub fn with_layout(layout: Layout, rng_seed: u64) -> Self {
        Self {
            layout,
            key_prefix: layout.shard_key_prefix(),
            rng: Rng::new(rng_seed),
            stats: TableStats::default(),
            #[cfg(test)]
            sabotage_no_jump: false,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    fn shard_key(&self, shard: u32) -> ShardKey {
        self.key_prefix.with_index(shard)
    }

    /// Reads the fingerprint's bucket: one shared-data get.
    pub fn probe<S: SharedStore + ?Sized>(&self, store: &S, fp: u64, now_ms: u64) -> Probe {
        let (shard, bucket) = self.layout.locate(fp);
        let absent = Probe {
            slot: None,
            generation: Generation(None),
        };
        let Some((bytes, _)) = store.get(&self.shard_key(shard)) else {
            return absent;
        };
        if !self.layout.is_valid_shard(&bytes) {
            return absent;
        }
        let range = self.layout.bucket_range(bucket);
        let b = bytes.get(range).unwrap_or_default();
        let slot = slots_in(b).find(|s| s.fp == fp && s.is_live(now_ms));
        Probe {
            slot,
            generation: Generation(Some(read_u32(b, 0))),
        }
    }

    fn fresh_shard(&mut self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.layout.shard_bytes()];
        if let Some(header) = bytes.get_mut(..SHARD_HEADER_BYTES) {
            header.copy_from_slice(&self.layout.header());
        }
        for b in 0..self.layout.buckets {
            let at = self.layout.bucket_range(b).start;
            put_u32_at(&mut bytes, at, next_u32(&mut self.rng));
        }
        bytes
    }

    /// Creates every shard that does not exist yet (call from `on_configure`), so that all
    /// the table's memory is allocated at start-up. Costs 2 + `shards` hostcalls; shards
    /// that exist are left untouched. Returns how many were created.
    pub fn create_all<S: SharedStore + ?Sized>(&mut self, store: &S) -> Result<u32, SetError> {
        self.create_all_with(store, |rng, _| next_u32(rng))
    }

    pub(crate) fn create_all_with<S, G>(
        &mut self,
        store: &S,
        mut generation: G,
    ) -> Result<u32, SetError>
    where
        S: SharedStore + ?Sized,
        G: FnMut(&mut Rng, u32) -> u32,
    {
        store.set(ANCHOR_KEY, ANCHOR_VALUE, None)?;
        let Some((_, token)) = store.get(ANCHOR_KEY) else {
            return Err(SetError::Host);
        };
        let mut created = 0;
        for shard in 0..self.layout.shards {
            let mut bytes = self.fresh_shard();
            for b in 0..self.layout.buckets {
                let at = self.layout.bucket_range(b).start;
                let g = generation(&mut self.rng, b);
                put_u32_at(&mut bytes, at, g);
            }
            match store.set(&self.shard_key(shard), &bytes, Some(token)) {
                Ok(()) => created += 1,
                Err(SetError::CasMismatch) => {}
                Err(SetError::Host) => return Err(SetError::Host),
            }
        }
        self.stats.created += u64::from(created);
        Ok(created)
    }

    /// Bounded read-modify-write of one shard.
    ///
    /// `change` sees a valid shard (the stored one, or a fresh empty one with random
    /// generations if the stored one is absent or garbage, as `Origin` says) and returns
    /// whether to write it and a result. It runs again on every attempt. The write is a
    /// real CAS in every case: the stored token for a present shard (garbage included),
    /// [`create_if_absent`] for an absent one.
    pub(crate) fn modify<S, T, F>(
        &mut self,
        store: &S,
        shard: u32,
        attempts: u32,
        now_ms: u64,
        mut change: F,
    ) -> Commit<T>
    where
        S: SharedStore + ?Sized,
        F: FnMut(&mut ShardMut<'_>, Origin) -> (bool, T),
    {
        let key = self.shard_key(shard);
        for _ in 0..attempts.max(1) {
            let (mut bytes, origin, cas) = match store.get(&key) {
                Some((bytes, cas)) if self.layout.is_valid_shard(&bytes) => {
                    (bytes, Origin::Valid, Some(cas))
                }
                Some((_, cas)) => (self.fresh_shard(), Origin::Garbage, Some(cas)),
                None => (self.fresh_shard(), Origin::Absent, None),
            };
            let mut view = ShardMut::new(&mut bytes, self.layout, now_ms);
            let (write, out) = change(&mut view, origin);
            let evictions = view.evictions;
            if !write {
                return Commit::Declined(out);
            }
            let result = match cas {
                Some(cas) => store.set(&key, &bytes, Some(cas)),
                None => match create_if_absent(store, &key, &bytes) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        if store.get(&key).is_none() {
                            // The key exists but is empty (a foreign "remove"): no token
                            // to CAS with. Reclaim it blindly with a fresh shard, which
                            // is safe content (no Missing, random generations), and retry.
                            let fresh = self.fresh_shard();
                            if store.set(&key, &fresh, None).is_ok() {
                                self.stats.rebuilt += 1;
                            }
                        }
                        Err(SetError::CasMismatch)
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    self.stats.evictions += u64::from(evictions);
                    match origin {
                        Origin::Valid => {}
                        Origin::Absent => self.stats.created += 1,
                        Origin::Garbage => self.stats.rebuilt += 1,
                    }
                    return Commit::Written(out);
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => {
                    self.stats.host_errors += 1;
                    return Commit::Host;
                }
            }
        }
        self.stats.contended += 1;
        Commit::Contended
    }

    /// Blind overwrite of one shard, for write paths that hit the CAS bound and must
    /// not give up (the invalidations).
    ///
    /// A blind write can undo changes that other workers committed between our read and
    /// our write. It is made harmless by its content, whatever was lost:
    /// - it holds **no Missing entry** (all are cleared before and after `change`), so it
    ///   cannot resurrect a 404 that an invalidation had removed, nor create one;
    /// - **every bucket generation jumps** by a random distance in [2^24, 2^32 - 2^24), so
    ///   it cannot roll a generation back to a value an in-flight reader holds (those
    ///   are within a few bumps of what we read), and a conditional insert that read
    ///   before this write fails its generation check.
    ///
    /// What may be lost: other keys' Exists marks, Missing entries (cache misses
    /// afterwards) and their generation bumps (replaced by the jump). Two fallbacks that
    /// pick the same jump for a bucket are a 2^-32 event.
    pub(crate) fn overwrite<S, T, F>(
        &mut self,
        store: &S,
        shard: u32,
        now_ms: u64,
        mut change: F,
    ) -> Result<T, SetError>
    where
        S: SharedStore + ?Sized,
        F: FnMut(&mut ShardMut<'_>) -> T,
    {
        let key = self.shard_key(shard);
        // A blind set cannot meet a CAS mismatch on Envoy; test stores can inject one.
        for _ in 0..BLIND_ATTEMPTS {
            let mut bytes = match store.get(&key) {
                Some((bytes, _)) if self.layout.is_valid_shard(&bytes) => bytes,
                _ => self.fresh_shard(),
            };
            let mut view = ShardMut::new(&mut bytes, self.layout, now_ms);
            for b in 0..self.layout.buckets {
                let jump = jump(&mut self.rng);
                #[cfg(test)]
                let jump = if self.sabotage_no_jump { 0 } else { jump };
                let mut bucket = view.bucket(b);
                bucket.clear_missing();
                let g = bucket.generation().wrapping_add(jump);
                bucket.set_generation(g);
            }
            let out = change(&mut view);
            for b in 0..self.layout.buckets {
                view.bucket(b).clear_missing();
            }
            let evictions = view.evictions;
            match store.set(&key, &bytes, None) {
                Ok(()) => {
                    self.stats.fallbacks += 1;
                    self.stats.evictions += u64::from(evictions);
                    return Ok(out);
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => break,
            }
        }
        self.stats.host_errors += 1;
        Err(SetError::Host)
    }

    /// Counts the live entries of one shard (one get).
    pub fn scan_shard<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        shard: u32,
        now_ms: u64,
    ) -> Occupancy {
        let slots = u64::from(self.layout.buckets) * u64::from(self.layout.ways);
        let mut occ = Occupancy {
            shards: 1,
            slots,
            ..Occupancy::default()
        };
        match store.get(&self.shard_key(shard)) {
            None => occ.absent_shards = 1,
            Some((bytes, _)) if !self.layout.is_valid_shard(&bytes) => occ.garbage_shards = 1,
            Some((bytes, _)) => {
                for b in 0..self.layout.buckets {
                    let range = self.layout.bucket_range(b);
                    for slot in
                        slots_in(bytes.get(range).unwrap_or_default()).filter(|s| s.is_live(now_ms))
                    {
                        match slot.state {
                            SlotState::Missing => occ.missing += 1,
                            SlotState::Exists => occ.exists += 1,
                            SlotState::Empty => {}
                        }
                    }
                }
            }
        }
        occ
    }
}

#[cfg(test)]
pub(crate) mod tests;
