//! Set-associative table vs an ideal LRU of the same capacity, on a Zipf workload.

use super::*;
use crate::keytable::Layout;
use crate::rng::Rng;
use crate::shared::MemStore;
use std::collections::BTreeMap;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// Zipf(s) over ranks 0..n, by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let weights: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// Probability mass of the `k` most popular keys.
    fn head_mass(&self, k: usize) -> f64 {
        self.cdf[k.min(self.cdf.len()) - 1]
    }
}

/// Fully associative LRU.
struct Lru {
    capacity: usize,
    clock: u64,
    stamp: Vec<u64>, // 0 = not cached
    order: BTreeMap<u64, usize>,
}

impl Lru {
    fn new(capacity: usize, keys: usize) -> Self {
        Self {
            capacity,
            clock: 0,
            stamp: vec![0; keys],
            order: BTreeMap::new(),
        }
    }

    fn access(&mut self, key: usize) -> bool {
        let hit = self.stamp[key] != 0;
        if hit {
            self.order.remove(&self.stamp[key]);
        } else if self.order.len() == self.capacity {
            if let Some((_, victim)) = self.order.pop_first() {
                self.stamp[victim] = 0;
            }
        }
        self.clock += 1;
        self.stamp[key] = self.clock;
        self.order.insert(self.clock, key);
        hit
    }
}

/// The same sets as the table, with LRU instead of FIFO inside each set: what
/// refreshing an entry on every hit (one more shared-data write per hit) would buy.
struct SetLru {
    layout: Layout,
    sets: Vec<Vec<u64>>, // front = most recent
}

impl SetLru {
    fn new(layout: Layout) -> Self {
        let sets = (layout.shards * layout.buckets) as usize;
        Self {
            layout,
            sets: vec![Vec::new(); sets],
        }
    }

    fn access(&mut self, fp: u64) -> bool {
        let (shard, bucket) = self.layout.locate(fp);
        let set = &mut self.sets[(shard * self.layout.buckets + bucket) as usize];
        let hit = match set.iter().position(|&f| f == fp) {
            Some(i) => {
                set.remove(i);
                true
            }
            None => false,
        };
        set.insert(0, fp);
        set.truncate(self.layout.ways as usize);
        hit
    }
}

struct Rates {
    table: f64,
    lru: f64,
    set_lru: f64,
    head: f64,
}

fn measure(capacity: u32, shard_slots: u32, warmup: u64, requests: u64, s: f64) -> Rates {
    let layout = Layout::new(capacity, shard_slots);
    let keys = 10 * layout.slots() as usize;
    let zipf = Zipf::new(keys, s);
    let store = MemStore::new();
    let mut cache = NegCache::with_table(
        KeyTable::with_layout(layout, 3),
        Fingerprinter::new(0x2545),
        86_400_000,
        600_000,
        4,
    );
    cache.table_mut().create_all(&store).unwrap();
    // Rank r is the key "k<r>" (a permutation of popularity over the hash space).
    let fps: Vec<u64> = (0..keys)
        .map(|r| cache.fingerprint(format!("enwiki:MWSession:k{r}").as_bytes()))
        .collect();
    let mut lru = Lru::new(layout.slots() as usize, keys);
    let mut set_lru = SetLru::new(layout);
    let mut rng = Rng::new(0x21f0_aaad);
    let (mut hits, mut lru_hits, mut set_lru_hits) = (0u64, 0u64, 0u64);
    for i in 0..warmup + requests {
        let key = zipf.sample(&mut rng);
        let fp = fps[key];
        let l = cache.lookup(&store, fp, 1);
        let hit = l.mark == Mark::Missing;
        if !hit {
            assert_eq!(
                cache.insert_missing(&store, fp, l.generation, 1),
                Fill::Inserted
            );
        }
        let lru_hit = lru.access(key);
        let set_lru_hit = set_lru.access(fp);
        if i >= warmup {
            hits += u64::from(hit);
            lru_hits += u64::from(lru_hit);
            set_lru_hits += u64::from(set_lru_hit);
        }
    }
    let n = requests as f64;
    Rates {
        table: hits as f64 / n,
        lru: lru_hits as f64 / n,
        set_lru: set_lru_hits as f64 / n,
        head: zipf.head_mass(layout.slots() as usize),
    }
}

fn report(capacity: u32, shard_slots: u32, warmup: u64, requests: u64) -> Rates {
    let r = measure(capacity, shard_slots, warmup, requests, 1.0);
    println!(
        "hit rate, Zipf s=1.0, {} keys, capacity {capacity} ({} ways), {requests} \
         requests after {warmup} warm-up: sessionguard table (set-assoc FIFO) {:.1}% | \
         ideal LRU {:.1}% | set-assoc LRU {:.1}% | top-{capacity} mass {:.1}% | \
         table/LRU {:.3}",
        10 * capacity,
        Layout::new(capacity, shard_slots).ways,
        100.0 * r.table,
        100.0 * r.lru,
        100.0 * r.set_lru,
        100.0 * r.head,
        r.table / r.lru
    );
    r
}

#[test]
fn set_associative_table_vs_ideal_lru_on_zipf() {
    let r = report(4096, 64, 50_000, 150_000);
    assert!(r.lru > 0.5 && r.lru < r.head + 0.01, "LRU model sane");
    assert!(r.table >= 0.85 * r.lru, "table far below LRU");
    assert!(r.set_lru >= r.table - 0.01);
}

/// The default size: `cargo test --release --lib -- --ignored hit_rate_default --nocapture`
#[test]
#[ignore = "long: default 65,536-slot table, run in release"]
fn hit_rate_default_size() {
    let r = report(65_536, 64, 1_000_000, 2_000_000);
    assert!(r.table >= 0.85 * r.lru);
}
