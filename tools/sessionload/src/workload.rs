//! What each request is: traffic classes and their mix, the key spaces
//! (Zipf-distributed reader misses, live sessions, distinct misses), and the
//! MediaWiki-shaped keys and values that travel on the wire.

use crate::rng::{hash2, hash_bytes, mix64, Rng};
use crate::scenario::{Keys, Mix};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// GET of a key that does not exist (a reader's stale/random session cookie).
    ReaderMiss,
    /// GET of a session this run wrote (a logged-in user's request).
    UserGet,
    /// POST of a session value (login, session change).
    Write,
    /// DELETE of a written session (logout).
    Delete,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::ReaderMiss,
        Class::UserGet,
        Class::Write,
        Class::Delete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::ReaderMiss => "reader_miss",
            Class::UserGet => "user_get",
            Class::Write => "write",
            Class::Delete => "delete",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which key a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRef {
    /// Rank in the Zipf-distributed space of non-existent keys.
    Reader(u64),
    /// The i-th of a sequence of distinct non-existent keys.
    Distinct(u64),
    /// Session id (index into this run's sessions).
    Session(u64),
}

/// One request to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub class: Class,
    pub key: KeyRef,
    /// Version of the value written (writes only; 0 otherwise).
    pub version: u32,
}

// ---- Zipf ---------------------------------------------------------------

/// Zipf distribution over ranks 1..=n with exponent s >= 0, sampled by
/// rejection-inversion (Hörmann & Derflinger 1996): O(1) memory and time,
/// works for huge n and any s (s = 0 is uniform, s = 1 the classic case).
#[derive(Debug, Clone)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

fn helper1(x: f64) -> f64 {
    // log1p(x)/x, stable near 0
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

fn helper2(x: f64) -> f64 {
    // expm1(x)/x, stable near 0
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + 0.25 * x))
    }
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Zipf {
        let n = n.max(1) as f64;
        let s = if s.is_finite() { s.max(0.0) } else { 1.0 };
        let mut z = Zipf {
            n,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            threshold: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(n + 0.5);
        z.threshold = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let mut t = x * (1.0 - self.s);
        if t < -1.0 {
            t = -1.0;
        }
        (helper1(t) * x).exp()
    }

    /// A rank in 1..=n.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.next_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let mut k = (x + 0.5).floor();
            if k < 1.0 {
                k = 1.0;
            } else if k > self.n {
                k = self.n;
            }
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }
}

// ---- keys ---------------------------------------------------------------

/// MediaWiki's session id alphabet: base_convert(hex, 16, 32) gives 0-9a-v.
const BASE32: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";

/// 32 base32 characters (160 bits) derived from `h`.
fn base32_160(h: u64) -> String {
    let a = mix64(h);
    let b = mix64(a ^ 0x1234_5678);
    let c = mix64(b ^ 0x9abc_def0);
    let mut out = String::with_capacity(32);
    let words = [a, b, c];
    for i in 0..32 {
        let bit = i * 5;
        let w = words[bit / 64];
        let off = bit % 64;
        let mut v = (w >> off) & 31;
        if off > 59 {
            // spans two words
            let next = words[bit / 64 + 1];
            v = ((w >> off) | (next << (64 - off))) & 31;
        }
        out.push(BASE32[v as usize] as char);
    }
    out
}

/// Builds key strings for each key space. Key strings are pure functions of
/// (seed, id), so they need not be stored.
#[derive(Debug, Clone)]
pub struct KeyNames {
    wiki_ids: Vec<String>,
    reader_seed: u64,
    distinct_seed: u64,
    session_seed: u64,
}

impl KeyNames {
    /// `seed` fixes the reader key space; `run_salt` makes session and
    /// distinct keys unique to this run (so runs never see each other's data).
    pub fn new(wiki_ids: Vec<String>, seed: u64, run_salt: u64) -> Self {
        let wiki_ids = if wiki_ids.is_empty() {
            vec!["enwiki".to_string()]
        } else {
            wiki_ids
        };
        KeyNames {
            wiki_ids,
            reader_seed: hash2(seed, 0x7265_6164_6572), // "reader"
            distinct_seed: hash2(seed ^ run_salt, 0x6469_7374), // "dist"
            session_seed: hash2(seed ^ run_salt, 0x7365_7373), // "sess"
        }
    }

    pub fn key(&self, k: KeyRef) -> String {
        let h = match k {
            KeyRef::Reader(r) => hash2(self.reader_seed, r),
            KeyRef::Distinct(i) => hash2(self.distinct_seed, i),
            KeyRef::Session(id) => hash2(self.session_seed, id),
        };
        let wiki = &self.wiki_ids[(mix64(h ^ 0x77) % self.wiki_ids.len() as u64) as usize];
        format!("{wiki}:MWSession:{}", base32_160(h))
    }
}

/// Percent-encode a key for use as one path segment (RFC 3986 unreserved
/// characters pass; `:` becomes `%3A` as MediaWiki sends it).
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 8);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---- values -------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn php_str(s: &str) -> String {
    format!("s:{}:\"{}\";", s.len(), s)
}

/// The field carrying the write version inside the serialized value.
const VERSION_FIELD: &str = "sessionload_v";

/// Session values shaped like MediaWiki's RESTBagOStuff output:
/// `PHP.<base64 of a 32-byte HMAC>.<PHP serialize() of the session>`.
/// The serialize() part is sized between `min` and `max` bytes (never less
/// than its ~190-byte skeleton) and is a pure function of (seed, key,
/// version), so a GET body can be checked without storing what was written.
#[derive(Debug, Clone)]
pub struct Values {
    seed: u64,
    min: usize,
    max: usize,
}

impl Values {
    pub fn new(seed: u64, min: usize, max: usize) -> Self {
        Values {
            seed: hash2(seed, 0x76616c),
            min: min.min(max),
            max: max.max(min),
        }
    }

    pub fn value(&self, key: &str, version: u32) -> Vec<u8> {
        let h = hash2(hash_bytes(self.seed, key.as_bytes()), u64::from(version));
        let span = (self.max - self.min + 1) as u64;
        let target = self.min + (mix64(h ^ 1) % span) as usize;
        let user_id = mix64(h ^ 2) % 50_000_000 + 1;
        let user_name = format!("User{}", mix64(h ^ 3) % 10_000_000);
        let meta = format!(
            "s:8:\"metadata\";a:3:{{{}{}i:{};{}i:{};}}",
            php_str("provider") + &php_str("CookieSessionProvider"),
            php_str("userId"),
            user_id,
            php_str(VERSION_FIELD),
            version
        );
        let build = |pad: &str| {
            format!(
                "a:2:{{s:4:\"data\";a:2:{{{}{}}}{}}}",
                php_str("wsUserName") + &php_str(&user_name),
                php_str("wsToken") + &php_str(pad),
                meta
            )
        };
        let skeleton = build("").len();
        let mut pad_len = target.saturating_sub(skeleton);
        // The length prefix grows with the pad; adjust once or twice.
        for _ in 0..3 {
            let extra = pad_len.to_string().len() - 1;
            let want = target.saturating_sub(skeleton + extra);
            if want == pad_len {
                break;
            }
            pad_len = want;
        }
        let mut pad = String::with_capacity(pad_len);
        let mut x = h ^ 6;
        while pad.len() < pad_len {
            x = mix64(x);
            for i in 0..12 {
                if pad.len() < pad_len {
                    pad.push(BASE32[((x >> (i * 5)) & 31) as usize] as char);
                }
            }
        }
        let ser = build(&pad);
        let mut mac = [0u8; 32];
        let mut y = h ^ 7;
        for chunk in mac.chunks_mut(8) {
            y = mix64(y);
            chunk.copy_from_slice(&y.to_le_bytes());
        }
        format!("PHP.{}.{}", base64(&mac), ser).into_bytes()
    }
}

/// Extract the write version from a value produced by [`Values::value`].
pub fn parse_version(body: &[u8]) -> Option<u32> {
    let marker = format!("s:{}:\"{}\";i:", VERSION_FIELD.len(), VERSION_FIELD);
    let m = marker.as_bytes();
    let pos = body.windows(m.len()).position(|w| w == m)?;
    let rest = &body[pos + m.len()..];
    let end = rest.iter().position(|&b| b == b';')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

// ---- the mix ------------------------------------------------------------

/// Which key space reader misses come from.
#[derive(Debug, Clone)]
pub enum MissSpace {
    Zipf(Zipf),
    /// Every miss is a new key (for cache memory-bound tests).
    Distinct {
        next: u64,
    },
}

/// Where a new session's creating write stands ([`Workload::logged_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// Not answered yet.
    Pending,
    /// Acknowledged (201): the user has their session cookie.
    Acked,
    /// Answered otherwise, or never sent: the login failed.
    Failed,
}

/// Draws the next operation: class from the mix, key from the class's key
/// space. Keeps the set of live sessions: a write creates a new session while
/// the pool has room, otherwise rewrites a random live one; a delete removes a
/// random live session for good. A new session is live (read, rewritten,
/// deleted) only once its creating write was acknowledged: a user gets the
/// session cookie with the login's response, so no logged-in read of a session
/// precedes it. user_get/delete with no live session fall back to a write.
#[derive(Debug)]
pub struct Workload {
    cum: [f64; 3],
    misses: MissSpace,
    pool_cap: usize,
    live: Vec<u64>,
    /// New sessions whose creating write is not acknowledged yet.
    logging_in: Vec<u64>,
    versions: HashMap<u64, u32>,
    next_session: u64,
}

impl Workload {
    pub fn new(mix: Mix, keys: &Keys, misses: MissSpace) -> Self {
        let c0 = mix.reader_miss;
        let c1 = c0 + mix.user_get;
        let c2 = c1 + mix.write;
        Workload {
            cum: [c0, c1, c2],
            misses,
            pool_cap: keys.session_pool.max(1) as usize,
            live: Vec::new(),
            logging_in: Vec::new(),
            versions: HashMap::new(),
            next_session: 0,
        }
    }

    #[cfg(test)]
    pub fn live_sessions(&self) -> usize {
        self.live.len()
    }

    fn pick_class(&self, u: f64) -> Class {
        if u < self.cum[0] {
            Class::ReaderMiss
        } else if u < self.cum[1] {
            Class::UserGet
        } else if u < self.cum[2] {
            Class::Write
        } else {
            Class::Delete
        }
    }

    /// Moves the sessions whose login `state` says was acknowledged into the live
    /// set and forgets those whose login failed (the pool has room again).
    pub fn logged_in(&mut self, mut state: impl FnMut(u64) -> Login) {
        let versions = &mut self.versions;
        let live = &mut self.live;
        self.logging_in.retain(|&id| match state(id) {
            Login::Pending => true,
            Login::Acked => {
                live.push(id);
                false
            }
            Login::Failed => {
                versions.remove(&id);
                false
            }
        });
    }

    /// A write that always creates a new session (used for prefill).
    pub fn new_session_write(&mut self) -> Op {
        let id = self.next_session;
        self.next_session += 1;
        self.logging_in.push(id);
        self.versions.insert(id, 1);
        Op {
            class: Class::Write,
            key: KeyRef::Session(id),
            version: 1,
        }
    }

    fn write(&mut self, rng: &mut Rng) -> Op {
        if self.live.len() + self.logging_in.len() < self.pool_cap {
            return self.new_session_write();
        }
        // The pool is full: rewrite a live session, or one still logging in if none is.
        let pool = if self.live.is_empty() {
            &self.logging_in
        } else {
            &self.live
        };
        let id = pool[rng.below(pool.len() as u64) as usize];
        let v = self.versions.entry(id).or_insert(0);
        *v = v.saturating_add(1);
        Op {
            class: Class::Write,
            key: KeyRef::Session(id),
            version: *v,
        }
    }

    pub fn next(&mut self, rng: &mut Rng) -> Op {
        let class = self.pick_class(rng.next_f64());
        match class {
            Class::ReaderMiss => {
                let key = match &mut self.misses {
                    MissSpace::Zipf(z) => KeyRef::Reader(z.sample(rng)),
                    MissSpace::Distinct { next } => {
                        let k = KeyRef::Distinct(*next);
                        *next += 1;
                        k
                    }
                };
                Op {
                    class,
                    key,
                    version: 0,
                }
            }
            Class::Write => self.write(rng),
            Class::UserGet => {
                if self.live.is_empty() {
                    return self.write(rng);
                }
                let id = self.live[rng.below(self.live.len() as u64) as usize];
                Op {
                    class,
                    key: KeyRef::Session(id),
                    version: 0,
                }
            }
            Class::Delete => {
                if self.live.is_empty() {
                    return self.write(rng);
                }
                let i = rng.below(self.live.len() as u64) as usize;
                let id = self.live.swap_remove(i);
                self.versions.remove(&id);
                Op {
                    class,
                    key: KeyRef::Session(id),
                    version: 0,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn harmonic(n: u64, s: f64) -> f64 {
        (1..=n).map(|k| (k as f64).powf(-s)).sum()
    }

    #[test]
    fn zipf_matches_theory() {
        for &(n, s) in &[(1000u64, 1.0f64), (1000, 0.8), (50, 2.0), (10, 0.0)] {
            let z = Zipf::new(n, s);
            let mut rng = Rng::new(11);
            let draws = 200_000;
            let mut counts = vec![0u64; n as usize + 1];
            for _ in 0..draws {
                let k = z.sample(&mut rng);
                assert!((1..=n).contains(&k), "rank {k} out of 1..={n}");
                counts[k as usize] += 1;
            }
            let hn = harmonic(n, s);
            for k in [1u64, 2, 3, 10] {
                if k > n {
                    continue;
                }
                let expect = (k as f64).powf(-s) / hn;
                let got = counts[k as usize] as f64 / draws as f64;
                let sd = (expect * (1.0 - expect) / draws as f64).sqrt();
                assert!(
                    (got - expect).abs() < 5.0 * sd + 1e-4,
                    "n={n} s={s} k={k}: expected {expect}, got {got}"
                );
            }
        }
    }

    #[test]
    fn zipf_keys_repeat_and_huge_n_works() {
        let z = Zipf::new(1_000_000, 1.0);
        let mut rng = Rng::new(5);
        let mut seen = HashSet::new();
        let draws = 10_000;
        for _ in 0..draws {
            seen.insert(z.sample(&mut rng));
        }
        // With s=1 over 1e6 keys, a large share of draws repeat.
        assert!(seen.len() < draws * 3 / 4, "{} distinct", seen.len());
        let z = Zipf::new(1_000_000_000_000, 1.2);
        for _ in 0..1000 {
            let k = z.sample(&mut rng);
            assert!((1..=1_000_000_000_000).contains(&k));
        }
        let one = Zipf::new(1, 1.0);
        assert_eq!(one.sample(&mut rng), 1);
    }

    /// `zipf_s = 0` is the uniform distribution, also over a space far larger than any
    /// negative cache (the replay's surges: 10^9 keys): every rank is as likely, and draws
    /// almost never repeat.
    #[test]
    fn zipf_s_zero_is_uniform_over_a_huge_space() {
        let n = 1_000_000_000u64;
        let z = Zipf::new(n, 0.0);
        let mut rng = Rng::new(17);
        let draws = 200_000u64;
        let mut seen = HashSet::new();
        let mut deciles = [0u64; 10];
        for _ in 0..draws {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k), "rank {k} out of 1..={n}");
            seen.insert(k);
            deciles[((k - 1) * 10 / n) as usize] += 1;
        }
        // Expected repeats among 2e5 uniform draws over 1e9: ~20.
        assert!(
            draws - seen.len() as u64 <= 100,
            "{} repeats",
            draws - seen.len() as u64
        );
        // Each tenth of the space gets a tenth of the draws (sd ~134).
        for (i, &c) in deciles.iter().enumerate() {
            assert!(c.abs_diff(draws / 10) < 1000, "decile {i}: {c} of {draws}");
        }
    }

    #[test]
    fn keys_look_like_mediawiki() {
        let names = KeyNames::new(vec!["enwiki".into(), "dewiki".into()], 1, 99);
        let k = names.key(KeyRef::Reader(1));
        let (wiki, rest) = k.split_once(':').unwrap();
        assert!(wiki == "enwiki" || wiki == "dewiki");
        let id = rest.strip_prefix("MWSession:").unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| BASE32.contains(&b)));
        assert_eq!(k, names.key(KeyRef::Reader(1)));
        assert_ne!(k, names.key(KeyRef::Reader(2)));
        assert_ne!(names.key(KeyRef::Session(1)), names.key(KeyRef::Reader(1)));
        // Reader keys depend only on the seed; session keys on the run salt too.
        let other_run = KeyNames::new(vec!["enwiki".into(), "dewiki".into()], 1, 100);
        assert_eq!(k, other_run.key(KeyRef::Reader(1)));
        assert_ne!(
            names.key(KeyRef::Session(1)),
            other_run.key(KeyRef::Session(1))
        );
        let enc = encode_key(&k);
        assert!(enc.contains("%3AMWSession%3A"), "{enc}");
        assert!(!enc.contains(':'));
        let distinct: HashSet<String> = (0..10_000)
            .map(|i| names.key(KeyRef::Distinct(i)))
            .collect();
        assert_eq!(distinct.len(), 10_000);
    }

    #[test]
    fn values_look_like_restbagostuff_and_roundtrip_version() {
        let v = Values::new(1, 200, 600);
        for version in [1u32, 2, 77, 4_000_000] {
            let key = format!("enwiki:MWSession:{version}");
            let body = v.value(&key, version);
            let s = String::from_utf8(body.clone()).unwrap();
            let parts: Vec<&str> = s.splitn(3, '.').collect();
            assert_eq!(parts[0], "PHP");
            assert_eq!(parts[1].len(), 44, "base64 of 32 bytes");
            let ser = parts[2];
            assert!(ser.starts_with("a:2:{s:4:\"data\";a:2:{"), "{ser}");
            assert!(ser.ends_with("}}"));
            assert!((200..=602).contains(&ser.len()), "len {}", ser.len());
            assert!(ser.len() <= 602, "len {}", ser.len());
            assert_eq!(parse_version(&body), Some(version));
            assert_eq!(body, v.value(&key, version), "deterministic");
            assert_ne!(body, v.value(&key, version + 1));
        }
        assert_eq!(parse_version(b"nothing here"), None);
        let big = Values::new(1, 5000, 5000).value("k", 3);
        let ser_len = big.len() - "PHP.".len() - 44 - 1;
        assert!((4998..=5002).contains(&ser_len), "{ser_len}");
    }

    #[test]
    fn php_string_lengths_are_consistent() {
        // every s:N:"..." must carry the right byte length
        let body = Values::new(9, 300, 300).value("enwiki:MWSession:x", 5);
        let s = String::from_utf8(body).unwrap();
        let ser = s.splitn(3, '.').nth(2).unwrap();
        let mut rest = ser;
        let mut checked = 0;
        while let Some(pos) = rest.find("s:") {
            let after = &rest[pos + 2..];
            let Some(colon) = after.find(':') else { break };
            if let Ok(n) = after[..colon].parse::<usize>() {
                let body = &after[colon + 1..];
                assert!(body.starts_with('"'));
                assert_eq!(&body[1 + n..1 + n + 2], "\";", "at {body:.40}");
                checked += 1;
                rest = &body[1 + n + 2..];
            } else {
                rest = after;
            }
        }
        assert!(checked >= 8);
        let skeleton = Values::new(1, 0, 0).value("enwiki:MWSession:x", 1).len() - 49;
        assert!(skeleton <= 200, "skeleton {skeleton}");
    }

    fn keys(pool: u64) -> Keys {
        Keys {
            reader_space: 100,
            zipf_s: 1.0,
            session_pool: pool,
            prefill: 0,
            prefill_rate: 1.0,
            wiki_ids: vec!["enwiki".into()],
            value_min_bytes: 200,
            value_max_bytes: 600,
        }
    }

    #[test]
    fn mix_proportions_and_session_lifecycle() {
        let mut w = Workload::new(
            Mix::default(),
            &keys(100),
            MissSpace::Zipf(Zipf::new(100, 1.0)),
        );
        let mut rng = Rng::new(3);
        let mut counts = [0u64; 4];
        let mut deleted = HashSet::new();
        let n = 200_000;
        for _ in 0..n {
            let op = w.next(&mut rng);
            w.logged_in(|_| Login::Acked);
            counts[op.class.index()] += 1;
            if let KeyRef::Session(id) = op.key {
                assert!(!deleted.contains(&id), "op on a deleted session");
                if op.class == Class::Delete {
                    deleted.insert(id);
                }
                if op.class == Class::Write {
                    assert!(op.version >= 1);
                }
            }
            assert!(w.live_sessions() <= 100);
        }
        let frac = |c: Class| counts[c.index()] as f64 / n as f64;
        assert!((frac(Class::ReaderMiss) - 0.85).abs() < 0.01);
        assert!((frac(Class::UserGet) - 0.10).abs() < 0.01);
        assert!((frac(Class::Write) - 0.04).abs() < 0.01);
        assert!((frac(Class::Delete) - 0.01).abs() < 0.005);
        assert_eq!(w.live_sessions(), 100);
    }

    #[test]
    fn a_session_is_read_only_once_its_login_was_acknowledged() {
        let mix = Mix {
            reader_miss: 0.0,
            user_get: 0.5,
            write: 0.5,
            delete: 0.0,
        };
        let mut w = Workload::new(mix, &keys(4), MissSpace::Zipf(Zipf::new(10, 1.0)));
        let mut rng = Rng::new(9);
        let mut created = Vec::new();
        for _ in 0..200 {
            let op = w.next(&mut rng);
            assert_ne!(
                op.class,
                Class::UserGet,
                "read before any login was acknowledged"
            );
            if let (KeyRef::Session(id), 1) = (op.key, op.version) {
                created.push(id);
            }
        }
        assert_eq!(
            created,
            vec![0, 1, 2, 3],
            "the pool counts sessions logging in"
        );
        // Session 1's login failed: it is forgotten and a new session takes its place.
        w.logged_in(|id| if id == 1 { Login::Failed } else { Login::Acked });
        let mut read = HashSet::new();
        for _ in 0..400 {
            let op = w.next(&mut rng);
            if let (Class::UserGet, KeyRef::Session(id)) = (op.class, op.key) {
                read.insert(id);
            }
        }
        assert!(!read.contains(&1) && !read.contains(&4), "{read:?}");
        assert_eq!(read, HashSet::from([0, 2, 3]));
    }

    #[test]
    fn distinct_misses_never_repeat() {
        let mix = Mix {
            reader_miss: 1.0,
            user_get: 0.0,
            write: 0.0,
            delete: 0.0,
        };
        let mut w = Workload::new(mix, &keys(1), MissSpace::Distinct { next: 0 });
        let mut rng = Rng::new(1);
        for i in 0..1000 {
            assert_eq!(w.next(&mut rng).key, KeyRef::Distinct(i));
        }
    }

    #[test]
    fn base64_known_answers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
