//! Key fingerprints: SipHash-2-4 under a per-deployment secret seed kept in shared data.
//!
//! # Why a keyed hash
//!
//! The key table places a key by its 64-bit fingerprint (shard, bucket, tag). With an
//! unkeyed or publicly known hash, anyone who can send requests could precompute
//! thousands of session keys that land in one bucket and keep flushing it (a cache
//! denial of service), or — far worse — two keys with the same 64-bit fingerprint, so
//! that a 404 for one answers lookups of the other. SipHash-2-4 is a pseudo-random
//! function designed for exactly this (hash-flooding resistance, Aumasson & Bernstein
//! 2012): without the 128-bit key its outputs for chosen inputs cannot be told from
//! random, so finding a full 64-bit collision costs ~2^32 work *per online probe* and an
//! attacker has no offline oracle at all (fingerprints never leave the proxy). The
//! 128-bit SipHash key is expanded from a 64-bit secret seed drawn from the host's CSPRNG
//! (`getrandom` -> WASI `random_get`) once per deployment; guessing it means guessing
//! 64 random bits.
//!
//! What remains: honest 64-bit collisions between distinct keys, with probability about
//! n²/2^65 for n live keys (n = 10^6 -> 3·10^-8 over the table's whole life); such a
//! pair shares one entry. And the bucket of a key (16k buckets by default) is far
//! easier to probe than a full collision: a patient attacker timing responses could
//! learn which of their own keys share a bucket and flush it — which costs them no less
//! than flushing the whole table by volume, something nobody can prevent in a
//! bounded cache.
//!
//! # The seed in shared data
//!
//! Every Envoy worker runs its own VM, and all of them must hash with the same seed: a
//! worker with a different seed would put a POST's invalidation in a different slot than
//! another worker's 404, which would break the no-stale-404 guarantee. [`init_seed`]
//! establishes exactly one seed per deployment (see its documentation for the protocol
//! and its remaining window); [`read_seed`] lets a periodic task verify agreement.

use crate::keytable::create_if_absent;
use crate::rng::splitmix64;
use crate::shared::{SetError, SharedStore};
use crate::wire::u64_at;

/// Shared-data key holding the deployment's fingerprint seed.
pub const SEED_KEY: &str = "sg.seed.v1";

/// A valid seed record: this magic followed by the seed, little-endian (16 bytes).
const SEED_MAGIC: &[u8; 8] = b"sgseed01";

/// Written (blindly) only to reclaim a seed key that exists but reads as empty; never
/// decodes as a seed, so it is always replaced by a compare-and-swap.
const PLACEHOLDER: &[u8] = b"sg.seed.pending";

/// Bound on the loop in [`init_seed`] (its docs quote the number); only contention or
/// host errors consume attempts.
const SEED_ATTEMPTS: u32 = 16;

/// Hashes keys to 64-bit fingerprints with SipHash-2-4 under a secret key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprinter {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("Fingerprinter { .. }")
    }
}

impl Fingerprinter {
    /// Expands the 64-bit deployment seed into the 128-bit SipHash key.
    pub fn new(seed: u64) -> Self {
        Self::with_keys(seed, splitmix64(seed ^ 0x5347_4b54_5f4b_3121))
    }

    /// Uses a full 128-bit SipHash key (tests use the reference vectors' key).
    pub fn with_keys(k0: u64, k1: u64) -> Self {
        Self { k0, k1 }
    }

    /// The fingerprint of a (decoded) key.
    pub fn fingerprint(&self, key: &[u8]) -> u64 {
        siphash24(self.k0, self.k1, key)
    }
}

/// SipHash-2-4 (64-bit output) of `msg` under the key (`k0`, `k1`).
pub fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = msg.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let m = u64::from_le_bytes(word);
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    // Final block: the remaining bytes and the length modulo 256 in the top byte.
    let mut last = (msg.len() as u64 & 0xff) << 56;
    for (i, &byte) in chunks.remainder().iter().enumerate() {
        last |= u64::from(byte) << (8 * i);
    }
    v[3] ^= last;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

fn encode_seed(seed: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(SEED_MAGIC);
    out[8..].copy_from_slice(&seed.to_le_bytes());
    out
}

fn decode_seed(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != 16 || bytes.get(..8) != Some(&SEED_MAGIC[..]) {
        return None;
    }
    u64_at(bytes, 8)
}

/// The deployment's seed as currently stored, if any (one shared-data get). A worker can
/// compare it with the seed it hashes with (e.g. on a tick) and stop serving cached 404s
/// if they ever differ.
pub fn read_seed<S: SharedStore + ?Sized>(store: &S) -> Option<u64> {
    store
        .get(SEED_KEY)
        .and_then(|(bytes, _)| decode_seed(&bytes))
}

/// Establishes the deployment's fingerprint seed, once, and returns the one everybody uses.
///
/// Call it from `on_configure` with a fresh random `candidate`; Envoy configures the main
/// thread's VM before the workers', so normally the first call creates the seed and every
/// later one (workers, reloads) just reads it: one get.
///
/// The host accepts any CAS on an absent key, so "create if absent" cannot be a plain
/// CAS. The protocol:
/// 1. `get(SEED_KEY)`. A valid seed record: adopt it, done.
/// 2. Present but not a seed (the placeholder, or garbage): CAS it to our candidate with the
///    token we just read. The key exists, so the CAS is real: exactly one contender wins,
///    the others see a mismatch, loop, and adopt the winner's seed at step 1.
/// 3. Absent: [`create_if_absent`] — a set whose CAS token is one the host just issued
///    to another key (`sg.anchor.v1`). Tokens come from one global counter, so no
///    existing key can hold that token and the set fails with a mismatch if the seed
///    key exists, yet succeeds when it is absent (any CAS is accepted then). Losers loop
///    and adopt at step 1.
/// 4. If the key exists but reads as empty (nothing of ours ever writes that; a foreign
///    "remove" can), only a blind write can reclaim it: we write the fixed placeholder —
///    identical for everyone, so concurrent reclaims are harmless — and go to step 2.
///
/// Remaining windows, stated honestly:
/// - Step 3 relies on the host's 32-bit CAS counter: if the seed key was last written
///   exactly a multiple of 2^32 shared-data writes before the anchor's fresh token was
///   issued, the create overwrites it (probability ~2^-32 per call, and only while
///   contenders race, i.e. at start-up).
/// - Step 4's blind write can erase a seed that another VM created and adopted a moment
///   before, after which two seeds are in use. It needs a key that exists but is empty,
///   which only a foreign writer can produce.
/// - If every attempt fails (host errors, or contention beyond 16 rounds), the candidate
///   is returned unshared. Hosts should compare with [`read_seed`] later and disable the
///   negative cache on disagreement.
pub fn init_seed<S: SharedStore + ?Sized>(store: &S, candidate: u64) -> u64 {
    let record = encode_seed(candidate);
    let mut exists_but_empty = false;
    for _ in 0..SEED_ATTEMPTS {
        match store.get(SEED_KEY) {
            Some((bytes, cas)) => {
                if let Some(seed) = decode_seed(&bytes) {
                    return seed;
                }
                if store.set(SEED_KEY, &record, Some(cas)).is_ok() {
                    return candidate;
                }
            }
            None if exists_but_empty => {
                // Step 4: the create below failed although the key reads as absent.
                let _ = store.set(SEED_KEY, PLACEHOLDER, None);
                exists_but_empty = false;
            }
            None => match create_if_absent(store, SEED_KEY, &record) {
                Ok(true) => return candidate,
                // Someone created it (re-read adopts it) or it exists but is empty.
                Ok(false) => exists_but_empty = store.get(SEED_KEY).is_none(),
                Err(SetError::CasMismatch) | Err(SetError::Host) => {}
            },
        }
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const K0: u64 = 0x0706_0504_0302_0100;
    const K1: u64 = 0x0f0e_0d0c_0b0a_0908;

    #[test]
    fn siphash24_reference_vectors() {
        // Key 00..0f, messages 00, 00 01, ... (SipHash reference `vectors.h`), and the
        // paper's worked example (15-byte message 00..0e).
        let msg: Vec<u8> = (0u8..64).collect();
        assert_eq!(siphash24(K0, K1, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(K0, K1, &msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(K0, K1, &msg[..2]), 0x0d6c_8009_d9a9_4f5a);
        assert_eq!(siphash24(K0, K1, &msg[..3]), 0x8567_6696_d7fb_7e2d);
        assert_eq!(siphash24(K0, K1, &msg[..15]), 0xa129_ca61_49be_45e5);
    }

    #[test]
    #[allow(deprecated)]
    fn siphash24_matches_std_for_every_length() {
        use std::hash::{Hasher, SipHasher};
        let msg: Vec<u8> = (0u8..=255).map(|b| b.wrapping_mul(37)).collect();
        for len in 0..msg.len() {
            for (k0, k1) in [(K0, K1), (0, 0), (u64::MAX, 12345)] {
                let mut std_hasher = SipHasher::new_with_keys(k0, k1);
                std_hasher.write(&msg[..len]);
                assert_eq!(siphash24(k0, k1, &msg[..len]), std_hasher.finish(), "{len}");
            }
        }
    }

    #[test]
    fn seeds_change_fingerprints_and_debug_hides_them() {
        let a = Fingerprinter::new(1);
        let b = Fingerprinter::new(2);
        let key = b"enwiki:MWSession:abcdefghijklmnopqrstuvwxyz234567";
        assert_ne!(a.fingerprint(key), b.fingerprint(key));
        assert_eq!(a.fingerprint(key), Fingerprinter::new(1).fingerprint(key));
        assert_eq!(format!("{a:?}"), "Fingerprinter { .. }");
    }

    #[test]
    fn first_seed_wins_and_later_candidates_adopt_it() {
        let s = MemStore::new();
        assert_eq!(init_seed(&s, 111), 111);
        assert_eq!(init_seed(&s, 222), 111);
        assert_eq!(read_seed(&s), Some(111));
    }

    #[test]
    fn a_second_create_cannot_overwrite_an_existing_seed() {
        // Worker B saw "absent" earlier, then A created the seed; B's create must fail.
        let s = MemStore::new();
        assert_eq!(init_seed(&s, 7), 7);
        assert_eq!(create_if_absent(&s, SEED_KEY, &encode_seed(8)), Ok(false));
        assert_eq!(read_seed(&s), Some(7));
    }

    #[test]
    fn garbage_and_placeholder_are_replaced_by_cas() {
        let s = MemStore::new();
        s.set(SEED_KEY, b"\xff\x00garbage", None).unwrap();
        assert_eq!(init_seed(&s, 5), 5);
        let s = MemStore::new();
        s.set(SEED_KEY, PLACEHOLDER, None).unwrap();
        assert_eq!(init_seed(&s, 6), 6);
        assert_eq!(init_seed(&s, 9), 6);
    }

    #[test]
    fn an_emptied_seed_key_is_reclaimed() {
        let s = MemStore::new();
        s.set(SEED_KEY, b"x", None).unwrap();
        s.set(SEED_KEY, b"", None).unwrap(); // exists, reads as absent
        assert_eq!(init_seed(&s, 42), 42);
        assert_eq!(read_seed(&s), Some(42));
    }

    type OtherVm<'a> = std::cell::RefCell<Option<Box<dyn FnOnce(&MemStore) + 'a>>>;

    /// Runs `before_first_seed_set` (another VM's action) right before the first write of
    /// the seed key reaches the store: the real interleaving of two VMs at start-up.
    struct Racing<'a> {
        inner: MemStore,
        before_first_seed_set: OtherVm<'a>,
    }

    impl SharedStore for Racing<'_> {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            if key == SEED_KEY {
                if let Some(other) = self.before_first_seed_set.borrow_mut().take() {
                    other(&self.inner);
                }
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn losing_the_create_race_adopts_the_winner() {
        let racing = Racing {
            inner: MemStore::new(),
            before_first_seed_set: std::cell::RefCell::new(Some(Box::new(|s: &MemStore| {
                assert_eq!(init_seed(s, 77), 77);
            }))),
        };
        // We saw "absent", the other VM created its seed, our create must fail and adopt.
        assert_eq!(init_seed(&racing, 1), 77);
        assert_eq!(read_seed(&racing.inner), Some(77));
    }

    #[test]
    fn losing_the_placeholder_cas_adopts_the_winner() {
        let racing = Racing {
            inner: MemStore::new(),
            before_first_seed_set: std::cell::RefCell::new(Some(Box::new(|s: &MemStore| {
                assert_eq!(init_seed(s, 55), 55);
            }))),
        };
        racing.inner.set(SEED_KEY, PLACEHOLDER, None).unwrap();
        assert_eq!(init_seed(&racing, 2), 55);
    }

    #[test]
    fn persistent_failure_returns_the_candidate() {
        let s = MemStore::new();
        s.set_interference(|_| true);
        assert_eq!(init_seed(&s, 99), 99);
        assert_eq!(read_seed(&s), None);
    }
}
