//! Response bodies that must be byte-identical to what Kask (Go 1.19 net/http + encoding/json)
//! sends: RFC 7807-shaped problems, ServeMux's plain-text 404 and its 301 redirect page.
//!
//! Byte fidelity matters because sessionguard answers some requests itself (negative cache,
//! fast 503) and those answers are compared with the store's own.

/// One of Kask's four problem kinds (401 is defined by Kask but never sent, so it is absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    BadRequest,
    NotFound,
    ServerError,
}

impl Problem {
    pub fn status(self) -> u16 {
        match self {
            Problem::BadRequest => 400,
            Problem::NotFound => 404,
            Problem::ServerError => 500,
        }
    }

    fn texts(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Problem::BadRequest => (
                "https://www.mediawiki.org/wiki/Kask/errors/bad_request",
                "Bad request",
                "The request was incorrect or malformed",
            ),
            Problem::NotFound => (
                "https://www.mediawiki.org/wiki/Kask/errors/not_found",
                "Not found",
                "The value you requested was not found",
            ),
            Problem::ServerError => (
                "https://www.mediawiki.org/wiki/Kask/errors/server_error",
                "Internal server error",
                "The server encountered an error with your request",
            ),
        }
    }

    /// `json.MarshalIndent(p, "", "  ")` followed by `fmt.Fprintln`'s newline. `instance` is the
    /// decoded request path, which may hold any bytes (e.g. from `%FF`).
    pub fn body(self, instance: &[u8]) -> Vec<u8> {
        let (ty, title, detail) = self.texts();
        go_marshal_indent(&[
            ("type", ty.as_bytes()),
            ("title", title.as_bytes()),
            ("detail", detail.as_bytes()),
            ("instance", instance),
        ])
    }
}

/// Go's `json.MarshalIndent(v, "", "  ") + "\n"` for a struct of string fields, in field order.
pub fn go_marshal_indent(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\n");
    for (i, (name, value)) in fields.iter().enumerate() {
        out.extend_from_slice(b"  ");
        go_json_string(name.as_bytes(), &mut out);
        out.extend_from_slice(b": ");
        go_json_string(value, &mut out);
        if i + 1 < fields.len() {
            out.push(b',');
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"}\n");
    out
}

/// Appends `s` as a JSON string exactly as Go 1.19's encoding/json does with HTML escaping on
/// (the default for `json.Marshal*`): `<`, `>`, `&`, U+2028 and U+2029 become `\uXXXX`; control
/// characters other than `\n`, `\r`, `\t` become `\u00xx` (Go 1.19 has no `\b`/`\f` short forms);
/// each byte of an invalid UTF-8 sequence becomes the six characters `\ufffd`, because Go decodes
/// one byte at a time on error rather than Rust's maximal-subpart replacement.
pub fn go_json_string(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b < 0x80 {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'<' | b'>' | b'&' | 0x00..=0x1f => {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 0xf) as usize]);
                }
                _ => out.push(b),
            }
            i += 1;
            continue;
        }
        match decode_one(&s[i..]) {
            Some((c, len)) => {
                if c == '\u{2028}' || c == '\u{2029}' {
                    out.extend_from_slice(if c == '\u{2028}' {
                        b"\\u2028"
                    } else {
                        b"\\u2029"
                    });
                } else {
                    out.extend_from_slice(&s[i..i + len]);
                }
                i += len;
            }
            None => {
                out.extend_from_slice(b"\\ufffd");
                i += 1;
            }
        }
    }
    out.push(b'"');
}

/// Decodes one non-ASCII UTF-8 scalar at the start of `s`, or None where Go's
/// `utf8.DecodeRune` would return `(RuneError, 1)`.
fn decode_one(s: &[u8]) -> Option<(char, usize)> {
    let len = match s[0] {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    let chunk = s.get(..len)?;
    // std's validator rejects overlongs, surrogates and > U+10FFFF exactly as Go's ranges do.
    let text = std::str::from_utf8(chunk).ok()?;
    text.chars().next().map(|c| (c, len))
}

/// `http.NotFound`'s body for paths no ServeMux pattern matches.
pub const PLAIN_NOT_FOUND: &[u8] = b"404 page not found\n";

/// The body `http.Redirect` writes for a GET: an HTML link to the (already escaped) target,
/// HTML-escaped, then `fmt.Fprintln`'s newline.
pub fn redirect_body(location: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(location.len() + 48);
    out.extend_from_slice(b"<a href=\"");
    for &b in location.as_bytes() {
        match b {
            b'&' => out.extend_from_slice(b"&amp;"),
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            b'"' => out.extend_from_slice(b"&#34;"),
            b'\'' => out.extend_from_slice(b"&#39;"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(b"\">Moved Permanently</a>.\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &[u8]) -> String {
        let mut out = Vec::new();
        go_json_string(s, &mut out);
        String::from_utf8(out).expect("escaper emits UTF-8")
    }

    #[test]
    fn not_found_body_is_byte_exact() {
        let body = Problem::NotFound.body(b"/sessions/v1/somekey");
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/not_found\",\n  \"title\": \"Not found\",\n  \"detail\": \"The value you requested was not found\",\n  \"instance\": \"/sessions/v1/somekey\"\n}\n"
        );
    }

    #[test]
    fn bad_request_body_is_byte_exact() {
        let body = Problem::BadRequest.body(b"/sessions/v1/foo");
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/bad_request\",\n  \"title\": \"Bad request\",\n  \"detail\": \"The request was incorrect or malformed\",\n  \"instance\": \"/sessions/v1/foo\"\n}\n"
        );
    }

    #[test]
    fn server_error_body_escapes_html_in_instance() {
        let body = Problem::ServerError.body(b"/sessions/v1/<a>&b");
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/server_error\",\n  \"title\": \"Internal server error\",\n  \"detail\": \"The server encountered an error with your request\",\n  \"instance\": \"/sessions/v1/\\u003ca\\u003e\\u0026b\"\n}\n"
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(Problem::BadRequest.status(), 400);
        assert_eq!(Problem::NotFound.status(), 404);
        assert_eq!(Problem::ServerError.status(), 500);
    }

    #[test]
    fn go_escapes_html_and_line_separators() {
        assert_eq!(esc(b"<>&"), r#""\u003c\u003e\u0026""#);
        assert_eq!(
            esc("a\u{2028}b\u{2029}c".as_bytes()),
            r#""a\u2028b\u2029c""#
        );
    }

    #[test]
    fn go_escapes_controls_and_quotes() {
        assert_eq!(esc(b"\"\\\n\r\t"), r#""\"\\\n\r\t""#);
        // Go 1.19: no \b or \f short forms; lowercase hex.
        assert_eq!(esc(b"\x08\x0c\x00\x1f"), r#""\u0008\u000c\u0000\u001f""#);
        // DEL and '/' are not escaped by Go.
        assert_eq!(esc(b"\x7f/"), "\"\x7f/\"");
    }

    #[test]
    fn go_keeps_valid_utf8_and_replaces_each_invalid_byte() {
        assert_eq!(esc("héllo ☃ 𝄞".as_bytes()), "\"héllo ☃ 𝄞\"");
        assert_eq!(esc(b"a\xffb"), r#""a\ufffdb""#);
        // Truncated 3-byte sequence: Go emits one replacement per byte.
        assert_eq!(esc(b"\xe2\x82"), r#""\ufffd\ufffd""#);
        // Surrogate encoded in UTF-8 and overlong '/' are invalid.
        assert_eq!(esc(b"\xed\xa0\x80"), r#""\ufffd\ufffd\ufffd""#);
        assert_eq!(esc(b"\xc0\xaf"), r#""\ufffd\ufffd""#);
        // A real U+FFFD in the input passes through unescaped.
        assert_eq!(esc("\u{fffd}".as_bytes()), "\"\u{fffd}\"");
    }

    #[test]
    fn redirect_body_matches_go() {
        assert_eq!(
            redirect_body("/sessions/v1/"),
            b"<a href=\"/sessions/v1/\">Moved Permanently</a>.\n\n".to_vec()
        );
        assert_eq!(
            redirect_body("/a&b"),
            b"<a href=\"/a&amp;b\">Moved Permanently</a>.\n\n".to_vec()
        );
    }

    #[test]
    fn marshal_indent_of_healthz_shape() {
        let body = go_marshal_indent(&[("version", b"1"), ("go_version", b"x")]);
        assert_eq!(
            body,
            b"{\n  \"version\": \"1\",\n  \"go_version\": \"x\"\n}\n".to_vec()
        );
    }
}
