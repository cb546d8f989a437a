use super::*;
use crate::keytable::{Layout, ANCHOR_KEY};
use crate::shared::{MemStore, SetError};
use std::cell::{Cell, RefCell};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const TTL: u64 = 1_000;
const KNOWN: u64 = 5_000;

fn cache(capacity: u32, shard_slots: u32, attempts: u32, rng: u64) -> NegCache {
    NegCache::with_table(
        KeyTable::with_layout(Layout::new(capacity, shard_slots), rng),
        Fingerprinter::new(1),
        TTL,
        KNOWN,
        attempts,
    )
}

/// A GET that starts now: its lookup, kept until the response.
fn get_start(c: &mut NegCache, s: &MemStore, fp: u64, now: u64) -> Lookup {
    c.lookup(s, fp, now)
}

#[test]
fn a_404_is_cached_until_its_ttl() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    c.table_mut().create_all(&s).unwrap();
    let fp = c.fingerprint(b"enwiki:MWSession:x");
    let l = get_start(&mut c, &s, fp, 0);
    assert_eq!(l.mark, Mark::Unknown);
    assert_eq!(c.insert_missing(&s, fp, l.generation, 5), Fill::Inserted);
    let hit = c.lookup(&s, fp, 6);
    assert_eq!((hit.mark, hit.expires_at), (Mark::Missing, 5 + TTL));
    assert_eq!(c.lookup(&s, fp, 5 + TTL).mark, Mark::Unknown);
    let st = c.stats();
    assert_eq!((st.lookups, st.hits, st.misses, st.inserts), (3, 1, 2, 1));
    assert_eq!(st.table.created, 4, "create_all made every shard");
}

#[test]
fn default_config_builds_the_documented_table() {
    let c = NegCache::new(
        &NegativeCacheConfig::default(),
        &KeyTableConfig::default(),
        16,
        1,
        2,
    );
    assert_eq!(c.table().layout().slots(), 65_536);
    assert_eq!(c.table().layout().total_bytes(), 1_122_304);
}

const REUSE: u64 = 100;

/// A key marked Exists at `now` by a 200, through `c`.
fn known(c: &mut NegCache, s: &MemStore, key: &[u8], now: u64) -> u64 {
    let fp = c.fingerprint(key);
    let seen = c.lookup(s, fp, now);
    assert!(c.mark_exists(s, fp, &seen, now));
    fp
}

#[test]
fn a_known_key_read_again_within_the_reuse_window_costs_no_host_read() {
    let s = MemStore::new();
    let mut c = cache(64, 16, 4, 1).with_local_reuse(REUSE);
    let fp = known(&mut c, &s, b"k", 1_000);
    let first = c.lookup(&s, fp, 1_000);
    assert_eq!(first.mark, Mark::Exists);
    let reads = s.reads();
    assert_eq!(c.lookup(&s, fp, 1_000 + REUSE - 1), first);
    assert_eq!(s.reads(), reads, "reused, not read");
    assert_eq!(c.lookup(&s, fp, 1_000 + REUSE).mark, Mark::Exists);
    assert_eq!(s.reads(), reads + 1, "the window ended: read again");
    let st = c.stats();
    assert_eq!((st.known, st.reused), (3, 1));
}

#[test]
fn the_default_configuration_reuses_for_100_ms() {
    let s = MemStore::new();
    let mut c = NegCache::new(
        &NegativeCacheConfig::default(),
        &KeyTableConfig::default(),
        16,
        1,
        2,
    );
    let fp = known(&mut c, &s, b"k", 0);
    c.lookup(&s, fp, 0);
    let reads = s.reads();
    c.lookup(&s, fp, 99);
    assert_eq!(s.reads(), reads);
    c.lookup(&s, fp, 100);
    assert_eq!(s.reads(), reads + 1);
}

#[test]
fn this_workers_own_writes_end_the_reuse_at_once() {
    let s = MemStore::new();
    let mut c = cache(64, 16, 4, 1).with_local_reuse(REUSE);
    // A logout through this worker: the next lookup sees the cached 404.
    let fp = known(&mut c, &s, b"logout", 0);
    assert_eq!(c.lookup(&s, fp, 1).mark, Mark::Exists);
    let ticket = c.begin_write(&s, fp, 2);
    assert_eq!(c.end_delete(&s, fp, ticket, true, 3), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp, 4).mark, Mark::Missing);
    // A 404 from the store to a read of a known key, cached by this worker.
    let fp = known(&mut c, &s, b"expired", 0);
    let seen = c.lookup(&s, fp, 1);
    assert_eq!(c.insert_missing(&s, fp, seen.generation, 2), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp, 3).mark, Mark::Missing);
}

/// A store and two workers' caches on it, both reusing their reads.
fn two_reusing_workers() -> (MemStore, NegCache, NegCache) {
    let reusing = |rng| cache(64, 16, 4, rng).with_local_reuse(REUSE);
    (MemStore::new(), reusing(1), reusing(2))
}

#[test]
fn another_workers_delete_is_seen_once_the_reuse_window_has_passed() {
    let (s, mut a, mut b) = two_reusing_workers();
    let fp = known(&mut a, &s, b"k", 0);
    assert_eq!(a.lookup(&s, fp, 10).mark, Mark::Exists);
    let ticket = b.begin_write(&s, fp, 20);
    assert_eq!(b.end_delete(&s, fp, ticket, true, 21), Fill::Inserted);
    // Within its window `a` still says Exists: the read is forwarded, never
    // answered at the proxy, and its reused generation cannot fill the cache.
    let lagging = a.lookup(&s, fp, 10 + REUSE - 1);
    assert_eq!(lagging.mark, Mark::Exists);
    assert_eq!(
        a.insert_missing(&s, fp, lagging.generation, 10 + REUSE - 1),
        Fill::Stale
    );
    assert_eq!(a.lookup(&s, fp, 10 + REUSE).mark, Mark::Missing);
}

#[test]
fn a_reused_read_cannot_fill_the_cache_after_a_write_to_its_bucket() {
    let (s, mut a, mut b) = two_reusing_workers();
    let fp = known(&mut a, &s, b"k", 0);
    a.lookup(&s, fp, 1);
    // Another worker writes the key (a re-login) after `a`'s read.
    let _ = b.begin_write(&s, fp, 2);
    b.end_write(&s, fp, true, 3);
    let reads = s.reads();
    let reused = a.lookup(&s, fp, 4);
    assert_eq!(s.reads(), reads, "reused, not read");
    assert_eq!(
        a.insert_missing(&s, fp, reused.generation, 5),
        Fill::Stale,
        "the write bumped the generation the reused read carries"
    );
}

#[test]
fn missing_and_unknown_reads_are_never_reused() {
    let s = MemStore::new();
    let mut c = cache(64, 16, 4, 1).with_local_reuse(REUSE);
    c.table_mut().create_all(&s).unwrap();
    let fp = c.fingerprint(b"gone");
    let seen = c.lookup(&s, fp, 0);
    assert_eq!(seen.mark, Mark::Unknown);
    assert_eq!(c.insert_missing(&s, fp, seen.generation, 1), Fill::Inserted);
    let reads = s.reads();
    assert_eq!(c.lookup(&s, fp, 2).mark, Mark::Missing);
    assert_eq!(c.lookup(&s, fp, 3).mark, Mark::Missing);
    assert_eq!(s.reads(), reads + 2);
    assert_eq!(c.stats().reused, 0);
}

#[test]
fn a_get_that_started_before_an_acknowledged_post_cannot_cache_its_404() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    let get = get_start(&mut c, &s, fp, 0);
    c.begin_write(&s, fp, 1);
    assert_eq!(c.end_write(&s, fp, true, 2), Invalidation::Committed);
    // The GET's 404 (read before the POST reached the store) arrives late.
    assert_eq!(c.insert_missing(&s, fp, get.generation, 3), Fill::Stale);
    assert_eq!(c.lookup(&s, fp, 4).mark, Mark::Exists);
    assert_eq!(c.stats().stale_fills, 1);
}

#[test]
fn a_404_arriving_while_the_post_is_in_flight_is_refused_too() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    let get = get_start(&mut c, &s, fp, 0);
    c.begin_write(&s, fp, 1);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 2), Fill::Stale);
}

#[test]
fn a_get_that_started_during_the_post_may_cache_until_the_post_ends() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    c.begin_write(&s, fp, 0);
    let get = get_start(&mut c, &s, fp, 1);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 2), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp, 3).mark, Mark::Missing); // not acknowledged yet
    c.end_write(&s, fp, true, 4);
    assert_eq!(c.lookup(&s, fp, 5).mark, Mark::Exists);
}

#[test]
fn a_get_that_started_after_the_post_caches_normally() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    c.begin_write(&s, fp, 0);
    c.end_write(&s, fp, false, 1);
    let get = get_start(&mut c, &s, fp, 2);
    assert_eq!(get.mark, Mark::Unknown);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 3), Fill::Inserted);
}

#[test]
fn eviction_between_begin_and_fill_does_not_reset_the_generation() {
    // capacity 4: one bucket, so every key collides with every other.
    let (mut c, s) = (cache(4, 4, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"victim");
    let get = get_start(&mut c, &s, fp, 0);
    c.begin_write(&s, fp, 1);
    c.end_write(&s, fp, true, 2);
    assert_eq!(c.lookup(&s, fp, 2).mark, Mark::Exists);
    // Other keys' reads (200s: marks without a generation change) evict the
    // victim's slot (and everything else) twice over.
    for i in 0..8 {
        let other = c.fingerprint(format!("other{i}").as_bytes());
        let l = c.lookup(&s, other, 3);
        assert!(c.mark_exists(&s, other, &l, 3));
    }
    assert_eq!(c.lookup(&s, fp, 3).mark, Mark::Unknown, "slot evicted");
    assert!(c.stats().table.evictions >= 4);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 4), Fill::Stale);
    assert_eq!(c.lookup(&s, fp, 5).mark, Mark::Unknown);
}

#[test]
fn a_flood_of_missing_keys_does_not_evict_live_sessions() {
    // A small table (64 slots in 4-way buckets) and 4,000 distinct missing keys.
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let sessions: Vec<u64> = (0..8)
        .map(|i| c.fingerprint(format!("enwiki:MWSession:live{i}").as_bytes()))
        .collect();
    for &fp in &sessions {
        let l = c.lookup(&s, fp, 0);
        assert!(c.mark_exists(&s, fp, &l, 0));
    }
    let mut inserted = 0;
    for i in 0..4_000u64 {
        let fp = c.fingerprint(format!("reader{i}").as_bytes());
        let l = c.lookup(&s, fp, 1 + i / 1000);
        if c.insert_missing(&s, fp, l.generation, 1 + i / 1000) == Fill::Inserted {
            inserted += 1;
        }
    }
    // The flood was cached (it displaced itself) and every session is still
    // known to exist, so its next read is critical.
    assert!(inserted > 3_900, "{inserted} of 4000 cached");
    for &fp in &sessions {
        assert_eq!(c.lookup(&s, fp, 10).mark, Mark::Exists);
    }
    // A bucket full of live sessions refuses a 404 rather than forget one.
    let (mut c, s) = (cache(4, 4, 4, 1), MemStore::new());
    for i in 0..4 {
        let fp = c.fingerprint(format!("live{i}").as_bytes());
        let l = c.lookup(&s, fp, 0);
        assert!(c.mark_exists(&s, fp, &l, 0));
    }
    let reader = c.fingerprint(b"reader");
    let l = c.lookup(&s, reader, 1);
    assert_eq!(
        c.insert_missing(&s, reader, l.generation, 1),
        Fill::Protected
    );
    assert_eq!(c.lookup(&s, reader, 1).mark, Mark::Unknown);
    assert_eq!(c.stats().protected_fills, 1);
}

#[test]
fn generation_wraparound_is_harmless() {
    let (mut c, s) = (cache(4, 4, 4, 1), MemStore::new());
    c.table_mut()
        .create_all_with(&s, |_, _| u32::MAX - 1)
        .unwrap();
    let fp = c.fingerprint(b"k");
    let g0 = get_start(&mut c, &s, fp, 0);
    assert_eq!(g0.generation.get(), Some(u32::MAX - 1));
    assert_eq!(c.begin_write(&s, fp, 1), WriteTicket(Some(u32::MAX)));
    c.end_write(&s, fp, true, 2);
    let g1 = get_start(&mut c, &s, fp, 3);
    assert_eq!(g1.generation.get(), Some(0), "wrapped");
    assert_eq!(c.insert_missing(&s, fp, g0.generation, 4), Fill::Stale);
    assert_eq!(c.insert_missing(&s, fp, g1.generation, 4), Fill::Inserted);
    // And once more across the wrap, with a DELETE's ticket.
    let t = c.begin_write(&s, fp, 5);
    assert_eq!(t, WriteTicket(Some(1)));
    assert_eq!(c.end_delete(&s, fp, t, true, 6), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp, 7).mark, Mark::Missing);
}

#[test]
fn delete_204_caches_missing_unless_a_write_intervened() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    let t = c.begin_write(&s, fp, 0);
    assert_eq!(c.end_delete(&s, fp, t, true, 1), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp, 2).mark, Mark::Missing);
    // DELETE, then a POST that starts and is acknowledged before the 204 arrives.
    let t = c.begin_write(&s, fp, 3);
    c.begin_write(&s, fp, 4);
    c.end_write(&s, fp, true, 5);
    assert_eq!(c.end_delete(&s, fp, t, true, 6), Fill::Stale);
    assert_eq!(c.lookup(&s, fp, 7).mark, Mark::Exists);
    // A POST that started first and ends after the DELETE started.
    c.begin_write(&s, fp, 8);
    let t = c.begin_write(&s, fp, 9);
    c.end_write(&s, fp, true, 10);
    assert_eq!(c.end_delete(&s, fp, t, true, 11), Fill::Stale);
    // A failed DELETE caches nothing, and the session is still known to exist
    // (writes keep Exists marks: they cannot answer a 404).
    let t = c.begin_write(&s, fp, 12);
    assert_eq!(c.end_delete(&s, fp, t, false, 13), Fill::Skipped);
    assert_eq!(c.lookup(&s, fp, 14).mark, Mark::Exists);
}

#[test]
fn get_200_marks_exists_without_a_bump_and_skips_fresh_marks() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    c.table_mut().create_all(&s).unwrap();
    let fp = c.fingerprint(b"k");
    let other = get_start(&mut c, &s, fp, 0);
    let l = get_start(&mut c, &s, fp, 0);
    assert!(c.mark_exists(&s, fp, &l, 1));
    let l2 = c.lookup(&s, fp, 2);
    assert_eq!((l2.mark, l2.expires_at), (Mark::Exists, 1 + KNOWN));
    assert_eq!(l2.generation, l.generation, "no generation change");
    let writes = s.writes();
    assert!(!c.mark_exists(&s, fp, &l2, 2), "fresh: no hostcall");
    assert_eq!(s.writes(), writes);
    assert!(
        c.mark_exists(&s, fp, &l2, 1 + KNOWN / 2 + 1),
        "refresh past half"
    );
    // A concurrent GET's 404 may still be cached (the key expired in the store).
    assert_eq!(
        c.insert_missing(&s, fp, other.generation, 3),
        Fill::Inserted
    );
}

#[test]
fn failed_post_clears_and_successful_post_marks_exists() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    let l = c.lookup(&s, fp, 0);
    c.insert_missing(&s, fp, l.generation, 0);
    c.begin_write(&s, fp, 1);
    assert_eq!(c.lookup(&s, fp, 1).mark, Mark::Unknown, "begin clears");
    c.end_write(&s, fp, false, 2);
    assert_eq!(c.lookup(&s, fp, 2).mark, Mark::Unknown);
    c.begin_write(&s, fp, 3);
    c.end_write(&s, fp, true, 4);
    let l = c.lookup(&s, fp, 5);
    assert_eq!((l.mark, l.expires_at), (Mark::Exists, 4 + KNOWN));
    assert_eq!(c.stats().invalidations, 4);
    assert_eq!(c.stats().exists_marks, 1);
}

#[test]
fn absent_shard_fill_loses_to_a_write_that_created_it() {
    let (mut c, s) = (cache(64, 16, 4, 1), MemStore::new());
    let fp = c.fingerprint(b"k");
    let get = c.lookup(&s, fp, 0);
    assert_eq!(get.generation.get(), None);
    c.begin_write(&s, fp, 1);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 2), Fill::Stale);
    // Without the write, the fill creates the shard but caches nothing (it has no
    // generation to compare with); the key's next 404 is cached.
    let fp2 = (0..)
        .map(|i| c.fingerprint(format!("x{i}").as_bytes()))
        .find(|&f| c.table().layout().locate(f).0 != c.table().layout().locate(fp).0)
        .unwrap();
    let get = c.lookup(&s, fp2, 3);
    assert_eq!(get.generation.get(), None);
    assert_eq!(c.insert_missing(&s, fp2, get.generation, 3), Fill::Stale);
    let get = c.lookup(&s, fp2, 4);
    assert_eq!(get.mark, Mark::Unknown);
    assert!(get.generation.get().is_some(), "the fill created the shard");
    assert_eq!(c.insert_missing(&s, fp2, get.generation, 4), Fill::Inserted);
    assert_eq!(c.lookup(&s, fp2, 5).mark, Mark::Missing);
}

/// The sequence the race simulation found: a GET reads a garbage shard, a write ends
/// (and rebuilds the shard), a foreign writer corrupts it again, then the GET's 404
/// arrives. Garbage then and garbage now must not let that 404 be cached.
#[test]
fn garbage_before_and_after_a_write_does_not_cache_the_404_of_a_get_from_before_it() {
    let (mut c, s) = (cache(4, 4, 4, 1), MemStore::new());
    let key = c.table().layout().shard_key(0);
    let fp = c.fingerprint(b"k");
    s.set(&key, b"junk", None).unwrap();
    let get = c.lookup(&s, fp, 0);
    c.begin_write(&s, fp, 1);
    c.end_write(&s, fp, true, 2);
    s.set(&key, b"more junk", None).unwrap();
    assert_eq!(c.insert_missing(&s, fp, get.generation, 3), Fill::Stale);
    assert_ne!(c.lookup(&s, fp, 4).mark, Mark::Missing);
}

#[test]
fn garbage_shard_is_a_miss_and_is_rebuilt() {
    let (mut c, s) = (cache(4, 4, 4, 1), MemStore::new());
    let key = c.table().layout().shard_key(0);
    let fp = c.fingerprint(b"k");
    s.set(&key, b"\x01\x02garbage", None).unwrap();
    let get = c.lookup(&s, fp, 0);
    assert_eq!((get.mark, get.generation.get()), (Mark::Unknown, None));
    assert_eq!(c.insert_missing(&s, fp, get.generation, 1), Fill::Stale);
    assert_eq!(c.stats().table.rebuilt, 1);
    let get = c.lookup(&s, fp, 1);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 1), Fill::Inserted);
    // Garbage again; a write rebuilds it first; the GET that saw garbage is refused.
    s.set(&key, &[0xff; 1096], None).unwrap();
    let get = c.lookup(&s, fp, 2);
    c.begin_write(&s, fp, 3);
    assert_eq!(c.insert_missing(&s, fp, get.generation, 4), Fill::Stale);
}

#[test]
fn contended_fill_gives_up_and_contended_invalidation_falls_back_safely() {
    let (mut c, s) = (cache(4, 4, 3, 1), Hooked::default());
    c.table_mut().create_all(&s).unwrap();
    let (a, b, d) = (
        c.fingerprint(b"a"),
        c.fingerprint(b"b"),
        c.fingerprint(b"d"),
    );
    for fp in [a, b] {
        let l = c.lookup(&s, fp, 0);
        assert_eq!(c.insert_missing(&s, fp, l.generation, 0), Fill::Inserted);
    }
    let d_get = c.lookup(&s, d, 1);
    s.fail_cas.set(true);
    assert_eq!(
        c.insert_missing(&s, d, d_get.generation, 1),
        Fill::Contended
    );
    assert_eq!(c.end_write(&s, a, true, 2), Invalidation::Fallback);
    s.fail_cas.set(false);
    assert_eq!(c.lookup(&s, a, 3).mark, Mark::Exists);
    assert_eq!(
        c.lookup(&s, b, 3).mark,
        Mark::Unknown,
        "fallback drops all 404s"
    );
    assert_eq!(c.insert_missing(&s, d, d_get.generation, 3), Fill::Stale);
    let st = c.stats();
    assert_eq!(
        (st.table.fallbacks, st.table.contended, st.invalidations),
        (1, 2, 1)
    );
}

#[test]
fn a_blind_write_retries_an_injected_mismatch_then_reports_failure() {
    let (mut c, s) = (cache(4, 4, 2, 1), MemStore::new());
    let fp = c.fingerprint(b"a");
    let mut left = 3; // the CAS attempts and the first blind attempt are refused
    s.set_interference(move |_| {
        left -= 1;
        left >= 0
    });
    assert_eq!(c.end_write(&s, fp, true, 0), Invalidation::Fallback);
    s.set_interference(|_| true);
    assert_eq!(c.end_write(&s, fp, true, 0), Invalidation::Failed);
    assert_eq!(c.stats().failed_invalidations, 1);
}

/// Wraps a store: fails CAS writes while `fail_cas` is set, runs `before_blind` (another
/// worker's action) right before the first blind write of a shard, or fails everything
/// with a host error.
#[derive(Default)]
struct Hooked<'a> {
    inner: MemStore,
    fail_cas: Cell<bool>,
    host_error: Cell<bool>,
    #[allow(clippy::type_complexity)]
    before_blind: RefCell<Option<Box<dyn FnOnce(&MemStore) + 'a>>>,
}

impl SharedStore for Hooked<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        if self.host_error.get() {
            return Err(SetError::Host);
        }
        if cas.is_some() && self.fail_cas.get() {
            return Err(SetError::CasMismatch);
        }
        if cas.is_none() && key != ANCHOR_KEY {
            if let Some(other) = self.before_blind.borrow_mut().take() {
                other(&self.inner);
            }
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn a_blind_fallback_never_resurrects_a_cleared_404() {
    // Worker X's invalidation of `b` hits the CAS bound and falls back to a blind
    // write. Between X's read and X's blind write, worker Y acknowledges a POST of
    // `a`, clearing a's 404. X's blind write must not bring a's 404 back.
    let (mut x, mut y) = (cache(4, 4, 2, 1), cache(4, 4, 2, 2));
    let (a, b) = (x.fingerprint(b"a"), x.fingerprint(b"b"));
    let store = Hooked::default();
    x.table_mut().create_all(&store).unwrap();
    let l = x.lookup(&store, a, 0);
    assert_eq!(x.insert_missing(&store, a, l.generation, 0), Fill::Inserted);
    let y_get = y.lookup(&store, b, 0); // a GET of b in flight on Y
    store.fail_cas.set(true);
    *store.before_blind.borrow_mut() = Some(Box::new(|inner: &MemStore| {
        y.begin_write(inner, a, 1);
        assert_eq!(y.end_write(inner, a, true, 1), Invalidation::Committed);
    }));
    assert_eq!(x.end_write(&store, b, true, 2), Invalidation::Fallback);
    store.fail_cas.set(false);
    assert_ne!(x.lookup(&store, a, 3).mark, Mark::Missing);
    assert_eq!(x.lookup(&store, b, 3).mark, Mark::Exists);
    // Y's GET of b, started before X's write, cannot cache its 404 either.
    assert_eq!(
        x.insert_missing(&store, b, y_get.generation, 4),
        Fill::Stale
    );
}

#[test]
fn host_errors_are_reported_and_cache_nothing() {
    let mut c = cache(4, 4, 2, 1);
    let store = Hooked::default();
    let fp = c.fingerprint(b"k");
    let l = c.lookup(&store, fp, 0);
    store.host_error.set(true);
    assert_eq!(
        c.insert_missing(&store, fp, l.generation, 0),
        Fill::HostError
    );
    let t = c.begin_write(&store, fp, 1);
    assert_eq!(t, WriteTicket(None));
    assert_eq!(c.end_delete(&store, fp, t, true, 2), Fill::Skipped);
    assert_eq!(c.end_write(&store, fp, true, 3), Invalidation::Failed);
    let st = c.stats();
    assert_eq!(st.failed_invalidations, 2);
    assert!(st.table.host_errors >= 3);
}
