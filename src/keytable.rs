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

use crate::config::{check_range, field, ConfigError};
use crate::rng::Rng;
use crate::shared::{SetError, SharedStore};

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
    /// reading the shard again (see `crate::recent`); 0 = never.
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

/// Where a table of a given configuration lives and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Configured capacity (part of the key names).
    pub capacity: u32,
    /// Configured slots per shard (part of the key names).
    pub shard_slots: u32,
    pub shards: u32,
    /// Buckets per shard.
    pub buckets: u32,
    /// Slots per bucket.
    pub ways: u32,
}

impl Layout {
    /// The layout for a configuration. Inputs are clamped to the validated ranges
    /// (1..=4096 slots per shard, up to 16M slots), so any input gives a usable layout.
    pub fn new(capacity: u32, shard_slots: u32) -> Self {
        let shard_slots = shard_slots.clamp(1, MAX_SHARD_SLOTS);
        let capacity = capacity.clamp(shard_slots, MAX_CAPACITY);
        let ways = shard_slots.min(MAX_WAYS);
        Self {
            capacity,
            shard_slots,
            shards: (capacity / shard_slots).max(1),
            buckets: shard_slots / ways,
            ways,
        }
    }

    pub fn from_config(config: &KeyTableConfig) -> Self {
        Self::new(config.capacity, config.shard_slots)
    }

    /// Slots actually allocated.
    pub fn slots(&self) -> u64 {
        u64::from(self.shards) * u64::from(self.buckets) * u64::from(self.ways)
    }

    pub fn bucket_bytes(&self) -> usize {
        BUCKET_HEADER_BYTES + self.ways as usize * SLOT_BYTES
    }

    /// Bytes of one shard value.
    pub fn shard_bytes(&self) -> usize {
        SHARD_HEADER_BYTES + self.buckets as usize * self.bucket_bytes()
    }

    /// Bytes of all shard values together (not counting the host's per-key overhead).
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.shards) * self.shard_bytes() as u64
    }

    /// Shared-data key of shard `index`.
    pub fn shard_key(&self, index: u32) -> ShardKey {
        self.shard_key_prefix().with_index(index)
    }

    /// The part of every shard key before the index.
    fn shard_key_prefix(&self) -> ShardKey {
        let mut key = ShardKey {
            bytes: [0; SHARD_KEY_MAX],
            len: 0,
        };
        key.push(KEY_PREFIX.as_bytes());
        for n in [self.capacity, self.shard_slots] {
            key.push(b".");
            key.push_decimal(n);
        }
        key.push(b".");
        key
    }

    /// Shard (from the high 32 bits) and bucket (from the low 32 bits) of a fingerprint.
    pub fn locate(&self, fp: u64) -> (u32, u32) {
        let shard = ((fp >> 32) * u64::from(self.shards)) >> 32;
        let bucket = ((fp & 0xffff_ffff) * u64::from(self.buckets)) >> 32;
        (shard as u32, bucket as u32)
    }

    fn bucket_range(&self, bucket: u32) -> std::ops::Range<usize> {
        let start = SHARD_HEADER_BYTES + bucket as usize * self.bucket_bytes();
        start..start + self.bucket_bytes()
    }

    fn header(&self) -> [u8; SHARD_HEADER_BYTES] {
        let b = (self.buckets as u16).to_le_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            VERSION,
            self.ways as u8,
            b[0],
            b[1],
        ]
    }

    /// Whether `bytes` is a well-formed shard of this layout.
    pub fn is_valid_shard(&self, bytes: &[u8]) -> bool {
        let Some(buckets) = bytes.strip_prefix(&self.header()) else {
            return false;
        };
        if buckets.len() != self.shard_bytes() - SHARD_HEADER_BYTES {
            return false;
        }
        // Every access checks a whole shard, which is nearly always valid: no early exit,
        // no branch per slot.
        let (mut reserved, mut state) = (0, 0);
        for bucket in buckets.chunks_exact(self.bucket_bytes()) {
            let slots = bucket.get(BUCKET_HEADER_BYTES..).unwrap_or_default();
            for slot in slots.chunks_exact(SLOT_BYTES) {
                // The two bytes of the meta that `decode_meta` checks.
                if let [.., r, s] = slot {
                    reserved |= r;
                    state = state.max(*s);
                }
            }
        }
        reserved == 0 && state <= SlotState::Exists as u8
    }
}

/// The longest shard key: the prefix and three dot-separated `u32`s.
const SHARD_KEY_MAX: usize = KEY_PREFIX.len() + 3 * (1 + 10);

/// A shard's shared-data key, built on the stack: every table access needs one, and
/// `format!` with its allocation was a visible part of a request's cost.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShardKey {
    bytes: [u8; SHARD_KEY_MAX],
    len: usize,
}

impl ShardKey {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }

    fn with_index(mut self, index: u32) -> Self {
        self.push_decimal(index);
        self
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn push_decimal(&mut self, mut n: u32) {
        let width = n.checked_ilog10().map_or(1, |log| log as usize + 1);
        let Some(dst) = self.bytes.get_mut(self.len..self.len + width) else {
            return;
        };
        for digit in dst.iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }
}

impl std::ops::Deref for ShardKey {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// What a slot says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotState {
    Empty = 0,
    /// The store answered 404 (or 204 to a DELETE); valid until expiry.
    Missing = 1,
    /// The store answered 200/201; valid until expiry.
    Exists = 2,
}

/// One decoded slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub fp: u64,
    pub state: SlotState,
    pub expires_at: u64,
}

impl Slot {
    pub const EMPTY: Slot = Slot {
        fp: 0,
        state: SlotState::Empty,
        expires_at: 0,
    };

    pub fn is_live(&self, now_ms: u64) -> bool {
        self.state != SlotState::Empty && self.expires_at > now_ms
    }
}

fn decode_meta(meta: u64) -> Option<(SlotState, u64)> {
    if (meta >> 48) & 0xff != 0 {
        return None;
    }
    let state = match meta >> STATE_SHIFT {
        0 => SlotState::Empty,
        1 => SlotState::Missing,
        2 => SlotState::Exists,
        _ => return None,
    };
    Some((state, meta & MAX_EXPIRY_MS))
}

fn encode_meta(state: SlotState, expires_at: u64) -> u64 {
    (state as u64) << STATE_SHIFT | expires_at.min(MAX_EXPIRY_MS)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn decode_slot(bytes: &[u8]) -> Slot {
    match decode_meta(read_u64(bytes, 8)) {
        Some((state, expires_at)) => Slot {
            fp: read_u64(bytes, 0),
            state,
            expires_at,
        },
        None => Slot::EMPTY,
    }
}

fn encode_slot(slot: &Slot, out: &mut [u8]) {
    if slot.state == SlotState::Empty {
        out[..SLOT_BYTES].fill(0);
        return;
    }
    out[..8].copy_from_slice(&slot.fp.to_le_bytes());
    out[8..16].copy_from_slice(&encode_meta(slot.state, slot.expires_at).to_le_bytes());
}

/// The generation of a bucket as a reader saw it, to be handed back to a conditional
/// write. `None` inside means the shard was absent or did not decode when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(pub(crate) Option<u32>);

impl Generation {
    pub fn get(self) -> Option<u32> {
        self.0
    }
}

/// The result of reading a fingerprint's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The live entry for the fingerprint, if any.
    pub slot: Option<Slot>,
    pub generation: Generation,
}

/// A bucket of a valid shard, being modified.
pub struct BucketMut<'a> {
    bytes: &'a mut [u8],
    ways: usize,
    now: u64,
    evictions: &'a mut u32,
}

impl BucketMut<'_> {
    pub fn generation(&self) -> u32 {
        read_u32(self.bytes, 0)
    }

    pub fn set_generation(&mut self, generation: u32) {
        self.bytes[..4].copy_from_slice(&generation.to_le_bytes());
    }

    /// Adds one (wrapping) and returns the new generation.
    pub fn bump_generation(&mut self) -> u32 {
        let next = self.generation().wrapping_add(1);
        self.set_generation(next);
        next
    }

    fn slot_bytes(&self, way: usize) -> &[u8] {
        let at = BUCKET_HEADER_BYTES + way * SLOT_BYTES;
        &self.bytes[at..at + SLOT_BYTES]
    }

    pub fn slot(&self, way: usize) -> Slot {
        decode_slot(self.slot_bytes(way))
    }

    fn write_slot(&mut self, way: usize, slot: &Slot) {
        let at = BUCKET_HEADER_BYTES + way * SLOT_BYTES;
        encode_slot(slot, &mut self.bytes[at..at + SLOT_BYTES]);
    }

    /// The live entry for `fp`, if any (the most recent one).
    pub fn find(&self, fp: u64) -> Option<Slot> {
        (0..self.ways)
            .map(|w| self.slot(w))
            .find(|s| s.fp == fp && s.is_live(self.now))
    }

    /// Inserts or replaces the entry for `fp` at the front of the bucket.
    pub fn put(&mut self, fp: u64, state: SlotState, expires_at: u64) {
        let slots = self.slots();
        let victim = Self::free_way(&slots[..self.ways], fp, self.now).unwrap_or(self.ways - 1);
        self.put_at(victim, &slots, fp, state, expires_at);
    }

    /// Inserts or replaces a Missing entry for `fp`, but never in place of a live
    /// Exists one: a flood of distinct missing keys must not make the filter forget
    /// the sessions whose reads are critical. Among live entries only the oldest
    /// Missing one may go. False (nothing written) if every slot holds a live session.
    pub fn put_missing(&mut self, fp: u64, expires_at: u64) -> bool {
        let slots = self.slots();
        let live = &slots[..self.ways];
        let Some(victim) = Self::free_way(live, fp, self.now)
            .or_else(|| live.iter().rposition(|s| s.state == SlotState::Missing))
        else {
            return false;
        };
        self.put_at(victim, &slots, fp, SlotState::Missing, expires_at);
        true
    }

    fn slots(&self) -> [Slot; MAX_WAYS as usize] {
        let mut all = [Slot::EMPTY; MAX_WAYS as usize];
        for (way, slot) in all.iter_mut().enumerate().take(self.ways) {
            *slot = self.slot(way);
        }
        all
    }

    /// The way `fp` may take without displacing a live entry of another key: its own,
    /// an empty one, or the oldest expired one.
    fn free_way(slots: &[Slot], fp: u64, now: u64) -> Option<usize> {
        slots
            .iter()
            .position(|s| s.state != SlotState::Empty && s.fp == fp)
            .or_else(|| slots.iter().position(|s| s.state == SlotState::Empty))
            .or_else(|| slots.iter().rposition(|s| !s.is_live(now)))
    }

    /// Writes the entry at the front, shifting the ways before `victim` back by one.
    fn put_at(
        &mut self,
        victim: usize,
        all: &[Slot; MAX_WAYS as usize],
        fp: u64,
        state: SlotState,
        expires_at: u64,
    ) {
        let slots = &all[..self.ways];
        let displaced = slots[victim];
        if displaced.is_live(self.now) && displaced.fp != fp {
            *self.evictions += 1;
        }
        for way in (1..=victim).rev() {
            self.write_slot(way, &slots[way - 1]);
        }
        self.write_slot(
            0,
            &Slot {
                fp,
                state,
                expires_at,
            },
        );
        // A shard from a foreign or older writer could hold duplicates; keep one.
        for way in 1..self.ways {
            if self.slot(way).fp == fp {
                self.write_slot(way, &Slot::EMPTY);
            }
        }
    }

    /// Removes every entry for `fp`; true if one was live.
    pub fn remove(&mut self, fp: u64) -> bool {
        self.remove_where(fp, |state| state != SlotState::Empty)
    }

    /// Removes the Missing entries for `fp`, keeping an Exists mark; true if one was live.
    pub fn remove_missing(&mut self, fp: u64) -> bool {
        self.remove_where(fp, |state| state == SlotState::Missing)
    }

    fn remove_where(&mut self, fp: u64, doomed: impl Fn(SlotState) -> bool) -> bool {
        let mut was_live = false;
        for way in 0..self.ways {
            let slot = self.slot(way);
            if doomed(slot.state) && slot.fp == fp {
                was_live |= slot.is_live(self.now);
                self.write_slot(way, &Slot::EMPTY);
            }
        }
        was_live
    }

    /// Empties every Missing slot (live or not); returns how many were live.
    pub fn clear_missing(&mut self) -> u32 {
        let mut live = 0;
        for way in 0..self.ways {
            let slot = self.slot(way);
            if slot.state == SlotState::Missing {
                live += u32::from(slot.is_live(self.now));
                self.write_slot(way, &Slot::EMPTY);
            }
        }
        live
    }
}

/// A valid shard, being modified.
pub struct ShardMut<'a> {
    bytes: &'a mut [u8],
    layout: Layout,
    now: u64,
    evictions: u32,
}

impl<'a> ShardMut<'a> {
    fn new(bytes: &'a mut [u8], layout: Layout, now: u64) -> Self {
        Self {
            bytes,
            layout,
            now,
            evictions: 0,
        }
    }

    /// Bucket `index` (taken modulo the bucket count, so any index is safe).
    pub fn bucket(&mut self, index: u32) -> BucketMut<'_> {
        let range = self.layout.bucket_range(index % self.layout.buckets);
        BucketMut {
            bytes: &mut self.bytes[range],
            ways: self.layout.ways as usize,
            now: self.now,
            evictions: &mut self.evictions,
        }
    }
}

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

/// Live entries found by a scan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub shards: u64,
    /// Slots scanned (allocated slots of the scanned shards).
    pub slots: u64,
    pub missing: u64,
    pub exists: u64,
    /// Shards not created yet.
    pub absent_shards: u64,
    /// Shards that did not decode.
    pub garbage_shards: u64,
}

impl Occupancy {
    pub fn live(&self) -> u64 {
        self.missing + self.exists
    }

    /// Live share of the scanned slots, 0..=1.
    pub fn ratio(&self) -> f64 {
        if self.slots == 0 {
            0.0
        } else {
            self.live() as f64 / self.slots as f64
        }
    }

    fn add(&mut self, other: &Occupancy) {
        self.shards += other.shards;
        self.slots += other.slots;
        self.missing += other.missing;
        self.exists += other.exists;
        self.absent_shards += other.absent_shards;
        self.garbage_shards += other.garbage_shards;
    }
}

/// An occupancy scan spread over ticks, a few shards (one get each) per step.
#[derive(Debug, Default, Clone)]
pub struct OccupancyScan {
    next: u32,
    acc: Occupancy,
}

impl OccupancyScan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans up to `max_shards` shards; returns the totals when a full pass completes.
    pub fn step<S: SharedStore + ?Sized>(
        &mut self,
        table: &KeyTable,
        store: &S,
        now_ms: u64,
        max_shards: u32,
    ) -> Option<Occupancy> {
        let shards = table.layout.shards;
        for _ in 0..max_shards.max(1) {
            if self.next >= shards {
                self.next = 0;
            }
            self.acc.add(&table.scan_shard(store, self.next, now_ms));
            self.next += 1;
            if self.next >= shards {
                self.next = 0;
                return Some(std::mem::take(&mut self.acc));
            }
        }
        None
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

    pub(crate) fn stats_mut(&mut self) -> &mut TableStats {
        &mut self.stats
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
        let b = &bytes[range];
        let slot = b[BUCKET_HEADER_BYTES..]
            .chunks_exact(SLOT_BYTES)
            .map(decode_slot)
            .find(|s| s.fp == fp && s.is_live(now_ms));
        Probe {
            slot,
            generation: Generation(Some(read_u32(b, 0))),
        }
    }

    fn fresh_shard(&mut self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.layout.shard_bytes()];
        bytes[..SHARD_HEADER_BYTES].copy_from_slice(&self.layout.header());
        for b in 0..self.layout.buckets {
            let at = self.layout.bucket_range(b).start;
            bytes[at..at + 4].copy_from_slice(&next_u32(&mut self.rng).to_le_bytes());
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
                bytes[at..at + 4].copy_from_slice(&g.to_le_bytes());
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
                    for slot in bytes[range.start + BUCKET_HEADER_BYTES..range.end]
                        .chunks_exact(SLOT_BYTES)
                        .map(decode_slot)
                        .filter(|s| s.is_live(now_ms))
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
pub(crate) mod tests {
    use super::*;
    use crate::fingerprint::splitmix64;
    use crate::shared::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    pub(crate) fn table(capacity: u32, shard_slots: u32) -> KeyTable {
        KeyTable::with_layout(Layout::new(capacity, shard_slots), 1)
    }

    /// Puts `fp` with `state` until `expires_at` through a CAS write.
    fn put(t: &mut KeyTable, s: &MemStore, fp: u64, state: SlotState, expires_at: u64, now: u64) {
        let (shard, bucket) = t.layout().locate(fp);
        let c = t.modify(s, shard, 4, now, |v, _| {
            v.bucket(bucket).put(fp, state, expires_at);
            (true, ())
        });
        assert_eq!(c, Commit::Written(()));
    }

    fn live(t: &KeyTable, s: &MemStore, fp: u64, now: u64) -> Option<SlotState> {
        t.probe(s, fp, now).slot.map(|slot| slot.state)
    }

    fn bucket_fps(t: &KeyTable, s: &MemStore, shard: u32, bucket: u32) -> Vec<u64> {
        let (bytes, _) = s.get(&t.layout().shard_key(shard)).unwrap();
        let range = t.layout().bucket_range(bucket);
        bytes[range.start + BUCKET_HEADER_BYTES..range.end]
            .chunks_exact(SLOT_BYTES)
            .map(decode_slot)
            .filter(|s| s.state != SlotState::Empty)
            .map(|s| s.fp)
            .collect()
    }

    #[test]
    fn default_layout_numbers_quoted_in_the_docs() {
        let l = Layout::from_config(&KeyTableConfig::default());
        assert_eq!((l.shards, l.buckets, l.ways), (1024, 16, 4));
        assert_eq!(l.slots(), 65_536);
        assert_eq!(l.bucket_bytes(), 68);
        assert_eq!(l.shard_bytes(), 1_096);
        assert_eq!(l.total_bytes(), 1_122_304);
        assert_eq!(&*l.shard_key(0), "sg.kt.v1.65536.64.0");
        assert_eq!(&*l.shard_key(1023), "sg.kt.v1.65536.64.1023");
        // A different size never shares a key with this one.
        assert_ne!(Layout::new(131_072, 64).shard_key(0), l.shard_key(0));
        assert_ne!(Layout::new(65_536, 32).shard_key(0), l.shard_key(0));
    }

    #[test]
    fn shard_keys_fit_whatever_the_numbers() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            4096,
            65_536,
            16_777_216,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let l = Layout {
                capacity: n,
                shard_slots: u32::MAX - n,
                ..Layout::new(4, 4)
            };
            let expected = format!("{KEY_PREFIX}.{n}.{}.{}", u32::MAX - n, n / 3);
            assert_eq!(l.shard_key(n / 3).as_str(), expected);
        }
    }

    #[test]
    fn a_shard_is_valid_exactly_when_every_meta_decodes() {
        let l = Layout::new(4, 4);
        let mut shard = vec![0u8; l.shard_bytes()];
        shard[..SHARD_HEADER_BYTES].copy_from_slice(&l.header());
        assert!(l.is_valid_shard(&shard));
        for way in 0..4 {
            for top in 0..=u16::MAX {
                let meta = u64::from(top) << 48 | 12_345;
                let mut bytes = shard.clone();
                let at = SHARD_HEADER_BYTES + BUCKET_HEADER_BYTES + way * SLOT_BYTES + 8;
                bytes[at..at + 8].copy_from_slice(&meta.to_le_bytes());
                assert_eq!(
                    l.is_valid_shard(&bytes),
                    decode_meta(meta).is_some(),
                    "way {way}, {top:#x}"
                );
            }
        }
    }

    #[test]
    fn odd_sizes_give_whole_buckets_and_never_panic() {
        let l = Layout::new(4, 4);
        assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (1, 1, 4, 4));
        let l = Layout::new(4, 1);
        assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (4, 1, 1, 4));
        let l = Layout::new(100, 6);
        assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (16, 1, 4, 64));
        let l = Layout::new(100, 64);
        assert_eq!((l.shards, l.slots()), (1, 64));
        for (c, s) in [(0, 0), (u32::MAX, u32::MAX), (1, u32::MAX), (u32::MAX, 1)] {
            let l = Layout::new(c, s);
            assert!(l.slots() >= 1 && l.slots() <= 16_777_216, "{l:?}");
            assert!(l.shard_bytes() <= SHARD_HEADER_BYTES + 1024 * 68);
            let (shard, bucket) = l.locate(u64::MAX);
            assert!(shard < l.shards && bucket < l.buckets);
        }
    }

    #[test]
    fn locate_spreads_over_every_shard_and_bucket() {
        let l = Layout::new(4096, 64);
        let mut seen = vec![0u32; (l.shards * l.buckets) as usize];
        for i in 0..100_000u64 {
            let (shard, bucket) = l.locate(splitmix64(i));
            seen[(shard * l.buckets + bucket) as usize] += 1;
        }
        let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*min > 50 && *max < 160, "min {min} max {max}");
    }

    #[test]
    fn absent_shard_reads_as_nothing_with_no_generation() {
        let (t, s) = (table(16, 4), MemStore::new());
        let p = t.probe(&s, 42, 0);
        assert_eq!(p.slot, None);
        assert_eq!(p.generation, Generation(None));
    }

    #[test]
    fn entries_live_until_their_expiry() {
        let (mut t, s) = (table(16, 4), MemStore::new());
        put(&mut t, &s, 42, SlotState::Missing, 100, 0);
        assert_eq!(live(&t, &s, 42, 0), Some(SlotState::Missing));
        assert_eq!(live(&t, &s, 42, 99), Some(SlotState::Missing));
        assert_eq!(live(&t, &s, 42, 100), None);
        assert_eq!(live(&t, &s, 43, 0), None);
        assert_eq!(t.stats().created, 1);
        assert!(t.probe(&s, 42, 0).generation.get().is_some());
    }

    #[test]
    fn expiry_is_clamped_to_48_bits() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        put(&mut t, &s, 1, SlotState::Exists, u64::MAX, 0);
        let slot = t.probe(&s, 1, 0).slot.unwrap();
        assert_eq!(slot.expires_at, MAX_EXPIRY_MS);
        assert!(s
            .get(&t.layout().shard_key(0))
            .is_some_and(|(b, _)| t.layout().is_valid_shard(&b)));
    }

    #[test]
    fn full_bucket_evicts_the_least_recently_inserted() {
        // capacity 4 = one bucket of 4 ways: every key collides.
        let (mut t, s) = (table(4, 4), MemStore::new());
        for fp in 1..=4 {
            put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
        }
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![4, 3, 2, 1]);
        assert_eq!(t.stats().evictions, 0);
        put(&mut t, &s, 5, SlotState::Missing, 1000, 1);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![5, 4, 3, 2]);
        assert_eq!(t.stats().evictions, 1);
        assert_eq!(live(&t, &s, 1, 1), None);
        // Re-inserting a key moves it to the front: no eviction.
        put(&mut t, &s, 2, SlotState::Exists, 1000, 2);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![2, 5, 4, 3]);
        assert_eq!(t.stats().evictions, 1);
        put(&mut t, &s, 6, SlotState::Missing, 1000, 3);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![6, 2, 5, 4]);
    }

    #[test]
    fn expired_entries_go_first_and_do_not_count_as_evictions() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        put(&mut t, &s, 1, SlotState::Missing, 1000, 0);
        put(&mut t, &s, 2, SlotState::Missing, 50, 0); // expires early
        put(&mut t, &s, 3, SlotState::Missing, 1000, 0);
        put(&mut t, &s, 4, SlotState::Missing, 1000, 0);
        put(&mut t, &s, 5, SlotState::Missing, 1000, 60);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![5, 4, 3, 1]);
        assert_eq!(t.stats().evictions, 0);
        assert_eq!(live(&t, &s, 1, 60), Some(SlotState::Missing));
    }

    #[test]
    fn removed_slots_are_reused_before_evicting() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        for fp in 1..=4 {
            put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
        }
        let c = t.modify(&s, 0, 4, 0, |v, _| (true, v.bucket(0).remove(3)));
        assert_eq!(c, Commit::Written(true));
        put(&mut t, &s, 9, SlotState::Missing, 1000, 0);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![9, 4, 2, 1]);
        assert_eq!(t.stats().evictions, 0);
    }

    #[test]
    fn identical_fingerprints_share_one_entry() {
        // A full 64-bit collision is one key as far as the table can tell.
        let (mut t, s) = (table(4, 4), MemStore::new());
        put(&mut t, &s, 7, SlotState::Missing, 1000, 0);
        put(&mut t, &s, 7, SlotState::Exists, 1000, 0);
        assert_eq!(bucket_fps(&t, &s, 0, 0), vec![7]);
        assert_eq!(live(&t, &s, 7, 0), Some(SlotState::Exists));
    }

    #[test]
    fn generations_wrap_and_survive_eviction() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        t.create_all_with(&s, |_, _| u32::MAX).unwrap();
        assert_eq!(t.probe(&s, 1, 0).generation, Generation(Some(u32::MAX)));
        let c = t.modify(&s, 0, 4, 0, |v, _| (true, v.bucket(0).bump_generation()));
        assert_eq!(c, Commit::Written(0));
        for fp in 10..20 {
            put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
        }
        // Ten inserts evicted everything; the generation is untouched.
        assert_eq!(t.probe(&s, 1, 0).generation, Generation(Some(0)));
        assert_eq!(t.stats().evictions, 6);
    }

    #[test]
    fn garbage_shards_read_as_empty_and_are_rebuilt_through_cas() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        let key = t.layout().shard_key(0);
        let mut bad = vec![0u8; t.layout().shard_bytes()];
        bad[..SHARD_HEADER_BYTES].copy_from_slice(&t.layout().header());
        bad[SHARD_HEADER_BYTES + BUCKET_HEADER_BYTES + 15] = 7; // state 7
        for garbage in [b"\x00".to_vec(), vec![0xff; 4096], bad] {
            s.set(&key, &garbage, None).unwrap();
            assert_eq!(
                t.probe(&s, 1, 0),
                Probe {
                    slot: None,
                    generation: Generation(None)
                }
            );
            assert_eq!(t.scan_shard(&s, 0, 0).garbage_shards, 1);
            let c = t.modify(&s, 0, 4, 0, |v, origin| {
                v.bucket(0).put(1, SlotState::Missing, 10);
                (true, origin)
            });
            assert_eq!(c, Commit::Written(Origin::Garbage));
            assert_eq!(live(&t, &s, 1, 0), Some(SlotState::Missing));
        }
        assert_eq!(t.stats().rebuilt, 3);
    }

    #[test]
    fn an_existing_but_empty_shard_is_reclaimed() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        let key = t.layout().shard_key(0);
        s.set(&key, b"x", None).unwrap();
        s.set(&key, b"", None).unwrap(); // exists, reads as absent: no CAS token
        assert_eq!(t.probe(&s, 1, 0).generation, Generation(None));
        put(&mut t, &s, 1, SlotState::Missing, 10, 0);
        assert_eq!(live(&t, &s, 1, 0), Some(SlotState::Missing));
        assert_eq!(t.stats().rebuilt, 1);
    }

    #[test]
    fn create_if_absent_never_overwrites() {
        let s = MemStore::new();
        assert_eq!(create_if_absent(&s, "k", b"first"), Ok(true));
        assert_eq!(create_if_absent(&s, "k", b"second"), Ok(false));
        assert_eq!(s.get("k").unwrap().0, b"first");
    }

    #[test]
    fn create_all_allocates_once_and_keeps_existing_shards() {
        let (mut t, s) = (table(64, 8), MemStore::new());
        put(&mut t, &s, 5, SlotState::Missing, 1000, 0);
        assert_eq!(t.create_all(&s), Ok(7));
        assert_eq!(t.create_all(&s), Ok(0));
        assert_eq!(live(&t, &s, 5, 0), Some(SlotState::Missing));
        let occ = OccupancyScan::new().step(&t, &s, 0, 100).unwrap();
        assert_eq!(occ.shards, 8);
        assert_eq!(occ.slots, 64);
        assert_eq!(occ.absent_shards, 0);
        assert_eq!(occ.missing, 1);
    }

    #[test]
    fn occupancy_scan_spreads_over_steps() {
        let (mut t, s) = (table(64, 8), MemStore::new());
        for fp in 0..40u64 {
            let fp = splitmix64(fp);
            let state = if fp % 2 == 0 {
                SlotState::Missing
            } else {
                SlotState::Exists
            };
            put(&mut t, &s, fp, state, 1000, 0);
        }
        let mut scan = OccupancyScan::new();
        assert_eq!(scan.step(&t, &s, 0, 3), None);
        assert_eq!(scan.step(&t, &s, 0, 3), None);
        let occ = scan.step(&t, &s, 0, 3).unwrap();
        assert_eq!(occ.shards, 8);
        assert_eq!(occ.live() + t.stats().evictions, 40);
        assert!(occ.ratio() > 0.3 && occ.ratio() <= 1.0);
        // Everything expires.
        let occ = scan.step(&t, &s, 1000, 100).unwrap();
        assert_eq!(occ.live(), 0);
    }

    #[test]
    fn contention_is_bounded_and_reported() {
        let (mut t, s) = (table(4, 4), MemStore::new());
        put(&mut t, &s, 1, SlotState::Missing, 1000, 0);
        s.set_interference(|_| true);
        let c = t.modify(&s, 0, 3, 0, |v, _| {
            v.bucket(0).put(2, SlotState::Missing, 1000);
            (true, ())
        });
        assert_eq!(c, Commit::Contended);
        assert_eq!(t.stats().contended, 1);
        s.clear_interference();
        assert_eq!(live(&t, &s, 2, 0), None);
    }

    #[test]
    fn overwrite_clears_missing_and_jumps_every_generation() {
        let (mut t, s) = (table(32, 16), MemStore::new());
        t.create_all_with(&s, |_, b| 1000 + b).unwrap();
        let fps: Vec<u64> = (0..40).map(splitmix64).collect();
        for (i, &fp) in fps.iter().enumerate() {
            let state = if i % 2 == 0 {
                SlotState::Missing
            } else {
                SlotState::Exists
            };
            put(&mut t, &s, fp, state, 1000, 0);
        }
        let before: Vec<Option<u32>> = (0..2)
            .flat_map(|sh| (0..4).map(move |b| (sh, b)))
            .map(|(sh, b)| {
                let probe_fp = fps
                    .iter()
                    .copied()
                    .find(|&fp| t.layout().locate(fp) == (sh, b));
                probe_fp.and_then(|fp| t.probe(&s, fp, 0).generation.get())
            })
            .collect();
        let out = t.overwrite(&s, 0, 0, |v| {
            // A change that tries to sneak a Missing in: it is cleared anyway.
            v.bucket(0).put(12345, SlotState::Missing, 1000);
            v.bucket(1).put(777, SlotState::Exists, 1000);
            7
        });
        assert_eq!(out, Ok(7));
        assert_eq!(t.stats().fallbacks, 1);
        let occ = t.scan_shard(&s, 0, 0);
        assert_eq!(occ.missing, 0);
        assert!(occ.exists > 0);
        let after: Vec<Option<u32>> = (0..2)
            .flat_map(|sh| (0..4).map(move |b| (sh, b)))
            .map(|(sh, b)| {
                let probe_fp = fps
                    .iter()
                    .copied()
                    .find(|&fp| t.layout().locate(fp) == (sh, b));
                probe_fp.and_then(|fp| t.probe(&s, fp, 0).generation.get())
            })
            .collect();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let (Some(b), Some(a)) = (b, a) else { continue };
            let d = a.wrapping_sub(*b);
            if i < 4 {
                assert!(
                    (1 << 24..=u32::MAX - (1 << 24)).contains(&d),
                    "bucket {i}: {d}"
                );
            } else {
                assert_eq!(d, 0, "shard 1 untouched");
            }
        }
    }

    #[test]
    fn rng_jumps_stay_far_from_zero() {
        let mut r = Rng::new(0);
        for _ in 0..100_000 {
            let j = jump(&mut r);
            assert!((1 << 24..=u32::MAX - (1 << 24)).contains(&j));
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn with_valid_header(layout: Layout, mut tail: Vec<u8>) -> Vec<u8> {
            let mut bytes = layout.header().to_vec();
            tail.resize(layout.shard_bytes() - SHARD_HEADER_BYTES, 0);
            bytes.extend(tail);
            bytes
        }

        proptest! {
            /// Whatever bytes a shard holds, nothing panics, a read sees either a valid
            /// shard or nothing, and every write leaves a valid shard.
            #[test]
            fn garbage_never_panics_and_writes_repair(
                raw in proptest::collection::vec(any::<u8>(), 0..400),
                keep_header in any::<bool>(),
                fp in any::<u64>(),
                now in any::<u64>(),
            ) {
                let mut t = table(32, 16);
                let s = MemStore::new();
                let layout = t.layout();
                let bytes = if keep_header { with_valid_header(layout, raw) } else { raw };
                let (shard, bucket) = layout.locate(fp);
                let key = layout.shard_key(shard);
                s.set(&key, &bytes, None).unwrap();
                let p = t.probe(&s, fp, now);
                prop_assert_eq!(p.generation.get().is_some(), layout.is_valid_shard(&bytes));
                let _ = t.scan_shard(&s, shard, now);
                let c = t.modify(&s, shard, 2, now, |v, _| {
                    v.bucket(bucket).put(fp, SlotState::Missing, now.saturating_add(5));
                    (true, ())
                });
                prop_assert_eq!(c, Commit::Written(()));
                prop_assert!(layout.is_valid_shard(&s.get(&key).unwrap().0));
                s.set(&key, &bytes, None).unwrap();
                prop_assert!(t.overwrite(&s, shard, now, |v| v.bucket(bucket).remove(fp)).is_ok());
                prop_assert!(layout.is_valid_shard(&s.get(&key).unwrap().0));
            }

            /// A bucket behaves like a 4-entry insertion-ordered list: the model and the
            /// table agree on what is live after any sequence of puts and removes.
            #[test]
            fn bucket_matches_a_fifo_model(
                ops in proptest::collection::vec((0u64..8, 0u8..3, 1u64..50, 0u64..5), 1..80)
            ) {
                let (mut t, s) = (table(4, 4), MemStore::new());
                let mut model: Vec<(u64, SlotState, u64)> = Vec::new(); // front = newest
                let mut now = 0u64;
                for (fp, op, ttl, dt) in ops {
                    now += dt;
                    let state = match op {
                        0 => SlotState::Missing,
                        1 => SlotState::Exists,
                        _ => SlotState::Empty,
                    };
                    if state == SlotState::Empty {
                        let _ = t.modify(&s, 0, 1, now, |v, _| (true, v.bucket(0).remove(fp)));
                        model.retain(|e| e.0 != fp);
                    } else {
                        put(&mut t, &s, fp, state, now + ttl, now);
                        if let Some(i) = model.iter().position(|e| e.0 == fp) {
                            model.remove(i);
                        } else if model.len() == 4 {
                            let victim = model.iter().rposition(|e| e.2 <= now).unwrap_or(3);
                            model.remove(victim);
                        }
                        model.insert(0, (fp, state, now + ttl));
                    }
                    for probe in 0..8u64 {
                        let expect = model.iter().find(|e| e.0 == probe && e.2 > now).map(|e| e.1);
                        prop_assert_eq!(live(&t, &s, probe, now), expect, "fp {}", probe);
                    }
                }
            }
        }
    }
}
