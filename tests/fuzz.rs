//! Fuzz campaigns for every parser and decision the filter runs on host data.
//!
//! Each target draws random (mostly structured, partly raw) inputs from a seeded
//! generator and checks properties that must hold for *any* input: no panic (a panic
//! aborts the Envoy worker's VM: `panic = "abort"`), and where an oracle exists, the
//! right answer. The campaign size is per target:
//!
//! - default (`cargo test`): a short bounded campaign, a few seconds in all;
//! - `SG_FUZZ_CASES=N`: N cases per target (`make fuzz` runs 10 million each);
//! - `SG_FUZZ_SEED=S`: base seed (default fixed, so CI is reproducible; a failing case
//!   prints its seed and index, and `SG_FUZZ_START=i` restarts the campaign there);
//! - `SG_FUZZ_REPORT=FILE`: appends one JSON line per target with its counts.
//!
//! Targets: Config::parse, the serialized header map, classify + replies, the Prometheus parser, the pressure
//! snapshot and tracker, the key table over garbage shards (with the no-stale-404
//! oracle), the limiter, admission ring, gradient state, election lease and seed over
//! garbage shared data, and single-flight bookkeeping.
// A test may fail loudly (the filter crate denies these outside tests).
#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg(not(target_arch = "wasm32"))]
// `*g.pick(..)` picks the element type the caller names; the deref is not noise.
#![allow(clippy::explicit_auto_deref)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Instant;

use serde_json::{json, Map, Value};

use sessionguard::admission::{Admission, AdmissionConfig, Decision, ADMISSION_KEY};
use sessionguard::classify::{classify, Criticality, Op};
use sessionguard::config::Config;
use sessionguard::election::{Election, Lease, LEASE_KEY};
use sessionguard::fingerprint::{init_seed, read_seed, Fingerprinter, SEED_KEY};
use sessionguard::gradient::{Controller, GradientState, Lane, RttHistogram, Usage, GRADIENT_KEY};
use sessionguard::guard::negative_cache;
use sessionguard::header_pairs;
use sessionguard::keytable::{KeyTable, Layout, OccupancyScan};
use sessionguard::limiter::{Acquire, ConcurrencyConfig, LimitMode, Limiter, Permit, INFLIGHT_KEY};
use sessionguard::negcache::{Fill, Invalidation, Mark, NegCache};
use sessionguard::outcome::{Completion, Ending};
use sessionguard::pressure::{
    self, FailureReason, MemoryConfig, MetricsEndpoint, PressureSnapshot, PressureTracker,
    SNAPSHOT_KEY, SNAPSHOT_LEN,
};
use sessionguard::prom::{find_gauge, samples, PromError, Selector};
use sessionguard::reply::{self, RetryAfterConfig, ShedReason};
use sessionguard::rng::splitmix64;
use sessionguard::shared::{MemStore, SharedStore};
use sessionguard::singleflight::SingleFlightConfig;
use sessionguard::singleflight::{Join, Limits, SingleFlight};
use sessionguard::wire::fnv1a;

// ---------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------

/// splitmix64-seeded xorshift: fast, reproducible, good enough to explore inputs.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(splitmix64(seed) | 1)
    }
    fn u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }
    fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn bool(&mut self) -> bool {
        self.u64() & 1 == 1
    }
    fn f64(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// A length biased to small values, sometimes up to `max`.
    fn len(&mut self, max: usize) -> usize {
        match self.below(8) {
            0..=4 => self.below(9) as usize,
            5 | 6 => self.below(65.min(max as u64 + 1)) as usize,
            _ => self.below(max as u64 + 1) as usize,
        }
        .min(max)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.len(max);
        (0..n).map(|_| self.u64() as u8).collect()
    }
    /// Interesting floats: edges, specials, and plain values.
    fn float(&mut self) -> f64 {
        const SPECIAL: [f64; 14] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            1e-300,
            4_294_967_296.0,
        ];
        match self.below(4) {
            0 => *self.pick(&SPECIAL),
            1 => f64::from_bits(self.u64()),
            _ => (self.f64() - 0.25) * 10f64.powi(self.below(12) as i32 - 3),
        }
    }
    /// Interesting u64s.
    fn int(&mut self) -> u64 {
        const SPECIAL: [u64; 10] = [
            0,
            1,
            2,
            255,
            65_535,
            4_294_967_295,
            4_294_967_296,
            u64::MAX,
            u64::MAX - 1,
            1 << 48,
        ];
        match self.below(3) {
            0 => *self.pick(&SPECIAL),
            1 => self.u64(),
            _ => {
                let bits = self.below(40);
                self.below(1 << bits)
            }
        }
    }
}

/// Writes whatever the store's injected conflicts say (a foreign writer, not the code
/// under test).
fn force_set(store: &MemStore, key: &str, value: &[u8]) {
    for _ in 0..64 {
        if store.set(key, value, None).is_ok() {
            return;
        }
    }
    panic!("could not write {key}");
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()?
        .trim()
        .replace('_', "")
        .parse()
        .ok()
}

/// Runs `case` on `default_cases` inputs (or `SG_FUZZ_CASES`), each from its own
/// seed; reports counts. A panic prints how to replay the case, then fails the test.
fn campaign(name: &str, default_cases: u64, mut case: impl FnMut(&mut Gen) -> Outcome) {
    let cases = env_u64("SG_FUZZ_CASES").unwrap_or(default_cases);
    let base = env_u64("SG_FUZZ_SEED").unwrap_or(0x5e55_1015_6a7d);
    let start = env_u64("SG_FUZZ_START").unwrap_or(0);
    let began = Instant::now();
    let mut tally: HashMap<&'static str, u64> = HashMap::new();
    for i in start..cases {
        let mut g = Gen::new(base ^ splitmix64(i));
        match catch_unwind(AssertUnwindSafe(|| case(&mut g))) {
            Ok(outcome) => *tally.entry(outcome.0).or_default() += 1,
            Err(panic) => {
                eprintln!(
                    "fuzz target `{name}` failed at case {i}: replay with \
                     SG_FUZZ_SEED={base} SG_FUZZ_START={i} cargo test --test fuzz"
                );
                resume_unwind(panic);
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    let done = cases.saturating_sub(start);
    let mut outcomes: Vec<_> = tally.into_iter().collect();
    outcomes.sort();
    let line = json!({
        "target": name,
        "cases": done,
        "seconds": (secs * 10.0).round() / 10.0,
        "seed": base,
        "outcomes": outcomes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>(),
    });
    eprintln!("fuzz {line}");
    if let Ok(path) = std::env::var("SG_FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// What a case exercised, tallied per target so a report shows the paths reached.
struct Outcome(&'static str);

// ---------------------------------------------------------------------------------
// Config::parse
// ---------------------------------------------------------------------------------

/// (section, field, kind) of every configuration field; kinds steer the values.
const FIELDS: &[(&str, &str, &str)] = &[
    ("", "base_uri", "path"),
    ("", "cas_attempts", "u32"),
    ("priorities", "read_known", "crit"),
    ("priorities", "read_unknown", "crit"),
    ("priorities", "write", "crit"),
    ("priorities", "delete", "crit"),
    ("priorities", "other", "crit"),
    ("concurrency", "enabled", "bool"),
    ("concurrency", "enforce", "bool"),
    ("concurrency", "mode", "mode"),
    ("concurrency", "limit", "u32"),
    ("concurrency", "min_limit", "u32"),
    ("concurrency", "max_limit", "u32"),
    ("concurrency", "sheddable_share", "unit"),
    ("concurrency.adaptive", "interval_ms", "ms"),
    ("concurrency.adaptive", "pinned_min_rtt_ms", "float"),
    ("concurrency.adaptive", "tolerance", "float"),
    ("concurrency.adaptive", "smoothing", "unit"),
    ("admission", "enabled", "bool"),
    ("admission", "enforce", "bool"),
    ("admission", "window_secs", "u32"),
    ("admission", "k", "float"),
    ("admission", "max_rejection_probability", "unit"),
    ("admission", "min_requests", "u32"),
    ("memory", "enabled", "bool"),
    ("memory", "enforce", "bool"),
    ("memory", "memory_limit_bytes", "bytes"),
    ("memory", "endpoints", "endpoints"),
    ("memory", "poll_interval_ms", "ms"),
    ("memory", "timeout_ms", "ms"),
    ("memory", "max_sample_age_ms", "ms"),
    ("memory", "gauge", "selector"),
    ("memory", "demand_gauges", "selectors"),
    ("memory", "retained_gauges", "selectors"),
    ("memory", "soft", "unit"),
    ("memory", "hard", "unit"),
    ("memory", "critical", "unit"),
    ("memory", "bytes_per_request", "bytes"),
    ("negative_cache", "enabled", "bool"),
    ("negative_cache", "enforce", "bool"),
    ("negative_cache", "ttl_ms", "ms"),
    ("negative_cache.single_flight", "enabled", "bool"),
    ("negative_cache.single_flight", "max_waiters", "u32"),
    ("negative_cache.single_flight", "max_wait_ms", "ms"),
    ("key_table", "capacity", "u32"),
    ("key_table", "shard_slots", "u32"),
    ("key_table", "known_ttl_ms", "ms"),
    ("retry_after", "min_secs", "u32"),
    ("retry_after", "max_secs", "u32"),
    ("retry_after", "jitter", "unit"),
];

const SELECTORS: &[&str] = &[
    "process_resident_memory_bytes",
    "go_memstats_heap_inuse_bytes",
    "go_memstats_stack_inuse_bytes",
    "x{a=\"b\"}",
    "x{a=\"b\",c=\"d\",}",
    "x{a=\"\\\"\\\\\\n\"}",
    "x{",
    "x{a=b}",
    "9bad",
    "",
    " x ",
    "x{a=\"1\",a=\"2\"}",
];

fn json_value(g: &mut Gen, kind: &str) -> Value {
    // One time in six, any type at all.
    if g.one_in(6) {
        return match g.below(7) {
            0 => Value::Null,
            1 => json!(g.bool()),
            2 => json!(g.int()),
            3 => json!(-(g.int() as i64)),
            4 => json!(String::from_utf8_lossy(&g.bytes(12))),
            5 => json!([1, "a"]),
            _ => json!({"x": 1}),
        };
    }
    match kind {
        "bool" => json!(g.bool()),
        "crit" => json!(*g.pick(&["critical", "sheddable", "Critical", ""])),
        "mode" => json!(*g.pick(&["fixed", "adaptive", "gradient"])),
        "path" => json!(*g.pick(&[
            "/sessions/v1/",
            "/",
            "/a/",
            "sessions/v1",
            "/a?b/",
            "/a%2F/",
            "/a#/",
            "",
            "/é/"
        ])),
        "u32" => json!(*g.pick(&[
            0u64,
            1,
            2,
            3,
            4,
            16,
            64,
            100,
            256,
            1000,
            4096,
            65_536,
            16_777_216,
            16_777_217,
            1_000_001,
            4_294_967_295,
            4_294_967_296
        ])),
        "ms" => json!(*g.pick(&[
            0u64, 1, 9, 10, 99, 100, 500, 1000, 5000, 60_000, 600_000, 86_400_000, 86_400_001
        ])),
        "bytes" => json!(*g.pick(&[0u64, 1, 1_048_575, 1_048_576, 419_430_400, u64::MAX])),
        "unit" => json!(*g.pick(&[0.0, 0.005, 0.01, 0.5, 0.7, 0.85, 0.95, 1.0, 1.5, 2.0, -0.1])),
        "float" => {
            let v = g.float();
            if v.is_finite() {
                json!(v)
            } else {
                json!(1.5)
            }
        }
        "selector" => json!(*g.pick(SELECTORS)),
        "selectors" => {
            let n = g.below(10) as usize;
            Value::Array((0..n).map(|_| json!(*g.pick(SELECTORS))).collect())
        }
        "endpoints" => {
            let n = if g.one_in(50) {
                257
            } else {
                g.below(4) as usize
            };
            Value::Array(
                (0..n)
                    .map(|_| {
                        let mut m = Map::new();
                        if g.bool() {
                            m.insert(
                                "cluster".into(),
                                json!(*g.pick(&["sessionstore", "", " ", "metrics"])),
                            );
                        }
                        if g.bool() {
                            m.insert("path".into(), json!(*g.pick(&["/metrics", "metrics", ""])));
                        }
                        if g.bool() {
                            m.insert("authority".into(), json!(*g.pick(&["kask", "", " "])));
                        }
                        if g.one_in(20) {
                            m.insert("bogus".into(), json!(1));
                        }
                        Value::Object(m)
                    })
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

fn insert_path(root: &mut Map<String, Value>, section: &str, field: &str, v: Value) {
    let mut node = root;
    if !section.is_empty() {
        for part in section.split('.') {
            let entry = node
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            node = entry.as_object_mut().expect("just made an object");
        }
    }
    node.insert(field.to_string(), v);
}

/// A configuration document: structured, then maybe mutated at the byte level.
fn config_doc(g: &mut Gen) -> Vec<u8> {
    if g.one_in(10) {
        return g.bytes(256);
    }
    let mut root = Map::new();
    let fields = g.below(8);
    for _ in 0..fields {
        let (section, field, kind) = *g.pick(FIELDS);
        let v = json_value(g, kind);
        insert_path(&mut root, section, field, v);
    }
    if g.one_in(15) {
        insert_path(
            &mut root,
            *g.pick(&["", "memory", "concurrency"]),
            "bogus",
            json!(1),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(root)).expect("serializable");
    if g.one_in(4) {
        mutate(g, &mut text);
    }
    text
}

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"18446744073709551616",
    b"NaN",
    b"\\u0000",
    b"\\ud800",
    b"\xff",
    b"\"concurrency\":{",
    b"\"memory\":{\"enabled\":true,",
];

fn mutate(g: &mut Gen, text: &mut Vec<u8>) {
    for _ in 0..g.range(1, 4) {
        let at = g.below(text.len() as u64 + 1) as usize;
        match g.below(5) {
            0 if !text.is_empty() => {
                let i = at.min(text.len() - 1);
                text[i] ^= 1 << g.below(8);
            }
            1 => {
                let end = (at + g.len(16)).min(text.len());
                text.drain(at..end);
            }
            2 => {
                let t = g.pick(TOKENS);
                text.splice(at..at, t.iter().copied());
            }
            3 => text.truncate(at),
            _ => {
                let end = (at + g.len(16)).min(text.len());
                let chunk = text[at..end].to_vec();
                text.splice(at..at, chunk);
            }
        }
    }
}

#[test]
fn fuzz_config_parse() {
    let mut accepted = 0u64;
    campaign("config_parse", 8_000, |g| {
        let doc = config_doc(g);
        match Config::parse(&doc) {
            Err(e) => {
                let line = e.to_string();
                assert!(line.starts_with("invalid plugin configuration: "), "{line}");
                assert!(!line.contains('\n'), "one log line: {line:?}");
                Outcome("rejected")
            }
            Ok(cfg) => {
                accepted += 1;
                build_everything(g, &cfg);
                Outcome("accepted")
            }
        }
    });
    if env_u64("SG_FUZZ_CASES").is_none() {
        assert!(accepted >= 500, "generator too rarely valid: {accepted}");
    }
}

/// Everything a worker builds from an accepted configuration, exercised a little:
/// an accepted configuration must never make a constructor or a first call panic.
fn build_everything(g: &mut Gen, cfg: &Config) {
    let store = MemStore::new();
    let layout = Layout::from_config(&cfg.key_table);
    assert!(layout.slots() >= 1);
    assert!(layout.slots() <= u64::from(cfg.key_table.capacity.max(1)));
    let mut cache = negative_cache(cfg, g.u64(), g.u64());
    let fp = cache.fingerprint(b"k");
    let l = cache.lookup(&store, fp, 1);
    let _ = cache.insert_missing(&store, fp, l.generation, 1);
    let mut limiter = Limiter::new(&cfg.concurrency, cfg.cas_attempts, g.u64());
    assert!(limiter.limit() >= cfg.concurrency.min_limit.min(limiter.limit()));
    if let Acquire::Admitted(p) | Acquire::ShadowShed(p) =
        limiter.try_acquire(&store, Criticality::Critical, 5)
    {
        let done = Completion {
            rtt_ms: Some(1.0),
            ending: Ending::Response(200),
            lane: Lane::Read,
        };
        limiter.release(&store, p, done, 6);
    }
    limiter.tick(&store, 10, true);
    assert_eq!(limiter.local_in_flight().total(), 0);
    let mut adm = Admission::new(&cfg.admission, cfg.cas_attempts);
    let _ = adm.decide(Criticality::Sheddable, g.f64());
    adm.tick(&store, 1000);
    let _ = Controller::new(&cfg.concurrency);
    let mut tracker = PressureTracker::new(&cfg.memory);
    let _ = tracker.snapshot(1);
    let _ = SingleFlight::new(&cfg.negative_cache.single_flight, Limits::default());
    let secs = cfg.retry_after.seconds(g.float(), g.float());
    assert!((cfg.retry_after.min_secs..=cfg.retry_after.max_secs).contains(&secs));
}

// ---------------------------------------------------------------------------------
// classify and the replies
// ---------------------------------------------------------------------------------

fn key_fragment(g: &mut Gen) -> Vec<u8> {
    const PIECES: &[&[u8]] = &[
        // 0..5: plain
        b"enwiki",
        b":",
        b"%3A",
        b"%3a",
        b"MWSession",
        // 5..17: what makes a path not a key (or a strange one)
        b"%2F",
        b"%2f",
        b"/",
        b"?",
        b"#",
        b"%",
        b"%4",
        b"%zz",
        b"%+1",
        b"%-1",
        b"% 1",
        b"..",
        // 17..: still a key
        b"%00",
        b"%ff",
        b"%C3%A9",
        b"\xc3\xa9",
        b"%E2%82",
        b"<script>",
        b"&",
        b"\"",
        b"\\",
        b"%5C",
        b"%22",
        b" ",
        b"\t",
        b"%0A",
        b"\xe2\x80\xa8",
        b"global:session:centralauth:",
        b".",
    ];
    let mut out = Vec::new();
    // Half the keys are made of pieces that keep them valid keys.
    let valid_only = g.bool();
    for _ in 0..g.len(12) {
        if valid_only {
            out.extend_from_slice(*g.pick(&PIECES[..5]));
            out.extend_from_slice(*g.pick(&PIECES[17..]));
        } else if g.one_in(5) {
            out.push(g.u64() as u8);
        } else {
            out.extend_from_slice(*g.pick(PIECES));
        }
    }
    if g.one_in(200) {
        // A very long key: up to Envoy's 60 KiB header limit.
        let n = g.range(1, 60 * 1024) as usize;
        out.extend(std::iter::repeat_n(b'a' + (g.below(26) as u8), n));
    }
    out
}

/// Go/Kask's decoding of a path: strict `%XX` (hex digits only), else not decodable.
fn reference_decode(input: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = hex(*input.get(i + 1)?)?;
            let lo = hex(*input.get(i + 2)?)?;
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Some(out)
}

/// How Go's json encoder renders bytes as a string: every invalid byte as U+FFFD.
fn go_string(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        s.push_str(chunk.valid());
        for _ in chunk.invalid() {
            s.push('\u{fffd}');
        }
    }
    s
}

fn check_problem(body: &[u8], path: &str) {
    let v: Value = serde_json::from_slice(body).expect("reply body is JSON");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 4, "type, title, detail, instance");
    let raw = path.split(['?', '#']).next().unwrap_or("");
    let expected = reference_decode(raw.as_bytes()).unwrap_or_else(|| raw.as_bytes().to_vec());
    assert_eq!(
        obj["instance"].as_str().expect("instance is a string"),
        go_string(&expected),
        "instance of {path:?}"
    );
    // Go escapes these; a raw one would differ from the store's own bytes.
    assert!(!body.iter().any(|&b| b == b'<' || b == b'>' || b == b'&'));
    assert!(!body[..body.len() - 1]
        .iter()
        .any(|&b| b < 0x20 && b != b'\n'));
    assert!(body.ends_with(b"}\n"));
}

/// Serializes header pairs like Envoy's `exportPairs` (proxy_get_header_map_pairs),
/// written apart from the filter's own `header_pairs::serialize`: names here are any
/// bytes, and the parser under test must not be checked against its own twin.
fn header_map(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        for part in [k, v] {
            out.extend_from_slice(part);
            out.push(0);
        }
    }
    out
}

#[test]
fn fuzz_header_pairs() {
    let names: [&[u8]; 6] = [
        b":method",
        b":path",
        b":authority",
        b"x-request-id",
        b":pat",
        b"",
    ];
    campaign("header_pairs", 20_000, |g| {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..g.len(12))
            .map(|_| {
                let name = if g.one_in(5) {
                    g.bytes(12)
                } else {
                    g.pick(&names).to_vec()
                };
                (name, g.bytes(60))
            })
            .collect();
        let mut buf = header_map(&pairs);
        let first = |name: &[u8]| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        };
        if g.one_in(3) {
            // Truncated, extended or corrupted: any answer but a panic. A change of
            // length always leaves the layout, so it must yield nothing.
            let len_before = buf.len();
            match g.below(3) {
                0 => buf.truncate(g.below(len_before as u64) as usize),
                1 => buf.extend(g.bytes(8).into_iter().chain([0])),
                _ => {
                    let at = g.below(len_before.max(1) as u64) as usize;
                    if let Some(b) = buf.get_mut(at) {
                        *b ^= 1 + g.below(255) as u8;
                    }
                }
            }
            let got = header_pairs::find(&buf, [":method", ":path"]);
            if buf.len() != len_before {
                assert_eq!(got, [None, None]);
                return Outcome("resized: nothing");
            }
            return Outcome(if got == [None, None] {
                "corrupted: nothing"
            } else {
                "corrupted: read"
            });
        }
        let [method, path] = header_pairs::find(&buf, [":method", ":path"]);
        assert_eq!((method, path), (first(b":method"), first(b":path")));
        Outcome(if method.is_some() && path.is_some() {
            "both found"
        } else {
            "some absent"
        })
    });
}

#[test]
fn fuzz_classify_and_replies() {
    let base_uris = ["/sessions/v1/", "/", "/a/b/"];
    let methods = ["GET", "POST", "DELETE", "PUT", "get", "", "GET ", "HEAD"];
    let fps = [Fingerprinter::new(1), Fingerprinter::new(2)];
    let retry = RetryAfterConfig::default();
    campaign("classify_replies", 10_000, |g| {
        let base = *g.pick(&base_uris);
        let method = if g.one_in(4) {
            *g.pick(&methods)
        } else {
            *g.pick(&methods[..3])
        };
        let mut raw_path = Vec::new();
        match g.below(10) {
            0 => raw_path.extend(g.bytes(40)),
            1 => {
                raw_path.extend_from_slice(&base.as_bytes()[..g.below(base.len() as u64) as usize])
            }
            _ => raw_path.extend_from_slice(base.as_bytes()),
        }
        raw_path.extend(key_fragment(g));
        // The host's own conversion: invalid UTF-8 reads as an empty path.
        let path = std::str::from_utf8(&raw_path).unwrap_or("");
        let r = classify(method, path, base);
        let outcome = match (&r.op, &r.key) {
            (Op::Other, None) => "other",
            (Op::Other, Some(_)) => panic!("Other with a key"),
            (_, None) => panic!("key op without a key: {path:?}"),
            (op, Some(key)) => {
                assert!(matches!(method, "GET" | "POST" | "DELETE"));
                let rest = path.strip_prefix(base).expect("key ops are under the base");
                assert!(!rest.contains(['?', '#']));
                assert_eq!(Some(key.clone()), reference_decode(rest.as_bytes()));
                assert!(!key.is_empty() && !key.contains(&b'/'));
                // Encoded and plain spellings are the same key, with the same hash.
                let encoded: String = key.iter().map(|b| format!("%{b:02X}")).collect();
                let again = classify(method, &format!("{base}{encoded}"), base);
                assert_eq!((again.op, again.key.as_ref()), (*op, Some(key)));
                for f in &fps {
                    assert_eq!(
                        f.fingerprint(key),
                        f.fingerprint(again.key.as_ref().unwrap())
                    );
                }
                "key"
            }
        };
        let nf = reply::cached_not_found(path);
        assert_eq!(nf.status, 404);
        check_problem(&nf.body, path);
        let reason = *g.pick(&ShedReason::ALL);
        let secs = retry.seconds(g.float(), g.float());
        let shed = reply::overloaded(reason, path, secs);
        assert_eq!(shed.status, 503);
        check_problem(&shed.body, path);
        for (name, value) in &shed.headers {
            assert!(
                !value.bytes().any(|b| b < 0x20 || b == 0x7f),
                "header {name} = {value:?}"
            );
        }
        Outcome(outcome)
    });
}

// ---------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct TruthSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

const METRIC_NAMES: &[&str] = &[
    "process_resident_memory_bytes",
    "go_memstats_heap_inuse_bytes",
    "go_memstats_stack_inuse_bytes",
    "x",
    "a:b_c",
    "_u",
    "http_requests_total",
];

fn label_value(g: &mut Gen) -> (String, String) {
    const PARTS: &[(&str, &str)] = &[
        ("a", "a"),
        ("\\\\", "\\"),
        ("\\\"", "\""),
        ("\\n", "\n"),
        (",", ","),
        ("}", "}"),
        ("=", "="),
        (" ", " "),
        ("é", "é"),
        ("{", "{"),
        ("#", "#"),
    ];
    let mut raw = String::new();
    let mut decoded = String::new();
    for _ in 0..g.len(6) {
        let (r, d) = *g.pick(PARTS);
        raw.push_str(r);
        decoded.push_str(d);
    }
    (raw, decoded)
}

fn format_value(g: &mut Gen) -> (String, f64) {
    match g.below(9) {
        0 => ("NaN".into(), f64::NAN),
        1 => ("+Inf".into(), f64::INFINITY),
        2 => ("-Inf".into(), f64::NEG_INFINITY),
        3 => {
            let v = g.below(1 << 40) as f64;
            (format!("{v:e}"), v)
        }
        4 => {
            let v = g.below(1 << 53) as f64;
            (format!("{}", v as u64), v)
        }
        5 => {
            let v = -(g.below(1000) as f64) / 8.0;
            (format!("{v}"), v)
        }
        6 => {
            let v = g.f64() * 1e12;
            (format!("{v:E}"), v)
        }
        _ => {
            let v = g.f64() * 1e9;
            (format!("{v}"), v)
        }
    }
}

/// A body with known samples, plus noise lines that cannot match the queried names.
fn prom_body(g: &mut Gen) -> (Vec<u8>, Vec<TruthSample>) {
    let mut out = Vec::new();
    let mut truth = Vec::new();
    let eol: &[u8] = if g.one_in(4) { b"\r\n" } else { b"\n" };
    for _ in 0..g.len(24) {
        match g.below(10) {
            0 => {
                out.extend_from_slice(b"# HELP x Some help with \\ and \" and x{a=\"b\"} 5");
                out.extend_from_slice(eol);
            }
            1 => {
                out.extend_from_slice(b"# TYPE process_resident_memory_bytes gauge");
                out.extend_from_slice(eol);
            }
            2 => out.extend_from_slice(eol),
            3 => {
                // Noise: a line that starts with a name we never ask for.
                out.extend_from_slice(b"zz_noise");
                let noise: Vec<u8> = g.bytes(30).into_iter().filter(|&b| b != b'\n').collect();
                out.extend(noise);
                out.extend_from_slice(eol);
            }
            _ => {
                let name = g.pick(METRIC_NAMES).to_string();
                let mut labels: Vec<(String, String)> = Vec::new();
                let mut raw_labels = Vec::new();
                for label in ["pod", "code", "a"] {
                    if g.one_in(2) {
                        let (raw, decoded) = label_value(g);
                        raw_labels.push(format!("{label}=\"{raw}\""));
                        labels.push((label.to_string(), decoded));
                    }
                }
                let (text, value) = format_value(g);
                if g.one_in(6) {
                    out.push(b' ');
                }
                out.extend_from_slice(name.as_bytes());
                if !raw_labels.is_empty() || g.one_in(4) {
                    out.push(b'{');
                    out.extend_from_slice(raw_labels.join(",").as_bytes());
                    if !raw_labels.is_empty() && g.one_in(4) {
                        out.push(b',');
                    }
                    out.push(b'}');
                }
                out.push(b' ');
                out.extend_from_slice(text.as_bytes());
                if g.one_in(5) {
                    out.extend_from_slice(format!(" {}", g.below(1 << 41)).as_bytes());
                }
                out.extend_from_slice(eol);
                truth.push(TruthSample {
                    name,
                    labels,
                    value,
                });
            }
        }
    }
    (out, truth)
}

fn same_value(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || ((a - b) / b).abs() < 1e-15
}

#[test]
fn fuzz_prometheus_text() {
    campaign("prometheus", 20_000, |g| {
        if g.one_in(3) {
            // Raw bytes: only "no panic" and termination can be asked.
            let mut body = g.bytes(512);
            if g.bool() {
                body.extend_from_slice(b"process_resident_memory_bytes 12\n");
                let at = g.below(body.len() as u64) as usize;
                body.truncate(at);
            }
            let n = samples(&body).count();
            assert!(n <= body.len() + 1);
            let _ = find_gauge(&body, "process_resident_memory_bytes", &[]);
            let sel_text = String::from_utf8_lossy(&g.bytes(24)).into_owned();
            if let Ok(sel) = Selector::parse(&sel_text) {
                let _ = sel.find(&body);
            }
            return Outcome("raw");
        }
        let (body, truth) = prom_body(g);
        // Every truth line is a sample the walker reads without error.
        let read: Vec<_> = samples(&body).collect();
        let ok = read.iter().filter(|s| s.is_ok()).count();
        assert!(ok >= truth.len(), "read {ok} of {} samples", truth.len());
        if truth.is_empty() {
            return Outcome("no samples");
        }
        let target = g.pick(&truth).clone();
        // Query by name and a subset of its labels.
        let query: Vec<(String, String)> = target
            .labels
            .iter()
            .filter(|_| g.below(3) != 0)
            .cloned()
            .collect();
        let q: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let matches: Vec<&TruthSample> = truth
            .iter()
            .filter(|s| {
                // As in Prometheus, an absent label matches the empty value.
                s.name == target.name
                    && q.iter().all(|(k, v)| {
                        let have = s.labels.iter().find(|(a, _)| a == k);
                        have.map_or("", |(_, b)| b.as_str()) == *v
                    })
            })
            .collect();
        let got = find_gauge(&body, &target.name, &q);
        let outcome = match (matches.len(), &got) {
            (1, Ok(v)) => {
                assert!(same_value(*v, matches[0].value), "{v} vs {:?}", matches[0]);
                "found"
            }
            (n, Err(PromError::Ambiguous { .. })) if n > 1 => "ambiguous",
            (n, other) => panic!(
                "{n} matching samples but {other:?} for {} {q:?} in {:?}",
                target.name,
                String::from_utf8_lossy(&body)
            ),
        };
        // A cut body never yields a number from its cut line.
        let cut = g.below(body.len() as u64 + 1) as usize;
        let head = &body[..cut];
        let complete = head
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&head[..0], |i| &head[..=i]);
        let a = find_gauge(head, &target.name, &q);
        let b = find_gauge(complete, &target.name, &q);
        match (&a, &b) {
            (Ok(x), Ok(y)) => assert!(same_value(*x, *y)),
            (Err(PromError::Truncated { .. }), Err(PromError::NotFound { .. })) => {}
            (Err(_), Err(_)) if head.len() == complete.len() => {}
            (Err(PromError::Ambiguous { .. }), Err(PromError::Ambiguous { .. })) => {}
            (Err(PromError::Malformed { .. }), Err(_)) => {}
            _ => panic!("cut at {cut}: {a:?} vs complete part {b:?}"),
        }
        Outcome(outcome)
    });
}

// ---------------------------------------------------------------------------------
// Memory pressure: snapshot decode, tracker on any body
// ---------------------------------------------------------------------------------

fn snapshot_bytes(g: &mut Gen) -> Vec<u8> {
    if g.one_in(4) {
        return g.bytes(120);
    }
    let mut b = vec![0u8; SNAPSHOT_LEN];
    b[..4].copy_from_slice(b"SGMP");
    b[4] = if g.one_in(20) { g.u64() as u8 } else { 2 };
    let active = g.bool();
    b[5] = if g.one_in(10) {
        g.u64() as u8
    } else {
        (g.below(8) as u8 & 6) | u8::from(active)
    };
    let endpoints = g.below(4) as u16;
    let driving = if g.one_in(10) {
        endpoints + 1
    } else {
        g.below(u64::from(endpoints) + 1) as u16
    };
    b[6..8].copy_from_slice(&driving.to_le_bytes());
    b[8..10].copy_from_slice(&endpoints.to_le_bytes());
    b[10..12].copy_from_slice(&(g.u64() as u16).to_le_bytes());
    let p = |g: &mut Gen| if active { g.f64() } else { 0.0 };
    let mut floats = [g.f64() * 2.0, g.f64() * 2.0, p(g), p(g), 1.0, g.f64()];
    if active {
        floats[4] = 1.0 - g.f64() * 0.99;
    }
    if g.one_in(3) {
        // One field anywhere at all.
        floats[g.below(6) as usize] = g.float();
    }
    for (i, v) in floats.iter().enumerate() {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    b[64..72].copy_from_slice(&g.int().to_le_bytes());
    b[72..80].copy_from_slice(&g.int().to_le_bytes());
    // The in-flight ceiling: none, in range, or anything.
    let ceiling = match g.below(3) {
        0 => 0,
        1 => 8 + g.below(1 << 20) as u32,
        _ => g.u64() as u32,
    };
    b[80..84].copy_from_slice(&ceiling.to_le_bytes());
    b[84..88].copy_from_slice(&(g.u64() as u32).to_le_bytes());
    if !g.one_in(20) {
        let sum = fnv1a(&b[..88]);
        b[88..92].copy_from_slice(&sum.to_le_bytes());
    }
    if g.one_in(10) {
        let i = g.below(SNAPSHOT_LEN as u64) as usize;
        b[i] ^= 1 << g.below(8);
    }
    b
}

fn memory_config(g: &mut Gen) -> MemoryConfig {
    let endpoints = g.range(1, 3) as usize;
    let mut cfg = MemoryConfig {
        enabled: Some(true),
        memory_limit_bytes: g.range(1 << 20, 1 << 34),
        endpoints: vec![MetricsEndpoint::default(); endpoints],
        max_sample_age_ms: g.range(1000, 10_000),
        bytes_per_request: g.one_in(3).then(|| g.range(4096, 1 << 20)),
        ..MemoryConfig::default()
    };
    if g.one_in(4) {
        cfg.demand_gauges.clear();
    }
    if g.one_in(3) {
        cfg.retained_gauges.clear();
    }
    cfg.validate("memory")
        .expect("generated a valid memory config");
    cfg
}

#[test]
fn fuzz_pressure() {
    campaign("pressure", 8_000, |g| {
        // Any stored bytes: decode never panics; what decodes is sane and round-trips.
        let bytes = snapshot_bytes(g);
        let decoded = PressureSnapshot::decode(&bytes);
        if let Ok(s) = decoded {
            for crit in [Criticality::Critical, Criticality::Sheddable] {
                let p = s.shed_probability(crit);
                assert!((0.0..=1.0).contains(&p));
                let _ = s.decide(crit, g.float());
                assert_eq!(s.decide(crit, f64::NAN), None);
            }
            assert!(s.max_in_flight().is_none_or(|c| c >= 8));
            assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
        }
        let store = MemStore::new();
        store.set(SNAPSHOT_KEY, &bytes, None).unwrap();
        let now = g.int();
        let _ = pressure::load(&store, now, g.range(1, 10_000));

        // A tracker fed any bodies and failures always publishes a decodable snapshot.
        let cfg = memory_config(g);
        let mut tracker = PressureTracker::new(&cfg);
        let mut t = g.below(1 << 40);
        for _ in 0..g.range(1, 12) {
            t += g.below(3000);
            let ep = g.below(cfg.endpoints.len() as u64 + 1) as usize;
            match g.below(4) {
                0 => tracker.on_failure(ep, FailureReason::Timeout, t),
                1 => {
                    let _ = tracker.on_sample(ep, &g.bytes(200), g.below(4096) as u32, t);
                }
                _ => {
                    let mut body = Vec::new();
                    for name in [
                        "process_resident_memory_bytes",
                        "go_memstats_heap_inuse_bytes",
                        "go_memstats_stack_inuse_bytes",
                        "go_memstats_heap_idle_bytes",
                        "go_memstats_heap_released_bytes",
                    ] {
                        if !g.one_in(8) {
                            let v = match g.below(3) {
                                0 => format!("{}", g.float()),
                                _ => format!("{}", g.below(cfg.memory_limit_bytes * 2)),
                            };
                            body.extend_from_slice(format!("{name} {v}\n").as_bytes());
                        }
                    }
                    if g.one_in(6) {
                        body.pop();
                    }
                    let _ = tracker.on_sample(ep, &body, g.below(4096) as u32, t);
                }
            }
            let snap = tracker.snapshot(t);
            let round = PressureSnapshot::decode(&snap.encode());
            assert_eq!(round, Ok(snap), "a published snapshot must decode");
            let _ = tracker.take_transitions(t);
            let _ = pressure::publish(&store, &snap, cfg.max_sample_age_ms, 4);
        }
        Outcome(if decoded.is_ok() {
            "decoded"
        } else {
            "rejected"
        })
    });
}

// ---------------------------------------------------------------------------------
// Key table over garbage shards, with the no-stale-404 oracle
// ---------------------------------------------------------------------------------

fn garbage_shard(g: &mut Gen, layout: &Layout) -> Option<Vec<u8>> {
    let len = layout.shard_bytes();
    match g.below(6) {
        0 => None,
        1 => Some(g.bytes(len + 16)),
        2 => Some(Vec::new()),
        _ => {
            // Right length and header, random slots (many with invalid meta).
            let mut b: Vec<u8> = (0..len).map(|_| g.u64() as u8).collect();
            b[..4].copy_from_slice(b"SGKT");
            b[4] = if g.one_in(8) { 2 } else { 1 };
            b[5] = layout.ways as u8;
            b[6..8].copy_from_slice(&(layout.buckets as u16).to_le_bytes());
            if g.bool() {
                // Make the metas valid: states 0..2, reserved 0, so the shard decodes.
                let slot_start =
                    |bucket: usize, way: usize| 8 + bucket * layout.bucket_bytes() + 4 + way * 16;
                for bucket in 0..layout.buckets as usize {
                    for way in 0..layout.ways as usize {
                        let at = slot_start(bucket, way);
                        let state = g.below(3);
                        let meta = (state << 56) | g.below(1 << 48);
                        b[at + 8..at + 16].copy_from_slice(&meta.to_le_bytes());
                    }
                }
            }
            Some(b)
        }
    }
}

/// An invalid shard value (never decodes), to inject mid-sequence.
fn broken_shard(g: &mut Gen, layout: &Layout) -> Vec<u8> {
    let mut b = g.bytes(layout.shard_bytes() + 8);
    if b.len() == layout.shard_bytes() {
        b.push(0);
    }
    if b.is_empty() {
        b.push(1);
    }
    b
}

#[test]
fn fuzz_keytable_garbage_shards() {
    campaign("keytable_negcache", 3_000, |g| {
        let layout = Layout::new(g.range(1, 256) as u32, g.range(1, 64) as u32);
        let table = KeyTable::with_layout(layout, g.u64());
        let ttl = g.range(1, 5000);
        let mut cache = NegCache::with_table(
            table,
            Fingerprinter::new(g.u64()),
            ttl,
            g.range(1, 5000),
            g.range(1, 6) as u32,
        );
        let store = MemStore::new();
        for shard in 0..layout.shards {
            if let Some(v) = garbage_shard(g, &layout) {
                force_set(&store, &layout.shard_key(shard), &v);
            }
        }
        let conflict_every = g.below(4); // 0 = never
        let counter = std::rc::Rc::new(std::cell::Cell::new(0u64));
        if conflict_every > 0 {
            let c = counter.clone();
            store.set_interference(move |_| {
                c.set(c.get() + 1);
                c.get() % (conflict_every + 1) == 0
            });
        }
        let fps: Vec<u64> = (0..g.range(1, 5)).map(|_| g.u64()).collect();
        // Per key: must not read Missing (an acknowledged write, nothing cached since).
        let mut protected: HashSet<u64> = HashSet::new();
        // Lookups held by "in-flight GETs": (fp, generation, read after the last ack?).
        let mut held = Vec::new();
        let mut tickets = Vec::new();
        let mut now = g.below(1 << 40);
        let mut hits = 0;
        for _ in 0..g.range(1, 30) {
            now += g.below(2 * ttl);
            let fp = *g.pick(&fps);
            // Shards to watch: all of a small table, else the one this op touches.
            let home = layout.locate(fp).0;
            let watched = |s: u32| layout.shards <= 16 || s == home;
            let valid_before: Vec<bool> = (0..layout.shards)
                .map(|s| {
                    watched(s) && {
                        store
                            .get(&layout.shard_key(s))
                            .is_some_and(|(b, _)| layout.is_valid_shard(&b))
                    }
                })
                .collect();
            match g.below(9) {
                0 | 1 => {
                    let l = cache.lookup(&store, fp, now);
                    if protected.contains(&fp) {
                        assert_ne!(
                            l.mark,
                            Mark::Missing,
                            "stale 404 after an acknowledged write"
                        );
                    }
                    hits += u32::from(l.mark == Mark::Missing);
                    held.push((fp, l, true));
                }
                2 if !held.is_empty() => {
                    let i = g.below(held.len() as u64) as usize;
                    let (fp, l, fresh) = held.swap_remove(i);
                    let fill = cache.insert_missing(&store, fp, l.generation, now);
                    if fill == Fill::Inserted && !fresh {
                        panic!("a 404 read before an acknowledged write was cached");
                    }
                    if fill == Fill::Inserted {
                        protected.remove(&fp);
                    }
                }
                3 => tickets.push((fp, cache.begin_write(&store, fp, now), true)),
                4 => {
                    let ok = g.one_in(4);
                    let r = cache.end_write(&store, fp, !ok, now);
                    if !ok && r != Invalidation::Failed {
                        protected.insert(fp);
                        // Every lookup and ticket taken before now predates the ack.
                        for h in held.iter_mut().filter(|h| h.0 == fp) {
                            h.2 = false;
                        }
                        for t in tickets.iter_mut().filter(|t| t.0 == fp) {
                            t.2 = false;
                        }
                    }
                }
                5 if !tickets.is_empty() => {
                    let i = g.below(tickets.len() as u64) as usize;
                    let (fp, ticket, fresh) = tickets.swap_remove(i);
                    let fill = cache.end_delete(&store, fp, ticket, g.bool(), now);
                    if fill == Fill::Inserted {
                        assert!(
                            fresh,
                            "a DELETE begun before an acknowledged write cached 404"
                        );
                        protected.remove(&fp);
                    }
                }
                6 => {
                    let l = cache.lookup(&store, fp, now);
                    let _ = cache.mark_exists(&store, fp, &l, now);
                }
                7 => {
                    let mut scan = OccupancyScan::new();
                    for _ in 0..=layout.shards {
                        if let Some(occ) =
                            scan.step(cache.table(), &store, now, 1 + g.below(3) as u32)
                        {
                            assert!(occ.live() <= layout.slots());
                        }
                    }
                }
                _ => {
                    // A foreign writer breaks a shard: it then reads as absent. The
                    // guarantee cannot survive that (module docs of negcache): forget
                    // what was promised for the keys of that shard.
                    let s = g.below(u64::from(layout.shards)) as u32;
                    force_set(&store, &layout.shard_key(s), &broken_shard(g, &layout));
                    let in_shard = |fp: &u64| layout.locate(*fp).0 == s;
                    protected.retain(|fp| !in_shard(fp));
                    for h in held.iter_mut().filter(|h| in_shard(&h.0)) {
                        h.2 = true;
                    }
                    for t in tickets.iter_mut().filter(|t| in_shard(&t.0)) {
                        t.2 = true;
                    }
                    continue;
                }
            }
            for (s, was_valid) in valid_before.iter().enumerate() {
                if *was_valid {
                    let (b, _) = store.get(&layout.shard_key(s as u32)).expect("still there");
                    assert!(layout.is_valid_shard(&b), "the cache broke shard {s}");
                }
            }
        }
        let stats = cache.stats();
        assert!(stats.hits <= stats.lookups);
        Outcome(if hits > 0 {
            "served a cached 404"
        } else {
            "no hit"
        })
    });
}

// ---------------------------------------------------------------------------------
// Limiter over a garbage in-flight table
// ---------------------------------------------------------------------------------

fn inflight_table(g: &mut Gen, my_id: u64) -> Option<Vec<u8>> {
    match g.below(5) {
        0 => None,
        1 => Some(g.bytes(200)),
        _ => {
            let n = if g.one_in(10) { 300 } else { g.below(8) as u32 };
            let mut b = b"SGi1".to_vec();
            b.extend_from_slice(&n.to_le_bytes());
            for _ in 0..n.min(300) {
                let id = if g.one_in(6) { my_id } else { g.u64() };
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&g.int().to_le_bytes());
                let c = |g: &mut Gen| {
                    if g.one_in(8) {
                        u32::MAX
                    } else {
                        g.below(8) as u32
                    }
                };
                b.extend_from_slice(&c(g).to_le_bytes());
                b.extend_from_slice(&c(g).to_le_bytes());
            }
            if g.one_in(5) {
                b.truncate(g.below(b.len() as u64) as usize);
            }
            Some(b)
        }
    }
}

fn concurrency_config(g: &mut Gen) -> ConcurrencyConfig {
    let min = g.range(1, 8) as u32;
    let max = min + g.below(64) as u32;
    let cfg = ConcurrencyConfig {
        enabled: !g.one_in(10),
        enforce: !g.one_in(5),
        mode: if g.bool() {
            LimitMode::Fixed
        } else {
            LimitMode::Adaptive
        },
        limit: g.range(u64::from(min), u64::from(max)) as u32,
        min_limit: min,
        max_limit: max,
        sheddable_share: g.f64(),
        ..ConcurrencyConfig::default()
    };
    cfg.validate("concurrency").expect("valid");
    cfg
}

#[test]
fn fuzz_limiter_garbage_table() {
    campaign("limiter", 6_000, |g| {
        let cfg = concurrency_config(g);
        let id = g.u64();
        let mut limiter = Limiter::new(&cfg, g.range(1, 8) as u32, id);
        let store = MemStore::new();
        if let Some(v) = inflight_table(g, id) {
            force_set(&store, INFLIGHT_KEY, &v);
        }
        if g.bool() {
            let junk = g.bytes(700);
            store.set(GRADIENT_KEY, &junk, None).unwrap();
        }
        let conflicts = g.below(3);
        if conflicts > 0 {
            let mut n = 0u64;
            store.set_interference(move |_| {
                n += 1;
                n % (conflicts + 1) == 0
            });
        }
        let mut held: Vec<Permit> = Vec::new();
        let mut now = g.below(1 << 40);
        let mut shed = 0;
        for _ in 0..g.range(1, 40) {
            now += g.below(500);
            match g.below(6) {
                0..=2 => {
                    let crit = if g.bool() {
                        Criticality::Critical
                    } else {
                        Criticality::Sheddable
                    };
                    match limiter.try_acquire(&store, crit, now) {
                        Acquire::Admitted(p) | Acquire::ShadowShed(p) => held.push(p),
                        Acquire::Shed { severity, .. } => {
                            assert!((0.0..=1.0).contains(&severity));
                            shed += 1;
                        }
                    }
                }
                3 | 4 if !held.is_empty() => {
                    let i = g.below(held.len() as u64) as usize;
                    let p = held.swap_remove(i);
                    let ending = *g.pick(&[
                        Ending::Response(200),
                        Ending::Response(503),
                        Ending::Response(504),
                        Ending::UpstreamReset,
                        Ending::DownstreamReset,
                        Ending::LocalReply,
                    ]);
                    let rtt = if g.one_in(4) {
                        Some(g.float())
                    } else {
                        Some(g.f64() * 100.0)
                    };
                    limiter.release(
                        &store,
                        p,
                        Completion {
                            rtt_ms: rtt,
                            ending,
                            lane: Lane::Read,
                        },
                        now,
                    );
                }
                5 => {
                    if g.one_in(4) {
                        limiter.set_pressure_factor(g.float());
                    }
                    limiter.tick(&store, now, g.bool());
                }
                _ => {
                    if let Some(v) = inflight_table(g, id) {
                        force_set(&store, INFLIGHT_KEY, &v);
                    }
                }
            }
            let limit = limiter.limit();
            assert!(limit >= 1, "limit {limit}");
            assert!(
                limit <= cfg.max_limit,
                "limit {limit} > max {}",
                cfg.max_limit
            );
        }
        for p in held.drain(..) {
            let done = Completion {
                rtt_ms: None,
                ending: Ending::DownstreamReset,
                lane: Lane::Read,
            };
            limiter.release(&store, p, done, now);
        }
        assert_eq!(
            limiter.local_in_flight().total(),
            0,
            "every permit came back"
        );
        let stats = limiter.stats();
        assert_eq!(stats.release_underflows, 0);
        assert_eq!(stats.foreign_permits, 0);
        Outcome(if shed > 0 { "shed some" } else { "shed none" })
    });
}

// ---------------------------------------------------------------------------------
// Admission ring, gradient state, election lease, seed over garbage
// ---------------------------------------------------------------------------------

#[test]
fn fuzz_admission_garbage_ring() {
    campaign("admission", 8_000, |g| {
        let cfg = AdmissionConfig {
            enabled: true,
            enforce: !g.one_in(4),
            window_secs: g.range(1, 20) as u32,
            k: 1.0 + g.f64() * 3.0,
            max_rejection_probability: g.f64(),
            min_requests: g.below(60) as u32,
        };
        let mut adm = Admission::new(&cfg, g.range(1, 6) as u32);
        let store = MemStore::new();
        let ring = |g: &mut Gen| -> Vec<u8> {
            if g.one_in(3) {
                return g.bytes(500);
            }
            let n = if g.one_in(4) {
                g.below(30)
            } else {
                u64::from(cfg.window_secs)
            };
            let mut b = b"SGa1".to_vec();
            b.extend_from_slice(&(n as u32).to_le_bytes());
            for _ in 0..n * 5 {
                let v = if g.one_in(5) {
                    u32::MAX
                } else {
                    g.u32() % 1000
                };
                b.extend_from_slice(&v.to_le_bytes());
            }
            b
        };
        let r = ring(g);
        force_set(&store, ADMISSION_KEY, &r);
        let mut now = g.int() / 2;
        let mut rejected = 0;
        for _ in 0..g.range(1, 40) {
            // Time mostly moves forward, sometimes jumps or steps back.
            now = match g.below(10) {
                0 => now.saturating_sub(g.below(5000)),
                1 => g.int(),
                _ => now.saturating_add(g.below(1500)),
            };
            match g.below(5) {
                0 => adm.tick(&store, now),
                1 => {
                    let r = ring(g);
                    force_set(&store, ADMISSION_KEY, &r);
                }
                2 => adm.record(*g.pick(&[
                    Ending::Response(200),
                    Ending::Response(500),
                    Ending::UpstreamTimeout,
                    Ending::DownstreamReset,
                ])),
                _ => {
                    let crit = if g.bool() {
                        Criticality::Critical
                    } else {
                        Criticality::Sheddable
                    };
                    match adm.decide(crit, g.float()) {
                        Decision::Reject { severity } => {
                            assert!((0.0..=1.0).contains(&severity));
                            rejected += 1;
                        }
                        Decision::Admit | Decision::ShadowReject => {}
                    }
                    assert_eq!(adm.decide(crit, f64::NAN), Decision::Admit);
                }
            }
            let p = adm.stats().rejection_probability;
            assert!(
                (0.0..=cfg.max_rejection_probability).contains(&p),
                "p = {p}, cap {}",
                cfg.max_rejection_probability
            );
        }
        Outcome(if rejected > 0 {
            "rejected some"
        } else {
            "rejected none"
        })
    });
}

#[test]
fn fuzz_gradient_state() {
    campaign("gradient", 5_000, |g| {
        let cfg = ConcurrencyConfig {
            mode: LimitMode::Adaptive,
            ..concurrency_config(g)
        };
        let ctl = Controller::new(&cfg);
        let len = 1248;
        let mut bytes: Vec<u8> = if g.one_in(4) {
            g.bytes(700)
        } else {
            (0..len).map(|_| g.u64() as u8).collect()
        };
        if bytes.len() >= 4 && !g.one_in(8) {
            bytes[..4].copy_from_slice(b"SGg2");
        }
        if bytes.len() == len && g.bool() {
            // Plausible floats for limit, baseline, sample, gradient.
            for i in 0..4 {
                let v = if g.bool() { g.f64() * 100.0 } else { g.float() };
                bytes[4 + 8 * i..12 + 8 * i].copy_from_slice(&v.to_le_bytes());
            }
        }
        let Some(mut state) = GradientState::decode(&bytes) else {
            return Outcome("undecodable");
        };
        let check = |state: &GradientState| {
            let l = ctl.limit_of(state);
            assert!(
                (cfg.min_limit..=cfg.max_limit).contains(&l),
                "limit {l} outside [{}, {}]",
                cfg.min_limit,
                cfg.max_limit
            );
        };
        check(&state);
        let mut now = g.int();
        for _ in 0..g.range(1, 8) {
            let mut h = RttHistogram::new();
            for _ in 0..g.below(60) {
                h.record(if g.one_in(5) {
                    g.float()
                } else {
                    g.f64() * 50.0
                });
            }
            let windows = if g.bool() {
                [h, RttHistogram::new()]
            } else {
                [RttHistogram::new(), h]
            };
            state.merge(
                &windows,
                Usage {
                    peak_in_flight: g.u32(),
                    denied: g.u32(),
                },
            );
            now = now.wrapping_add(g.below(3000));
            let _ = ctl.step(&mut state, now);
            check(&state);
            let again = GradientState::decode(&state.encode()).expect("own encoding decodes");
            check(&again);
        }
        // The same garbage through the shared key and a limiter tick.
        let store = MemStore::new();
        store.set(GRADIENT_KEY, &bytes, None).unwrap();
        let mut limiter = Limiter::new(&cfg, 4, g.u64());
        limiter.tick(&store, now, true);
        assert!((cfg.min_limit..=cfg.max_limit).contains(&limiter.limit()));
        Outcome("decoded")
    });
}

#[test]
fn fuzz_election_and_seed() {
    campaign("election_seed", 20_000, |g| {
        let store = MemStore::new();
        let mut lease = g.bytes(40);
        if lease.len() >= 4 && g.bool() {
            lease[..4].copy_from_slice(b"SGl1");
        }
        if g.one_in(3) {
            lease = Lease {
                term: g.u32(),
                holder: g.u64(),
                expires_ms: g.int(),
            }
            .encode();
        }
        if let Some(l) = Lease::decode(&lease) {
            assert_eq!(Lease::decode(&l.encode()), Some(l));
        }
        store.set(LEASE_KEY, &lease, None).unwrap();
        let mut a = Election::new(g.range(1, 4) as u32);
        let mut b = Election::new(g.range(1, 4) as u32);
        let (ida, idb) = (g.u64(), g.u64() | 1);
        let lease_ms = g.range(1, 5000);
        let mut now = g.int() / 2;
        for _ in 0..g.range(1, 10) {
            now = now.saturating_add(g.below(lease_ms * 2));
            let la = a.tick(&store, ida, now, lease_ms);
            let lb = b.tick(&store, idb, now, lease_ms);
            assert!(!(la && lb) || ida == idb, "two leaders at {now}");
        }
        let mut seed = g.bytes(24);
        if g.one_in(3) {
            seed = b"sgseed01".to_vec();
            seed.extend_from_slice(&g.u64().to_le_bytes());
            if g.one_in(4) {
                seed.truncate(g.below(17) as usize);
            }
        }
        if !seed.is_empty() || g.bool() {
            store.set(SEED_KEY, &seed, None).unwrap();
        }
        let before = read_seed(&store);
        let chosen = init_seed(&store, g.u64());
        if let Some(existing) = before {
            assert_eq!(chosen, existing, "an existing seed is adopted");
        }
        assert_eq!(
            read_seed(&store),
            Some(chosen),
            "and then everyone reads it"
        );
        assert_eq!(init_seed(&store, g.u64()), chosen);
        Outcome(if before.is_some() {
            "adopted"
        } else {
            "created"
        })
    });
}

// ---------------------------------------------------------------------------------
// Single-flight bookkeeping
// ---------------------------------------------------------------------------------

#[test]
fn fuzz_singleflight_releases_every_waiter_once() {
    campaign("singleflight", 20_000, |g| {
        let cfg = SingleFlightConfig {
            enabled: !g.one_in(10),
            max_waiters: g.below(6) as u32,
            max_wait_ms: g.range(1, 2000),
        };
        let limits = Limits {
            max_keys: g.range(1, 8) as usize,
            max_total_waiters: g.range(1, 12) as usize,
            leader_ttl_ms: g.range(1, 5000),
        };
        let mut sf = SingleFlight::new(&cfg, limits);
        let fps: Vec<u64> = (0..g.range(1, 6)).map(|_| g.u64()).collect();
        let mut next_id = 1u32;
        let mut leaders: Vec<(u64, u32)> = Vec::new();
        let mut waiting: HashMap<u32, u64> = HashMap::new();
        let mut now = g.below(1 << 40);
        let mut released = 0;
        let mut take = |ids: Vec<u32>, waiting: &mut HashMap<u32, u64>| {
            for id in ids {
                assert!(
                    waiting.remove(&id).is_some(),
                    "id {id} released twice or never waited"
                );
                released += 1;
            }
        };
        for _ in 0..g.range(1, 60) {
            now += g.below(300);
            let fp = *g.pick(&fps);
            match g.below(6) {
                0..=2 => {
                    let id = next_id;
                    next_id += 1;
                    match sf.join(fp, id, now) {
                        Join::Leader => leaders.push((fp, id)),
                        Join::Wait => {
                            waiting.insert(id, fp);
                        }
                        Join::Bypass => {}
                    }
                }
                3 if !leaders.is_empty() => {
                    let (fp, id) = leaders.swap_remove(g.below(leaders.len() as u64) as usize);
                    let ids = if g.bool() {
                        sf.complete(fp, id, g.bool())
                    } else {
                        sf.leader_gone(fp, id)
                    };
                    take(ids, &mut waiting);
                }
                4 if !waiting.is_empty() => {
                    let ids: Vec<u32> = waiting.keys().copied().collect();
                    let id = *g.pick(&ids);
                    let fp = waiting[&id];
                    if sf.cancel(fp, id) {
                        waiting.remove(&id);
                    } else {
                        panic!("waiter {id} could not be cancelled");
                    }
                }
                _ => take(sf.expire(now), &mut waiting),
            }
            assert_eq!(sf.waiters(), waiting.len());
            assert!(sf.flights() <= limits.max_keys);
            assert!(sf.waiters() <= limits.max_total_waiters);
        }
        // Nothing is held forever: past every deadline, all waiters come back.
        take(sf.expire(now + 10_000), &mut waiting);
        assert!(waiting.is_empty(), "waiters never released: {waiting:?}");
        Outcome(if released > 0 {
            "released"
        } else {
            "none waited"
        })
    });
}
