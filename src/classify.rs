//! From method and path to what a request is: its operation, its key, its class.

use serde::Deserialize;

/// What a request does to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Delete,
    /// Anything the store answers without touching a key: other methods, other paths,
    /// malformed keys (the store itself answers those with 400/404).
    Other,
}

/// Whether a request may be shed before others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Shed only when nothing sheddable is left (logged-in users' work).
    Critical,
    /// Shed first (readers looking up sessions that do not exist).
    Sheddable,
}

/// The class of a request, the unit of priorities and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// GET of a key recently seen to exist.
    ReadKnown,
    /// GET of any other key.
    ReadUnknown,
    Write,
    Delete,
    Other,
}

impl Class {
    pub const ALL: [Class; 5] = [
        Class::ReadKnown,
        Class::ReadUnknown,
        Class::Write,
        Class::Delete,
        Class::Other,
    ];

    /// Stable name used in metrics and headers.
    pub fn name(self) -> &'static str {
        match self {
            Class::ReadKnown => "read_known",
            Class::ReadUnknown => "read_unknown",
            Class::Write => "write",
            Class::Delete => "delete",
            Class::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn of(op: Op, known_to_exist: bool) -> Class {
        match op {
            Op::Read if known_to_exist => Class::ReadKnown,
            Op::Read => Class::ReadUnknown,
            Op::Write => Class::Write,
            Op::Delete => Class::Delete,
            Op::Other => Class::Other,
        }
    }
}

/// Criticality of each key operation. Defaults: a logged-in user's work (writes,
/// deletes, reads of sessions known to exist) is critical; other reads are sheddable.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Priorities {
    pub read_known: Criticality,
    pub read_unknown: Criticality,
    pub write: Criticality,
    pub delete: Criticality,
}

impl Default for Priorities {
    fn default() -> Self {
        Self {
            read_known: Criticality::Critical,
            read_unknown: Criticality::Sheddable,
            write: Criticality::Critical,
            delete: Criticality::Critical,
        }
    }
}

impl Priorities {
    /// `Other` requests are never shed (the filter lets them through untouched);
    /// should one be asked about, it is critical.
    pub fn of(&self, class: Class) -> Criticality {
        match class {
            Class::ReadKnown => self.read_known,
            Class::ReadUnknown => self.read_unknown,
            Class::Write => self.write,
            Class::Delete => self.delete,
            Class::Other => Criticality::Critical,
        }
    }
}

/// A request as the filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// The decoded key, for key operations only. Percent-encoded and plain forms of the
    /// same key (`a%3Ab`, `a:b`) give the same bytes, as they do in the store.
    pub key: Option<Vec<u8>>,
}

/// Classifies a request the way the store will route it.
///
/// Only requests the store would treat as key operations get an op and a key; the rest
/// (query strings, `/` in the key, empty keys, bad percent-encoding, other methods) are
/// `Other` and pass through untouched, so the store answers them with its own errors.
pub fn classify(method: &str, path: &str, base_uri: &str) -> Request {
    let other = Request {
        op: Op::Other,
        key: None,
    };
    let op = match method {
        "GET" => Op::Read,
        "POST" => Op::Write,
        "DELETE" => Op::Delete,
        _ => return other,
    };
    let Some(raw_key) = path.as_bytes().strip_prefix(base_uri.as_bytes()) else {
        return other;
    };
    if find_any(raw_key, QUERY_OR_FRAGMENT).is_some() {
        return other;
    }
    let mut key = Vec::with_capacity(raw_key.len());
    match percent_decode_into(raw_key, &mut key) {
        Some(()) if !key.is_empty() && !key.contains(&b'/') => Request { op, key: Some(key) },
        _ => other,
    }
}

/// Appends `input` to `out` with its `%XX` escapes decoded; `None` at a malformed escape
/// (the store rejects those too), with `out` partly written.
pub(crate) fn percent_decode_into(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut rest = input;
    while let Some(at) = find_any(rest, [b'%']) {
        let (plain, escape) = rest.split_at_checked(at)?;
        out.extend_from_slice(plain);
        let [_, hi, lo, tail @ ..] = escape else {
            return None;
        };
        out.push(hex_value(*hi)? << 4 | hex_value(*lo)?);
        rest = tail;
    }
    out.extend_from_slice(rest);
    Some(())
}

/// Where a request target's path ends.
pub(crate) const QUERY_OR_FRAGMENT: [u8; 2] = [b'?', b'#'];

/// Index of the first byte of `s` that is one of `needles`. Paths are scanned several
/// times per request, so eight bytes at a time.
pub(crate) fn find_any<const N: usize>(s: &[u8], needles: [u8; N]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    let mut start = 0;
    for word in s.chunks_exact(8) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // `x` has a zero byte exactly where `w` holds `n`; the test finds whether there
        // is one, the scan below where.
        let found = needles.iter().any(|&n| {
            let x = w ^ ONES.wrapping_mul(u64::from(n));
            x.wrapping_sub(ONES) & !x & HIGHS != 0
        });
        if found {
            break;
        }
        start += 8;
    }
    let offset = s.get(start..)?.iter().position(|b| needles.contains(b))?;
    Some(start + offset)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const BASE: &str = "/sessions/v1/";

    fn key_of(method: &str, path: &str) -> Option<Vec<u8>> {
        classify(method, path, BASE).key
    }

    #[test]
    fn methods_map_to_ops() {
        assert_eq!(classify("GET", "/sessions/v1/k", BASE).op, Op::Read);
        assert_eq!(classify("POST", "/sessions/v1/k", BASE).op, Op::Write);
        assert_eq!(classify("DELETE", "/sessions/v1/k", BASE).op, Op::Delete);
        assert_eq!(classify("PUT", "/sessions/v1/k", BASE).op, Op::Other);
        assert_eq!(classify("HEAD", "/sessions/v1/k", BASE).op, Op::Other);
        assert_eq!(classify("get", "/sessions/v1/k", BASE).op, Op::Other);
    }

    #[test]
    fn encoded_and_plain_colons_are_the_same_key() {
        let a = key_of("GET", "/sessions/v1/enwiki%3AMWSession%3Aabc");
        let b = key_of("GET", "/sessions/v1/enwiki:MWSession:abc");
        assert_eq!(a, b);
        assert_eq!(a.unwrap(), b"enwiki:MWSession:abc");
        assert_eq!(key_of("GET", "/sessions/v1/a%3ab").unwrap(), b"a:b");
    }

    #[test]
    fn the_stores_own_rejections_pass_through_as_other() {
        for path in [
            "/sessions/v1/",
            "/sessions/v1/cat/dog",
            "/sessions/v1/cat%2Fdog",
            "/sessions/v1/foo?bar",
            "/sessions/v1/foo?",
            "/sessions/v1/bad%zz",
            "/sessions/v1/trunc%4",
            "/something/else",
            "/sessions/v1",
            "/healthz",
            "",
        ] {
            let r = classify("GET", path, BASE);
            assert_eq!(r.op, Op::Other, "{path}");
            assert_eq!(r.key, None, "{path}");
        }
    }

    #[test]
    fn kask_examples() {
        assert_eq!(key_of("GET", "/sessions/v1/cat").unwrap(), b"cat");
        assert_eq!(key_of("GET", "/sessions/v1/foo%3Fbar").unwrap(), b"foo?bar");
        assert_eq!(key_of("GET", "/sessions/v1/cat%20dog").unwrap(), b"cat dog");
    }

    #[test]
    fn invalid_utf8_keys_are_still_keys() {
        assert_eq!(
            key_of("GET", "/sessions/v1/%ff%fe").unwrap(),
            vec![0xff, 0xfe]
        );
    }

    #[test]
    fn find_any_finds_the_first_needle_anywhere() {
        let hay: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        assert_eq!(find_any(&hay, [b'?', b'#']), None);
        assert_eq!(find_any(&[], [b'%']), None);
        for at in 0..hay.len() {
            for (needle, other) in [(b'?', b'#'), (b'#', b'?')] {
                let mut s = hay.clone();
                s[at] = needle;
                assert_eq!(find_any(&s, [b'?', b'#']), Some(at));
                if let Some(later) = s.get_mut(at + 1 + at % 9) {
                    *later = other;
                }
                assert_eq!(find_any(&s, [b'?', b'#']), Some(at));
                assert_eq!(find_any(&s[at..], [needle]), Some(0));
            }
        }
        // Bytes one above or below a needle, or with the high bit set, are not it.
        assert_eq!(
            find_any(
                &[0x24, 0x26, 0xa5, 0x40, 0x3e, 0xbf, 0x22, 0, 0xff],
                [b'%', b'?', b'#']
            ),
            None
        );
    }

    #[test]
    fn classes_follow_priorities() {
        let p = Priorities::default();
        assert_eq!(p.of(Class::of(Op::Read, false)), Criticality::Sheddable);
        assert_eq!(p.of(Class::of(Op::Read, true)), Criticality::Critical);
        assert_eq!(p.of(Class::of(Op::Write, false)), Criticality::Critical);
        assert_eq!(p.of(Class::of(Op::Delete, false)), Criticality::Critical);
        assert_eq!(p.of(Class::of(Op::Other, false)), Criticality::Critical);
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
