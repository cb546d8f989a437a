//! Request routing and key parsing, reproducing Kask's stack: Go 1.19's `net/http` URL
//! decoding, `http.ServeMux` (path cleaning, 301 redirects, plain-text 404) and Kask's
//! `ValidatingKeyParserMiddleware`. Everything here is pure so it can be tested exhaustively.

/// Kask's `validate()`: ensure a trailing and a leading slash.
pub fn normalise_base_uri(base: &str) -> String {
    let mut b = base.to_string();
    if !b.ends_with('/') {
        b.push('/');
    }
    if !b.starts_with('/') {
        b.insert(0, '/');
    }
    b
}

/// Where a request goes, decided the way Go's ServeMux would decide it.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The base-URI handler (instrumented by Kask's Prometheus middleware).
    Key(KeyParse),
    Metrics,
    Healthz,
    Control,
    /// ServeMux's `404 page not found`.
    NotFound,
    /// ServeMux's 301 to the given, already escaped, location.
    Redirect(String),
    /// Request target `*` (e.g. `OPTIONS *`): ServeMux answers 400 with no body.
    Asterisk,
    /// Invalid percent-encoding: Go rejects the request before any handler runs.
    BadEncoding,
}

/// Outcome of Kask's key middleware.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyParse {
    Key(Vec<u8>),
    NotFound,
    BadRequest,
}

pub struct Router {
    base: Vec<u8>,
    control: bool,
}

pub const METRICS_PATH: &[u8] = b"/metrics";
pub const HEALTHZ_PATH: &[u8] = b"/healthz";
pub const CONTROL_PATH: &[u8] = b"/_sim/control";

impl Router {
    /// `base` must already be normalised.
    pub fn new(base: &str, control: bool) -> Router {
        Router {
            base: base.as_bytes().to_vec(),
            control,
        }
    }

    /// Routes a request. `raw_path` is the still-encoded path, `raw_query` the text after the
    /// first `?` if any. Returns the route and the decoded path (Go's `r.URL.Path`), which is
    /// what problem bodies report as `instance`.
    pub fn route(&self, raw_path: &str, raw_query: Option<&str>) -> (Route, Vec<u8>) {
        if raw_path == "*" {
            return (Route::Asterisk, b"*".to_vec());
        }
        let Some(path) = percent_decode(raw_path) else {
            return (Route::BadEncoding, raw_path.as_bytes().to_vec());
        };
        let query = raw_query.unwrap_or("");
        let cleaned = clean_path(&path);

        if self.redirects_to_slash(&cleaned) {
            let mut target = cleaned.clone();
            target.push(b'/');
            return (Route::Redirect(location(&target, query)), path);
        }
        if cleaned != path {
            return (Route::Redirect(location(&cleaned, query)), path);
        }

        let route = if path == METRICS_PATH {
            Route::Metrics
        } else if path == HEALTHZ_PATH {
            Route::Healthz
        } else if self.control && path == CONTROL_PATH {
            Route::Control
        } else if path.starts_with(&self.base) {
            Route::Key(parse_key(&path, &self.base, !query.is_empty()))
        } else {
            Route::NotFound
        };
        (route, path)
    }

    fn is_exact_pattern(&self, p: &[u8]) -> bool {
        p == METRICS_PATH || p == HEALTHZ_PATH || (self.control && p == CONTROL_PATH)
    }

    /// ServeMux redirects `/tree` to `/tree/` when only the subtree pattern is registered.
    fn redirects_to_slash(&self, path: &[u8]) -> bool {
        if path.is_empty() || self.is_exact_pattern(path) {
            return false;
        }
        self.base.len() == path.len() + 1 && self.base.starts_with(path)
    }
}

/// Kask's `ValidatingKeyParserMiddleware`, including its use of `strings.Split(path, base)`:
/// the key is whatever follows the *first* occurrence of the base URI up to the next one.
pub fn parse_key(path: &[u8], base: &[u8], has_query: bool) -> KeyParse {
    let parts = go_split(path, base);
    if parts.len() < 2 {
        return KeyParse::NotFound;
    }
    if has_query {
        return KeyParse::BadRequest;
    }
    let segment = parts[1];
    if segment.contains(&b'/') || segment.is_empty() {
        return KeyParse::NotFound;
    }
    KeyParse::Key(segment.to_vec())
}

/// Go's `strings.Split` for a non-empty separator.
fn go_split<'a>(s: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    if sep.is_empty() {
        return vec![s];
    }
    while i + sep.len() <= s.len() {
        if &s[i..i + sep.len()] == sep {
            parts.push(&s[start..i]);
            i += sep.len();
            start = i;
        } else {
            i += 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Go's `url.unescape(s, encodePath)`: `%XX` decodes to any byte (so `%2F` becomes `/`), `+`
/// stays `+`, and a `%` not followed by two hex digits makes the whole request invalid.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex_val(*b.get(i + 1)?)?;
            let lo = hex_val(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// ServeMux's `cleanPath`: `path.Clean`, keeping a trailing slash.
pub fn clean_path(p: &[u8]) -> Vec<u8> {
    if p.is_empty() {
        return b"/".to_vec();
    }
    let mut rooted = Vec::with_capacity(p.len() + 1);
    if p[0] != b'/' {
        rooted.push(b'/');
    }
    rooted.extend_from_slice(p);
    let mut np = go_path_clean_rooted(&rooted);
    if rooted.last() == Some(&b'/') && np != b"/" {
        np.push(b'/');
    }
    np
}

/// `path.Clean` for a path that starts with `/`.
fn go_path_clean_rooted(p: &[u8]) -> Vec<u8> {
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in p.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = Vec::with_capacity(p.len());
    for s in &segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// `(&url.URL{Path: path, RawQuery: query}).String()`, as ServeMux builds redirect targets.
fn location(path: &[u8], query: &str) -> String {
    let mut out = go_escape_path(path);
    if !query.is_empty() {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Go's `url.escape(s, encodePath)`.
pub fn go_escape_path(s: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &c in s {
        let keep = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'_'
                    | b'.'
                    | b'~'
                    | b'$'
                    | b'&'
                    | b'+'
                    | b','
                    | b'/'
                    | b':'
                    | b';'
                    | b'='
                    | b'@'
            );
        if keep {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(HEX[(c >> 4) as usize] as char);
            out.push(HEX[(c & 0xf) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/sessions/v1/";

    fn router() -> Router {
        Router::new(BASE, false)
    }

    fn key(raw: &str) -> Route {
        router().route(raw, None).0
    }

    // The cases of Kask's http_test.go TestValidatingKeyParserMiddleware.
    #[test]
    fn kask_key_parser_cases() {
        let b = BASE.as_bytes();
        assert_eq!(
            parse_key(b"/sessions/v1/cat", b, false),
            KeyParse::Key(b"cat".to_vec())
        );
        assert_eq!(
            parse_key(b"/sessions/v1/cat/dog", b, false),
            KeyParse::NotFound
        );
        assert_eq!(parse_key(b"/sessions/v1/", b, false), KeyParse::NotFound);
        assert_eq!(parse_key(b"/something/else", b, false), KeyParse::NotFound);
        assert_eq!(
            parse_key(b"/sessions/v1/foo", b, true),
            KeyParse::BadRequest
        );
        assert_eq!(
            parse_key(b"/sessions/v1/cat dog", b, false),
            KeyParse::Key(b"cat dog".to_vec())
        );
        // `%2F` decodes to `/` before the middleware sees the path.
        assert_eq!(parse_key(b"/sessions/v1//", b, false), KeyParse::NotFound);
    }

    #[test]
    fn routed_key_cases() {
        assert_eq!(
            key("/sessions/v1/cat"),
            Route::Key(KeyParse::Key(b"cat".to_vec()))
        );
        assert_eq!(key("/sessions/v1/cat/dog"), Route::Key(KeyParse::NotFound));
        assert_eq!(key("/sessions/v1/"), Route::Key(KeyParse::NotFound));
        assert_eq!(key("/something/else"), Route::NotFound);
        assert_eq!(
            key("/sessions/v1/foo%3Fbar"),
            Route::Key(KeyParse::Key(b"foo?bar".to_vec()))
        );
        assert_eq!(
            router().route("/sessions/v1/foo", Some("bar")).0,
            Route::Key(KeyParse::BadRequest)
        );
        assert_eq!(
            key("/sessions/v1/cat%20dog"),
            Route::Key(KeyParse::Key(b"cat dog".to_vec()))
        );
        assert_eq!(
            key("/sessions/v1/cat%2Fdog"),
            Route::Key(KeyParse::NotFound)
        );
        assert_eq!(
            key("/sessions/v1/enwiki%3AMWSession%3Aabc"),
            Route::Key(KeyParse::Key(b"enwiki:MWSession:abc".to_vec()))
        );
    }

    #[test]
    fn bare_question_mark_is_not_a_query() {
        // Go: len(RawQuery) == 0 for a trailing lone `?`.
        assert_eq!(
            router().route("/sessions/v1/foo", Some("")).0,
            Route::Key(KeyParse::Key(b"foo".to_vec()))
        );
    }

    #[test]
    fn query_checked_after_base_but_before_slashes() {
        // Kask checks the query before the `/` rule, so this is 400, not 404.
        assert_eq!(
            router().route("/sessions/v1/a/b", Some("x=1")).0,
            Route::Key(KeyParse::BadRequest)
        );
    }

    #[test]
    fn instance_is_decoded_path() {
        let (_, path) = router().route("/sessions/v1/a%3Cb", None);
        assert_eq!(path, b"/sessions/v1/a<b".to_vec());
    }

    #[test]
    fn split_on_repeated_base_takes_first_segment() {
        // strings.Split(path, base)[1] quirk.
        assert_eq!(
            key("/sessions/v1/a/sessions/v1/b"),
            Route::Key(KeyParse::Key(b"a".to_vec()))
        );
    }

    #[test]
    fn mux_routes() {
        assert_eq!(key("/metrics"), Route::Metrics);
        assert_eq!(key("/healthz"), Route::Healthz);
        assert_eq!(router().route("/healthz", Some("x")).0, Route::Healthz);
        assert_eq!(key("/metrics/"), Route::NotFound);
        assert_eq!(key("/"), Route::NotFound);
        assert_eq!(key("/_sim/control"), Route::NotFound);
        assert_eq!(
            Router::new(BASE, true).route("/_sim/control", None).0,
            Route::Control
        );
        assert_eq!(key("*"), Route::Asterisk);
    }

    #[test]
    fn mux_redirects() {
        assert_eq!(key("/sessions/v1"), Route::Redirect("/sessions/v1/".into()));
        assert_eq!(
            router().route("/sessions/v1", Some("a=b")).0,
            Route::Redirect("/sessions/v1/?a=b".into())
        );
        assert_eq!(
            key("/sessions/v1//x"),
            Route::Redirect("/sessions/v1/x".into())
        );
        assert_eq!(
            key("/sessions/v1/a/../b"),
            Route::Redirect("/sessions/v1/b".into())
        );
        // A lone %2F decodes to "//", which ServeMux cleans and redirects.
        assert_eq!(
            key("/sessions/v1/%2F"),
            Route::Redirect("/sessions/v1/".into())
        );
        assert_eq!(
            key("/sessions/v1/./a%20b"),
            Route::Redirect("/sessions/v1/a%20b".into())
        );
        assert_eq!(key("/metrics/."), Route::Redirect("/metrics".into()));
    }

    #[test]
    fn bad_percent_encoding() {
        assert_eq!(key("/sessions/v1/%"), Route::BadEncoding);
        assert_eq!(key("/sessions/v1/%4"), Route::BadEncoding);
        assert_eq!(key("/sessions/v1/%zz"), Route::BadEncoding);
        assert_eq!(
            key("/sessions/v1/%ff"),
            Route::Key(KeyParse::Key(vec![0xff]))
        );
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode("a+b").unwrap(), b"a+b");
        assert_eq!(percent_decode("%3a%3A").unwrap(), b"::");
        assert!(percent_decode("%").is_none());
        assert!(percent_decode("%g0").is_none());
    }

    #[test]
    fn clean_path_cases() {
        assert_eq!(clean_path(b""), b"/");
        assert_eq!(clean_path(b"a"), b"/a");
        assert_eq!(clean_path(b"/a//b/"), b"/a/b/");
        assert_eq!(clean_path(b"/.."), b"/");
        assert_eq!(clean_path(b"/a/b/../../.."), b"/");
        assert_eq!(clean_path(b"//"), b"/");
        assert_eq!(clean_path(b"/a/./"), b"/a/");
    }

    #[test]
    fn escape_path_like_go() {
        assert_eq!(
            go_escape_path(b"/a b?c#d!'()*"),
            "/a%20b%3Fc%23d%21%27%28%29%2A"
        );
        assert_eq!(go_escape_path(b"/$&+,:;=@-_.~"), "/$&+,:;=@-_.~");
        assert_eq!(go_escape_path(&[b'/', 0xff]), "/%FF");
    }

    #[test]
    fn base_uri_normalisation() {
        assert_eq!(normalise_base_uri("sessions/v1"), "/sessions/v1/");
        assert_eq!(normalise_base_uri("/sessions/v1/"), "/sessions/v1/");
        assert_eq!(normalise_base_uri(""), "/");
    }

    #[test]
    fn root_base_uri() {
        let r = Router::new("/", false);
        assert_eq!(r.route("/metrics", None).0, Route::Metrics);
        assert_eq!(
            r.route("/k", None).0,
            Route::Key(KeyParse::Key(b"k".to_vec()))
        );
        // strings.Split(path, "/")[1] is the first segment.
        assert_eq!(
            r.route("/k/x", None).0,
            Route::Key(KeyParse::Key(b"k".to_vec()))
        );
    }
}
