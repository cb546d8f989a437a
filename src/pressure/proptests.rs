use super::snapshot::{MAGIC, SUMMED, VERSION};

use crate::ceiling::MIN_CEILING;
use crate::classify::Criticality;

use super::*;
use crate::wire::fnv1a;
use proptest::prelude::*;

fn cfg() -> MemoryConfig {
    MemoryConfig {
        enabled: Some(true),
        memory_limit_bytes: 400 << 20,
        endpoints: vec![MetricsEndpoint::default(); 2],
        ..MemoryConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_never_panics_and_accepted_snapshots_are_sane(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        u in 0.0f64..1.0,
    ) {
        if let Ok(s) = PressureSnapshot::decode(&bytes) {
            prop_assert!(s.max_in_flight().is_none_or(|c| c >= MIN_CEILING));
            let _ = s.decide(Criticality::Sheddable, u);
        }
    }

    #[test]
    fn garbage_with_a_valid_frame_never_panics(
        mut body in proptest::array::uniform32(any::<u64>()),
    ) {
        let mut b = [0u8; SNAPSHOT_LEN];
        for (i, w) in body.iter_mut().enumerate().take(SNAPSHOT_LEN / 8) {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        let sum = fnv1a(&b[..SUMMED]);
        b[SUMMED..SUMMED + 4].copy_from_slice(&sum.to_le_bytes());
        if let Ok(s) = PressureSnapshot::decode(&b) {
            prop_assert!((0.0..=1.0).contains(&s.shed_probability(Criticality::Critical)));
            prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
        }
    }

    #[test]
    fn tracker_never_panics(
        steps in proptest::collection::vec(
            (0usize..4, proptest::collection::vec(any::<u8>(), 0..256), any::<u64>(), any::<bool>()),
            0..32,
        )
    ) {
        let mut t = PressureTracker::new(&cfg());
        for (idx, bytes, now, fail) in steps {
            if fail {
                t.on_failure(idx, FailureReason::Timeout, now);
            } else {
                let _ = t.on_sample(idx, &bytes, 0, now);
            }
            let s = t.snapshot(now);
            prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
            let _ = t.take_transitions(now);
            let _ = t.stats(now);
        }
    }

    #[test]
    fn snapshot_is_always_decodable(
        values in proptest::collection::vec((0.0f64..3.0, 0.0f64..3.0), 1..10),
    ) {
        let mut t = PressureTracker::new(&cfg());
        for (i, (d, rss)) in values.into_iter().enumerate() {
            let limit = (400u64 << 20) as f64;
            let body = format!(
                "process_resident_memory_bytes {}\ngo_memstats_heap_inuse_bytes {}\ngo_memstats_stack_inuse_bytes 0\n",
                rss * limit, d * limit
            );
            let now = i as u64 * 1000;
            t.on_sample(i % 2, body.as_bytes(), 0, now).unwrap();
            let s = t.snapshot(now);
            prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
            prop_assert!(s.shed_probability(Criticality::Critical) <= s.shed_probability(Criticality::Sheddable));
        }
    }
}
