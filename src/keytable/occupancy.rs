//! How full the table is: a background scan, one shard per step.

use super::KeyTable;
use crate::shared::SharedStore;

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

    pub(super) fn add(&mut self, other: &Occupancy) {
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
