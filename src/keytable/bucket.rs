//! One bucket's slots in a shard's bytes: decoding, replacement, generations; and the
//! shard being modified.

use super::layout::Layout;
use super::{BUCKET_HEADER_BYTES, MAX_WAYS, SLOT_BYTES};

use super::slot::{decode_slot, encode_slot, read_u32, Slot, SlotState};
use crate::wire::put_u32_at;

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
        put_u32_at(self.bytes, 0, generation);
    }

    /// Adds one (wrapping) and returns the new generation.
    pub fn bump_generation(&mut self) -> u32 {
        let next = self.generation().wrapping_add(1);
        self.set_generation(next);
        next
    }

    pub(super) fn slot_bytes(&self, way: usize) -> &[u8] {
        let at = BUCKET_HEADER_BYTES + way * SLOT_BYTES;
        self.bytes.get(at..at + SLOT_BYTES).unwrap_or_default()
    }

    pub fn slot(&self, way: usize) -> Slot {
        decode_slot(self.slot_bytes(way))
    }

    pub(super) fn write_slot(&mut self, way: usize, slot: &Slot) {
        let at = BUCKET_HEADER_BYTES + way * SLOT_BYTES;
        encode_slot(slot, self.bytes, at);
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
        let live = slots.get(..self.ways).unwrap_or_default();
        let victim = Self::free_way(live, fp, self.now).unwrap_or(self.ways - 1);
        self.put_at(victim, &slots, fp, state, expires_at);
    }

    /// Inserts or replaces a Missing entry for `fp`, but never in place of a live
    /// Exists one: a flood of distinct missing keys must not make the filter forget
    /// the sessions whose reads are critical. Among live entries only the oldest
    /// Missing one may go. False (nothing written) if every slot holds a live session.
    pub fn put_missing(&mut self, fp: u64, expires_at: u64) -> bool {
        let slots = self.slots();
        let live = slots.get(..self.ways).unwrap_or_default();
        let Some(victim) = Self::free_way(live, fp, self.now)
            .or_else(|| live.iter().rposition(|s| s.state == SlotState::Missing))
        else {
            return false;
        };
        self.put_at(victim, &slots, fp, SlotState::Missing, expires_at);
        true
    }

    pub(super) fn slots(&self) -> [Slot; MAX_WAYS as usize] {
        let mut all = [Slot::EMPTY; MAX_WAYS as usize];
        for (way, slot) in all.iter_mut().enumerate().take(self.ways) {
            *slot = self.slot(way);
        }
        all
    }

    /// The way `fp` may take without displacing a live entry of another key: its own,
    /// an empty one, or the oldest expired one.
    pub(super) fn free_way(slots: &[Slot], fp: u64, now: u64) -> Option<usize> {
        slots
            .iter()
            .position(|s| s.state != SlotState::Empty && s.fp == fp)
            .or_else(|| slots.iter().position(|s| s.state == SlotState::Empty))
            .or_else(|| slots.iter().rposition(|s| !s.is_live(now)))
    }

    /// Writes the entry at the front, shifting the ways before `victim` back by one.
    pub(super) fn put_at(
        &mut self,
        victim: usize,
        all: &[Slot; MAX_WAYS as usize],
        fp: u64,
        state: SlotState,
        expires_at: u64,
    ) {
        let slots = all.get(..self.ways).unwrap_or_default();
        let displaced = slots.get(victim).copied().unwrap_or(Slot::EMPTY);
        if displaced.is_live(self.now) && displaced.fp != fp {
            *self.evictions += 1;
        }
        for way in (1..=victim).rev() {
            if let Some(before) = slots.get(way - 1) {
                self.write_slot(way, before);
            }
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

    pub(super) fn remove_where(&mut self, fp: u64, doomed: impl Fn(SlotState) -> bool) -> bool {
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
    pub(super) evictions: u32,
}

impl<'a> ShardMut<'a> {
    pub(super) fn new(bytes: &'a mut [u8], layout: Layout, now: u64) -> Self {
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
            bytes: self.bytes.get_mut(range).unwrap_or_default(),
            ways: self.layout.ways as usize,
            now: self.now,
            evictions: &mut self.evictions,
        }
    }
}
