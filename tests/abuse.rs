//! Abuse of the key table, in the pure core: what a flood of distinct keys can do to the
//! hot working set, and what a crafted key can do to the hash.
//!
//! # The eviction bound
//!
//! The table has B buckets of `ways` = 4 slots (B = capacity / 4). An insert goes to the
//! front of its bucket and pushes the others back; lookups never reorder (FIFO). So an
//! entry inserted (or re-inserted after a miss) is evicted exactly when `ways` newer
//! distinct keys have been inserted into *its* bucket. With k flood keys spread
//! uniformly by the seeded hash (the attacker cannot aim: see below), a freshly inserted
//! hot entry survives k flood inserts with probability
//!
//! ```text
//! P(survive) = P(Binomial(k, 1/B) < ways)          ~ P(Poisson(k/B) < 4)
//! ```
//!
//! e.g. k = B (a flood as large as a quarter of the capacity): 98.1% survive; k = 2B:
//! 85.7%; it takes k ~ 3.7·B (~ 0.92 × capacity) distinct keys to evict half of them.
//! A hot key that was evicted costs one store request (its next lookup misses) and is
//! back at the front, where it pushes its bucket's other entries back. In a bucket that
//! holds h hot keys (h < ways), every (ways - h) flood inserts evict one hot key and the
//! re-inserts cascade through the h of them: h store requests. So each flood request
//! costs the store at most `sum_b h_b / (ways - h_b) / B` extra requests: 0.22 for a hot
//! set of 1/8 of the capacity, 0.6 at 1/4, and more than 1 past 1/2 (FIFO buckets do
//! not protect a hot set that nearly fills the table). Size `key_table.capacity` at
//! 8x the hot working set or more.
//!
//! `flood_evicts_the_hot_set_as_the_bound_predicts` measures this on the real
//! `NegCache` over `MemStore`; `flood_costs_at_most_the_stated_re_misses` measures the
//! amplification with hot keys refreshed as they would be by live traffic.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;

use sessionguard::fingerprint::Fingerprinter;
use sessionguard::keytable::{KeyTable, Layout};
use sessionguard::negcache::{Fill, Mark, NegCache};
use sessionguard::shared::MemStore;

const CAPACITY: u32 = 4096;
const SHARD_SLOTS: u32 = 64;
const WAYS: u64 = 4;
const TTL_MS: u64 = 1 << 40; // nothing expires during these tests

/// A cache over `store` with every shard created, as the host does at start.
fn cache(seed: u64, store: &MemStore) -> (NegCache, Layout) {
    let layout = Layout::new(CAPACITY, SHARD_SLOTS);
    let table = KeyTable::with_layout(layout, 7);
    let mut c = NegCache::with_table(table, Fingerprinter::new(seed), TTL_MS, TTL_MS, 4);
    assert!(c.table_mut().create_all(store).is_ok());
    (c, layout)
}

fn insert(c: &mut NegCache, store: &MemStore, fp: u64) {
    let l = c.lookup(store, fp, 1);
    assert_eq!(c.insert_missing(store, fp, l.generation, 1), Fill::Inserted);
}

fn cached(c: &mut NegCache, store: &MemStore, fp: u64) -> bool {
    c.lookup(store, fp, 1).mark == Mark::Missing
}

/// P(Binomial(n, p) < m).
fn binom_cdf_below(n: u64, p: f64, m: u64) -> f64 {
    let mut term = (1.0 - p).powf(n as f64); // P(X = 0)
    let mut sum = 0.0;
    for i in 0..m.min(n + 1) {
        sum += term;
        term *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p);
    }
    sum
}

fn bucket_of(layout: &Layout, fp: u64) -> u64 {
    let (shard, bucket) = layout.locate(fp);
    u64::from(shard) * u64::from(layout.buckets) + u64::from(bucket)
}

#[test]
fn flood_evicts_the_hot_set_as_the_bound_predicts() {
    let store = MemStore::new();
    let (mut c, layout) = cache(0x5eed, &store);
    let b = u64::from(layout.shards) * u64::from(layout.buckets);
    assert_eq!((b, u64::from(layout.ways)), (1024, WAYS));
    // 1024 hot keys (a quarter of the table), inserted first, in order.
    let hot: Vec<u64> = (0..1024)
        .map(|i| c.fingerprint(format!("hot:{i}").as_bytes()))
        .collect();
    let mut later_hot_in_bucket = vec![0u64; hot.len()];
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, &fp) in hot.iter().enumerate() {
        insert(&mut c, &store, fp);
        let bucket = seen.entry(bucket_of(&layout, fp)).or_default();
        for &earlier in bucket.iter() {
            later_hot_in_bucket[earlier] += 1;
        }
        bucket.push(i);
    }
    let mut flooded = 0u64;
    println!("flood keys k, k/B, measured survival, bound P(Bin(k,1/B) < 4 - later hot)");
    for k in [256u64, 512, 1024, 2048, 3072, 4096, 8192] {
        while flooded < k {
            let fp = c.fingerprint(format!("flood:{flooded}").as_bytes());
            insert(&mut c, &store, fp);
            flooded += 1;
        }
        let survived = hot.iter().filter(|&&fp| cached(&mut c, &store, fp)).count();
        let measured = survived as f64 / hot.len() as f64;
        let expected = later_hot_in_bucket
            .iter()
            .map(|&y| binom_cdf_below(k, 1.0 / b as f64, WAYS.saturating_sub(y)))
            .sum::<f64>()
            / hot.len() as f64;
        println!(
            "{k:>6} {:>5.2} {measured:.3} {expected:.3}",
            k as f64 / b as f64
        );
        // Statistical agreement (1024 entries, sd <= 0.016, buckets correlate a little).
        assert!(
            (measured - expected).abs() < 0.06,
            "k = {k}: measured {measured:.3}, bound {expected:.3}"
        );
    }
    // The headline numbers in the module docs.
    assert!((binom_cdf_below(1024, 1.0 / 1024.0, 4) - 0.981).abs() < 0.001);
    assert!((binom_cdf_below(2048, 1.0 / 1024.0, 4) - 0.857).abs() < 0.001);
    let half = (1..8192)
        .find(|&k| binom_cdf_below(k, 1.0 / 1024.0, 4) < 0.5)
        .unwrap();
    assert!((3700..3800).contains(&half), "{half}");
}

#[test]
fn flood_costs_at_most_the_stated_re_misses() {
    // Live traffic looks every hot key up between flood inserts; a miss goes to the
    // store and re-inserts it, at the front of its bucket, which pushes the bucket's
    // other hot keys back: in a bucket holding h hot keys, every (ways - h) flood
    // inserts evict one hot key, whose re-insert evicts the next, h re-misses in all.
    // So a flood key landing in bucket b costs h_b / (ways - h_b) store requests, and
    // the flood as a whole (1/B of it per bucket) sum_b h_b / (ways - h_b) / B per key.
    let store = MemStore::new();
    let (mut c, layout) = cache(0xabcdef, &store);
    let b = u64::from(layout.shards) * u64::from(layout.buckets);
    // A hot set that fits: 512 keys (1/8 of the slots), at most 3 per bucket.
    let mut per_bucket: HashMap<u64, u64> = HashMap::new();
    let hot: Vec<u64> = (0u64..)
        .map(|i| c.fingerprint(format!("session:{i}").as_bytes()))
        .filter(|&fp| {
            let n = per_bucket.entry(bucket_of(&layout, fp)).or_default();
            *n += 1;
            *n < WAYS
        })
        .take(512)
        .collect();
    let mut h_of: HashMap<u64, u64> = HashMap::new();
    for &fp in &hot {
        insert(&mut c, &store, fp);
        *h_of.entry(bucket_of(&layout, fp)).or_default() += 1;
    }
    let bound: f64 = h_of
        .values()
        .map(|&h| h as f64 / (WAYS - h) as f64)
        .sum::<f64>()
        / b as f64;
    let flood = 16_384u64;
    let rounds = 128;
    let mut re_misses = 0u64;
    for round in 0..rounds {
        for i in 0..flood / rounds {
            let fp = c.fingerprint(format!("flood:{round}:{i}").as_bytes());
            insert(&mut c, &store, fp);
        }
        for &fp in &hot {
            if !cached(&mut c, &store, fp) {
                re_misses += 1;
                insert(&mut c, &store, fp);
            }
        }
    }
    let per_flood_request = re_misses as f64 / flood as f64;
    println!(
        "{flood} flood keys, {} hot keys, {b} buckets: {re_misses} hot re-misses \
         ({per_flood_request:.3} per flood request; bound sum h/(4-h)/B = {bound:.3})",
        hot.len()
    );
    assert!(
        per_flood_request <= bound * 1.15,
        "{per_flood_request} > {bound}"
    );
    assert!(
        per_flood_request >= bound * 0.5,
        "the model is off: {per_flood_request}"
    );
}

// ---------------------------------------------------------------------------------
// The seeded hash
// ---------------------------------------------------------------------------------

fn mw_key(i: u64) -> Vec<u8> {
    format!("enwiki:MWSession:{i:032}").into_bytes()
}

#[test]
fn the_same_key_hashes_differently_under_another_seed() {
    let a = Fingerprinter::new(1);
    let b = Fingerprinter::new(2);
    let layout = Layout::new(65_536, 64);
    let mut same_bucket = 0;
    for i in 0..20_000 {
        let key = mw_key(i);
        assert_ne!(a.fingerprint(&key), b.fingerprint(&key), "{i}");
        same_bucket +=
            usize::from(layout.locate(a.fingerprint(&key)) == layout.locate(b.fingerprint(&key)));
    }
    // 16,384 buckets: about 1.2 keys of 20,000 share their bucket by chance.
    assert!(same_bucket <= 8, "{same_bucket}");
}

#[test]
fn keys_crafted_to_collide_under_one_seed_spread_under_another() {
    // The attacker's best case: it somehow learned seed A and brute-forced 300 keys
    // that all land in bucket 0 of shard 0. The deployment's seed is B.
    let layout = Layout::new(CAPACITY, SHARD_SLOTS);
    let buckets = u64::from(layout.shards) * u64::from(layout.buckets);
    let known = Fingerprinter::new(0xa11ce);
    let real = Fingerprinter::new(0xb0b);
    let crafted: Vec<Vec<u8>> = (0u64..)
        .map(mw_key)
        .filter(|k| bucket_of(&layout, known.fingerprint(k)) == 0)
        .take(300)
        .collect();
    let mut load = vec![0u32; buckets as usize];
    for k in &crafted {
        assert_eq!(bucket_of(&layout, known.fingerprint(k)), 0);
        load[bucket_of(&layout, real.fingerprint(k)) as usize] += 1;
    }
    let max = *load.iter().max().unwrap();
    // 300 keys into 1024 buckets (mean 0.29): a load of 5 has probability < 1e-4 per
    // bucket; under seed A all 300 were in one bucket.
    assert!(max <= 4, "max bucket load {max} under the real seed");
    // And under the real seed, the table's own replacement keeps them to `ways` each.
    let store = MemStore::new();
    let (mut c, _) = cache(0xb0b, &store);
    for k in &crafted {
        let fp = c.fingerprint(k);
        insert(&mut c, &store, fp);
    }
    let cached_now = crafted
        .iter()
        .filter(|k| {
            let fp = c.fingerprint(k);
            cached(&mut c, &store, fp)
        })
        .count();
    assert!(cached_now >= 290, "{cached_now} of 300 still cached");
}

#[test]
fn structured_keys_collide_only_at_chance() {
    // Sequential session ids, one-bit differences and long shared prefixes: no full
    // 64-bit collision among 200,000 (chance ~1e-9), bucket loads as for random keys.
    let f = Fingerprinter::new(0x5e55_1015);
    let layout = Layout::new(65_536, 64);
    let buckets = u64::from(layout.shards) * u64::from(layout.buckets);
    let mut fps = Vec::with_capacity(200_000);
    let mut load = vec![0u32; buckets as usize];
    for i in 0..200_000u64 {
        let key = match i % 4 {
            0 => mw_key(i),
            1 => {
                let mut k = vec![b'a'; 64];
                k[(i / 4 % 64) as usize] ^= 1 << (i / 256 % 8);
                k.extend_from_slice(&(i / 2048).to_le_bytes());
                k
            }
            2 => format!("global:session:centralauth:{:x}", i * 0x1_0001).into_bytes(),
            _ => {
                let mut k = vec![b'x'; 4000];
                k.extend_from_slice(i.to_string().as_bytes());
                k
            }
        };
        let fp = f.fingerprint(&key);
        fps.push(fp);
        load[bucket_of(&layout, fp) as usize] += 1;
    }
    let n = fps.len();
    fps.sort_unstable();
    fps.dedup();
    assert_eq!(fps.len(), n, "a 64-bit fingerprint collision");
    // Chi-square of the bucket loads against uniform: mean 12.2 per bucket.
    let mean = n as f64 / buckets as f64;
    let chi2: f64 = load
        .iter()
        .map(|&o| (f64::from(o) - mean).powi(2) / mean)
        .sum();
    let dof = buckets as f64 - 1.0;
    let z = (chi2 - dof) / (2.0 * dof).sqrt();
    println!("chi-square {chi2:.0} for {dof} dof (z = {z:.2})");
    assert!(z.abs() < 5.0, "bucket loads are not uniform: z = {z:.2}");
}
