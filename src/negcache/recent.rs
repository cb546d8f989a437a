//! A worker's own recent reads of keys known to exist, reused for a few milliseconds.
//!
//! Every key-table lookup copies the key's shard out of the host: one hostcall, and one
//! call back into the module to allocate the copy; docs/perf.md ("Where the pass path's
//! cost goes") measures what that pair costs a forwarded request in Envoy's V8. Sessions are read in bursts (a page
//! view, its API calls), so a worker that has just seen a key marked Exists reuses that
//! read for `key_table.local_reuse_ms` instead of asking the host again.
//!
//! Only Exists reads are reused, never Missing ones, so reuse never answers a request
//! at the proxy: at worst a request is forwarded that a fresh read would have answered
//! with a cached 404 (the key was deleted through another worker in the meantime; this
//! worker's own writes forget the key at once). A reused read also carries an older
//! bucket generation, which can only make a later `insert_missing` refuse, never
//! accept, so the no-stale-404 guarantee of [`crate::negcache`] is untouched.
//!
//! Fixed size, direct-mapped: a newer key takes the slot of an older one.

use super::Lookup;

/// Slots of the table (a power of two).
const SLOTS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    fp: u64,
    read_at_ms: u64,
    lookup: Lookup,
}

#[derive(Debug, Clone)]
pub struct RecentKnown {
    slots: Box<[Option<Entry>]>,
    max_age_ms: u64,
}

impl RecentKnown {
    /// `max_age_ms` = 0 turns reuse off (every lookup reads the host).
    pub fn new(max_age_ms: u64) -> Self {
        Self {
            slots: vec![None; SLOTS].into_boxed_slice(),
            max_age_ms,
        }
    }

    fn index(fp: u64) -> usize {
        // The high bits pick the shard and the low bits the bucket (`Layout::locate`);
        // folding both spreads keys of one bucket over several slots.
        ((fp ^ (fp >> 32)) as usize) & (SLOTS - 1)
    }

    /// The read of `fp` made at most `max_age_ms` ago (by this worker's clock).
    pub fn get(&self, fp: u64, now_ms: u64) -> Option<Lookup> {
        let e = (*self.slots.get(Self::index(fp))?)?;
        let age = now_ms.checked_sub(e.read_at_ms)?;
        (e.fp == fp && age < self.max_age_ms).then_some(e.lookup)
    }

    /// Remembers a read that found `fp` marked Exists.
    pub fn put(&mut self, fp: u64, now_ms: u64, lookup: Lookup) {
        if self.max_age_ms > 0 {
            if let Some(slot) = self.slots.get_mut(Self::index(fp)) {
                *slot = Some(Entry {
                    fp,
                    read_at_ms: now_ms,
                    lookup,
                });
            }
        }
    }

    /// This worker is about to change `fp`'s entry: its next lookup must read the host.
    pub fn forget(&mut self, fp: u64) {
        if let Some(slot) = self.slots.get_mut(Self::index(fp)) {
            if slot.is_some_and(|e| e.fp == fp) {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::negcache::{Generation, Mark};

    fn exists(generation: u32) -> Lookup {
        Lookup {
            mark: Mark::Exists,
            expires_at: 1_000_000,
            generation: Generation(Some(generation)),
        }
    }

    #[test]
    fn a_read_is_reused_until_it_is_max_age_old() {
        let mut r = RecentKnown::new(100);
        r.put(7, 1_000, exists(3));
        assert_eq!(r.get(7, 1_000), Some(exists(3)));
        assert_eq!(r.get(7, 1_099), Some(exists(3)));
        assert_eq!(r.get(7, 1_100), None);
    }

    #[test]
    fn a_clock_that_went_back_reads_the_host() {
        let mut r = RecentKnown::new(100);
        r.put(7, 1_000, exists(3));
        assert_eq!(r.get(7, 999), None);
    }

    #[test]
    fn zero_max_age_never_reuses() {
        let mut r = RecentKnown::new(0);
        r.put(7, 1_000, exists(3));
        assert_eq!(r.get(7, 1_000), None);
    }

    #[test]
    fn forget_drops_only_that_key() {
        let mut r = RecentKnown::new(100);
        r.put(1, 0, exists(1));
        r.put(2, 0, exists(2));
        // A key sharing key 1's slot must not drop it.
        let twin = 1 + SLOTS as u64;
        assert_eq!(RecentKnown::index(twin), RecentKnown::index(1));
        r.forget(twin);
        assert_eq!(r.get(1, 0), Some(exists(1)));
        r.forget(1);
        assert_eq!(r.get(1, 0), None);
        assert_eq!(r.get(2, 0), Some(exists(2)));
    }

    #[test]
    fn a_key_sharing_a_slot_replaces_the_older_one() {
        let mut r = RecentKnown::new(100);
        let twin = 1 + SLOTS as u64;
        r.put(1, 0, exists(1));
        r.put(twin, 0, exists(2));
        assert_eq!(r.get(1, 0), None);
        assert_eq!(r.get(twin, 0), Some(exists(2)));
    }
}
