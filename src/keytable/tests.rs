use super::slot::{decode_meta, decode_slot};
use super::*;
use crate::rng::splitmix64;
use crate::shared::MemStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

pub(crate) fn table(capacity: u32, shard_slots: u32) -> KeyTable {
    KeyTable::with_layout(Layout::new(capacity, shard_slots), 1)
}

/// Puts `fp` with `state` until `expires_at` through a CAS write.
fn put(t: &mut KeyTable, s: &MemStore, fp: u64, state: SlotState, expires_at: u64, now: u64) {
    let (shard, bucket) = t.layout().locate(fp);
    let c = t.modify(s, shard, 4, now, |v, _| {
        v.bucket(bucket).put(fp, state, expires_at);
        (true, ())
    });
    assert_eq!(c, Commit::Written(()));
}

fn live(t: &KeyTable, s: &MemStore, fp: u64, now: u64) -> Option<SlotState> {
    t.probe(s, fp, now).slot.map(|slot| slot.state)
}

fn bucket_fps(t: &KeyTable, s: &MemStore, shard: u32, bucket: u32) -> Vec<u64> {
    let (bytes, _) = s.get(&t.layout().shard_key(shard)).unwrap();
    let range = t.layout().bucket_range(bucket);
    bytes[range.start + BUCKET_HEADER_BYTES..range.end]
        .chunks_exact(SLOT_BYTES)
        .map(decode_slot)
        .filter(|s| s.state != SlotState::Empty)
        .map(|s| s.fp)
        .collect()
}

#[test]
fn default_layout_numbers_quoted_in_the_docs() {
    let l = Layout::from_config(&KeyTableConfig::default());
    assert_eq!((l.shards, l.buckets, l.ways), (1024, 16, 4));
    assert_eq!(l.slots(), 65_536);
    assert_eq!(l.bucket_bytes(), 68);
    assert_eq!(l.shard_bytes(), 1_096);
    assert_eq!(l.total_bytes(), 1_122_304);
    assert_eq!(&*l.shard_key(0), "sg.kt.v1.65536.64.0");
    assert_eq!(&*l.shard_key(1023), "sg.kt.v1.65536.64.1023");
    // A different size never shares a key with this one.
    assert_ne!(Layout::new(131_072, 64).shard_key(0), l.shard_key(0));
    assert_ne!(Layout::new(65_536, 32).shard_key(0), l.shard_key(0));
}

#[test]
fn shard_keys_fit_whatever_the_numbers() {
    for n in [
        0,
        1,
        9,
        10,
        99,
        100,
        4096,
        65_536,
        16_777_216,
        u32::MAX - 1,
        u32::MAX,
    ] {
        let l = Layout {
            capacity: n,
            shard_slots: u32::MAX - n,
            ..Layout::new(4, 4)
        };
        let expected = format!("{KEY_PREFIX}.{n}.{}.{}", u32::MAX - n, n / 3);
        assert_eq!(l.shard_key(n / 3).as_str(), expected);
    }
}

#[test]
fn a_shard_is_valid_exactly_when_every_meta_decodes() {
    let l = Layout::new(4, 4);
    let mut shard = vec![0u8; l.shard_bytes()];
    shard[..SHARD_HEADER_BYTES].copy_from_slice(&l.header());
    assert!(l.is_valid_shard(&shard));
    for way in 0..4 {
        for top in 0..=u16::MAX {
            let meta = u64::from(top) << 48 | 12_345;
            let mut bytes = shard.clone();
            let at = SHARD_HEADER_BYTES + BUCKET_HEADER_BYTES + way * SLOT_BYTES + 8;
            bytes[at..at + 8].copy_from_slice(&meta.to_le_bytes());
            assert_eq!(
                l.is_valid_shard(&bytes),
                decode_meta(meta).is_some(),
                "way {way}, {top:#x}"
            );
        }
    }
}

#[test]
fn odd_sizes_give_whole_buckets_and_never_panic() {
    let l = Layout::new(4, 4);
    assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (1, 1, 4, 4));
    let l = Layout::new(4, 1);
    assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (4, 1, 1, 4));
    let l = Layout::new(100, 6);
    assert_eq!((l.shards, l.buckets, l.ways, l.slots()), (16, 1, 4, 64));
    let l = Layout::new(100, 64);
    assert_eq!((l.shards, l.slots()), (1, 64));
    for (c, s) in [(0, 0), (u32::MAX, u32::MAX), (1, u32::MAX), (u32::MAX, 1)] {
        let l = Layout::new(c, s);
        assert!(l.slots() >= 1 && l.slots() <= 16_777_216, "{l:?}");
        assert!(l.shard_bytes() <= SHARD_HEADER_BYTES + 1024 * 68);
        let (shard, bucket) = l.locate(u64::MAX);
        assert!(shard < l.shards && bucket < l.buckets);
    }
}

#[test]
fn locate_spreads_over_every_shard_and_bucket() {
    let l = Layout::new(4096, 64);
    let mut seen = vec![0u32; (l.shards * l.buckets) as usize];
    for i in 0..100_000u64 {
        let (shard, bucket) = l.locate(splitmix64(i));
        seen[(shard * l.buckets + bucket) as usize] += 1;
    }
    let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
    assert!(*min > 50 && *max < 160, "min {min} max {max}");
}

#[test]
fn absent_shard_reads_as_nothing_with_no_generation() {
    let (t, s) = (table(16, 4), MemStore::new());
    let p = t.probe(&s, 42, 0);
    assert_eq!(p.slot, None);
    assert_eq!(p.generation, Generation(None));
}

#[test]
fn entries_live_until_their_expiry() {
    let (mut t, s) = (table(16, 4), MemStore::new());
    put(&mut t, &s, 42, SlotState::Missing, 100, 0);
    assert_eq!(live(&t, &s, 42, 0), Some(SlotState::Missing));
    assert_eq!(live(&t, &s, 42, 99), Some(SlotState::Missing));
    assert_eq!(live(&t, &s, 42, 100), None);
    assert_eq!(live(&t, &s, 43, 0), None);
    assert_eq!(t.stats().created, 1);
    assert!(t.probe(&s, 42, 0).generation.get().is_some());
}

#[test]
fn expiry_is_clamped_to_48_bits() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    put(&mut t, &s, 1, SlotState::Exists, u64::MAX, 0);
    let slot = t.probe(&s, 1, 0).slot.unwrap();
    assert_eq!(slot.expires_at, MAX_EXPIRY_MS);
    assert!(s
        .get(&t.layout().shard_key(0))
        .is_some_and(|(b, _)| t.layout().is_valid_shard(&b)));
}

#[test]
fn full_bucket_evicts_the_least_recently_inserted() {
    // capacity 4 = one bucket of 4 ways: every key collides.
    let (mut t, s) = (table(4, 4), MemStore::new());
    for fp in 1..=4 {
        put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
    }
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![4, 3, 2, 1]);
    assert_eq!(t.stats().evictions, 0);
    put(&mut t, &s, 5, SlotState::Missing, 1000, 1);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![5, 4, 3, 2]);
    assert_eq!(t.stats().evictions, 1);
    assert_eq!(live(&t, &s, 1, 1), None);
    // Re-inserting a key moves it to the front: no eviction.
    put(&mut t, &s, 2, SlotState::Exists, 1000, 2);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![2, 5, 4, 3]);
    assert_eq!(t.stats().evictions, 1);
    put(&mut t, &s, 6, SlotState::Missing, 1000, 3);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![6, 2, 5, 4]);
}

#[test]
fn expired_entries_go_first_and_do_not_count_as_evictions() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    put(&mut t, &s, 1, SlotState::Missing, 1000, 0);
    put(&mut t, &s, 2, SlotState::Missing, 50, 0); // expires early
    put(&mut t, &s, 3, SlotState::Missing, 1000, 0);
    put(&mut t, &s, 4, SlotState::Missing, 1000, 0);
    put(&mut t, &s, 5, SlotState::Missing, 1000, 60);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![5, 4, 3, 1]);
    assert_eq!(t.stats().evictions, 0);
    assert_eq!(live(&t, &s, 1, 60), Some(SlotState::Missing));
}

#[test]
fn removed_slots_are_reused_before_evicting() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    for fp in 1..=4 {
        put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
    }
    let c = t.modify(&s, 0, 4, 0, |v, _| (true, v.bucket(0).remove(3)));
    assert_eq!(c, Commit::Written(true));
    put(&mut t, &s, 9, SlotState::Missing, 1000, 0);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![9, 4, 2, 1]);
    assert_eq!(t.stats().evictions, 0);
}

#[test]
fn identical_fingerprints_share_one_entry() {
    // A full 64-bit collision is one key as far as the table can tell.
    let (mut t, s) = (table(4, 4), MemStore::new());
    put(&mut t, &s, 7, SlotState::Missing, 1000, 0);
    put(&mut t, &s, 7, SlotState::Exists, 1000, 0);
    assert_eq!(bucket_fps(&t, &s, 0, 0), vec![7]);
    assert_eq!(live(&t, &s, 7, 0), Some(SlotState::Exists));
}

#[test]
fn generations_wrap_and_survive_eviction() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    t.create_all_with(&s, |_, _| u32::MAX).unwrap();
    assert_eq!(t.probe(&s, 1, 0).generation, Generation(Some(u32::MAX)));
    let c = t.modify(&s, 0, 4, 0, |v, _| (true, v.bucket(0).bump_generation()));
    assert_eq!(c, Commit::Written(0));
    for fp in 10..20 {
        put(&mut t, &s, fp, SlotState::Missing, 1000, 0);
    }
    // Ten inserts evicted everything; the generation is untouched.
    assert_eq!(t.probe(&s, 1, 0).generation, Generation(Some(0)));
    assert_eq!(t.stats().evictions, 6);
}

#[test]
fn garbage_shards_read_as_empty_and_are_rebuilt_through_cas() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    let key = t.layout().shard_key(0);
    let mut bad = vec![0u8; t.layout().shard_bytes()];
    bad[..SHARD_HEADER_BYTES].copy_from_slice(&t.layout().header());
    bad[SHARD_HEADER_BYTES + BUCKET_HEADER_BYTES + 15] = 7; // state 7
    for garbage in [b"\x00".to_vec(), vec![0xff; 4096], bad] {
        s.set(&key, &garbage, None).unwrap();
        assert_eq!(
            t.probe(&s, 1, 0),
            Probe {
                slot: None,
                generation: Generation(None)
            }
        );
        assert_eq!(t.scan_shard(&s, 0, 0).garbage_shards, 1);
        let c = t.modify(&s, 0, 4, 0, |v, origin| {
            v.bucket(0).put(1, SlotState::Missing, 10);
            (true, origin)
        });
        assert_eq!(c, Commit::Written(Origin::Garbage));
        assert_eq!(live(&t, &s, 1, 0), Some(SlotState::Missing));
    }
    assert_eq!(t.stats().rebuilt, 3);
}

#[test]
fn an_existing_but_empty_shard_is_reclaimed() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    let key = t.layout().shard_key(0);
    s.set(&key, b"x", None).unwrap();
    s.set(&key, b"", None).unwrap(); // exists, reads as absent: no CAS token
    assert_eq!(t.probe(&s, 1, 0).generation, Generation(None));
    put(&mut t, &s, 1, SlotState::Missing, 10, 0);
    assert_eq!(live(&t, &s, 1, 0), Some(SlotState::Missing));
    assert_eq!(t.stats().rebuilt, 1);
}

#[test]
fn create_if_absent_never_overwrites() {
    let s = MemStore::new();
    assert_eq!(create_if_absent(&s, "k", b"first"), Ok(true));
    assert_eq!(create_if_absent(&s, "k", b"second"), Ok(false));
    assert_eq!(s.get("k").unwrap().0, b"first");
}

#[test]
fn create_all_allocates_once_and_keeps_existing_shards() {
    let (mut t, s) = (table(64, 8), MemStore::new());
    put(&mut t, &s, 5, SlotState::Missing, 1000, 0);
    assert_eq!(t.create_all(&s), Ok(7));
    assert_eq!(t.create_all(&s), Ok(0));
    assert_eq!(live(&t, &s, 5, 0), Some(SlotState::Missing));
    let occ = OccupancyScan::new().step(&t, &s, 0, 100).unwrap();
    assert_eq!(occ.shards, 8);
    assert_eq!(occ.slots, 64);
    assert_eq!(occ.absent_shards, 0);
    assert_eq!(occ.missing, 1);
}

#[test]
fn occupancy_scan_spreads_over_steps() {
    let (mut t, s) = (table(64, 8), MemStore::new());
    for fp in 0..40u64 {
        let fp = splitmix64(fp);
        let state = if fp % 2 == 0 {
            SlotState::Missing
        } else {
            SlotState::Exists
        };
        put(&mut t, &s, fp, state, 1000, 0);
    }
    let mut scan = OccupancyScan::new();
    assert_eq!(scan.step(&t, &s, 0, 3), None);
    assert_eq!(scan.step(&t, &s, 0, 3), None);
    let occ = scan.step(&t, &s, 0, 3).unwrap();
    assert_eq!(occ.shards, 8);
    assert_eq!(occ.live() + t.stats().evictions, 40);
    assert!(occ.ratio() > 0.3 && occ.ratio() <= 1.0);
    // Everything expires.
    let occ = scan.step(&t, &s, 1000, 100).unwrap();
    assert_eq!(occ.live(), 0);
}

#[test]
fn contention_is_bounded_and_reported() {
    let (mut t, s) = (table(4, 4), MemStore::new());
    put(&mut t, &s, 1, SlotState::Missing, 1000, 0);
    s.set_interference(|_| true);
    let c = t.modify(&s, 0, 3, 0, |v, _| {
        v.bucket(0).put(2, SlotState::Missing, 1000);
        (true, ())
    });
    assert_eq!(c, Commit::Contended);
    assert_eq!(t.stats().contended, 1);
    s.clear_interference();
    assert_eq!(live(&t, &s, 2, 0), None);
}

#[test]
fn overwrite_clears_missing_and_jumps_every_generation() {
    let (mut t, s) = (table(32, 16), MemStore::new());
    t.create_all_with(&s, |_, b| 1000 + b).unwrap();
    let fps: Vec<u64> = (0..40).map(splitmix64).collect();
    for (i, &fp) in fps.iter().enumerate() {
        let state = if i % 2 == 0 {
            SlotState::Missing
        } else {
            SlotState::Exists
        };
        put(&mut t, &s, fp, state, 1000, 0);
    }
    // The generation of every bucket that holds one of `fps`.
    let generations = |t: &KeyTable| -> Vec<Option<u32>> {
        (0..2)
            .flat_map(|sh| (0..4).map(move |b| (sh, b)))
            .map(|(sh, b)| {
                let probe_fp = fps
                    .iter()
                    .copied()
                    .find(|&fp| t.layout().locate(fp) == (sh, b));
                probe_fp.and_then(|fp| t.probe(&s, fp, 0).generation.get())
            })
            .collect()
    };
    let before = generations(&t);
    let out = t.overwrite(&s, 0, 0, |v| {
        // A change that tries to sneak a Missing in: it is cleared anyway.
        v.bucket(0).put(12345, SlotState::Missing, 1000);
        v.bucket(1).put(777, SlotState::Exists, 1000);
        7
    });
    assert_eq!(out, Ok(7));
    assert_eq!(t.stats().fallbacks, 1);
    let occ = t.scan_shard(&s, 0, 0);
    assert_eq!(occ.missing, 0);
    assert!(occ.exists > 0);
    let after = generations(&t);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (Some(b), Some(a)) = (b, a) else { continue };
        let d = a.wrapping_sub(*b);
        if i < 4 {
            assert!(
                (1 << 24..=u32::MAX - (1 << 24)).contains(&d),
                "bucket {i}: {d}"
            );
        } else {
            assert_eq!(d, 0, "shard 1 untouched");
        }
    }
}

#[test]
fn rng_jumps_stay_far_from_zero() {
    let mut r = Rng::new(0);
    for _ in 0..100_000 {
        let j = jump(&mut r);
        assert!((1 << 24..=u32::MAX - (1 << 24)).contains(&j));
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn with_valid_header(layout: Layout, mut tail: Vec<u8>) -> Vec<u8> {
        let mut bytes = layout.header().to_vec();
        tail.resize(layout.shard_bytes() - SHARD_HEADER_BYTES, 0);
        bytes.extend(tail);
        bytes
    }

    proptest! {
        /// Whatever bytes a shard holds, nothing panics, a read sees either a valid
        /// shard or nothing, and every write leaves a valid shard.
        #[test]
        fn garbage_never_panics_and_writes_repair(
            raw in proptest::collection::vec(any::<u8>(), 0..400),
            keep_header in any::<bool>(),
            fp in any::<u64>(),
            now in any::<u64>(),
        ) {
            let mut t = table(32, 16);
            let s = MemStore::new();
            let layout = t.layout();
            let bytes = if keep_header { with_valid_header(layout, raw) } else { raw };
            let (shard, bucket) = layout.locate(fp);
            let key = layout.shard_key(shard);
            s.set(&key, &bytes, None).unwrap();
            let p = t.probe(&s, fp, now);
            prop_assert_eq!(p.generation.get().is_some(), layout.is_valid_shard(&bytes));
            let _ = t.scan_shard(&s, shard, now);
            let c = t.modify(&s, shard, 2, now, |v, _| {
                v.bucket(bucket).put(fp, SlotState::Missing, now.saturating_add(5));
                (true, ())
            });
            prop_assert_eq!(c, Commit::Written(()));
            prop_assert!(layout.is_valid_shard(&s.get(&key).unwrap().0));
            s.set(&key, &bytes, None).unwrap();
            prop_assert!(t.overwrite(&s, shard, now, |v| v.bucket(bucket).remove(fp)).is_ok());
            prop_assert!(layout.is_valid_shard(&s.get(&key).unwrap().0));
        }

        /// A bucket behaves like a 4-entry insertion-ordered list: the model and the
        /// table agree on what is live after any sequence of puts and removes.
        #[test]
        fn bucket_matches_a_fifo_model(
            ops in proptest::collection::vec((0u64..8, 0u8..3, 1u64..50, 0u64..5), 1..80)
        ) {
            let (mut t, s) = (table(4, 4), MemStore::new());
            let mut model: Vec<(u64, SlotState, u64)> = Vec::new(); // front = newest
            let mut now = 0u64;
            for (fp, op, ttl, dt) in ops {
                now += dt;
                let state = match op {
                    0 => SlotState::Missing,
                    1 => SlotState::Exists,
                    _ => SlotState::Empty,
                };
                if state == SlotState::Empty {
                    let _ = t.modify(&s, 0, 1, now, |v, _| (true, v.bucket(0).remove(fp)));
                    model.retain(|e| e.0 != fp);
                } else {
                    put(&mut t, &s, fp, state, now + ttl, now);
                    if let Some(i) = model.iter().position(|e| e.0 == fp) {
                        model.remove(i);
                    } else if model.len() == 4 {
                        let victim = model.iter().rposition(|e| e.2 <= now).unwrap_or(3);
                        model.remove(victim);
                    }
                    model.insert(0, (fp, state, now + ttl));
                }
                for probe in 0..8u64 {
                    let expect = model.iter().find(|e| e.0 == probe && e.2 > now).map(|e| e.1);
                    prop_assert_eq!(live(&t, &s, probe, now), expect, "fp {}", probe);
                }
            }
        }
    }
}
