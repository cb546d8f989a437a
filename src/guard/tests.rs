use super::*;
use crate::gradient::Lane;
use crate::limiter::LimitMode;
use crate::outcome::{Completion, Ending};
use crate::shared::MemStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const NOW: u64 = 1_750_000_000_000;

fn vm(config: Config) -> Vm {
    Vm::new(config, 1, 7, 9)
}

fn read(vm: &mut Vm, key: &str, id: u32) -> KeyRequest {
    KeyRequest {
        op: Op::Read,
        fp: vm.cache.fingerprint(key.as_bytes()),
        id,
    }
}

/// A forwarded request's answer, settled and released as the host does it.
fn answer(vm: &mut Vm, store: &MemStore, req: KeyRequest, fwd: Forward, status: u32) {
    let (permit, outstanding) = fwd.into_parts();
    let _ = vm
        .guard()
        .settle(store, req, outstanding, Some(status), || true, NOW);
    if let Some(permit) = permit {
        let done = Completion {
            rtt_ms: Some(1.0),
            ending: Ending::Response(status),
            lane: Lane::of(req.op),
        };
        vm.limiter.release(store, permit, done, NOW);
    }
}

fn forwarded(v: Verdict) -> Forward {
    match v {
        Verdict::Forward(f) => f,
        other => panic!("expected a forward, got {other:?}"),
    }
}

#[test]
fn a_known_missing_key_is_answered_and_a_known_session_is_critical() {
    let store = MemStore::new();
    let mut vm = vm(Config::default());
    vm.cache.table_mut().create_all(&store).unwrap();
    let missing = read(&mut vm, "reader", 1);
    let fwd = forwarded(vm.guard().decide(&store, missing, NOW));
    assert_eq!(
        (fwd.class, fwd.flight),
        (Class::ReadUnknown, Flight::Leader)
    );
    answer(&mut vm, &store, missing, fwd, 404);
    assert!(matches!(
        vm.guard().decide(&store, missing, NOW),
        Verdict::CachedMissing
    ));
    let session = read(&mut vm, "session", 2);
    let fwd = forwarded(vm.guard().decide(&store, session, NOW));
    answer(&mut vm, &store, session, fwd, 200);
    let fwd = forwarded(vm.guard().decide(&store, session, NOW));
    assert_eq!(fwd.class, Class::ReadKnown);
    assert_eq!(vm.config.priorities.of(fwd.class), Criticality::Critical);
    assert_eq!(vm.tally.cache_hits, 1);
}

#[test]
fn a_flood_of_missing_keys_leaves_a_live_session_critical() {
    let store = MemStore::new();
    let mut config = Config::default();
    // A table far smaller than the flood: 256 slots for 20,000 distinct keys.
    config.key_table.capacity = 256;
    config.key_table.shard_slots = 64;
    let mut vm = vm(config);
    let session = read(&mut vm, "enwiki:MWSession:alive", 1);
    let fwd = forwarded(vm.guard().decide(&store, session, NOW));
    answer(&mut vm, &store, session, fwd, 200);
    for i in 0..20_000u32 {
        let req = read(&mut vm, &format!("reader{i}"), i + 2);
        let fwd = forwarded(vm.guard().decide(&store, req, NOW));
        answer(&mut vm, &store, req, fwd, 404);
    }
    assert!(vm.cache.stats().inserts > 19_000, "the flood was cached");
    let fwd = forwarded(vm.guard().decide(&store, session, NOW));
    assert_eq!(fwd.class, Class::ReadKnown, "the session is still known");
}

#[test]
fn shadow_mode_is_the_same_for_every_mechanism() {
    let store = MemStore::new();
    let mut config = Config::default();
    config.concurrency.mode = LimitMode::Fixed;
    // Room for one sheddable request (0.8 x 2, rounded down).
    config.concurrency.limit = 2;
    config.concurrency.min_limit = 1;
    config.concurrency.enforce = false;
    config.negative_cache.enforce = false;
    let mut vm = vm(config);
    vm.cache.table_mut().create_all(&store).unwrap();
    let missing = read(&mut vm, "reader", 1);
    let first = forwarded(vm.guard().decide(&store, missing, NOW));
    answer(&mut vm, &store, missing, first, 404);
    // Known missing and over the limit: both would act, neither does.
    let other = read(&mut vm, "other", 2);
    let held = forwarded(vm.guard().decide(&store, other, NOW));
    let fwd = forwarded(vm.guard().decide(&store, missing, NOW));
    assert_eq!(vm.tally.cache_would_hit, 1);
    assert_eq!(vm.tally.would_shed[ShedReason::Concurrency.index()], 1);
    assert_eq!(vm.tally.shed, [[0; 2]; ShedReason::ALL.len()]);
    assert_eq!(fwd.flight, Flight::None, "no single flight in shadow mode");
    answer(&mut vm, &store, other, held, 404);
    answer(&mut vm, &store, missing, fwd, 404);
}

#[test]
fn a_shed_request_takes_no_slot_and_is_tallied_by_reason_and_class() {
    let store = MemStore::new();
    let mut config = Config::default();
    config.concurrency.mode = LimitMode::Fixed;
    config.concurrency.limit = 2;
    config.concurrency.min_limit = 1;
    config.concurrency.sheddable_share = 0.5;
    let mut vm = vm(config);
    let (ra, rb) = (read(&mut vm, "a", 1), read(&mut vm, "b", 2));
    let a = forwarded(vm.guard().decide(&store, ra, NOW));
    match vm.guard().decide(&store, rb, NOW) {
        Verdict::Shed {
            reason,
            crit,
            retry_after_secs,
        } => {
            assert_eq!(
                (reason, crit),
                (ShedReason::Concurrency, Criticality::Sheddable)
            );
            assert!(retry_after_secs >= 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.tally.shed[ShedReason::Concurrency.index()], [0, 1]);
    assert_eq!(vm.limiter.local_in_flight().total(), 1);
    // A write is critical: it is admitted beside the sheddable read.
    let write = KeyRequest {
        op: Op::Write,
        fp: vm.cache.fingerprint(b"w"),
        id: 3,
    };
    let w = forwarded(vm.guard().decide(&store, write, NOW));
    assert!(w.write.is_some());
    answer(&mut vm, &store, ra, a, 404);
    answer(&mut vm, &store, write, w, 201);
    assert_eq!(vm.limiter.local_in_flight().total(), 0);
}
