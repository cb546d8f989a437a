//! Keeping this VM's slot of the shared in-flight table in step with its own counts:
//! the in-place CAS loop, the tick (controller step, stale slots, reserve decay).

use super::table::{
    fetch, push_slot, scan, write_mine, InFlight, HEADER_LEN, INFLIGHT_KEY, MAGIC, MAX_SLOTS,
    SLOT_LEN,
};
use super::Limiter;
use crate::gradient::{self, Usage, Windows};
use crate::shared::{update, SetError, SharedStore};
use crate::wire::{u32_at, u64_at};

/// What a VM's slot in the table shows, as far as the VM knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MySlot {
    /// The slot shows these counts, at least the VM's own in each class; the excess
    /// is released slots not written yet, which the VM's acquires may take back.
    Shows(InFlight),
    /// A write gave up (or the table was full): the slot may be off either way, so
    /// the next acquire, release or tick writes at once.
    Pending,
}

/// Outcome of one in-place sync attempt loop.
pub(super) enum Sync {
    /// The table now shows `local` for this VM.
    Done,
    /// The loop gave up (contention, host refusal or a full table).
    GaveUp { full: bool },
}

impl Limiter {
    /// Makes the table show `self.local` for this VM, in place on the store's bytes.
    pub(super) fn sync_in_place<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        now_ms: u64,
    ) -> Sync {
        let mut full = false;
        for _ in 0..self.attempts {
            let (mut buf, cas) = fetch(store);
            let scanned = scan(&buf, self.id);
            if let Some(s) = scanned {
                self.seen(s.others, s.slots);
                let stored = s.mine.map(|(_, c)| c).unwrap_or_default();
                if stored == self.local {
                    self.set_dirty(false);
                    return Sync::Done;
                }
            } else if cas.is_none() && self.local.is_zero() {
                self.set_dirty(false);
                return Sync::Done;
            }
            if !write_mine(&mut buf, scanned, self.id, now_ms, self.local) {
                full = true;
                break;
            }
            match store.set(INFLIGHT_KEY, &buf, cas) {
                Ok(()) => {
                    self.set_dirty(false);
                    return Sync::Done;
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => break,
            }
        }
        self.set_dirty(true);
        Sync::GaveUp { full }
    }

    /// Periodic work, on every VM's `on_tick` (idempotent across VMs):
    /// 1. the in-flight table: drop slots of dead VMs (stale heartbeat), refresh this
    ///    VM's heartbeat, and write its exact count if a write is pending;
    /// 2. the adaptive limit: merge this VM's RTT window into shared data, run the
    ///    controller step if `is_leader` (from [`crate::election::Election::tick`]),
    ///    and cache the limit to enforce until the next tick.
    pub fn tick<S: SharedStore + ?Sized>(&mut self, store: &S, now_ms: u64, is_leader: bool) {
        if !self.counting() && self.local.is_zero() && !self.is_dirty() {
            return;
        }
        self.maintain_table(store, now_ms);
        self.decay_reserve();
        if !self.enabled {
            return;
        }
        match gradient::sync(
            store,
            self.attempts,
            &self.controller,
            &self.windows,
            self.usage,
            is_leader,
            now_ms,
        ) {
            Ok(p) => {
                self.windows = Windows::default();
                self.usage = Usage::default();
                self.set_limit(p.limit);
                self.stats.min_rtt_ms = p.baseline_ms;
                self.stats.sample_rtt_ms = p.sample_ms;
                self.stats.gradient = p.gradient;
                if p.stepped {
                    self.stats.limit_steps += 1;
                }
            }
            Err(_) => self.stats.cas_giveups_tick += 1,
        }
    }

    fn maintain_table<S: SharedStore + ?Sized>(&mut self, store: &S, now_ms: u64) {
        let id = self.id;
        let local = self.local;
        let dirty = self.is_dirty();
        let stale_ms = self.stale_ms;
        let mut reclaimed = 0u64;
        let mut seen = None;
        let mut mine_written = true;
        let result = update(store, INFLIGHT_KEY, self.attempts, |current| {
            reclaimed = 0;
            mine_written = true;
            let bytes = current.unwrap_or_default();
            let valid = scan(bytes, id).is_some();
            let mut kept: Vec<(u64, u64, InFlight)> = Vec::new();
            let mut my_last = None;
            if valid {
                // Valid implies every slot is in bounds; `?`-free decoding by chunks.
                for chunk in bytes
                    .get(HEADER_LEN..)
                    .unwrap_or_default()
                    .chunks_exact(SLOT_LEN)
                {
                    let (Some(sid), Some(last)) = (u64_at(chunk, 0), u64_at(chunk, 8)) else {
                        continue;
                    };
                    let counts = InFlight {
                        critical: u32_at(chunk, 16).unwrap_or(0),
                        sheddable: u32_at(chunk, 20).unwrap_or(0),
                    };
                    if sid == id {
                        my_last = Some((last, counts));
                    } else if now_ms.saturating_sub(last) > stale_ms {
                        reclaimed += 1;
                    } else {
                        kept.push((sid, last, counts));
                    }
                }
            }
            let others = kept.iter().fold(InFlight::default(), |a, s| a.plus(s.2));
            seen = Some((others, kept.len() + usize::from(!local.is_zero())));
            let heartbeat_due = match my_last {
                Some((last, counts)) => {
                    counts != local || now_ms.saturating_sub(last) > stale_ms / 4
                }
                None => !local.is_zero(),
            };
            let must_write =
                reclaimed > 0 || heartbeat_due || dirty || (current.is_some() && !valid);
            if !must_write {
                return None;
            }
            // A full table has no room for this VM: it stays pending (dirty).
            let include_mine = !local.is_zero() && kept.len() < MAX_SLOTS;
            mine_written = local.is_zero() || include_mine;
            let n = kept.len() + usize::from(include_mine);
            let mut out = Vec::with_capacity(HEADER_LEN + n * SLOT_LEN);
            out.extend_from_slice(&MAGIC);
            // n <= MAX_SLOTS, which fits a u32.
            out.extend_from_slice(&(n as u32).to_le_bytes());
            for (sid, last, counts) in &kept {
                push_slot(&mut out, *sid, *last, *counts);
            }
            if include_mine {
                push_slot(&mut out, id, now_ms, local);
            }
            Some((out, ()))
        });
        if let Some((others, slots)) = seen {
            self.seen(others, slots);
        }
        match result {
            Ok(Some(())) => {
                self.stats.stale_slots_reclaimed += reclaimed;
                self.set_dirty(!mine_written);
            }
            Ok(None) => self.set_dirty(false),
            Err(_) => {
                self.stats.cas_giveups_tick += 1;
                self.set_dirty(true);
            }
        }
    }
}
