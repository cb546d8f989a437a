//! Local replies: the fast 503 and the cached 404, in the store's own error shape.
//!
//! Kask writes its errors with Go's `json.MarshalIndent(problem, "", "  ")` plus a
//! newline, `content-type: application/json` and `x-content-type-options: nosniff`.
//! A cached 404 must be byte-identical to the store's own, so the encoder below
//! follows Go's escaping rules exactly.

use std::borrow::Cow;

use serde::Deserialize;

use crate::classify::{find_any, percent_decode_into, QUERY_OR_FRAGMENT};
use crate::config::check::{check_range, check_unit, field, ConfigError};

/// A problem body up to the contents of its `instance` string. Only the instance varies
/// per request; the other fields are constant texts that Go would not escape (a test
/// checks), so the whole head is one constant.
macro_rules! problem_head {
    ($kind:literal, $title:literal, $detail:literal) => {
        concat!(
            "{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/",
            $kind,
            "\",\n  \"title\": \"",
            $title,
            "\",\n  \"detail\": \"",
            $detail,
            "\",\n  \"instance\": \""
        )
    };
}

const NOT_FOUND_HEAD: &str = problem_head!(
    "not_found",
    "Not found",
    "The value you requested was not found"
);
const PROBLEM_TAIL: &[u8] = b"\"\n}\n";

/// A reply header; only `retry-after` is not a constant.
pub type Header = (&'static str, Cow<'static, str>);

const CONTENT_TYPE: Header = ("content-type", Cow::Borrowed("application/json"));
const NOSNIFF: Header = ("x-content-type-options", Cow::Borrowed("nosniff"));

/// Why a request was shed; travels in `x-sessionguard-shed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    Concurrency,
    Admission,
    Memory,
}

impl ShedReason {
    pub const ALL: [ShedReason; 3] = [
        ShedReason::Concurrency,
        ShedReason::Admission,
        ShedReason::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShedReason::Concurrency => "concurrency",
            ShedReason::Admission => "admission",
            ShedReason::Memory => "memory",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn problem_head(self) -> &'static str {
        match self {
            ShedReason::Concurrency => problem_head!(
                "overloaded",
                "Service unavailable",
                "The session store is at its concurrency limit; retry after the indicated delay"
            ),
            ShedReason::Admission => problem_head!(
                "overloaded",
                "Service unavailable",
                "The session store is failing requests; this one was rejected early to let it recover"
            ),
            ShedReason::Memory => problem_head!(
                "overloaded",
                "Service unavailable",
                "The session store is close to its memory limit; retry after the indicated delay"
            ),
        }
    }
}

/// How `retry-after` is chosen for a shed request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryAfterConfig {
    pub min_secs: u32,
    pub max_secs: u32,
    /// Fraction of the delay randomised, so that clients do not return in lockstep.
    pub jitter: f64,
}

impl Default for RetryAfterConfig {
    fn default() -> Self {
        Self {
            min_secs: 1,
            max_secs: 30,
            jitter: 0.5,
        }
    }
}

impl RetryAfterConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "min_secs"), self.min_secs, 1, 3600)?;
        check_range(
            &field(section, "max_secs"),
            self.max_secs,
            self.min_secs,
            3600,
        )?;
        check_unit(&field(section, "jitter"), self.jitter, 0.0, 1.0)
    }

    /// Seconds to advertise, given how severe the overload is (`severity` in [0, 1]:
    /// 0 = barely over, 1 = as bad as it gets) and a uniform random `u` in [0, 1).
    ///
    /// The base delay grows with severity between `min_secs` and `max_secs`; jitter then
    /// spreads it over `[base * (1 - jitter), base]`, never below `min_secs`.
    pub fn seconds(&self, severity: f64, u: f64) -> u32 {
        let severity = if severity.is_finite() {
            severity.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let u = if u.is_finite() {
            u.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let span = f64::from(self.max_secs - self.min_secs);
        let base = f64::from(self.min_secs) + span * severity;
        let jittered = base * (1.0 - self.jitter * u);
        (jittered.round() as u32).clamp(self.min_secs, self.max_secs)
    }
}

/// A ready-to-send local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

/// The store's own 404 for the raw request `path`, plus `x-sessionguard-cache: hit`.
pub fn cached_not_found(path: &str) -> Reply {
    Reply {
        status: 404,
        headers: vec![
            CONTENT_TYPE,
            NOSNIFF,
            ("x-sessionguard-cache", Cow::Borrowed("hit")),
        ],
        body: problem_body(NOT_FOUND_HEAD, path),
    }
}

/// The fast 503 for a shed request.
pub fn overloaded(reason: ShedReason, path: &str, retry_after_secs: u32) -> Reply {
    Reply {
        status: 503,
        headers: vec![
            CONTENT_TYPE,
            NOSNIFF,
            ("retry-after", Cow::Owned(retry_after_secs.to_string())),
            ("x-envoy-overloaded", Cow::Borrowed("true")),
            ("x-sessionguard-shed", Cow::Borrowed(reason.name())),
        ],
        body: problem_body(reason.problem_head(), path),
    }
}

/// Go's `json.MarshalIndent(Problem{...}, "", "  ")` followed by `\n`, for `path`.
fn problem_body(head: &str, path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + path.len() + PROBLEM_TAIL.len());
    out.extend_from_slice(head.as_bytes());
    let start = out.len();
    push_instance(&mut out, path);
    // Written in place, the usual instance (printable ASCII) needs no second copy.
    if let Some(instance) = out.get(start..) {
        if !instance.iter().all(|&b| is_plain_ascii(b)) {
            let instance = out.split_off(start);
            push_go_json_string_contents(&mut out, &instance);
        }
    }
    out.extend_from_slice(PROBLEM_TAIL);
    out
}

/// Appends the store's `instance`, unescaped: the decoded request path (Go's
/// `r.URL.Path`), or the path as sent when it does not decode.
fn push_instance(out: &mut Vec<u8>, raw_path: &str) {
    let raw = raw_path.as_bytes();
    let without_query = match find_any(raw, QUERY_OR_FRAGMENT) {
        Some(end) => raw.get(..end).unwrap_or_default(),
        None => raw,
    };
    let start = out.len();
    if percent_decode_into(without_query, out).is_none() {
        out.truncate(start);
        out.extend_from_slice(without_query);
    }
}

/// A byte Go writes as itself in a JSON string, whatever surrounds it.
fn is_plain_ascii(b: u8) -> bool {
    (0x20..0x80).contains(&b) && !matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&')
}

/// Go's encoding/json string escaping with HTML escaping on (the default), without the
/// quotes; each byte that is not part of valid UTF-8 becomes the six characters
/// `\ufffd`, as in Go.
fn push_go_json_string_contents(out: &mut Vec<u8>, s: &[u8]) {
    for chunk in s.utf8_chunks() {
        push_valid(out, chunk.valid().as_bytes());
        for _ in chunk.invalid() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
}

/// `s` is valid UTF-8; runs that need no escaping are copied whole.
fn push_valid(out: &mut Vec<u8>, s: &[u8]) {
    let mut copied = 0;
    let mut i = 0;
    while i < s.len() {
        match escaped_char(s, i) {
            Some((code, width)) => {
                out.extend_from_slice(s.get(copied..i).unwrap_or_default());
                push_escape(out, code);
                i += width;
                copied = i;
            }
            None => i += 1,
        }
    }
    out.extend_from_slice(s.get(copied..).unwrap_or_default());
}

/// The character starting at `s[i]` if Go escapes it: its code point and UTF-8 width.
fn escaped_char(s: &[u8], i: usize) -> Option<(u32, usize)> {
    match *s.get(i)? {
        b @ (b'"' | b'\\' | b'<' | b'>' | b'&' | 0..=0x1f) => Some((u32::from(b), 1)),
        // U+2028 and U+2029; in valid UTF-8, 0xe2 only ever starts a character.
        0xe2 => match *s.get(i + 1..i + 3)? {
            [0x80, last @ (0xa8 | 0xa9)] => Some((0x2000 | u32::from(last & 0x3f), 3)),
            _ => None,
        },
        _ => None,
    }
}

fn push_escape(out: &mut Vec<u8>, code: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match code {
        0x22 => b'"',
        0x5c => b'\\',
        0x0a => b'n',
        0x0d => b'r',
        0x09 => b't',
        _ => {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                // A nibble is below 16: `get` always finds its digit.
                out.extend(HEX.get(((code >> shift) & 0xf) as usize));
            }
            return;
        }
    };
    out.extend_from_slice(&[b'\\', short]);
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn not_found_is_byte_identical_to_kask() {
        let r = cached_not_found("/sessions/v1/somekey");
        let expected = "{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/not_found\",\n  \"title\": \"Not found\",\n  \"detail\": \"The value you requested was not found\",\n  \"instance\": \"/sessions/v1/somekey\"\n}\n";
        assert_eq!(String::from_utf8(r.body).unwrap(), expected);
        assert_eq!(r.status, 404);
        assert!(r
            .headers
            .contains(&("content-type", "application/json".into())));
        assert!(r
            .headers
            .contains(&("x-content-type-options", "nosniff".into())));
    }

    fn escaped(s: &[u8]) -> String {
        let mut out = Vec::new();
        push_go_json_string_contents(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn go_escaping_rules() {
        assert_eq!(
            escaped("a<b>&\"c\\\n\r\t\u{1}\u{2028}\u{2029}é€\u{fffd}".as_bytes()),
            r#"a\u003cb\u003e\u0026\"c\\\n\r\t\u0001\u2028\u2029é€�"#
        );
        assert_eq!(escaped(b"a\xffb\xe2\x82"), r#"a\ufffdb\ufffd\ufffd"#);
        assert_eq!(escaped(b"\xe2\x80"), r#"\ufffd\ufffd"#);
        assert_eq!(escaped(b"<<plain>>"), r#"\u003c\u003cplain\u003e\u003e"#);
        assert_eq!(escaped(b""), "");
    }

    /// The constant fields are written unescaped: that is Go's output only if Go would
    /// not escape them either.
    #[test]
    fn constant_fields_are_what_go_writes() {
        let mut bodies = vec![cached_not_found("/k").body];
        bodies.extend(ShedReason::ALL.map(|r| overloaded(r, "/k", 1).body));
        for body in bodies {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let fields = ["type", "title", "detail"].map(|f| v[f].as_str().unwrap());
            for text in fields {
                assert_eq!(escaped(text.as_bytes()), text);
            }
            let [kind, title, detail] = fields;
            let expected = format!(
                "{{\n  \"type\": \"{kind}\",\n  \"title\": \"{title}\",\n  \"detail\": \"{detail}\",\n  \"instance\": \"/k\"\n}}\n"
            );
            assert_eq!(String::from_utf8(body).unwrap(), expected);
        }
    }

    fn instance_of(path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        push_instance(&mut out, path);
        out
    }

    #[test]
    fn instance_is_the_decoded_path() {
        assert_eq!(
            instance_of("/sessions/v1/enwiki%3AMWSession%3Aab"),
            b"/sessions/v1/enwiki:MWSession:ab"
        );
        assert_eq!(instance_of("/sessions/v1/x?y=1"), b"/sessions/v1/x");
        assert_eq!(instance_of("/sessions/v1/%zz"), b"/sessions/v1/%zz");
        assert_eq!(instance_of("/sessions/v1/%ff"), b"/sessions/v1/\xff");
        assert_eq!(instance_of("/sessions/v1/a#b?c"), b"/sessions/v1/a");
        assert_eq!(instance_of("?"), b"");
    }

    #[test]
    fn instances_are_escaped_only_when_go_would() {
        for (path, instance) in [
            ("/k", "/k"),
            ("/a%3Cb%3E", "/a\\u003cb\\u003e"),
            ("/%E2%80%A8", "/\\u2028"),
            ("/%C3%A9", "/é"),
            ("/%FF%22", "/\\ufffd\\\""),
            ("/x%zz<", "/x%zz\\u003c"),
        ] {
            let body = String::from_utf8(cached_not_found(path).body).unwrap();
            let expected = format!("  \"instance\": \"{instance}\"\n}}\n");
            assert!(body.ends_with(&expected), "{path}: {body}");
        }
    }

    #[test]
    fn overloaded_reply_carries_reason_and_retry_after() {
        let r = overloaded(ShedReason::Memory, "/sessions/v1/k", 7);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "7".into())));
        assert!(r.headers.contains(&("x-envoy-overloaded", "true".into())));
        assert!(r
            .headers
            .contains(&("x-sessionguard-shed", "memory".into())));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["instance"], "/sessions/v1/k");
        assert_eq!(
            body["type"],
            "https://www.mediawiki.org/wiki/Kask/errors/overloaded"
        );
        assert_eq!(body["title"], "Service unavailable");
        assert_eq!(
            body["detail"],
            "The session store is close to its memory limit; retry after the indicated delay"
        );
    }

    #[test]
    fn retry_after_grows_with_severity_and_stays_in_bounds() {
        let c = RetryAfterConfig::default();
        assert_eq!(c.seconds(0.0, 0.0), 1);
        assert_eq!(c.seconds(1.0, 0.0), 30);
        assert_eq!(c.seconds(1.0, 0.999), 15);
        assert!(c.seconds(0.5, 0.0) > c.seconds(0.1, 0.0));
        for sev in [-1.0, 0.0, 0.3, 1.0, 9.0, f64::NAN, f64::INFINITY] {
            for u in [0.0, 0.5, 0.999, f64::NAN, -3.0] {
                let s = c.seconds(sev, u);
                assert!((1..=30).contains(&s), "{sev} {u} -> {s}");
            }
        }
    }

    #[test]
    fn jitter_spreads_clients() {
        let c = RetryAfterConfig {
            min_secs: 1,
            max_secs: 60,
            jitter: 0.5,
        };
        let distinct: std::collections::BTreeSet<u32> = (0..100)
            .map(|i| c.seconds(1.0, f64::from(i) / 100.0))
            .collect();
        assert!(distinct.len() > 10, "{distinct:?}");
    }
}
