use super::*;
use crate::limiter::config::{AdaptiveConfig, ConcurrencyConfig, LimitMode};
use crate::shared::MemStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn cfg(limit: u32, min: u32, max: u32) -> ConcurrencyConfig {
    ConcurrencyConfig {
        limit,
        min_limit: min,
        max_limit: max,
        ..ConcurrencyConfig::default()
    }
}

/// `n` samples spread ±20% around `median_ms`.
fn spread(median_ms: f64, n: u32) -> RttHistogram {
    let mut h = RttHistogram::new();
    for i in 0..n {
        let spread = 0.8 + 0.4 * f64::from(i) / f64::from(n.max(2) - 1);
        h.record(median_ms * spread);
    }
    h
}

/// Windows with `h` as reads, no writes.
fn reads(h: RttHistogram) -> Windows {
    [h, RttHistogram::new()]
}

/// A window of `n` reads spread ±20% around `median_ms`.
fn window(median_ms: f64, n: u32) -> Windows {
    reads(spread(median_ms, n))
}

/// What a window shows when `offered` requests want to be in flight: the limit holds
/// the peak, and turns the rest away.
fn usage(ctl: &Controller, st: &GradientState, offered: u32) -> Usage {
    let limit = ctl.limit_of(st);
    Usage {
        peak_in_flight: offered.min(limit),
        denied: offered.saturating_sub(limit),
    }
}

/// A peak of `n` in flight, nobody turned away.
fn peak(n: u32) -> Usage {
    Usage {
        peak_in_flight: n,
        denied: 0,
    }
}

/// Runs one interval: the window's samples, with `offered` requests wanting to be in flight.
fn run(ctl: &Controller, st: &mut GradientState, t: &mut u64, rtt: f64, offered: u32) -> Step {
    let u = usage(ctl, st, offered);
    st.merge(&window(rtt, 200), u);
    *t += ctl.interval_ms();
    ctl.step(st, *t)
}

#[test]
fn histogram_percentiles_are_close() {
    let mut h = RttHistogram::new();
    for i in 1..=1000 {
        h.record(f64::from(i) * 0.1); // 0.1 .. 100 ms, uniform
    }
    let p50 = h.percentile(0.5).unwrap();
    let p10 = h.percentile(0.1).unwrap();
    assert!((p50 / 50.0 - 1.0).abs() < 0.13, "{p50}");
    assert!((p10 / 10.0 - 1.0).abs() < 0.13, "{p10}");
    assert!(h.percentile(1.0).unwrap() >= 90.0);
    assert_eq!(RttHistogram::new().percentile(0.5), None);
}

#[test]
fn nan_inf_negative_and_zero_rtts_are_safe() {
    let mut h = RttHistogram::new();
    assert!(!h.record(f64::NAN));
    assert!(!h.record(f64::INFINITY));
    assert!(!h.record(f64::NEG_INFINITY));
    assert!(!h.record(-1.0));
    assert!(h.is_empty());
    assert!(h.record(0.0));
    assert!(h.record(1e300));
    assert!(h.record(f64::MIN_POSITIVE));
    assert_eq!(h.total(), 3);
    let p = h.percentile(0.5).unwrap();
    assert!(p.is_finite() && p > 0.0);
    assert!(h.percentile(f64::NAN).unwrap().is_finite());

    // A controller fed only zero RTTs keeps a finite limit within bounds.
    let ctl = Controller::new(&cfg(100, 10, 1000));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..50 {
        let mut zeros = RttHistogram::new();
        for _ in 0..100 {
            zeros.record(0.0);
        }
        st.merge(&reads(zeros), peak(100));
        t += 1000;
        ctl.step(&mut st, t);
        assert!(st.limit.is_finite() && (10.0..=1000.0).contains(&st.limit));
    }
}

#[test]
fn histogram_saturates_instead_of_overflowing() {
    let mut a = RttHistogram::new();
    a.counts[5] = u32::MAX - 1;
    a.recount();
    a.record(RttHistogram::lower_edge(5) * 1.01);
    a.record(RttHistogram::lower_edge(5) * 1.01);
    assert_eq!(a.counts[5], u32::MAX);
    let b = a.clone();
    a.merge(&b);
    assert_eq!(a.counts[5], u32::MAX);
}

#[test]
fn state_roundtrips_and_garbage_decodes_as_none() {
    let ctl = Controller::new(&cfg(100, 10, 1000));
    let mut st = ctl.initial_state();
    let mut t = 0;
    run(&ctl, &mut st, &mut t, 5.0, 80);
    let seen = Usage {
        peak_in_flight: 12,
        denied: 3,
    };
    st.merge(&window(7.0, 30), seen);
    let bytes = st.encode();
    assert_eq!(bytes.len(), STATE_LEN);
    let back = GradientState::decode(&bytes).unwrap();
    assert_eq!(back.limit, st.limit);
    assert_eq!(back.encode(), bytes, "NaNs and all");
    assert_eq!(back.usage, seen);
    assert_eq!(GradientState::decode(&bytes[..bytes.len() - 1]), None);
    assert_eq!(GradientState::decode(b"garbage"), None);
    let mut wrong_magic = bytes.clone();
    wrong_magic[0] = b'X';
    assert_eq!(GradientState::decode(&wrong_magic), None);
    // NaN limit and out-of-range ring position are repaired, not trusted.
    let mut nan = bytes.clone();
    nan[4..12].copy_from_slice(&f64::NAN.to_le_bytes());
    // Lane 0 starts at byte 52: baseline, sample, then its ring position.
    nan[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
    let repaired = GradientState::decode(&nan).unwrap();
    assert_eq!(repaired.lanes[0].ring_pos, 0);
    assert_eq!(ctl.limit_of(&repaired), 100);
    let mut st2 = repaired;
    run(&ctl, &mut st2, &mut t, 5.0, 80);
    assert!(st2.limit.is_finite());
}

#[test]
fn steady_latency_never_cuts_the_limit_below_offered_concurrency() {
    // Offered concurrency 150 with a wide but stable latency spread.
    let ctl = Controller::new(&cfg(200, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for i in 0..500 {
        // Wide spread: fast 404s and slow reads, p90/p10 ≈ 10.
        let mut h = RttHistogram::new();
        for j in 0..200 {
            h.record(if j % 3 == 0 { 20.0 } else { 2.0 } * (1.0 + f64::from(j % 7) / 10.0));
        }
        let u = usage(&ctl, &st, 150);
        st.merge(&reads(h), u);
        t += 1000;
        ctl.step(&mut st, t);
        assert!(ctl.limit_of(&st) >= 150, "window {i}: limit {}", st.limit);
    }
    // It settled at about twice the offered concurrency, not at max_limit.
    assert!(ctl.limit_of(&st) <= 400, "{}", st.limit);
}

#[test]
fn idle_limit_does_not_drift_up() {
    let ctl = Controller::new(&cfg(100, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..200 {
        run(&ctl, &mut st, &mut t, 3.0, 10);
    }
    assert_eq!(ctl.limit_of(&st), 100);
}

/// A limit cut by an overload (10x latency, twice the limit offered) after a calm start
/// at 3 ms with 20 in flight; returns the controller, the state and the clock.
fn cut_by_an_overload() -> (Controller, GradientState, u64) {
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..10 {
        run(&ctl, &mut st, &mut t, 3.0, 20);
    }
    for _ in 0..20 {
        let offered = 2 * ctl.limit_of(&st);
        run(&ctl, &mut st, &mut t, 30.0, offered);
    }
    (ctl, st, t)
}

#[test]
fn after_an_overload_a_limit_that_only_meets_bursts_returns_to_the_configured_one() {
    let (ctl, mut st, mut t) = cut_by_an_overload();
    let cut = ctl.limit_of(&st);
    assert!(cut < 60, "{cut}");
    // The calm load after a surge: latency a little above the baseline (g ≈ 1.4), and
    // bursts that reach the limit: 3 of a window's ~200 requests are turned away.
    let calm = 4.2;
    let mut calm_state = st.clone();
    let mut back = Vec::new();
    for _ in 0..7 {
        let burst = ctl.limit_of(&calm_state) + 3;
        run(&ctl, &mut calm_state, &mut t, calm, burst);
        back.push(ctl.limit_of(&calm_state));
    }
    assert!(
        back[0] >= cut + 40,
        "the first calm window: {cut} -> {back:?}"
    );
    assert!(back[6] >= 200, "7 windows after: {back:?}");
    assert!(back.iter().all(|&l| l <= 256), "{back:?}");
    // The same latency while the limit turns away demand (twice the limit offered):
    // it grows by the gradient only.
    let mut busy = Vec::new();
    for _ in 0..7 {
        let offered = 2 * ctl.limit_of(&st);
        run(&ctl, &mut st, &mut t, calm, offered);
        busy.push(ctl.limit_of(&st));
    }
    assert!(busy.windows(2).all(|w| w[0] <= w[1]), "{busy:?}");
    assert!(busy[0] <= cut + cut / 4, "from {cut}: {busy:?}");
    assert!(busy[2] < back[2] / 2, "busy {busy:?}, calm {back:?}");
}

#[test]
fn the_end_of_an_overload_is_acted_on_half_an_interval_in() {
    let (ctl, st, t) = cut_by_an_overload();
    let cut = ctl.limit_of(&st);
    let half = t + ctl.interval_ms() / 2;
    let early = |rtt: f64, offered: u32| {
        let mut s = st.clone();
        let u = usage(&ctl, &s, offered);
        s.merge(&window(rtt, 200), u);
        let before = (ctl.step(&mut s.clone(), half - 1), ctl.step(&mut s, half));
        (before, ctl.limit_of(&s))
    };
    // Calm: latency near the baseline, a burst or two turned away.
    let ((too_soon, step), limit) = early(4.2, cut + 3);
    assert_eq!((too_soon, step), (Step::NotDue, Step::Updated));
    assert!(limit >= cut + 40, "{cut} -> {limit}");
    // Still overloaded: the step waits for the whole interval.
    assert_eq!(early(30.0, cut + 3).0 .1, Step::NotDue, "latency inflated");
    assert_eq!(early(4.2, 2 * cut).0 .1, Step::NotDue, "demand turned away");
    // At the configured limit there is nothing to recover: steady state keeps its pace.
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..5 {
        run(&ctl, &mut st, &mut t, 3.0, 20);
    }
    st.merge(&window(3.0, 200), peak(20));
    assert_eq!(ctl.step(&mut st, t + ctl.interval_ms() / 2), Step::NotDue);
}

#[test]
fn a_window_turns_demand_away_only_past_the_burst_share() {
    let u = |denied| Usage {
        peak_in_flight: 30,
        denied,
    };
    assert!(!u(0).turns_away(1000));
    assert!(!u(50).turns_away(950), "5% is a burst");
    assert!(u(51).turns_away(950));
    assert!(u(1).turns_away(0), "all turned away");
    assert!(u(u32::MAX).turns_away(0));
    assert!(!u(u32::MAX).turns_away(u64::MAX), "no overflow");
}

#[test]
fn a_limit_an_overload_cut_returns_to_the_configured_one_once_unused() {
    let (ctl, mut st, mut t) = cut_by_an_overload();
    let cut = ctl.limit_of(&st);
    assert!(cut < 100, "{cut}");
    // Over: latency back at the baseline, 20 in flight (less than half the limit).
    let mut back = Vec::new();
    for _ in 0..20 {
        run(&ctl, &mut st, &mut t, 3.0, 20);
        back.push(ctl.limit_of(&st));
    }
    assert!(back.windows(2).all(|w| w[0] <= w[1]), "{back:?}");
    assert!(back[6] >= 200, "7 windows after: {back:?}");
    assert!(
        back.iter().all(|&l| l <= 256),
        "never past the configured limit: {back:?}"
    );
}

#[test]
fn latency_step_5x_cuts_the_limit_then_it_recovers() {
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    // Offered concurrency follows Little's law: 50 requests/ms-ish of load.
    let offered = |rtt: f64| (40.0 * rtt) as u32;
    for _ in 0..30 {
        run(&ctl, &mut st, &mut t, 4.0, offered(4.0));
    }
    let before = ctl.limit_of(&st);
    assert!(before >= 160, "{before}");
    let mut low = before;
    for _ in 0..30 {
        run(&ctl, &mut st, &mut t, 20.0, offered(20.0));
        low = low.min(ctl.limit_of(&st));
    }
    assert!(low <= before / 4, "limit only fell to {low} from {before}");
    assert!(low >= 16);
    // The baseline was not dragged up by 30 windows of overload.
    assert!(st.baseline_ms < 5.0, "{}", st.baseline_ms);
    let mut recovered_at = None;
    for i in 0..60 {
        run(&ctl, &mut st, &mut t, 4.0, offered(4.0));
        if recovered_at.is_none() && ctl.limit_of(&st) >= offered(4.0) {
            recovered_at = Some(i);
        }
    }
    let at = recovered_at.expect("limit recovered");
    assert!(at <= 30, "recovery took {at} windows");
}

#[test]
fn permanent_latency_increase_is_eventually_accepted() {
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..20 {
        run(&ctl, &mut st, &mut t, 4.0, 100);
    }
    for _ in 0..400 {
        let peak = ctl.limit_of(&st);
        run(&ctl, &mut st, &mut t, 20.0, peak);
    }
    assert!(st.baseline_ms > 15.0, "{}", st.baseline_ms);
    assert!(ctl.limit_of(&st) >= 256, "{}", st.limit);
}

#[test]
fn bounds_hold_under_any_latency_sequence() {
    let ctl = Controller::new(&cfg(50, 20, 80));
    let mut st = ctl.initial_state();
    let mut t = 0;
    let rtts = [1.0, 100.0, 0.0, 1e9, 3.0, 0.01, 50.0];
    for i in 0..300 {
        run(&ctl, &mut st, &mut t, rtts[i % rtts.len()], 1000);
        let l = ctl.limit_of(&st);
        assert!((20..=80).contains(&l), "{l}");
    }
}

#[test]
fn pinned_min_rtt_is_used_and_fixed_mode_holds_the_limit() {
    let mut c = cfg(100, 10, 1000);
    c.adaptive = AdaptiveConfig {
        pinned_min_rtt_ms: Some(2.0),
        ..AdaptiveConfig::default()
    };
    let ctl = Controller::new(&c);
    let mut st = ctl.initial_state();
    let mut t = 0;
    for _ in 0..10 {
        run(&ctl, &mut st, &mut t, 10.0, 100);
    }
    assert_eq!(st.baseline_ms, 2.0);
    assert!(ctl.limit_of(&st) < 100);

    c.mode = LimitMode::Fixed;
    let fixed = Controller::new(&c);
    let mut st = fixed.initial_state();
    for _ in 0..10 {
        run(&fixed, &mut st, &mut t, 10.0, 100);
    }
    assert_eq!(fixed.limit_of(&st), 100);
    assert!(st.sample_ms > 8.0, "fixed mode still measures");
}

#[test]
fn sparse_windows_accumulate_until_enough_samples() {
    let ctl = Controller::new(&cfg(100, 10, 1000));
    let mut st = ctl.initial_state();
    let i = ctl.interval_ms();
    st.merge(&window(5.0, 10), peak(90));
    assert_eq!(ctl.step(&mut st, 2 * i), Step::TooFewSamples);
    assert_eq!(ctl.step(&mut st, 2 * i + i / 2), Step::NotDue);
    st.merge(&window(5.0, 10), peak(90));
    assert_eq!(ctl.step(&mut st, 3 * i), Step::Updated);
    assert!(st.lanes[0].window.is_empty());
    // A clock that jumps backwards makes a step due instead of stalling.
    st.merge(&window(5.0, 30), peak(90));
    assert_eq!(ctl.step(&mut st, 10), Step::Updated);
}

#[test]
fn sync_merges_workers_and_only_the_leader_steps() {
    let store = MemStore::new();
    let ctl = Controller::new(&cfg(100, 10, 1000));
    let w = window(5.0, 15);
    let p = sync(&store, 8, &ctl, &w, peak(60), false, 1000).unwrap();
    assert_eq!(p.limit, 100);
    assert!(!p.stepped);
    let busy = Usage {
        peak_in_flight: 70,
        denied: 4,
    };
    let p = sync(&store, 8, &ctl, &w, busy, false, 1000).unwrap();
    assert!(!p.stepped);
    let (bytes, _) = store.get(GRADIENT_KEY).unwrap();
    let st = GradientState::decode(&bytes).unwrap();
    assert_eq!(st.pending_samples(), 30);
    assert_eq!(
        st.usage,
        Usage {
            peak_in_flight: 70,
            denied: 4
        },
        "peaks merge as a maximum, denials add up"
    );
    // A reader with nothing to merge does not write.
    let writes = store.writes();
    sync(
        &store,
        8,
        &ctl,
        &Windows::default(),
        Usage::default(),
        false,
        1500,
    )
    .unwrap();
    assert_eq!(store.writes(), writes);
    // The leader steps once per interval, whoever else also claims to lead.
    let empty = Windows::default();
    assert!(
        sync(&store, 8, &ctl, &empty, Usage::default(), true, 2000)
            .unwrap()
            .stepped
    );
    assert!(
        !sync(&store, 8, &ctl, &empty, Usage::default(), true, 2000)
            .unwrap()
            .stepped
    );
    let st = GradientState::decode(&store.get(GRADIENT_KEY).unwrap().0).unwrap();
    assert_eq!(st.pending_samples(), 0);
    assert!((st.sample_ms / 5.0 - 1.0).abs() < 0.15);
}

#[test]
fn sync_overwrites_garbage_and_reports_contention() {
    let store = MemStore::new();
    let ctl = Controller::new(&cfg(100, 10, 1000));
    store
        .set(GRADIENT_KEY, b"\x01\x02old version", None)
        .unwrap();
    let p = sync(
        &store,
        4,
        &ctl,
        &Windows::default(),
        Usage::default(),
        false,
        0,
    )
    .unwrap();
    assert_eq!(p.limit, 100);
    assert!(GradientState::decode(&store.get(GRADIENT_KEY).unwrap().0).is_some());
    store.set_interference(|_| true);
    let r = sync(&store, 4, &ctl, &window(3.0, 5), peak(1), false, 0);
    assert_eq!(r, Err(UpdateError::Contended));
}

/// Runs `windows` intervals of reads at `read_ms` and writes at `write_ms` (0 =
/// none of that kind) with the limit fully used; returns the final limit.
fn lanes(
    ctl: &Controller,
    st: &mut GradientState,
    t: &mut u64,
    n: u32,
    read_ms: f64,
    write_ms: f64,
) -> u32 {
    for _ in 0..n {
        let w = [
            if read_ms > 0.0 {
                spread(read_ms, 200)
            } else {
                RttHistogram::new()
            },
            if write_ms > 0.0 {
                spread(write_ms, 50)
            } else {
                RttHistogram::new()
            },
        ];
        let u = usage(ctl, st, ctl.limit_of(st));
        st.merge(&w, u);
        *t += ctl.interval_ms();
        ctl.step(st, *t);
    }
    ctl.limit_of(st)
}

#[test]
fn fast_writes_do_not_set_the_bar_for_slow_reads() {
    // Kask in front of a store whose reads take ~1 s and writes ~0.3 ms: a prefill
    // of writes comes first, then reads join at their own, stable latency.
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    lanes(&ctl, &mut st, &mut t, 20, 0.0, 0.3);
    let limit = lanes(&ctl, &mut st, &mut t, 60, 950.0, 0.3);
    assert!(limit >= 256, "stable slow reads cut the limit to {limit}");
    // Both lanes learned their own baseline.
    assert!(st.lanes[0].baseline_ms > 500.0 && st.lanes[1].baseline_ms < 1.0);
}

#[test]
fn a_queue_inflates_every_lane_and_the_limit_falls() {
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    let before = lanes(&ctl, &mut st, &mut t, 20, 5.0, 1.0);
    // A queue in front of the store adds 20 ms to everything.
    let after = lanes(&ctl, &mut st, &mut t, 10, 25.0, 21.0);
    assert!(after < before / 2, "{before} -> {after}");
}

#[test]
fn one_slow_lane_is_enough_to_shrink() {
    // Writes inflate 10x (a write path in trouble); reads are fine. The lane
    // with the lowest gradient decides.
    let ctl = Controller::new(&cfg(256, 16, 2048));
    let mut st = ctl.initial_state();
    let mut t = 0;
    let before = lanes(&ctl, &mut st, &mut t, 20, 5.0, 1.0);
    let after = lanes(&ctl, &mut st, &mut t, 10, 5.0, 10.0);
    assert!(after < before, "{before} -> {after}");
}
