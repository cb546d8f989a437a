//! Request targets the way Go's `net/http` reads them.
//!
//! Kask's server (Go's `http.ReadRequest` -> `url.ParseRequestURI`) refuses a request target
//! only for a control byte (below 0x20, or 0x7f) or an invalid `%` escape; every other byte,
//! `<`, `>`, `"`, `` ` ``, `{`, `|`, `#` or a non-UTF-8 byte, is part of the path and so of the
//! key (`#` too: a request target has no fragment). hyper parses the target into an
//! `http::Uri`, which refuses most of those (a bare `400` with no body) and cuts at `#`.
//!
//! [`GoTargets`] sits between the socket and hyper and percent-encodes exactly those bytes
//! in each request line's target. The router decodes the path (Go's `r.URL.Path`), so keys,
//! `instance` fields and redirects come out as Kask's. A control byte becomes an invalid
//! escape, which the router answers as Go's server does: `400 Bad Request`, then close.
//! Request boundaries are followed through `Content-Length` and chunked bodies, so body
//! bytes are never touched; anything this does not follow is passed through unchanged.
//!
//! The wrapper holds no buffer of its own while nothing needs rewriting (kask-sim's memory per
//! connection is part of what it models): bytes are read into hyper's buffer and rewritten
//! there; only a request line that grows keeps its overflow until hyper reads it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes of a header or chunk-size line kept for parsing: enough for `Content-Length`,
/// `Transfer-Encoding` and a chunk size. A longer one of those is not followed ([`State::Opaque`]).
const LINE_KEPT: usize = 64;

/// What a control byte in a target becomes: an escape the router refuses as invalid.
const REFUSED: &[u8] = b"%%";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of a request line, up to and including the first space.
    Method,
    /// The request target, before any `?`.
    Path,
    /// The request target after the first `?`.
    Query,
    /// The rest of the request line, up to its `\n`.
    Version,
    /// Header lines, one at a time in `line`.
    Headers,
    /// Bytes of a `Content-Length` body still to come.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// Bytes of a chunk still to come.
    ChunkData(u64),
    /// The line end after a chunk.
    ChunkEnd,
    /// Trailer lines after the last chunk, up to an empty one.
    Trailers,
    /// Something this does not follow: everything passes unchanged from here on.
    Opaque,
}

/// Where the rewritten bytes go: for each input byte, either that byte (`keep`) or others.
pub trait Sink {
    fn keep(&mut self, input: &[u8]);
    fn replace(&mut self, with: &[u8]);
}

impl Sink for Vec<u8> {
    fn keep(&mut self, input: &[u8]) {
        self.extend_from_slice(input);
    }
    fn replace(&mut self, with: &[u8]) {
        self.extend_from_slice(with);
    }
}

/// A sink that writes nothing while the output equals the input: `out` is `None` until the
/// first replacement, then the whole rewritten chunk.
struct Lazy<'a> {
    input: &'a [u8],
    kept: usize,
    out: Option<Vec<u8>>,
}

impl Sink for Lazy<'_> {
    fn keep(&mut self, input: &[u8]) {
        match &mut self.out {
            Some(out) => out.extend_from_slice(input),
            None => self.kept += input.len(),
        }
    }
    fn replace(&mut self, with: &[u8]) {
        let out = self.out.get_or_insert_with(|| {
            let mut v = Vec::with_capacity(self.input.len() + 64);
            v.extend_from_slice(&self.input[..self.kept]);
            v
        });
        out.extend_from_slice(with);
    }
}

/// The byte-stream transformation, independent of any I/O.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    line: [u8; LINE_KEPT],
    /// Length of the current line so far (may exceed what `line` kept).
    len: usize,
    content_length: Option<u64>,
    chunked: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Method,
            line: [0; LINE_KEPT],
            len: 0,
            content_length: None,
            chunked: false,
        }
    }
}

/// Bytes Go keeps in a path that `http::Uri` refuses (or reads as a fragment).
fn escape_in_path(b: u8) -> bool {
    b >= 0x80
        || matches!(
            b,
            b'"' | b'#' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

/// The same for a query (`http::Uri` allows more there).
fn escape_in_query(b: u8) -> bool {
    b >= 0x80 || matches!(b, b'"' | b'#' | b'<' | b'>')
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

fn escaped(b: u8) -> [u8; 3] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]
}

impl Rewriter {
    /// Passes the rewritten form of `input` (the next bytes from the client) to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl Sink) {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.keep(input);
                    return;
                }
                State::Body(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.keep(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Method,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::Path | State::Query => {
                    self.target_byte(&input[..1], out);
                    input = &input[1..];
                }
                _ => {
                    out.keep(&input[..1]);
                    self.byte(input[0]);
                    input = &input[1..];
                }
            }
        }
    }

    /// A byte outside targets and bodies (always kept as it is): the state after it.
    fn byte(&mut self, b: u8) {
        match self.state {
            State::Method if b == b' ' => self.state = State::Path,
            State::Version if b == b'\n' => {
                self.state = State::Headers;
                self.content_length = None;
                self.chunked = false;
            }
            State::ChunkEnd if b == b'\n' => self.state = State::ChunkSize,
            State::Headers | State::ChunkSize | State::Trailers => {
                if b != b'\n' {
                    if self.len < LINE_KEPT {
                        self.line[self.len] = b;
                    }
                    self.len += 1;
                    return;
                }
                let (kept, len) = (self.len.min(LINE_KEPT), self.len);
                self.len = 0;
                let line = self.line;
                let line = &line[..kept];
                let (line, len) = match line.strip_suffix(b"\r") {
                    Some(l) if len == kept => (l, len - 1),
                    _ => (line, len),
                };
                self.state = match self.state {
                    State::Headers => self.header(line, len > line.len()),
                    State::ChunkSize => chunk_size(line, len > line.len()),
                    _ if len == 0 => State::Method,
                    other => other,
                };
            }
            _ => {}
        }
    }

    fn target_byte(&mut self, input: &[u8], out: &mut impl Sink) {
        let b = input[0];
        let query = self.state == State::Query;
        match b {
            b' ' => self.state = State::Version,
            // A line that ends inside the target is no HTTP/1.x request: let hyper refuse it.
            b'\r' | b'\n' => self.state = State::Opaque,
            b'?' if !query => self.state = State::Query,
            _ if is_control(b) => return out.replace(REFUSED),
            _ if (query && escape_in_query(b)) || (!query && escape_in_path(b)) => {
                return out.replace(&escaped(b))
            }
            _ => {}
        }
        out.keep(input);
    }

    /// One header line (without its line end; `cut`: longer than what was kept); the state
    /// after it.
    fn header(&mut self, line: &[u8], cut: bool) -> State {
        if line.is_empty() && !cut {
            return match (self.chunked, self.content_length) {
                (true, _) => State::ChunkSize,
                (false, Some(n)) if n > 0 => State::Body(n),
                _ => State::Method,
            };
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            return State::Headers;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let length = name.eq_ignore_ascii_case(b"content-length");
        let coding = name.eq_ignore_ascii_case(b"transfer-encoding");
        if (length || coding) && cut {
            return State::Opaque;
        }
        if length {
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => self.content_length = Some(n),
                None => return State::Opaque,
            }
        } else if coding {
            self.chunked = value
                .split(|&c| c == b',')
                .any(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        State::Headers
    }
}

/// A chunk-size line (`1a;ext=x`; `cut`: longer than what was kept); the state after it.
fn chunk_size(line: &[u8], cut: bool) -> State {
    let semicolon = line.iter().position(|&c| c == b';');
    if cut && semicolon.is_none() {
        return State::Opaque;
    }
    let digits = line[..semicolon.unwrap_or(line.len())].trim_ascii();
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
    {
        Some(0) => State::Trailers,
        Some(n) => State::ChunkData(n),
        None => State::Opaque,
    }
}

/// A client connection whose reads come through a [`Rewriter`]; writes pass unchanged.
pub struct GoTargets<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes that did not fit into the reader's buffer yet.
    pending: Vec<u8>,
    pos: usize,
}

impl<S> GoTargets<S> {
    pub fn new(inner: S) -> Self {
        GoTargets {
            inner,
            rewriter: Rewriter::default(),
            pending: Vec::new(),
            pos: 0,
        }
    }

    /// Moves what fits of `pending` into `buf`; frees it once it is all out.
    fn drain(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.pending.len() - self.pos);
        buf.put_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.pending.len() {
            self.pending = Vec::new();
            self.pos = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GoTargets<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.pending.len() {
            me.drain(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        let mut sink = Lazy {
            input: &buf.filled()[before..],
            kept: 0,
            out: None,
        };
        me.rewriter.feed(sink.input, &mut sink);
        if let Some(out) = sink.out {
            // Rewritten: what was read is replaced by what fits of the rewritten bytes.
            buf.set_filled(before);
            me.pending = out;
            me.drain(buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GoTargets<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{percent_decode, KeyParse, Route, Router};

    fn rewrite_in_pieces(input: &[u8], piece: usize) -> Vec<u8> {
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        for part in input.chunks(piece) {
            rw.feed(part, &mut out);
        }
        out
    }

    fn rewrite(input: &[u8]) -> Vec<u8> {
        let whole = rewrite_in_pieces(input, input.len().max(1));
        // However the bytes arrive, the result is the same.
        for piece in [1, 2, 3, 7] {
            assert_eq!(rewrite_in_pieces(input, piece), whole, "pieces of {piece}");
        }
        whole
    }

    #[test]
    fn targets_go_accepts_are_escaped_for_hyper() {
        assert_eq!(
            rewrite(b"GET /sessions/v1/a<b>\"c`{d}|\\^#e HTTP/1.1\r\nHost: x\r\n\r\n"),
            b"GET /sessions/v1/a%3Cb%3E%22c%60%7Bd%7D%7C%5C%5E%23e HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        assert_eq!(
            rewrite(b"GET /k\xff\xc3\xa9 HTTP/1.1\r\n\r\n"),
            b"GET /k%FF%C3%A9 HTTP/1.1\r\n\r\n"
        );
        // Already valid targets, escapes and queries are left as they are.
        let plain = b"GET /sessions/v1/enwiki%3AMWSession%3Aabc?x=1&y HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(plain), plain);
        // In a query only what `http::Uri` refuses there.
        assert_eq!(
            rewrite(b"GET /k?a<b>|{} HTTP/1.1\r\n\r\n"),
            b"GET /k?a%3Cb%3E|{} HTTP/1.1\r\n\r\n"
        );
        // A control byte becomes an invalid escape (Go: 400 Bad Request).
        assert_eq!(
            rewrite(b"GET /a\tb\x7f HTTP/1.1\r\n\r\n"),
            b"GET /a%%b%% HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn the_router_sees_the_key_go_would() {
        let router = Router::new("/sessions/v1/", false);
        let out = rewrite(b"GET /sessions/v1/a<b>#c\xff HTTP/1.1\r\n\r\n");
        let target = std::str::from_utf8(&out[4..out.len() - 13]).unwrap();
        let (route, path) = router.route(target, None);
        assert_eq!(route, Route::Key(KeyParse::Key(b"a<b>#c\xff".to_vec())));
        assert_eq!(path, b"/sessions/v1/a<b>#c\xff");
        assert_eq!(router.route("/a%%b", None).0, Route::BadEncoding);
        assert!(percent_decode("/a%%b").is_none());
    }

    #[test]
    fn bodies_are_never_rewritten() {
        // Pipelined: a POST whose body holds what would be escaped in a target, a chunked
        // POST (extension, trailer), then a GET whose target is rewritten.
        let input: &[u8] = b"POST /k<1> HTTP/1.1\r\nContent-Length: 12\r\n\r\nGET /<x> HTTP\
            POST /k HTTP/1.1\r\ntransfer-encoding: gzip, Chunked\r\n\r\n\
            5;x=y\r\n<a b>\r\n3\r\n#\xff\"\r\n0\r\nX-T: <>\r\n\r\n\
            GET /k<2> HTTP/1.1\r\n\r\n";
        let want: &[u8] = b"POST /k%3C1%3E HTTP/1.1\r\nContent-Length: 12\r\n\r\nGET /<x> HTTP\
            POST /k HTTP/1.1\r\ntransfer-encoding: gzip, Chunked\r\n\r\n\
            5;x=y\r\n<a b>\r\n3\r\n#\xff\"\r\n0\r\nX-T: <>\r\n\r\n\
            GET /k%3C2%3E HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(input), want);
    }

    #[test]
    fn nothing_is_copied_while_nothing_changes() {
        let mut rw = Rewriter::default();
        let plain: &[u8] = b"GET /sessions/v1/abc HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut sink = Lazy {
            input: plain,
            kept: 0,
            out: None,
        };
        rw.feed(plain, &mut sink);
        assert!(sink.out.is_none());
        assert_eq!(sink.kept, plain.len());
        let odd: &[u8] = b"GET /k<1> HTTP/1.1\r\n\r\n";
        let mut sink = Lazy {
            input: odd,
            kept: 0,
            out: None,
        };
        rw.feed(odd, &mut sink);
        assert_eq!(
            sink.out.as_deref(),
            Some(&b"GET /k%3C1%3E HTTP/1.1\r\n\r\n"[..])
        );
    }

    #[test]
    fn long_header_lines() {
        // A long header that does not frame the body is skipped over; the next request is
        // still found.
        let long = format!("X-Long: {}\r\n", "v".repeat(500));
        let input = format!(
            "POST /a HTTP/1.1\r\n{long}Content-Length: 3\r\n\r\n<b>GET /<c> HTTP/1.1\r\n\r\n"
        );
        let want = format!(
            "POST /a HTTP/1.1\r\n{long}Content-Length: 3\r\n\r\n<b>GET /%3Cc%3E HTTP/1.1\r\n\r\n"
        );
        assert_eq!(rewrite(input.as_bytes()), want.as_bytes());
        // One that does but is longer than what is kept: not followed.
        let input = format!(
            "POST /a HTTP/1.1\r\nContent-Length:{}3\r\n\r\n<b>GET /<c>",
            " ".repeat(80)
        );
        assert_eq!(rewrite(input.as_bytes()), input.as_bytes());
    }

    #[test]
    fn what_it_cannot_follow_passes_unchanged() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\nGET /<> HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(input), input);
        let input: &[u8] = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /<>";
        assert_eq!(rewrite(input), input);
    }
}
