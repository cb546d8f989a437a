//! A deterministic simulation of the pipeline in front of a store at k x its
//! capacity: several VMs, each with its own [`Vm`], share one [`MemStore`] as Envoy's
//! workers share shared data; the store is a FIFO queue in front of `SERVERS`
//! backend workers with exponential service times (kask-sim's model, and the
//! replay's calibration: 4 x 2.2 ms = 1,818 requests/s). Time is simulated, so the
//! results do not depend on the machine running the test.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{crit_index, Flight, KeyRequest, Outstanding, Verdict, Vm};
use crate::classify::{Class, Criticality, Op};
use crate::config::Config;
use crate::gradient::Lane;
use crate::limiter::Permit;
use crate::outcome::{Completion, Ending};
use crate::rng::splitmix64;
use crate::rng::Rng;
use crate::shared::MemStore;

const SERVERS: usize = 4;
const SERVICE_US: f64 = 2_200.0;
/// Requests per second the store serves at full utilisation.
pub const CAPACITY: f64 = SERVERS as f64 * 1e6 / SERVICE_US;
const TICK_US: u64 = 100_000;
const SESSIONS: u64 = 2_000;

/// One phase of the offered load: `secs` seconds at `x` times the capacity.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub secs: u64,
    pub x: f64,
}

/// The classes of the incident's mix, in the order of [`Outcome::sent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reader's lookup of a key that never existed, never the same twice: the
    /// negative cache cannot absorb these.
    Reader,
    /// A logged-in user's read of their session.
    Session,
    Write,
    Logout,
}

impl Kind {
    fn draw(u: f64) -> Kind {
        match u {
            u if u < 0.85 => Kind::Reader,
            u if u < 0.95 => Kind::Session,
            u if u < 0.99 => Kind::Write,
            _ => Kind::Logout,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What happened to the offered requests, per [`Kind`].
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub sent: [u64; 4],
    pub ok: [u64; 4],
    /// 503s by criticality (0 critical, 1 sheddable), all reasons.
    pub shed: [u64; 2],
    /// Critical requests shed in a tick in which a sheddable one was admitted.
    pub inverted_ticks: u64,
    /// Store busy time over server time, while the surge (the highest phase) held,
    /// from its second second on.
    pub utilisation: f64,
    /// Most requests the store held (queued or in service) at once.
    pub peak_in_store: usize,
}

impl Outcome {
    /// Share of `kind`'s requests answered (not shed).
    fn ok_share(&self, kind: usize) -> f64 {
        self.ok[kind] as f64 / self.sent[kind].max(1) as f64
    }

    pub fn writes_ok(&self) -> f64 {
        self.ok_share(Kind::Write.index())
    }

    pub fn sessions_ok(&self) -> f64 {
        self.ok_share(Kind::Session.index())
    }

    pub fn readers_ok(&self) -> f64 {
        self.ok_share(Kind::Reader.index())
    }

    /// Share of the 503s sent that hit critical requests.
    pub fn critical_share_of_503s(&self) -> f64 {
        self.shed[0] as f64 / (self.shed[0] + self.shed[1]).max(1) as f64
    }
}

/// A request in the store, until it completes.
struct InStore {
    finish_us: u64,
    vm: usize,
    kind: Kind,
    req: KeyRequest,
    outstanding: Outstanding,
    permit: Option<Permit>,
    admitted_us: u64,
}

impl PartialEq for InStore {
    fn eq(&self, other: &Self) -> bool {
        self.finish_us == other.finish_us
    }
}
impl Eq for InStore {}
impl PartialOrd for InStore {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InStore {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.finish_us.cmp(&other.finish_us)
    }
}

/// Runs `phases` of Poisson arrivals spread over `vms` VMs with `config`.
pub fn run(config: &Config, vms: usize, phases: &[Phase], seed: u64) -> Outcome {
    let store = MemStore::new();
    let mut rng = Rng::new(seed);
    let mut vm: Vec<Vm> = (0..vms)
        .map(|i| Vm::new(config.clone(), i as u64 + 1, 7, rng.next_u64()))
        .collect();
    let base_ms = 1_750_000_000_000u64;
    // Fingerprints are hashes: spread over the table's shards and buckets.
    let session_fp = |i: u64| splitmix64(0x5e55_0000_0000_0000 ^ i);
    for i in 0..SESSIONS {
        let first = &mut vm[0];
        let l = first.cache.lookup(&store, session_fp(i), base_ms);
        first.cache.mark_exists(&store, session_fp(i), &l, base_ms);
    }

    let surge_x = phases.iter().map(|p| p.x).fold(0.0, f64::max);
    let mut out = Outcome::default();
    let mut servers: BinaryHeap<Reverse<u64>> = (0..SERVERS).map(|_| Reverse(0)).collect();
    let mut in_store: BinaryHeap<Reverse<InStore>> = BinaryHeap::new();
    let (mut busy_us, mut surge_us) = (0u64, 0u64);
    let mut next_tick = TICK_US;
    let mut tick_admitted_sheddable = false;
    let mut tick_shed_critical = false;
    let mut next_id = 1u32;
    let mut reader_key = 0u64;
    let mut now = 0u64;
    let mut phase_start = 0u64;
    for phase in phases {
        let end = phase_start + phase.secs * 1_000_000;
        let surge = phase.x == surge_x;
        let measured_from = phase_start + 1_000_000;
        let mean_gap = 1e6 / (phase.x * CAPACITY);
        let mut next_arrival = phase_start as f64 + exp(&mut rng, mean_gap);
        loop {
            let completion = in_store.peek().map_or(u64::MAX, |Reverse(r)| r.finish_us);
            let arrival = next_arrival as u64;
            now = completion.min(arrival).min(next_tick);
            if now >= end {
                now = end;
                break;
            }
            let now_ms = base_ms + now / 1000;
            if now == completion {
                let Some(Reverse(done)) = in_store.pop() else {
                    break;
                };
                complete(&mut vm[done.vm], &store, done, now, &mut out);
            } else if now == next_tick {
                for (i, v) in vm.iter_mut().enumerate() {
                    v.limiter.tick(&store, now_ms, i == 0);
                    v.admission.tick(&store, now_ms);
                }
                if tick_admitted_sheddable && tick_shed_critical {
                    out.inverted_ticks += 1;
                }
                (tick_admitted_sheddable, tick_shed_critical) = (false, false);
                next_tick += TICK_US;
            } else {
                next_arrival += exp(&mut rng, mean_gap);
                let kind = Kind::draw(rng.next_f64());
                out.sent[kind.index()] += 1;
                let (op, fp) = match kind {
                    Kind::Reader => {
                        reader_key += 1;
                        (Op::Read, splitmix64(0x4ead_0000_0000_0000 ^ reader_key))
                    }
                    Kind::Session => (Op::Read, session_fp(rng.next_u64() % SESSIONS)),
                    Kind::Write => (Op::Write, session_fp(rng.next_u64() % SESSIONS)),
                    Kind::Logout => (Op::Delete, rng.next_u64()),
                };
                next_id = next_id.wrapping_add(1);
                let req = KeyRequest {
                    op,
                    fp,
                    id: next_id,
                };
                let w = (rng.next_u64() % vms as u64) as usize;
                match vm[w].guard().decide(&store, req, now_ms) {
                    Verdict::CachedMissing => out.ok[kind.index()] += 1,
                    Verdict::Shed { crit, .. } => {
                        out.shed[crit_index(crit)] += 1;
                        tick_shed_critical |= crit == Criticality::Critical;
                    }
                    Verdict::Forward(fwd) => {
                        assert_ne!(fwd.flight, Flight::Wait, "reader keys never repeat");
                        tick_admitted_sheddable |= fwd.class == Class::ReadUnknown;
                        let service = exp(&mut rng, SERVICE_US) as u64;
                        let Some(Reverse(free)) = servers.pop() else {
                            break;
                        };
                        let start = free.max(now);
                        servers.push(Reverse(start + service));
                        if surge && start >= measured_from && start < end {
                            busy_us += service;
                        }
                        let (permit, outstanding) = fwd.into_parts();
                        in_store.push(Reverse(InStore {
                            finish_us: start + service,
                            vm: w,
                            kind,
                            req,
                            outstanding,
                            permit,
                            admitted_us: now,
                        }));
                        out.peak_in_store = out.peak_in_store.max(in_store.len());
                    }
                }
            }
        }
        if surge {
            surge_us += end.saturating_sub(measured_from);
        }
        phase_start = end;
    }
    // Drain: the requests in the store complete.
    while let Some(Reverse(done)) = in_store.pop() {
        now = now.max(done.finish_us);
        complete(&mut vm[done.vm], &store, done, now, &mut out);
    }
    out.utilisation = busy_us as f64 / (SERVERS as f64 * surge_us.max(1) as f64);
    out
}

/// The store answers: the pipeline settles the answer, the host's `on_log` follows.
fn complete(vm: &mut Vm, store: &MemStore, done: InStore, now_us: u64, out: &mut Outcome) {
    let status = match done.kind {
        Kind::Reader => 404,
        Kind::Session => 200,
        Kind::Write => 201,
        Kind::Logout => 204,
    };
    let now_ms = 1_750_000_000_000 + now_us / 1000;
    let _ = vm.guard().settle(
        store,
        done.req,
        done.outstanding,
        Some(status),
        || true,
        now_ms,
    );
    out.ok[done.kind.index()] += 1;
    let ending = Ending::Response(status);
    vm.admission.record(ending);
    if let Some(permit) = done.permit {
        let rtt_ms = (now_us - done.admitted_us) as f64 / 1000.0;
        let done = Completion {
            rtt_ms: Some(rtt_ms),
            ending,
            lane: Lane::of(done.req.op),
        };
        vm.limiter.release(store, permit, done, now_ms);
    }
}

fn exp(rng: &mut Rng, mean: f64) -> f64 {
    -(1.0 - rng.next_f64()).ln() * mean
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn surge(x: f64) -> Vec<Phase> {
        vec![
            Phase { secs: 3, x: 0.75 },
            Phase { secs: 12, x },
            Phase { secs: 3, x: 0.5 },
        ]
    }

    fn check(x: f64, o: &Outcome) {
        let summary = format!(
            "{x}x: writes {:.4}, sessions {:.4}, readers {:.3}, utilisation {:.3}, \
             503s critical {:.4} ({:?}), inverted ticks {}, peak in store {}",
            o.writes_ok(),
            o.sessions_ok(),
            o.readers_ok(),
            o.utilisation,
            o.critical_share_of_503s(),
            o.shed,
            o.inverted_ticks,
            o.peak_in_store
        );
        println!("{summary}");
        assert!(o.writes_ok() >= 0.999, "{summary}");
        assert!(o.sessions_ok() >= 0.99, "{summary}");
        assert!(o.critical_share_of_503s() <= 0.01, "{summary}");
        assert!(o.utilisation >= 0.9, "{summary}");
        assert_eq!(
            o.inverted_ticks, 0,
            "critical shed beside admitted sheddable: {summary}"
        );
        assert!(
            o.shed[1] > 0,
            "a surge that sheds nothing tests nothing: {summary}"
        );
    }

    #[test]
    fn logged_in_users_keep_working_at_3x() {
        let o = run(&Config::default(), 2, &surge(3.0), 11);
        check(3.0, &o);
    }

    #[test]
    fn logged_in_users_keep_working_at_5x() {
        let o = run(&Config::default(), 2, &surge(5.0), 12);
        check(5.0, &o);
    }

    #[test]
    fn logged_in_users_keep_working_at_5x_across_four_workers() {
        let o = run(&Config::default(), 4, &surge(5.0), 13);
        check(5.0, &o);
    }
}
