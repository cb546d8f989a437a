//! One slot's 16 bytes: a fingerprint, then its state and expiry in one word.

use super::{BUCKET_HEADER_BYTES, MAX_EXPIRY_MS, SLOT_BYTES, STATE_SHIFT};
use crate::wire::{put_u64_at, u32_at, u64_at};

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

pub(super) fn decode_meta(meta: u64) -> Option<(SlotState, u64)> {
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

pub(super) fn encode_meta(state: SlotState, expires_at: u64) -> u64 {
    (state as u64) << STATE_SHIFT | expires_at.min(MAX_EXPIRY_MS)
}

/// A word of a slot or bucket header; callers pass ranges inside a valid shard, and
/// anything else reads as 0 (an empty slot) rather than panicking.
pub(super) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64_at(bytes, at).unwrap_or(0)
}

pub(super) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32_at(bytes, at).unwrap_or(0)
}

pub(super) fn decode_slot(bytes: &[u8]) -> Slot {
    match decode_meta(read_u64(bytes, 8)) {
        Some((state, expires_at)) => Slot {
            fp: read_u64(bytes, 0),
            state,
            expires_at,
        },
        None => Slot::EMPTY,
    }
}

/// Writes `slot` at `at` (an empty slot is all zeros); nothing if out of range.
pub(super) fn encode_slot(slot: &Slot, out: &mut [u8], at: usize) {
    let (fp, meta) = match slot.state {
        SlotState::Empty => (0, 0),
        _ => (slot.fp, encode_meta(slot.state, slot.expires_at)),
    };
    put_u64_at(out, at, fp);
    put_u64_at(out, at + 8, meta);
}

/// The slots of one bucket's bytes (its generation header first).
pub(super) fn slots_in(bucket: &[u8]) -> impl Iterator<Item = Slot> + '_ {
    bucket
        .get(BUCKET_HEADER_BYTES..)
        .unwrap_or_default()
        .chunks_exact(SLOT_BYTES)
        .map(decode_slot)
}
