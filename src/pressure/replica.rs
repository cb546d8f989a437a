//! Several replicas: each one's share of the filter's requests, from its own count of
//! the requests it holds, and the global ceiling its headroom allows at that share.
//!
//! Envoy's load balancer picks the replica after the filter has admitted a request, so
//! the filter's own count is one number for all replicas. Each replica's `/metrics`
//! says how many requests it holds, though: a Go service runs a goroutine per
//! connection it serves (`go_goroutines`; kask-sim exports the same), so the
//! goroutines above the replica's count at rest are the requests it holds. From that:
//!
//! - `held` = goroutines − the fewest seen since the replica started;
//! - `pending` = `held` + the requests in flight that no replica shows
//!   (`global − Σ held`, when positive: sent but not yet taken in, or on a replica
//!   whose count is unknown), assumed all on this one;
//! - `share` = `pending / global`, within [`1/N`, 1] for `N` endpoints: it rises at
//!   once and falls by [`SHARE_FALL_WEIGHT`] of the way per poll, and is measured
//!   only while at least [`SHARE_MIN_IN_FLIGHT`] requests are in flight (below, the
//!   count is mostly noise); never measured, it is 1, today's assumption that every
//!   request may land on this replica;
//! - the global ceiling = `global + (own − pending) / share`, where `own` is the
//!   replica's ceiling in its own requests (its memory learned against `held`, see
//!   [`crate::ceiling`]): the room it has left, in requests of which it gets `share`.
//!
//! Errors stay on the safe side where the filter can tell: idle connections Envoy keeps
//! open after a surge count as held (a larger share, a smaller room); requests a replica
//! does not show are counted on every replica. Requests from other front proxies count
//! as held too, so each proxy gets its part of the room, not all of it. What the polls
//! cannot see is a share that moves between two of them (a hot key range, a replica
//! leaving the ring): that replica can pass its line until the next poll re-measures
//! it (docs/memory.md, "Failure modes").

use crate::ceiling::{MAX_CEILING, MIN_CEILING};

/// The gauge that counts a replica's goroutines (Go's client and kask-sim).
pub const GOROUTINES_GAUGE: &str = "go_goroutines";
/// Fewer requests in flight than this teach nothing about the shares.
pub const SHARE_MIN_IN_FLIGHT: u32 = 32;
/// Share of the way a smaller measured share moves the estimate per poll.
pub const SHARE_FALL_WEIGHT: f64 = 0.2;

/// What the filter knows of one replica's part of the traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// The fewest goroutines seen since the replica started: its count at rest.
    rest: Option<f64>,
    /// Requests it held at its last sample; `None` when its count is unknown.
    held: Option<u32>,
    /// The smoothed share of the filter's requests that reach it (1 until measured).
    pub(super) share: f64,
}

impl Default for Replica {
    fn default() -> Self {
        Replica::new()
    }
}

impl Replica {
    pub fn new() -> Replica {
        Replica {
            rest: None,
            held: None,
            share: 1.0,
        }
    }

    /// Forgets everything (the replica restarted, or stopped showing its count).
    pub fn reset(&mut self) {
        *self = Replica::new();
    }

    /// Records a sample's goroutine count and returns the requests held: the count
    /// above the fewest seen since the replica started. A count that is not a
    /// finite, non-negative number gives `None` (the count is unknown).
    pub fn observe(&mut self, goroutines: f64) -> Option<u32> {
        if !(goroutines.is_finite() && goroutines >= 0.0) {
            self.held = None;
            return None;
        }
        let rest = self.rest.map_or(goroutines, |r| r.min(goroutines));
        self.rest = Some(rest);
        // Non-negative and finite; `as` saturates at u32::MAX.
        let held = (goroutines - rest).round() as u32;
        self.held = Some(held);
        Some(held)
    }

    /// Requests held at the last sample, if its count is known.
    pub fn held(&self) -> Option<u32> {
        self.held
    }

    /// Learns the share from `pending` of `global` requests in flight (module docs);
    /// `replicas` sets the floor `1/replicas`. Returns the share now in force.
    pub fn learn_share(&mut self, pending: u32, global: u32, replicas: usize) -> f64 {
        if global < SHARE_MIN_IN_FLIGHT {
            return self.share;
        }
        let floor = 1.0 / replicas.max(1) as f64;
        let measured = (f64::from(pending) / f64::from(global)).clamp(floor, 1.0);
        self.share = if measured >= self.share {
            measured
        } else {
            self.share + SHARE_FALL_WEIGHT * (measured - self.share)
        };
        self.share
    }
}

/// The filter's in-flight requests not shown by any replica: `global − Σ held`, or 0.
pub fn unaccounted(global: u32, held: impl IntoIterator<Item = u32>) -> u32 {
    let shown = held.into_iter().fold(0u32, u32::saturating_add);
    global.saturating_sub(shown)
}

/// The global in-flight ceiling one replica allows: `global + (own − pending) / share`,
/// rounded down, within [`MIN_CEILING`]..=[`MAX_CEILING`]. `own` is the replica's
/// ceiling in its own requests, `pending` the requests on it or possibly heading to
/// it. A share that is not in (0, 1] counts as 1 (every request may land here).
pub fn global_ceiling(global: u32, own: u32, pending: u32, share: f64) -> u32 {
    let share = if share > 0.0 && share <= 1.0 {
        share
    } else {
        1.0
    };
    let room = f64::from(own) - f64::from(pending);
    let c = (f64::from(global) + room / share).floor();
    // Finite (share >= a positive number); clamped, so the cast is exact.
    c.clamp(f64::from(MIN_CEILING), f64::from(MAX_CEILING)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn held_is_the_count_above_the_fewest_seen() {
        let mut r = Replica::new();
        assert_eq!(r.held(), None);
        assert_eq!(r.observe(12.0), Some(0));
        assert_eq!(r.observe(112.0), Some(100));
        // Fewer than ever: the new rest.
        assert_eq!(r.observe(5.0), Some(0));
        assert_eq!(r.observe(45.0), Some(40));
        assert_eq!(r.held(), Some(40));
        // Garbage: unknown, and the rest is kept.
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(r.observe(bad), None);
            assert_eq!(r.held(), None);
        }
        assert_eq!(r.observe(6.0), Some(1));
        assert_eq!(r.observe(1e300), Some(u32::MAX));
        r.reset();
        assert_eq!((r.held(), r.share), (None, 1.0));
        assert_eq!(r.observe(30.0), Some(0));
    }

    #[test]
    fn the_share_rises_at_once_and_falls_slowly() {
        let mut r = Replica::new();
        // Unknown: 1. Too few in flight to measure: kept.
        assert_eq!(r.learn_share(3, 10, 3), 1.0);
        // Measured: falls a fifth of the way per poll.
        assert!((r.learn_share(100, 300, 3) - (1.0 - 0.2 * (2.0 / 3.0))).abs() < 1e-9);
        for _ in 0..60 {
            r.learn_share(100, 300, 3);
        }
        assert!((r.share - 1.0 / 3.0).abs() < 1e-3, "{}", r.share);
        // A larger share is taken at once.
        assert_eq!(r.learn_share(150, 300, 3), 0.5);
        // Never below an even split, never above 1.
        for _ in 0..60 {
            r.learn_share(0, 300, 3);
        }
        assert!((r.share - 1.0 / 3.0).abs() < 1e-3, "{}", r.share);
        assert_eq!(r.learn_share(900, 300, 3), 1.0);
        // No replicas is one replica.
        assert_eq!(Replica::new().learn_share(0, 300, 0), 1.0);
    }

    #[test]
    fn unaccounted_requests() {
        assert_eq!(unaccounted(300, [100, 90, 80]), 30);
        assert_eq!(unaccounted(300, [200, 200]), 0);
        assert_eq!(unaccounted(300, []), 300);
        assert_eq!(unaccounted(5, [u32::MAX, u32::MAX]), 0);
    }

    #[test]
    fn equal_shares_allow_each_replica_its_own_headroom() {
        // Three replicas, each with room for 1,000 of its own requests, each holding a
        // third of 300: the fleet takes ~3,000, three times one replica's headroom.
        let c = global_ceiling(300, 1000, 100, 1.0 / 3.0);
        assert!((2999..=3000).contains(&c), "{c}");
        // With share 1 (every key hashes to this replica) it is today's ceiling:
        // in flight + the room left.
        assert_eq!(global_ceiling(300, 1000, 300, 1.0), 1000);
        // A replica over its line: below the count, never below the minimum.
        assert_eq!(global_ceiling(300, 200, 290, 1.0), 210);
        assert_eq!(global_ceiling(300, 8, 290, 1.0 / 3.0), MIN_CEILING);
        // Bounded above; garbage shares count as 1.
        assert_eq!(global_ceiling(u32::MAX, u32::MAX, 0, 1e-9), MAX_CEILING);
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY, 2.0] {
            assert_eq!(global_ceiling(300, 1000, 300, s), 1000, "{s}");
        }
    }
}
