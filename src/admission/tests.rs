use super::*;
use crate::shared::MemStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const C: Criticality = Criticality::Critical;
const S: Criticality = Criticality::Sheddable;

fn cfg(window_secs: u32, min_requests: u32) -> AdmissionConfig {
    AdmissionConfig {
        window_secs,
        min_requests,
        ..AdmissionConfig::default()
    }
}

fn formula(n: f64, acc: f64, k: f64, cap: f64) -> f64 {
    ((n - k * acc) / (n + 1.0)).max(0.0).min(cap)
}

/// `n` forwarded requests on each VM, a fraction `f` of them failing.
fn traffic(vms: &mut [Admission], n: u32, f: f64) {
    let failures = (f64::from(n) * f).round() as u32;
    for a in vms.iter_mut() {
        for i in 0..n {
            let crit = if i % 4 == 0 { C } else { S };
            // Offered, and forwarded whatever the decision (the formula's inputs).
            let _ = a.decide(crit, 0.5);
            a.record(if i < failures {
                Ending::Response(503)
            } else {
                Ending::Response(404)
            });
        }
    }
}

fn tick_all(vms: &mut [Admission], store: &MemStore, now_ms: u64) {
    for a in vms.iter_mut() {
        a.tick(store, now_ms);
    }
}

#[test]
fn computed_p_matches_the_formula_across_workers() {
    for f in [0.0, 0.1, 0.3, 0.5, 0.8, 1.0] {
        let store = MemStore::new();
        let mut vms: Vec<_> = (0..3).map(|_| Admission::new(&cfg(10, 50), 8)).collect();
        for s in 0..5u64 {
            // Before the window is full p lags; check it at the end.
            traffic(&mut vms, 40, f);
            tick_all(&mut vms, &store, s * 1000 + 500);
        }
        tick_all(&mut vms, &store, 4_900);
        let n = 3.0 * 40.0 * 5.0;
        let acc = n - 3.0 * 5.0 * (40.0 * f).round();
        let want = formula(n, acc, 1.5, 0.9);
        for a in &vms {
            let st = a.stats();
            assert_eq!(st.window_requests, 600);
            assert!(
                (st.rejection_probability - want).abs() < 1e-9,
                "f={f}: {} vs {want}",
                st.rejection_probability
            );
            assert!((st.sheddable_share - 0.75).abs() < 1e-9);
        }
    }
}

#[test]
fn formula_edges_and_garbage_inputs() {
    assert_eq!(rejection_probability(0, 0, 1.5, 0.9, 0), 0.0);
    assert_eq!(rejection_probability(100, 100, 1.5, 0.9, 0), 0.0);
    assert_eq!(rejection_probability(100, 0, 1.5, 0.9, 0), 0.9);
    assert!((rejection_probability(100, 0, 1.5, 1.0, 0) - 100.0 / 101.0).abs() < 1e-12);
    assert_eq!(
        rejection_probability(49, 0, 1.5, 0.9, 50),
        0.0,
        "min_requests"
    );
    assert_eq!(rejection_probability(50, 0, 1.5, 0.9, 50), 0.9);
    assert_eq!(rejection_probability(100, 0, f64::NAN, 0.9, 0), 0.0);
    assert_eq!(rejection_probability(100, 0, 1.5, f64::INFINITY, 0), 0.0);
    assert_eq!(rejection_probability(u64::MAX, 0, 1.5, 0.9, 0), 0.9);
}

#[test]
fn min_requests_is_honoured_on_the_whole_window() {
    let store = MemStore::new();
    let mut vms: Vec<_> = (0..2).map(|_| Admission::new(&cfg(10, 50), 8)).collect();
    traffic(&mut vms, 20, 1.0); // 40 requests, all failing
    tick_all(&mut vms, &store, 1000);
    assert_eq!(vms[0].stats().rejection_probability, 0.0);
    traffic(&mut vms, 5, 1.0); // 50 in the window: enough evidence
    tick_all(&mut vms, &store, 2000);
    // The last VM to tick sees everything; the first sees it on its next tick.
    assert_eq!(vms[1].stats().rejection_probability, 0.9);
    tick_all(&mut vms, &store, 2500);
    assert_eq!(vms[1].stats().rejection_probability, 0.9);
}

#[test]
fn window_slides_and_p_returns_to_zero() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(5, 10), 8);
    for s in 0..5u64 {
        traffic(std::slice::from_mut(&mut a), 100, 1.0);
        a.tick(&store, s * 1000);
    }
    assert_eq!(a.stats().rejection_probability, 0.9);
    // The store recovers: successes only. Old seconds fall out one by one.
    let mut last = 1.0;
    for s in 5..11u64 {
        traffic(std::slice::from_mut(&mut a), 100, 0.0);
        a.tick(&store, s * 1000);
        let p = a.stats().rejection_probability;
        assert!(p <= last);
        last = p;
    }
    assert_eq!(a.stats().rejection_probability, 0.0);
    assert_eq!(a.stats().window_requests, 500);
    // Nothing at all for a whole window: empty.
    a.tick(&store, 30_000);
    assert_eq!(a.stats().window_requests, 0);
}

#[test]
fn endings_count_as_the_store_sees_them() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(10, 0), 8);
    for e in [
        Ending::Response(200),
        Ending::Response(404),
        Ending::Response(201),
        Ending::Response(499),
    ] {
        a.record(e);
    }
    for e in [
        Ending::Response(500),
        Ending::Response(503),
        Ending::UpstreamTimeout,
        Ending::UpstreamReset,
    ] {
        a.record(e);
    }
    // Shed or cached at the proxy, abandoned by the client, or not read: not
    // requests.
    for e in [Ending::LocalReply, Ending::DownstreamReset, Ending::Unread] {
        a.record(e);
    }
    a.tick(&store, 0);
    let st = a.stats();
    assert_eq!((st.window_requests, st.window_accepts), (8, 4));
    assert_eq!((st.successes, st.failures), (4, 4));
    // One observed request standing for ten counts ten times.
    a.record_weighted(Ending::Response(200), 10);
    a.record_weighted(Ending::Response(503), 10);
    a.record_weighted(Ending::Unread, 10);
    a.tick(&store, 0);
    let st = a.stats();
    assert_eq!((st.window_requests, st.window_accepts), (28, 14));
    assert_eq!((st.successes, st.failures), (14, 14));
}

#[test]
fn split_sheds_sheddable_first() {
    assert_eq!(split(0.0, 0.85), (0.0, 0.0));
    assert_eq!(split(f64::NAN, 0.5), (0.0, 0.0));
    let (s, c) = split(0.425, 0.85);
    assert!((s - 0.5).abs() < 1e-12 && c == 0.0);
    let (s, c) = split(0.85, 0.85);
    assert!((s - 1.0).abs() < 1e-12 && c == 0.0);
    let (s, c) = split(0.9, 0.85);
    assert!(s == 1.0 && (c - 1.0 / 3.0).abs() < 1e-9);
    // No sheddable traffic: critical takes the whole p.
    assert_eq!(split(0.4, 0.0), (1.0, 0.4));
    assert_eq!(split(0.4, 1.0), (0.4, 0.0));
    assert_eq!(split(0.4, f64::NAN), (1.0, 0.4));
}

#[test]
fn decide_rejects_in_priority_order_and_with_the_right_rates() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(10, 10), 8);
    // 80% sheddable offered, store failing every request: p = 0.9 (cap).
    for i in 0..1000 {
        let crit = if i % 5 == 0 { C } else { S };
        let _ = a.decide(crit, 0.999_999);
        a.record(Ending::Response(500));
    }
    a.tick(&store, 0);
    let st = a.stats();
    assert_eq!(st.rejection_probability, 0.9);
    assert_eq!(st.sheddable_rejection_probability, 1.0);
    assert!((st.critical_rejection_probability - 0.5).abs() < 1e-9);
    let mut rejected = [0u32; 2];
    for i in 0..1000 {
        let u = (f64::from(i) + 0.5) / 1000.0;
        for (j, crit) in [C, S].into_iter().enumerate() {
            if let Decision::Reject { severity } = a.decide(crit, u) {
                assert_eq!(severity, 1.0);
                rejected[j] += 1;
            }
        }
    }
    assert_eq!(rejected, [500, 1000]);
    assert_eq!(a.stats().rejected_critical, 500);
    // Non-finite randomness never rejects.
    assert_eq!(a.decide(C, f64::NAN), Decision::Admit);
}

#[test]
fn critical_is_untouched_while_sheddable_suffices() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(10, 10), 8);
    // 85% sheddable, 40% of requests failing: p = (1000 - 1.5*600)/1001 ≈ 0.1.
    for i in 0..1000 {
        let crit = if i % 20 < 3 { C } else { S };
        let _ = a.decide(crit, 0.999_999);
        a.record(if i % 5 < 2 {
            Ending::Response(503)
        } else {
            Ending::Response(404)
        });
    }
    a.tick(&store, 0);
    let st = a.stats();
    assert!(st.rejection_probability > 0.09 && st.rejection_probability < 0.11);
    assert_eq!(st.critical_rejection_probability, 0.0);
    for i in 0..1000 {
        assert_eq!(a.decide(C, f64::from(i) / 1000.0), Decision::Admit);
    }
}

#[test]
fn critical_requests_come_back_within_seconds_of_a_recovery() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(10, 10), 8);
    // Half the traffic critical, each request forwarded whatever the decision.
    let second = |a: &mut Admission, now: &mut u64, failing: bool| {
        for tenth in 0..10 {
            for i in 0..10 {
                let _ = a.decide(if i % 2 == 0 { C } else { S }, 0.999);
                a.record(Ending::Response(if failing { 503 } else { 200 }));
            }
            a.tick(&store, *now + tenth * 100);
        }
        *now += 1000;
    };
    // The store is down for the whole window: rejecting every sheddable request
    // is not enough (p = 0.9 > s = 0.5), so critical ones are rejected too.
    let mut now = 0;
    for _ in 0..10 {
        second(&mut a, &mut now, true);
    }
    assert!(a.stats().critical_rejection_probability > 0.5);
    // It is back. The window holds failures for seconds yet (it alone would
    // admit critical requests again after ~4 s), the last two seconds are clean.
    let mut back_after = None;
    for s in 1..=10u64 {
        second(&mut a, &mut now, false);
        if back_after.is_none() && a.stats().critical_rejection_probability == 0.0 {
            back_after = Some(s);
            assert!(a.stats().sheddable_rejection_probability > 0.0);
        }
    }
    assert!(
        matches!(back_after, Some(s) if s <= 2),
        "critical requests admitted again after {back_after:?} s"
    );
}

#[test]
fn shadow_mode_only_counts() {
    let store = MemStore::new();
    let mut c = cfg(10, 0);
    c.enforce = false;
    let mut a = Admission::new(&c, 8);
    for _ in 0..100 {
        a.record(Ending::UpstreamTimeout);
    }
    a.tick(&store, 0);
    assert_eq!(a.decide(S, 0.0), Decision::ShadowReject);
    assert_eq!(a.stats().would_have_rejected, 1);
    assert_eq!(a.stats().rejected_sheddable, 0);
}

#[test]
fn disabled_is_free() {
    let store = MemStore::new();
    let mut c = cfg(10, 0);
    c.enabled = false;
    let mut a = Admission::new(&c, 8);
    a.record(Ending::Response(500));
    assert_eq!(a.decide(S, 0.0), Decision::Admit);
    a.tick(&store, 0);
    assert_eq!(store.writes(), 0);
    assert!(store.get(ADMISSION_KEY).is_none());
}

#[test]
fn seconds_wrap_around_u32() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(4, 0), 8);
    let wrap_ms = (u64::from(u32::MAX) + 1) * 1000;
    for s in [wrap_ms - 2000, wrap_ms - 1000, wrap_ms, wrap_ms + 1000] {
        for _ in 0..10 {
            a.record(Ending::Response(500));
        }
        a.tick(&store, s);
    }
    assert_eq!(second_of(wrap_ms), 0);
    assert_eq!(a.stats().window_requests, 40);
    a.tick(&store, wrap_ms + 2000);
    assert_eq!(a.stats().window_requests, 30);
    // A bucket from the future (clock set back) does not count.
    a.tick(&store, wrap_ms - 10_000);
    assert_eq!(a.stats().window_requests, 0);
}

#[test]
fn garbage_or_resized_rings_are_replaced() {
    let store = MemStore::new();
    store
        .set(ADMISSION_KEY, b"SGa1\xff\xff\xff\xffjunk", None)
        .unwrap();
    let mut a = Admission::new(&cfg(10, 0), 8);
    a.record(Ending::Response(200));
    a.tick(&store, 0);
    assert_eq!(a.stats().window_requests, 1);
    let len = store.get(ADMISSION_KEY).unwrap().0.len();
    assert_eq!(len, HEADER_LEN + 10 * BUCKET_LEN);
    // Another window size: restarts empty with the new size.
    a.reconfigure(&cfg(3, 0));
    a.tick(&store, 1000);
    assert_eq!(a.stats().window_requests, 0);
    assert_eq!(
        store.get(ADMISSION_KEY).unwrap().0.len(),
        HEADER_LEN + 3 * BUCKET_LEN
    );
}

#[test]
fn contention_delays_but_never_loses_counts() {
    let store = MemStore::new();
    let mut a = Admission::new(&cfg(10, 0), 3);
    for _ in 0..7 {
        a.record(Ending::Response(200));
    }
    store.set_interference(|_| true);
    a.tick(&store, 0);
    assert_eq!(a.stats().flush_giveups, 1);
    store.clear_interference();
    a.record(Ending::Response(200));
    a.tick(&store, 1000);
    assert_eq!(a.stats().window_requests, 8);
}

#[cfg(not(target_arch = "wasm32"))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn split_rejects_exactly_p_and_stays_in_range(p in 0.0f64..=1.0, s in 0.0f64..=1.0) {
            let (ps, pc) = split(p, s);
            prop_assert!((0.0..=1.0).contains(&ps) && (0.0..=1.0).contains(&pc));
            if s > 0.0 {
                prop_assert!((s * ps + (1.0 - s) * pc - p).abs() < 1e-9);
            }
            if p <= s {
                prop_assert_eq!(pc, 0.0);
            }
        }

        #[test]
        fn p_is_bounded(req in any::<u64>(), acc in any::<u64>(), k in 1.0f64..100.0, cap in 0.0f64..=1.0) {
            let p = rejection_probability(req, acc, k, cap, 0);
            prop_assert!((0.0..=cap).contains(&p));
        }
    }
}
