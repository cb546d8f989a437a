use crate::ceiling::{MAX_CEILING, MIN_CEILING};
use crate::classify::Criticality;
use crate::prom::PromError;

use super::*;
use crate::shared::{MemStore, SharedStore};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const MI: f64 = 1024.0 * 1024.0;
const LIMIT: u64 = 400 * 1024 * 1024;
const S: Criticality = Criticality::Sheddable;
const C: Criticality = Criticality::Critical;

/// The curve's tests pin the thresholds they were written for.
fn cfg() -> MemoryConfig {
    MemoryConfig {
        enabled: Some(true),
        memory_limit_bytes: LIMIT,
        soft: 0.70,
        hard: 0.85,
        critical: 0.95,
        ..MemoryConfig::default()
    }
}

fn cfg_endpoints(n: usize) -> MemoryConfig {
    MemoryConfig {
        endpoints: vec![MetricsEndpoint::default(); n],
        ..cfg()
    }
}

/// A Kask /metrics body (client_golang layout) with the given ratios of the limit.
fn kask(rss: f64, heap: f64, stack: f64) -> String {
    let b = |r: f64| format!("{:e}", (r * LIMIT as f64).round());
    format!(
        "# HELP go_goroutines Number of goroutines that currently exist.\n\
         # TYPE go_goroutines gauge\n\
         go_goroutines 5023\n\
         # HELP go_memstats_heap_idle_bytes Number of heap bytes waiting to be used.\n\
         # TYPE go_memstats_heap_idle_bytes gauge\n\
         go_memstats_heap_idle_bytes 1.2124160e+07\n\
         # HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.\n\
         # TYPE go_memstats_heap_inuse_bytes gauge\n\
         go_memstats_heap_inuse_bytes {}\n\
         # HELP go_memstats_stack_inuse_bytes Number of bytes in use by the stack allocator.\n\
         # TYPE go_memstats_stack_inuse_bytes gauge\n\
         go_memstats_stack_inuse_bytes {}\n\
         http_request_duration_seconds_bucket{{code=\"404\",method=\"GET\",le=\"+Inf\"}} 570123\n\
         # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes {}\n\
         process_virtual_memory_bytes 1.2345e+07\n",
        b(heap),
        b(stack),
        b(rss)
    )
}

/// Demand `d` (split 60/40 between heap and stack), RSS `rss`.
fn body(d: f64, rss: f64) -> Vec<u8> {
    kask(rss, d * 0.6, d * 0.4).into_bytes()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

// ---- configuration ----

#[test]
fn defaults_validate() {
    MemoryConfig::default().validate("memory").unwrap();
    cfg().validate("memory").unwrap();
}

// ---- the curve ----

#[test]
fn curve_shape() {
    let c = Curve::from_config(&cfg());
    // Sheddable: 0 at soft, x² in the band, 1 from hard.
    assert_eq!(c.sheddable(0.0), 0.0);
    assert_eq!(c.sheddable(0.70), 0.0);
    assert!(close(c.sheddable(0.775), 0.25));
    assert!(close(c.sheddable(0.70 + 0.15 * 0.9), 0.81));
    assert_eq!(c.sheddable(0.85), 1.0);
    assert_eq!(c.sheddable(3.0), 1.0);
    assert_eq!(c.sheddable(f64::NAN), 0.0);
    let mut prev = 0.0;
    for i in 0..=1000 {
        let p = c.sheddable(f64::from(i) / 1000.0);
        assert!(p >= prev && (0.0..=1.0).contains(&p));
        prev = p;
    }
    // Severity: 0 at soft, 1 at critical.
    assert_eq!(c.severity(0.70), 0.0);
    assert!(close(c.severity(0.825), 0.5));
    assert_eq!(c.severity(0.95), 1.0);
}

#[test]
fn degenerate_thresholds_do_not_divide_by_zero() {
    let c = Curve {
        soft: 0.8,
        hard: 0.8,
        critical: 0.8,
    };
    for r in [0.0, 0.79, 0.8, 0.81, 2.0, f64::INFINITY] {
        for v in [c.sheddable(r), c.severity(r)] {
            assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{r}: {v}");
        }
    }
}

// ---- thresholds through the tracker ----

#[test]
fn thresholds_and_decisions() {
    // (demand, rss, p sheddable); critical traffic is never shed by the curve.
    let cases = [
        (0.50, 0.52, 0.0),
        (0.775, 0.80, 0.25),
        (0.86, 0.88, 1.0),
        (0.97, 0.97, 1.0),
        (1.2, 1.2, 1.0),
    ];
    for (d, rss, ps) in cases {
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(d, rss), 0, 1000).unwrap();
        let s = t.snapshot(1000);
        assert!(s.is_active());
        assert!(close(s.shed_probability(S), ps), "{d}: {s:?}");
        assert_eq!(s.shed_probability(C), 0.0, "{d}: {s:?}");
    }
    // decide: u < p sheds, with the severity.
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(0.775, 0.8), 0, 0).unwrap();
    let s = t.snapshot(0);
    assert_eq!(s.decide(S, 0.24), Some(s.severity()));
    assert!(s.severity() > 0.0 && s.severity() < 1.0);
    assert_eq!(s.decide(S, 0.26), None);
    assert_eq!(s.decide(C, 0.0), None);
    assert_eq!(s.decide(S, f64::NAN), None);
}

#[test]
fn rss_above_critical_is_a_hard_ceiling() {
    // Demand over soft but the gauges miss memory (e.g. cgo): RSS at 97% of the limit.
    let mut t = PressureTracker::new(&cfg());
    let r = t.on_sample(0, &body(0.72, 0.97), 0, 0).unwrap();
    assert!(close(r.decision_ratio, 0.97));
    let s = t.snapshot(0);
    assert!(s.ceiling_in_force());
    assert_eq!(s.shed_probability(S), 1.0);
    // RSS above critical but demand low: memory retained after a surge, reused
    // before the kernel is asked for more; it must not keep shedding.
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(0.30, 0.97), 0, 0).unwrap();
    let s = t.snapshot(0);
    assert!(!s.ceiling_in_force());
    assert_eq!(s.shed_probability(S), 0.0);
    // RSS high but below critical, demand low: nothing is shed.
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(0.30, 0.93), 0, 0).unwrap();
    let s = t.snapshot(0);
    assert!(!s.ceiling_in_force());
    assert_eq!(s.shed_probability(S), 0.0);
    assert!(close(s.ceiling_ratio(), 0.93));
    assert!(close(s.ratio(), 0.30));
}

// ---- the end of a surge ----

#[test]
fn end_of_surge_stops_shedding_within_two_samples() {
    let mut t = PressureTracker::new(&cfg());
    let mut now = 0;
    let mut poll = |t: &mut PressureTracker, d: f64, rss: f64| {
        now += 1000;
        t.on_sample(0, &body(d, rss), 0, now).unwrap();
        t.snapshot(now)
    };
    // Surge: demand climbs past hard; RSS follows it up.
    for (d, rss) in [(0.3, 0.35), (0.6, 0.66), (0.8, 0.86), (0.9, 0.93)] {
        poll(&mut t, d, rss);
    }
    let s = poll(&mut t, 0.88, 0.93);
    assert_eq!(s.shed_probability(S), 1.0);
    // Load back to normal: goroutines exit, heap-in-use falls; RSS stays near peak.
    let after: Vec<f64> = [(0.20, 0.93), (0.20, 0.93), (0.19, 0.92), (0.2, 0.92)]
        .iter()
        .map(|&(d, rss)| poll(&mut t, d, rss).shed_probability(S))
        .collect();
    assert_eq!(after[0], 0.0, "{after:?}");
    assert!(after.iter().all(|&p| p == 0.0), "{after:?}");
    // Even from far above the limit it takes at most two samples.
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(1.2, 0.94), 0, 0).unwrap();
    t.on_sample(0, &body(0.2, 0.94), 0, 1000).unwrap();
    t.on_sample(0, &body(0.2, 0.94), 0, 2000).unwrap();
    assert_eq!(t.snapshot(2000).shed_probability(S), 0.0);
}

#[test]
fn rss_alone_keeps_shedding_after_the_surge() {
    // The contrast the design is about: with the ceiling as the only signal,
    // retained RSS keeps shedding although the demand is gone.
    let mut t = PressureTracker::new(&MemoryConfig {
        demand_gauges: Vec::new(),
        ..cfg()
    });
    t.on_sample(0, &body(0.9, 0.93), 0, 0).unwrap();
    for i in 1..=10 {
        t.on_sample(0, &body(0.2, 0.93), 0, i * 1000).unwrap();
    }
    let s = t.snapshot(10_000);
    assert!(s.demand_fallback());
    assert_eq!(s.shed_probability(S), 1.0);
}

#[test]
fn rising_is_immediate_falling_is_smoothed() {
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(0.2, 0.3), 0, 0).unwrap();
    let r = t.on_sample(0, &body(0.9, 0.94), 0, 1000).unwrap();
    assert!(close(r.decision_ratio, 0.9));
    let r = t.on_sample(0, &body(0.5, 0.94), 0, 2000).unwrap();
    assert!(close(r.decision_ratio, 0.7));
    let r = t.on_sample(0, &body(0.5, 0.94), 0, 3000).unwrap();
    assert!(close(r.decision_ratio, 0.6));
}

// ---- signals ----

#[test]
fn demand_is_resident_memory_less_what_the_runtime_retains_free() {
    let mut t = PressureTracker::new(&cfg());
    let r = t
        .on_sample(0, crate::prom::tests::GO_METRICS.as_bytes(), 0, 0)
        .unwrap();
    assert_eq!(r.ceiling_bytes, 1.82452224e8);
    assert_eq!(
        r.demand_bytes,
        Some(1.82452224e8 - (1.212416e7 - 3.080192e6))
    );
}

#[test]
fn demand_is_heap_plus_stack_in_use_without_retained_gauges() {
    let mut t = PressureTracker::new(&MemoryConfig {
        retained_gauges: Vec::new(),
        ..cfg()
    });
    let r = t
        .on_sample(0, crate::prom::tests::GO_METRICS.as_bytes(), 0, 0)
        .unwrap();
    assert_eq!(r.ceiling_bytes, 1.82452224e8);
    assert_eq!(r.demand_bytes, Some(9.8828288e7 + 6.5273856e7));
    assert!(close(r.ceiling_ratio, 1.82452224e8 / LIMIT as f64));
}

#[test]
fn no_go_gauges_falls_back_to_the_ceiling() {
    let mut t = PressureTracker::new(&cfg());
    let r = t
        .on_sample(0, crate::prom::tests::PYTHON_METRICS.as_bytes(), 0, 0)
        .unwrap();
    assert_eq!(r.demand_bytes, None);
    assert!(close(r.decision_ratio, 3.4029568e7 / LIMIT as f64));
    assert!(t.snapshot(0).demand_fallback());
}

#[test]
fn missing_ceiling_or_bad_values_fail_the_poll() {
    let mut t = PressureTracker::new(&cfg());
    let e = t.on_sample(0, b"go_goroutines 3\n", 0, 0).unwrap_err();
    assert!(
        matches!(e, SampleError::Metrics(PromError::NotFound { .. })),
        "{e}"
    );
    assert!(matches!(
        t.endpoint_stats(0).unwrap().status,
        EndpointStatus::Failed(FailureReason::Metrics(PromError::NotFound { .. }))
    ));
    for bad in ["NaN", "+Inf", "-1"] {
        let b = format!("process_resident_memory_bytes {bad}\n");
        let e = t.on_sample(0, b.as_bytes(), 0, 0).unwrap_err();
        assert!(
            matches!(e, SampleError::Metrics(PromError::InvalidValue { .. })),
            "{e}"
        );
    }
    let b = "process_resident_memory_bytes 1e8\ngo_memstats_heap_inuse_bytes NaN\ngo_memstats_stack_inuse_bytes 1\n";
    assert!(t.on_sample(0, b.as_bytes(), 0, 0).is_err());
    assert_eq!(t.endpoint_stats(0).unwrap().scrape_failures, 5);
    assert_eq!(
        t.on_sample(7, b"", 0, 0),
        Err(SampleError::UnknownEndpoint(7))
    );
    assert!(!t.snapshot(0).is_active());
}

#[test]
fn truncated_body_without_demand_fails_rather_than_falls_back() {
    let full = body(0.3, 0.93);
    // Cut inside the stack gauge's line: RSS comes later in the body, so cut
    // after moving RSS to the top.
    let text = String::from_utf8(full).unwrap();
    let moved = format!(
        "process_resident_memory_bytes 3.9e8\n{}",
        text.replace("process_resident_memory_bytes", "x_process_resident")
    );
    let cut = moved.find("\ngo_memstats_stack_inuse_bytes ").unwrap() + 1 + 33;
    let mut t = PressureTracker::new(&cfg());
    let e = t.on_sample(0, &moved.as_bytes()[..cut], 0, 0).unwrap_err();
    assert!(
        matches!(e, SampleError::Metrics(PromError::Truncated { .. })),
        "{e}"
    );
    assert!(!t.snapshot(0).is_active());
}

// ---- staleness, failures, recovery ----

#[test]
fn an_old_sample_stops_driving_and_a_new_one_resumes() {
    let mut t = PressureTracker::new(&cfg());
    assert_eq!(t.take_transitions(0), vec![]);
    t.on_sample(0, &body(0.9, 0.92), 0, 1000).unwrap();
    let tr = t.take_transitions(1000);
    assert_eq!(
        (tr[0].from, tr[0].to),
        (StatusKind::Pending, StatusKind::Fresh)
    );
    assert!(t.snapshot(6000).is_active()); // exactly max_sample_age_ms old
    assert_eq!(t.snapshot(6000).sample_age_ms(6000), Some(5000));
    let s = t.snapshot(6001);
    assert!(!s.is_active());
    assert_eq!(s.decide(S, 0.0), None);
    let tr = t.take_transitions(6001);
    assert_eq!(tr.len(), 1);
    assert_eq!(
        (tr[0].from, tr[0].to),
        (StatusKind::Fresh, StatusKind::Stale)
    );
    assert!(tr[0].to_string().contains("no longer used"), "{}", tr[0]);
    // Reported once.
    assert_eq!(t.take_transitions(9000), vec![]);
    assert_eq!(t.stats(9000).stale_transitions, 1);
    // Recovery: the next good sample drives again, without smoothing from the gap.
    let r = t.on_sample(0, &body(0.5, 0.9), 0, 10_000).unwrap();
    assert!(close(r.decision_ratio, 0.5));
    let tr = t.take_transitions(10_000);
    assert_eq!(
        (tr[0].from, tr[0].to),
        (StatusKind::Stale, StatusKind::Fresh)
    );
    assert!(t.snapshot(10_000).is_active());
}

#[test]
fn failures_hold_the_last_sample_until_it_is_too_old() {
    let mut t = PressureTracker::new(&cfg());
    t.on_sample(0, &body(0.9, 0.92), 0, 0).unwrap();
    t.take_transitions(0);
    t.on_failure(0, FailureReason::Timeout, 1000);
    t.on_failure(0, FailureReason::HttpStatus(503), 2000);
    let st = t.endpoint_stats(0).unwrap();
    assert_eq!(
        st.status,
        EndpointStatus::Failing(FailureReason::HttpStatus(503))
    );
    assert_eq!(st.consecutive_failures, 2);
    let tr = t.take_transitions(2000);
    assert_eq!(tr.len(), 1);
    assert_eq!(tr[0].to, StatusKind::Failing);
    assert!(tr[0].to_string().contains("HTTP 503"), "{}", tr[0]);
    assert_eq!(t.snapshot(5000).shed_probability(S), 1.0);
    // Past max_sample_age_ms: no longer drives.
    t.on_failure(0, FailureReason::Timeout, 5500);
    let s = t.snapshot(5001 + 1000);
    assert!(!s.is_active());
    let tr = t.take_transitions(6001);
    assert_eq!(
        (tr[0].from, tr[0].to),
        (StatusKind::Failing, StatusKind::Failed)
    );
    let stats = t.stats(6001);
    assert_eq!(stats.scrape_failures, 3);
    assert_eq!(stats.stale_transitions, 1);
    assert_eq!(stats.samples, 1);
    // Recovery.
    t.on_sample(0, &body(0.2, 0.9), 0, 7000).unwrap();
    assert_eq!(t.endpoint_stats(0).unwrap().status, EndpointStatus::Fresh);
    assert_eq!(t.endpoint_stats(0).unwrap().consecutive_failures, 0);
    assert!(t.snapshot(7000).is_active());
}

#[test]
fn failure_before_any_sample() {
    let mut t = PressureTracker::new(&cfg());
    t.on_failure(0, FailureReason::CallFailed, 0);
    t.on_failure(9, FailureReason::CallFailed, 0); // unknown: ignored
    let tr = t.take_transitions(0);
    assert_eq!(
        (tr[0].from, tr[0].to),
        (StatusKind::Pending, StatusKind::Failed)
    );
    assert!(tr[0].to_string().contains("no sample yet"), "{}", tr[0]);
    assert!(!t.snapshot(0).is_active());
}

// ---- several endpoints ----

#[test]
fn the_worst_fresh_endpoint_drives() {
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    t.on_sample(0, &body(0.5, 0.6), 0, 0).unwrap();
    t.on_sample(1, &body(0.8, 0.85), 0, 0).unwrap();
    t.on_sample(2, &body(0.75, 0.9), 0, 3000).unwrap();
    let s = t.snapshot(3000);
    assert_eq!(s.worst_endpoint(), Some(1));
    assert!(close(s.ratio(), 0.8));
    assert!(close(s.ceiling_ratio(), 0.9));
    assert_eq!((s.driving_endpoints(), s.endpoints()), (3, 3));
    // Endpoint 1 goes stale: the next worst (still fresh) drives.
    let s = t.snapshot(5500);
    assert_eq!(s.worst_endpoint(), Some(2));
    assert!(close(s.ratio(), 0.75));
    assert_eq!(s.driving_endpoints(), 1);
    assert_eq!(s.sample_age_ms(5500), Some(2500));
    // An unknown endpoint changes nothing.
    assert!(t.on_sample(3, &body(1.0, 1.0), 0, 5500).is_err());
    assert_eq!(t.snapshot(5500).worst_endpoint(), Some(2));
}

#[test]
fn unset_limit_never_sheds() {
    let mut t = PressureTracker::new(&MemoryConfig::default());
    t.on_sample(0, &body(0.99, 0.99), 0, 0).unwrap();
    let s = t.snapshot(0);
    assert_eq!(s.shed_probability(S), 0.0);
    assert_eq!(s.ratio(), 0.0);
}

#[test]
fn labelled_ceiling_selector() {
    let mut t = PressureTracker::new(&MemoryConfig {
        gauge: "container_memory_working_set_bytes{container=\"kask\"}".into(),
        demand_gauges: Vec::new(),
        ..cfg()
    });
    let b = format!(
        "container_memory_working_set_bytes{{container=\"envoy\"}} 1e6\ncontainer_memory_working_set_bytes{{container=\"kask\"}} {}\n",
        0.9 * LIMIT as f64
    );
    let r = t.on_sample(0, b.as_bytes(), 0, 0).unwrap();
    assert!(close(r.ceiling_ratio, 0.9));
    assert!(r.ceiling_bytes > 300.0 * MI);
}

// ---- the in-flight ceiling ----

const PRIOR: f64 = crate::ceiling::PRIOR_BYTES_PER_REQUEST as f64;

/// The ceiling for ratios of the limit, give or take one request (the bodies
/// round their values).
fn expected(in_flight: u32, demand: f64, line: f64, b: f64) -> std::ops::RangeInclusive<u32> {
    let c = ((f64::from(in_flight) + (line - demand) * LIMIT as f64 / b).floor()) as u32;
    c.saturating_sub(1)..=c + 1
}

#[test]
fn a_sample_gives_the_ceiling_and_the_snapshot_carries_it() {
    let mut t = PressureTracker::new(&cfg());
    // Before any sample: the whole line at the prior cost (bounded).
    let blind = t.snapshot(0);
    assert!(expected(0, 0.0, 0.95, PRIOR).contains(&blind.max_in_flight().unwrap()));
    assert!(!blind.is_active());
    let r = t.on_sample(0, &body(0.5, 0.52), 300, 1000).unwrap();
    let demand = r.demand_bytes.unwrap() / LIMIT as f64;
    let want = r.max_in_flight;
    assert!(expected(300, demand, 0.95, PRIOR).contains(&want));
    let s = t.snapshot(1000);
    assert_eq!(s.max_in_flight(), Some(want));
    assert_eq!(s.bytes_per_request(), PRIOR as u32);
    assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
    // Over the line: fewer than in flight now, never below the minimum.
    let r = t.on_sample(0, &body(1.2, 1.2), 300, 2000).unwrap();
    assert_eq!(r.max_in_flight, MIN_CEILING);
    // An unset limit has no line: the largest ceiling.
    let mut t = PressureTracker::new(&MemoryConfig::default());
    let r = t.on_sample(0, &body(0.5, 0.5), 10, 0).unwrap();
    assert_eq!(r.max_in_flight, MAX_CEILING);
}

#[test]
fn the_ceiling_follows_a_surge_between_polls() {
    // A store at 20 MiB + 36 KiB per request; the limit 64 MiB, the line 0.78.
    let mi = 1024.0 * 1024.0;
    let limit = 64.0 * mi;
    let mut t = PressureTracker::new(&MemoryConfig {
        enabled: Some(true),
        memory_limit_bytes: 64 << 20,
        ..MemoryConfig::default()
    });
    let mem = |n: u32| 20.0 * mi + 36.0 * 1024.0 * f64::from(n);
    let body = |n: u32| {
        format!(
            "process_resident_memory_bytes {}\ngo_memstats_heap_idle_bytes 0\ngo_memstats_heap_released_bytes 0\nprocess_start_time_seconds 1.7e9\n",
            mem(n)
        )
    };
    // Polls every 100 ms while in flight climbs by 100 per poll (a step surge),
    // each admitted up to the last ceiling: memory never passes the line by more
    // than the estimation error allows, and the estimate converges.
    let mut n = 5;
    let mut peak = 0.0f64;
    for i in 0..60u64 {
        t.on_sample(0, body(n).as_bytes(), n, i * 100).unwrap();
        let c = t.snapshot(i * 100).max_in_flight().unwrap();
        n = (n + 100).min(c);
        peak = peak.max(mem(n));
    }
    assert!(peak <= 0.78 * limit, "peak {:.3}", peak / limit);
    // Cheaper than the prior: the rise taught nothing, the load held at the ceiling
    // since has moved the estimate towards 36 KiB, and the ceiling towards the whole
    // headroom at that cost, from the headroom at the prior.
    let (c, b) = t.ceilings().next().unwrap();
    assert!((36.0 * 1024.0..PRIOR).contains(&b), "{b}");
    let at_prior = (0.78 * limit - 20.0 * mi) / PRIOR;
    let at_cost = (0.78 * limit - 20.0 * mi) / (36.0 * 1024.0);
    assert!(
        f64::from(c) > at_prior && f64::from(c) <= at_cost + 3.0,
        "{c} in ({at_prior}, {at_cost}]"
    );
}

#[test]
fn without_a_young_sample_the_ceiling_relaxes_to_the_headroom_at_rest() {
    let mut t = PressureTracker::new(&MemoryConfig {
        bytes_per_request: Some(PRIOR as u64),
        ..cfg()
    });
    // The store at rest, then over the line with 100 in flight (memory that the
    // requests do not explain): the minimum.
    let r = t.on_sample(0, &body(0.3, 0.3), 10, 0).unwrap();
    t.on_sample(0, &body(1.0, 1.0), 100, 0).unwrap();
    assert_eq!(t.snapshot(0).max_in_flight(), Some(MIN_CEILING));
    let demand = r.demand_bytes.unwrap() / LIMIT as f64;
    // The poller goes blind (store down): failures keep the last ceiling while the
    // sample is young...
    t.on_failure(0, FailureReason::Timeout, 1000);
    assert_eq!(t.snapshot(1000).max_in_flight(), Some(MIN_CEILING));
    // ...then the headroom at rest: never shed forever, never unbounded.
    let s = t.snapshot(10_000);
    assert!(!s.is_active());
    let rest = demand - 10.0 * PRIOR / LIMIT as f64;
    let c = s.max_in_flight().unwrap();
    assert!(expected(0, rest, 0.95, PRIOR).contains(&c), "{c}");
}

#[test]
fn several_endpoints_the_tightest_ceiling_holds() {
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    t.on_sample(0, &body(0.3, 0.3), 100, 0).unwrap();
    let r = t.on_sample(1, &body(0.8, 0.8), 100, 0).unwrap();
    // Endpoint 2 never answered: its blind ceiling is the loosest.
    let s = t.snapshot(0);
    assert_eq!(s.max_in_flight(), Some(r.max_in_flight));
    let all: Vec<u32> = t.ceilings().map(|(c, _)| c).collect();
    assert!(all[0] > all[1] && all[2] > all[0], "{all:?}");
    assert!(expected(0, 0.0, 0.95, PRIOR).contains(&all[2]));
}

#[test]
fn a_restart_in_the_body_starts_a_new_window() {
    let mut t = PressureTracker::new(&cfg());
    let with_start = |d: f64, start: f64| {
        let mut b = body(d, d);
        b.extend_from_slice(format!("process_start_time_seconds {start}\n").as_bytes());
        b
    };
    t.on_sample(0, &with_start(0.5, 1.0), 10, 0).unwrap();
    t.on_sample(0, &with_start(0.1, 2.0), 0, 100).unwrap();
    assert_eq!(t.endpoints[0].estimator.stats().restarts, 1);
    // A body without it is fine.
    t.on_sample(0, &body(0.1, 0.1), 0, 200).unwrap();
}

#[test]
fn polls_are_fast_when_memory_is_high_or_rising_and_slow_when_idle() {
    let mut t = PressureTracker::new(&MemoryConfig {
        poll_interval_ms: 100,
        ..cfg()
    });
    // Nothing yet: fast.
    assert_eq!(t.next_poll_in_ms(0), 100);
    t.on_sample(0, &body(0.2, 0.2), 10, 0).unwrap();
    assert_eq!(t.next_poll_in_ms(0), 1000);
    // Rising by more than 1% of the limit since the last sample.
    t.on_sample(0, &body(0.25, 0.25), 10, 1000).unwrap();
    assert_eq!(t.next_poll_in_ms(1000), 100);
    t.on_sample(0, &body(0.25, 0.25), 10, 1100).unwrap();
    assert_eq!(t.next_poll_in_ms(1100), 1000);
    // Above soft.
    t.on_sample(0, &body(0.75, 0.75), 10, 2000).unwrap();
    t.on_sample(0, &body(0.75, 0.75), 10, 2100).unwrap();
    assert_eq!(t.next_poll_in_ms(2100), 100);
    // A failure: fast.
    t.on_sample(0, &body(0.2, 0.2), 10, 3000).unwrap();
    t.on_sample(0, &body(0.2, 0.2), 10, 3100).unwrap();
    assert_eq!(t.next_poll_in_ms(3100), 1000);
    t.on_failure(0, FailureReason::Timeout, 3200);
    assert_eq!(t.next_poll_in_ms(3200), 100);
    // In flight at half the ceiling.
    let c = t.snapshot(3200).max_in_flight().unwrap();
    t.on_sample(0, &body(0.2, 0.2), c, 4000).unwrap();
    t.on_sample(0, &body(0.2, 0.2), c, 4100).unwrap();
    assert_eq!(t.next_poll_in_ms(4100), 100);
    // Idle never slower than half the sample age.
    let t = PressureTracker::new(&MemoryConfig {
        poll_interval_ms: 500,
        max_sample_age_ms: 800,
        ..cfg()
    });
    assert_eq!(t.idle_poll_ms, 500);
}

// ---- snapshot ----

fn busy_snapshot() -> PressureSnapshot {
    let mut t = PressureTracker::new(&cfg_endpoints(2));
    t.on_sample(1, &body(0.72, 0.97), 0, 1234).unwrap();
    t.snapshot(1500)
}

#[test]
fn snapshot_round_trip() {
    for s in [
        busy_snapshot(),
        PressureSnapshot::idle(99, 3),
        PressureSnapshot::default(),
    ] {
        let bytes = s.encode();
        assert_eq!(bytes.len(), SNAPSHOT_LEN);
        assert_eq!(PressureSnapshot::decode(&bytes), Ok(s));
    }
    let s = busy_snapshot();
    assert!(s.ceiling_in_force());
    assert_eq!(s.worst_endpoint(), Some(1));
    assert_eq!(s.sample_ms(), Some(1234));
    assert_eq!(s.computed_ms(), 1500);
    assert_eq!(&s.encode()[0..4], b"SGMP");
}

#[test]
fn snapshot_garbage_is_rejected() {
    let good = busy_snapshot().encode();
    assert_eq!(PressureSnapshot::decode(&[]), Err(SnapshotError::Missing));
    assert_eq!(
        PressureSnapshot::decode(&good[..95]),
        Err(SnapshotError::Length(95))
    );
    let mut long = good.to_vec();
    long.push(0);
    assert_eq!(
        PressureSnapshot::decode(&long),
        Err(SnapshotError::Length(97))
    );
    // Every single-bit flip is caught (magic, version or checksum), except in
    // the trailing reserved word.
    for i in 0..92 {
        for bit in 0..8 {
            let mut b = good;
            b[i] ^= 1 << bit;
            assert!(PressureSnapshot::decode(&b).is_err(), "byte {i} bit {bit}");
        }
    }
    let mut b = good;
    b[4] = 3;
    assert_eq!(PressureSnapshot::decode(&b), Err(SnapshotError::Version(3)));
    // Out-of-range fields with a valid checksum.
    let mut bad = busy_snapshot();
    bad.p_sheddable = 1.5;
    assert!(matches!(
        PressureSnapshot::decode(&bad.encode()),
        Err(SnapshotError::Invalid(_))
    ));
    let mut bad = PressureSnapshot::idle(0, 1);
    bad.p_sheddable = 0.5;
    assert!(PressureSnapshot::decode(&bad.encode()).is_err());
    let mut bad = busy_snapshot();
    bad.max_in_flight = 3;
    assert!(PressureSnapshot::decode(&bad.encode()).is_err());
    let e = PressureSnapshot::decode(&[1, 2, 3]).unwrap_err();
    assert!(e.to_string().starts_with("memory pressure snapshot"), "{e}");
}

#[test]
fn snapshot_expiry() {
    let s = busy_snapshot(); // computed at 1500
    assert_eq!(s.check_current(6500, 5000), Ok(s));
    assert_eq!(
        s.check_current(6501, 5000),
        Err(SnapshotError::Expired { age_ms: 5001 })
    );
    assert_eq!(s.check_current(0, 5000), Ok(s));
    let future = PressureSnapshot::idle(20_000, 1);
    assert_eq!(
        future.check_current(10_000, 5000),
        Err(SnapshotError::FromTheFuture { ahead_ms: 10_000 })
    );
}

#[test]
fn publish_and_load_through_shared_data() {
    let store = MemStore::new();
    assert_eq!(load(&store, 0, 5000), Err(SnapshotError::Missing));
    let s = busy_snapshot(); // computed at 1500
    assert_eq!(publish(&store, &s, 5000, 4), Ok(true));
    assert_eq!(load(&store, 2000, 5000), Ok(s));
    assert!(matches!(
        load(&store, 10_000, 5000),
        Err(SnapshotError::Expired { .. })
    ));
    // An older snapshot from a late poller does not overwrite a newer one...
    let older = PressureSnapshot::idle(1000, 2);
    assert_eq!(publish(&store, &older, 5000, 4), Ok(false));
    assert_eq!(load(&store, 2000, 5000), Ok(s));
    // ...unless the stored one is too far ahead (the clock stepped back).
    let far = PressureSnapshot::idle(100_000, 2);
    assert_eq!(publish(&store, &far, 5000, 4), Ok(true));
    let after_step = PressureSnapshot::idle(2000, 2);
    assert_eq!(publish(&store, &after_step, 5000, 4), Ok(true));
    assert_eq!(load(&store, 2000, 5000), Ok(after_step));
    // Garbage in the key is overwritten, and reported by load until then.
    store.set(SNAPSHOT_KEY, b"garbage", None).unwrap();
    assert_eq!(load(&store, 2000, 5000), Err(SnapshotError::Length(7)));
    assert_eq!(publish(&store, &s, 5000, 4), Ok(true));
    assert_eq!(load(&store, 2000, 5000), Ok(s));
}

#[test]
fn shed_counters() {
    let mut c = ShedCounters::default();
    let s = busy_snapshot();
    for i in 0..100 {
        let u = f64::from(i) / 100.0;
        if s.decide(S, u).is_some() {
            c.record(S);
        }
        if s.decide(C, u).is_some() {
            c.record(C);
        }
    }
    assert_eq!(c.sheddable, 100);
    assert_eq!(c.critical, 0); // the curve never sheds critical traffic
    assert_eq!(c.total(), 100);
}

#[test]
fn a_limit_alone_turns_memory_shedding_on() {
    let with_limit = MemoryConfig {
        memory_limit_bytes: 64 << 20,
        ..MemoryConfig::default()
    };
    assert!(with_limit.is_on());
    assert!(with_limit.validate("memory").is_ok());
    assert!(!MemoryConfig::default().is_on());
    let off = MemoryConfig {
        enabled: Some(false),
        ..with_limit.clone()
    };
    assert!(!off.is_on());
    let no_limit = MemoryConfig {
        enabled: Some(true),
        ..MemoryConfig::default()
    };
    assert!(no_limit.validate("memory").is_err());
}

// ---- several replicas, each showing its own count (go_goroutines) ----

/// `body(d, d)` with the replica's goroutine count, or without the gauge.
fn replica_body(demand: f64, goroutines: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8(body(demand, demand)).unwrap();
    let line = goroutines.map_or(String::new(), |g| format!("go_goroutines {g}\n"));
    text.replace("go_goroutines 5023\n", &line).into_bytes()
}

const REST_GOROUTINES: u32 = 12;

/// One poll of replica `i` holding `held` of `global` requests in flight: its memory
/// `0.3 x limit` plus that many at the prior cost, its goroutines its rest plus `held`.
fn poll_replica(t: &mut PressureTracker, i: usize, held: u32, global: u32, now: u64) -> Reading {
    let demand = 0.3 + f64::from(held) * PRIOR / LIMIT as f64;
    let g = (REST_GOROUTINES + held).to_string();
    t.on_sample(i, &replica_body(demand, Some(&g)), global, now)
        .unwrap()
}

/// Polls every replica once at rest, then `rounds` times with `global` requests in
/// flight, replica `i` holding `held[i]` of them; returns the published ceiling.
fn replicas_ceiling(t: &mut PressureTracker, held: &[u32], global: u32, rounds: u64) -> u32 {
    let mut now = 0;
    for (i, _) in held.iter().enumerate() {
        poll_replica(t, i, 0, 0, now);
    }
    for _ in 0..rounds {
        now += 100;
        for (i, &n) in held.iter().enumerate() {
            poll_replica(t, i, n, global, now);
        }
    }
    t.snapshot(now).max_in_flight().unwrap()
}

/// Today's ceiling for the same polls: the replicas' counts unknown.
fn ceiling_without_counts(held: &[u32], global: u32) -> u32 {
    let mut t = PressureTracker::new(&cfg_endpoints(held.len()));
    let demand = |k: u32| 0.3 + f64::from(k) * PRIOR / LIMIT as f64;
    for (i, &n) in held.iter().enumerate() {
        t.on_sample(i, &replica_body(0.3, None), 0, 0).unwrap();
        t.on_sample(i, &replica_body(demand(n), None), global, 100)
            .unwrap();
    }
    t.snapshot(100).max_in_flight().unwrap()
}

#[test]
fn replicas_with_even_shares_hold_each_its_own_headroom() {
    let one = ceiling_without_counts(&[100, 100, 100], 300);
    // One replica's headroom above its base, at the prior cost: today's ceiling.
    assert!(expected(0, 0.3, 0.95, PRIOR).contains(&one), "{one}");
    for n in [2u32, 3] {
        let held = vec![300 / n; n as usize];
        let mut t = PressureTracker::new(&cfg_endpoints(n as usize));
        let c = replicas_ceiling(&mut t, &held, 300, 60);
        let want = f64::from(one) * f64::from(n);
        assert!(
            (f64::from(c) - want).abs() < 0.03 * want,
            "{n} replicas: {c} vs {want}"
        );
    }
}

#[test]
fn a_replica_that_gets_every_key_gives_todays_ceiling() {
    let held = [300, 0, 0];
    let today = ceiling_without_counts(&held, 300);
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    let c = replicas_ceiling(&mut t, &held, 300, 60);
    assert!(c.abs_diff(today) <= 2, "{c} vs {today}");
}

#[test]
fn requests_no_replica_shows_count_on_every_replica() {
    // The filter has 300 in flight; the replicas show 60 each: 120 are in transit
    // (or idle connections were reused). Each replica may get them all.
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    let c = replicas_ceiling(&mut t, &[60, 60, 60], 300, 60);
    let share = t.endpoints[0].replica.share;
    assert!((share - 180.0 / 300.0).abs() < 0.01, "{share}");
    let even = replicas_ceiling(
        &mut PressureTracker::new(&cfg_endpoints(3)),
        &[100, 100, 100],
        300,
        60,
    );
    assert!(c < even, "{c} vs {even}");
}

#[test]
fn a_share_that_rises_lowers_the_ceiling_at_once() {
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    let even = replicas_ceiling(&mut t, &[100, 100, 100], 300, 60);
    // Replica 0 now gets most keys: the next poll of it takes the new share whole.
    let r = poll_replica(&mut t, 0, 250, 300, 10_000);
    assert!((r.share - 250.0 / 300.0).abs() < 0.01, "{}", r.share);
    let c = t.snapshot(10_000).max_in_flight().unwrap();
    assert!(c < even / 2, "{c} vs {even}");
    assert_eq!(c, r.max_in_flight);
}

#[test]
fn without_counts_or_with_one_endpoint_the_ceiling_is_todays() {
    // Missing, NaN or negative goroutine counts: the filter's count, share 1.
    for g in [None, Some("NaN"), Some("-5"), Some("+Inf")] {
        let mut plain = PressureTracker::new(&cfg_endpoints(3));
        let mut odd = PressureTracker::new(&cfg_endpoints(3));
        for (now, global, d) in [(0, 0, 0.3), (100, 300, 0.35), (200, 320, 0.36)] {
            for i in 0..3 {
                let a = plain
                    .on_sample(i, &replica_body(d, None), global, now)
                    .unwrap();
                let b = odd.on_sample(i, &replica_body(d, g), global, now).unwrap();
                assert_eq!(a, b, "{g:?}");
                assert_eq!(b.share, 1.0);
            }
        }
        assert_eq!(plain.snapshot(200), odd.snapshot(200), "{g:?}");
    }
    // One endpoint: the count is not used (the single-store path is unchanged).
    let mut plain = PressureTracker::new(&cfg());
    let mut counted = PressureTracker::new(&cfg());
    for (now, global, d, g) in [(0, 0, 0.3, 10), (100, 300, 0.35, 310), (200, 320, 0.36, 40)] {
        let a = plain
            .on_sample(0, &replica_body(d, None), global, now)
            .unwrap();
        let b = counted
            .on_sample(0, &replica_body(d, Some(&g.to_string())), global, now)
            .unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn a_replica_that_stops_showing_its_count_starts_over_conservatively() {
    let mut t = PressureTracker::new(&cfg_endpoints(3));
    let even = replicas_ceiling(&mut t, &[100, 100, 100], 300, 60);
    let d = 0.3 + 100.0 * PRIOR / LIMIT as f64;
    let r = t.on_sample(1, &replica_body(d, None), 300, 10_000).unwrap();
    assert_eq!(r.share, 1.0);
    assert!(!t.endpoints[1].by_replica);
    let c = t.snapshot(10_000).max_in_flight().unwrap();
    assert!(c < even / 2, "{c} vs {even}");
    // Its requests are now unaccounted: the others' shares rise at their next poll.
    let r = poll_replica(&mut t, 0, 100, 300, 10_100);
    assert!(r.share > 0.6, "{}", r.share);
}

#[test]
fn a_replica_restart_forgets_its_count_at_rest() {
    let mut t = PressureTracker::new(&cfg_endpoints(2));
    let with = |g: u32, start: f64| {
        let mut b = replica_body(0.3, Some(&g.to_string()));
        b.extend_from_slice(format!("process_start_time_seconds {start}\n").as_bytes());
        b
    };
    t.on_sample(0, &with(10, 1.0), 0, 0).unwrap();
    t.on_sample(0, &with(60, 1.0), 100, 100).unwrap();
    assert_eq!(t.endpoints[0].replica.held(), Some(50));
    // Restarted with more goroutines at rest (a new runtime): held from the new rest.
    t.on_sample(0, &with(40, 2.0), 100, 200).unwrap();
    assert_eq!(t.endpoints[0].replica.held(), Some(0));
    t.on_sample(0, &with(45, 2.0), 100, 300).unwrap();
    assert_eq!(t.endpoints[0].replica.held(), Some(5));
}
