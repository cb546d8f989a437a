//! The in-flight table's bytes (layout in the module docs of [`super`]): one slot per VM,
//! scanned and rewritten in place.

use crate::shared::SharedStore;
use crate::wire::{put_u32_at, put_u64_at, u32_at, u64_at};

use crate::classify::Criticality;

/// The shared key holding the in-flight table (layout in the module docs).
pub const INFLIGHT_KEY: &str = "sg.v1.inflight";
/// Most VMs the table holds; a VM that finds it full behaves as on a CAS give-up.
pub const MAX_SLOTS: usize = 256;
/// Lower bound of the heartbeat age after which a VM's slot is reclaimed.
pub const MIN_STALE_MS: u64 = 60_000;

pub(super) const MAGIC: [u8; 4] = *b"SGi1";
pub(super) const HEADER_LEN: usize = 8;
pub(super) const SLOT_LEN: usize = 24;
/// In-flight requests by criticality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    pub critical: u32,
    pub sheddable: u32,
}

impl InFlight {
    pub fn total(self) -> u32 {
        self.critical.saturating_add(self.sheddable)
    }

    pub fn is_zero(self) -> bool {
        self.critical == 0 && self.sheddable == 0
    }

    pub(super) fn plus(self, other: InFlight) -> InFlight {
        InFlight {
            critical: self.critical.saturating_add(other.critical),
            sheddable: self.sheddable.saturating_add(other.sheddable),
        }
    }

    pub(super) fn count(self, crit: Criticality) -> u32 {
        match crit {
            Criticality::Critical => self.critical,
            Criticality::Sheddable => self.sheddable,
        }
    }

    pub(super) fn count_mut(&mut self, crit: Criticality) -> &mut u32 {
        match crit {
            Criticality::Critical => &mut self.critical,
            Criticality::Sheddable => &mut self.sheddable,
        }
    }

    pub(super) fn incremented(mut self, crit: Criticality) -> InFlight {
        let c = self.count_mut(crit);
        *c = c.saturating_add(1);
        self
    }
}

/// Result of scanning a table value.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scan {
    pub(super) others: InFlight,
    /// Byte offset and counts of this VM's slot.
    pub(super) mine: Option<(usize, InFlight)>,
    pub(super) slots: usize,
}

/// Scans a table; `None` if it is not a valid table for `my_id`.
pub(super) fn scan(bytes: &[u8], my_id: u64) -> Option<Scan> {
    if bytes.get(..4)? != MAGIC {
        return None;
    }
    let n = usize::try_from(u32_at(bytes, 4)?).ok()?;
    if n > MAX_SLOTS || bytes.len() != HEADER_LEN + n * SLOT_LEN {
        return None;
    }
    let mut out = Scan {
        others: InFlight::default(),
        mine: None,
        slots: n,
    };
    for i in 0..n {
        let off = HEADER_LEN + i * SLOT_LEN;
        let counts = InFlight {
            critical: u32_at(bytes, off + 16)?,
            sheddable: u32_at(bytes, off + 20)?,
        };
        if u64_at(bytes, off)? == my_id {
            if out.mine.is_some() {
                return None;
            }
            out.mine = Some((off, counts));
        } else {
            out.others = out.others.plus(counts);
        }
    }
    Some(out)
}

pub(super) fn push_slot(buf: &mut Vec<u8>, id: u64, now_ms: u64, counts: InFlight) {
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&now_ms.to_le_bytes());
    buf.extend_from_slice(&counts.critical.to_le_bytes());
    buf.extend_from_slice(&counts.sheddable.to_le_bytes());
}

/// Rewrites `buf` in place so that this VM's slot holds `counts` (no slot when zero).
/// `scanned` is `scan(buf)`. False when the table is full and this VM has no slot.
pub(super) fn write_mine(
    buf: &mut Vec<u8>,
    scanned: Option<Scan>,
    id: u64,
    now_ms: u64,
    counts: InFlight,
) -> bool {
    let Some(s) = scanned else {
        buf.clear();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&u32::from(!counts.is_zero()).to_le_bytes());
        if !counts.is_zero() {
            push_slot(buf, id, now_ms, counts);
        }
        return true;
    };
    // s.slots <= MAX_SLOTS, so these conversions and sums cannot overflow.
    let set_len = |buf: &mut Vec<u8>, n: usize| put_u32_at(buf, 4, n as u32);
    match s.mine {
        Some((off, _)) if counts.is_zero() => {
            if off + SLOT_LEN <= buf.len() {
                buf.drain(off..off + SLOT_LEN);
            }
            set_len(buf, s.slots.saturating_sub(1))
        }
        Some((off, _)) => {
            put_u64_at(buf, off + 8, now_ms)
                && put_u32_at(buf, off + 16, counts.critical)
                && put_u32_at(buf, off + 20, counts.sheddable)
        }
        None if counts.is_zero() => true,
        None if s.slots >= MAX_SLOTS => false,
        None => {
            push_slot(buf, id, now_ms, counts);
            set_len(buf, s.slots + 1)
        }
    }
}

/// The table's bytes and CAS token; empty and `None` when absent.
pub(super) fn fetch<S: SharedStore + ?Sized>(store: &S) -> (Vec<u8>, Option<u32>) {
    match store.get(INFLIGHT_KEY) {
        Some((bytes, cas)) => (bytes, Some(cas)),
        None => (Vec::new(), None),
    }
}

/// Global in-flight as the table shows it (sum of all slots), or `None` if the value
/// is absent or undecodable. For tests and debugging endpoints.
pub fn read_in_flight<S: SharedStore + ?Sized>(store: &S) -> Option<InFlight> {
    let (bytes, _) = store.get(INFLIGHT_KEY)?;
    // An id no slot uses (ids are random u64; a collision only moves counts between
    // the two fields of the result, not their sum).
    scan(&bytes, 0).map(|s| s.others.plus(s.mine.map(|m| m.1).unwrap_or_default()))
}
