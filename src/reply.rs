//! Local replies: the fast 503 and the cached 404, in the store's own error shape.
//!
//! Kask writes its errors with Go's `json.MarshalIndent(problem, "", "  ")` plus a
//! newline, `content-type: application/json` and `x-content-type-options: nosniff`.
//! A cached 404 must be byte-identical to the store's own, so the encoder below
//! follows Go's escaping rules exactly.

use serde::Deserialize;

use crate::config::{check_range, check_unit, field, ConfigError};

pub const NOT_FOUND_TYPE: &str = "https://www.mediawiki.org/wiki/Kask/errors/not_found";
pub const OVERLOADED_TYPE: &str = "https://www.mediawiki.org/wiki/Kask/errors/overloaded";

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

    fn detail(self) -> &'static str {
        match self {
            ShedReason::Concurrency => {
                "The session store is at its concurrency limit; retry after the indicated delay"
            }
            ShedReason::Admission => {
                "The session store is failing requests; this one was rejected early to let it recover"
            }
            ShedReason::Memory => {
                "The session store is close to its memory limit; retry after the indicated delay"
            }
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
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// The store's own 404 for the raw request `path`, plus `x-sessionguard-cache: hit`.
pub fn cached_not_found(path: &str) -> Reply {
    let instance = instance_of(path);
    Reply {
        status: 404,
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            ("x-sessionguard-cache", "hit".to_string()),
        ],
        body: problem_body(
            NOT_FOUND_TYPE,
            "Not found",
            "The value you requested was not found",
            &instance,
        ),
    }
}

/// The fast 503 for a shed request.
pub fn overloaded(reason: ShedReason, path: &str, retry_after_secs: u32) -> Reply {
    let instance = instance_of(path);
    Reply {
        status: 503,
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            ("retry-after", retry_after_secs.to_string()),
            ("x-envoy-overloaded", "true".to_string()),
            ("x-sessionguard-shed", reason.name().to_string()),
        ],
        body: problem_body(
            OVERLOADED_TYPE,
            "Service unavailable",
            reason.detail(),
            &instance,
        ),
    }
}

/// The store's `instance` is the decoded request path (Go's `r.URL.Path`); a path that
/// does not decode is reported as sent.
pub fn instance_of(raw_path: &str) -> Vec<u8> {
    let without_query = raw_path.split(['?', '#']).next().unwrap_or("");
    decode_path(without_query.as_bytes()).unwrap_or_else(|| without_query.as_bytes().to_vec())
}

fn decode_path(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hex = input.get(i + 1..i + 3)?;
            // Hex digits only: `from_str_radix` alone would also take a sign (`%+1`).
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let s = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(s, 16).ok()?);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Go's `json.MarshalIndent(Problem{...}, "", "  ")` followed by `\n`.
pub fn problem_body(kind: &str, title: &str, detail: &str, instance: &[u8]) -> Vec<u8> {
    let mut out = String::with_capacity(160 + instance.len());
    out.push_str("{\n  \"type\": ");
    push_go_json_string(&mut out, kind.as_bytes());
    out.push_str(",\n  \"title\": ");
    push_go_json_string(&mut out, title.as_bytes());
    out.push_str(",\n  \"detail\": ");
    push_go_json_string(&mut out, detail.as_bytes());
    out.push_str(",\n  \"instance\": ");
    push_go_json_string(&mut out, instance);
    out.push_str("\n}\n");
    out.into_bytes()
}

/// Go's encoding/json string escaping with HTML escaping on (the default); each
/// byte that is not part of valid UTF-8 becomes the six characters `\ufffd`, as in Go.
fn push_go_json_string(out: &mut String, s: &[u8]) {
    out.push('"');
    for chunk in s.utf8_chunks() {
        push_valid(out, chunk.valid());
        for _ in chunk.invalid() {
            out.push_str("\\ufffd");
        }
    }
    out.push('"');
}

fn push_valid(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' | '\u{0}'..='\u{1f}' => {
                let code = c as u32;
                out.push_str("\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((code >> shift) & 0xf) as usize] as char);
                }
            }
            _ => out.push(c),
        }
    }
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

    #[test]
    fn go_escaping_rules() {
        let mut s = String::new();
        push_go_json_string(&mut s, "a<b>&\"c\\\n\u{1}\u{2028}é\u{fffd}".as_bytes());
        assert_eq!(s, r#""a\u003cb\u003e\u0026\"c\\\n\u0001\u2028é�""#);
        let mut s = String::new();
        push_go_json_string(&mut s, b"a\xffb\xe2\x82");
        assert_eq!(s, r#""a\ufffdb\ufffd\ufffd""#);
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
        assert_eq!(body["type"], OVERLOADED_TYPE);
        assert_eq!(body["title"], "Service unavailable");
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
