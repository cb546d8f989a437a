//! One leader among all VMs for periodic work, by a lease in shared data.
//!
//! `on_tick` runs on every worker's VM and on the main thread's VM. Work that must be
//! done once per interval (the gradient step) goes to whoever holds the lease in
//! [`LEASE_KEY`]. Every VM calls [`Election::tick`] on each tick:
//!
//! - the holder renews its lease when less than half of it is left (one write per
//!   half lease, not per tick) and stays leader;
//! - anyone else stays follower while the lease is valid, without writing;
//! - when the lease has expired (the leader stopped ticking: its VM crashed, was
//!   replaced, or is stuck), the first VM to CAS its claim becomes leader and bumps
//!   the term.
//!
//! A lease whose expiry is further in the future than `lease_ms` is impossible for a
//! well-behaved holder and is treated as expired: a clock that jumped backwards, or
//! garbage, cannot leave the filter without a leader.
//!
//! **Guarantee:** at most one VM believes it leads, except (a) right after the key is
//! first created (the host accepts any CAS for an absent key, so two VMs can both
//! "create" it) and (b) for at most one tick after a lease is lost on contention.
//! The leader's work must therefore be idempotent on its own: the gradient step does
//! its due-check and its write in one CAS update of its own key, so two leaders
//! cannot both apply a step for the same interval.
//!
//! `LEASE_KEY` layout (little-endian, 24 bytes): magic `SGl1`, term (u32, wrapping),
//! holder id (u64), expiry in ms (u64). Any other value means "no valid lease".

use crate::shared::{update, SharedStore};
use crate::wire::Reader;

/// The shared key holding the lease.
pub const LEASE_KEY: &str = "sg.v1.lease";

const MAGIC: [u8; 4] = *b"SGl1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub term: u32,
    pub holder: u64,
    pub expires_ms: u64,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.term.to_le_bytes());
        out.extend_from_slice(&self.holder.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        let mut r = Reader::new(bytes);
        if r.take::<4>()? != MAGIC {
            return None;
        }
        let lease = Lease {
            term: r.u32()?,
            holder: r.u64()?,
            expires_ms: r.u64()?,
        };
        r.is_done().then_some(lease)
    }

    /// Valid at `now_ms`: not expired, and not further away than one lease.
    fn valid(&self, now_ms: u64, lease_ms: u64) -> bool {
        now_ms < self.expires_ms && self.expires_ms <= now_ms.saturating_add(lease_ms)
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ElectionStats {
    /// Leases this VM claimed (became leader).
    pub claims: u64,
    /// Renewals written.
    pub renewals: u64,
    /// Ticks whose CAS loop hit its bound or the host refused; treated as follower.
    pub giveups: u64,
}

/// One VM's view of the election.
#[derive(Debug, Clone)]
pub struct Election {
    cas_attempts: u32,
    leader: bool,
    term: u32,
    stats: ElectionStats,
}

impl Election {
    pub fn new(cas_attempts: u32) -> Self {
        Self {
            cas_attempts,
            leader: false,
            term: 0,
            stats: ElectionStats::default(),
        }
    }

    /// Runs the election for this tick and says whether `my_id` leads until the next
    /// one. `my_id` must be unique per VM (a random u64 drawn at VM start); `lease_ms`
    /// should be a few tick periods (e.g. 3x), so one late tick does not lose it.
    ///
    /// When the CAS loop gives up, or the host refuses the write, this VM is a
    /// follower for this tick: at worst nobody leads for one tick, never two.
    pub fn tick<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        my_id: u64,
        now_ms: u64,
        lease_ms: u64,
    ) -> bool {
        let lease_ms = lease_ms.max(1);
        let mut outcome = (false, 0u32, false); // (leader, term, claimed)
        let result = update(store, LEASE_KEY, self.cas_attempts, |current| {
            let lease = current.and_then(Lease::decode);
            let renewed = Lease {
                term: 0,
                holder: my_id,
                expires_ms: now_ms.saturating_add(lease_ms),
            };
            match lease {
                Some(l) if l.valid(now_ms, lease_ms) && l.holder == my_id => {
                    outcome = (true, l.term, false);
                    // Renew only in the second half of the lease.
                    (l.expires_ms - now_ms <= lease_ms / 2).then(|| {
                        let next = Lease {
                            term: l.term,
                            ..renewed
                        };
                        (next.encode(), ())
                    })
                }
                Some(l) if l.valid(now_ms, lease_ms) => {
                    outcome = (false, l.term, false);
                    None
                }
                other => {
                    let term = other.map_or(1, |l| l.term.wrapping_add(1));
                    outcome = (true, term, true);
                    Some((Lease { term, ..renewed }.encode(), ()))
                }
            }
        });
        let (leader, term, claimed) = outcome;
        match result {
            Ok(Some(())) => {
                if claimed {
                    self.stats.claims += 1;
                } else {
                    self.stats.renewals += 1;
                }
                self.leader = leader;
                self.term = term;
            }
            Ok(None) => {
                self.leader = leader;
                self.term = term;
            }
            Err(_) => {
                self.stats.giveups += 1;
                self.leader = false;
            }
        }
        self.leader
    }

    /// What the last tick decided.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The lease term seen at the last tick (wraps at u32::MAX).
    pub fn term(&self) -> u32 {
        self.term
    }

    pub fn stats(&self) -> ElectionStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LEASE: u64 = 3000;

    fn round(
        store: &MemStore,
        vms: &mut [(u64, Election)],
        now: u64,
        skip: Option<u64>,
    ) -> Vec<u64> {
        let mut leaders = Vec::new();
        for (id, e) in vms.iter_mut() {
            if Some(*id) == skip {
                continue;
            }
            if e.tick(store, *id, now, LEASE) {
                leaders.push(*id);
            }
        }
        leaders
    }

    fn vms(n: u64) -> Vec<(u64, Election)> {
        (1..=n)
            .map(|i| (i * 0x9e37_79b9, Election::new(8)))
            .collect()
    }

    #[test]
    fn exactly_one_leader_among_many_vms() {
        let store = MemStore::new();
        let mut vms = vms(9);
        let mut first = None;
        for t in 0..100 {
            let leaders = round(&store, &mut vms, t * 1000, None);
            assert_eq!(leaders.len(), 1, "tick {t}: {leaders:?}");
            // Stable: the same leader keeps renewing.
            assert_eq!(*first.get_or_insert(leaders[0]), leaders[0]);
        }
        let writes = store.writes();
        round(&store, &mut vms, 100_000, None);
        round(&store, &mut vms, 100_500, None);
        assert!(store.writes() - writes <= 1, "followers do not write");
    }

    #[test]
    fn failover_when_the_leader_stops_ticking() {
        let store = MemStore::new();
        let mut vms = vms(4);
        let leader = round(&store, &mut vms, 0, None)[0];
        let term = vms.iter().find(|v| v.0 == leader).unwrap().1.term();
        // The leader dies; until its lease runs out nobody else takes over.
        let mut t = 1000;
        let mut new_leader = None;
        while t <= 10_000 {
            let leaders = round(&store, &mut vms, t, Some(leader));
            assert!(leaders.len() <= 1);
            if t < LEASE {
                assert!(leaders.is_empty(), "stole a valid lease at {t}");
            }
            if let Some(&l) = leaders.first() {
                new_leader.get_or_insert((l, t));
            }
            t += 1000;
        }
        let (l, at) = new_leader.expect("failover happened");
        assert_ne!(l, leader);
        assert!(at <= LEASE + 1000, "failover after {at} ms");
        let new_term = vms.iter().find(|v| v.0 == l).unwrap().1.term();
        assert_eq!(new_term, term.wrapping_add(1));
        // The old leader comes back and finds itself a follower.
        let leaders = round(&store, &mut vms, t, None);
        assert_eq!(leaders, vec![l]);
    }

    #[test]
    fn term_wraps_around() {
        let store = MemStore::new();
        let old = Lease {
            term: u32::MAX,
            holder: 7,
            expires_ms: 10,
        };
        store.set(LEASE_KEY, &old.encode(), None).unwrap();
        let mut e = Election::new(4);
        assert!(e.tick(&store, 8, 100, LEASE));
        assert_eq!(e.term(), 0);
        assert!(e.tick(&store, 8, 200, LEASE));
        assert_eq!(e.term(), 0);
    }

    #[test]
    fn garbage_and_far_future_leases_are_replaced() {
        let store = MemStore::new();
        store.set(LEASE_KEY, b"not a lease", None).unwrap();
        let mut e = Election::new(4);
        assert!(e.tick(&store, 1, 1000, LEASE));
        // A lease expiring an hour from now (clock went back) is not honoured.
        let future = Lease {
            term: 3,
            holder: 2,
            expires_ms: 3_600_000,
        };
        store.set(LEASE_KEY, &future.encode(), None).unwrap();
        let mut e = Election::new(4);
        assert!(e.tick(&store, 1, 1000, LEASE));
        assert_eq!(e.term(), 4);
        assert_eq!(Lease::decode(&future.encode()), Some(future));
        assert_eq!(Lease::decode(&future.encode()[..23]), None);
    }

    #[test]
    fn contention_makes_a_follower_never_a_second_leader() {
        let store = MemStore::new();
        let mut a = Election::new(3);
        assert!(a.tick(&store, 1, 0, LEASE));
        store.set_interference(|_| true);
        let mut b = Election::new(3);
        // Lease expired, but every claim loses the race: b stays follower.
        assert!(!b.tick(&store, 2, 10_000, LEASE));
        assert_eq!(b.stats().giveups, 1);
        // a's renewal is also lost: a steps down instead of assuming.
        assert!(!a.tick(&store, 1, 10_000, LEASE));
        store.clear_interference();
        assert!(b.tick(&store, 2, 11_000, LEASE));
        assert!(!a.tick(&store, 1, 11_000, LEASE));
    }
}
