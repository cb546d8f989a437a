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

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header or chunk-size line kept for parsing; longer lines are not
/// `Content-Length`, `Transfer-Encoding` or a chunk size anyone sends.
const MAX_LINE: usize = 8 * 1024;

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

/// The byte-stream transformation, independent of any I/O.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    line: Vec<u8>,
    content_length: Option<u64>,
    chunked: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Method,
            line: Vec::new(),
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

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

impl Rewriter {
    /// Appends the rewritten form of `input` (the next bytes from the client) to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Body(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Method,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                _ => {
                    self.byte(input[0], out);
                    input = &input[1..];
                }
            }
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Method => {
                out.push(b);
                if b == b' ' {
                    self.state = State::Path;
                }
            }
            State::Path | State::Query => self.target_byte(b, out),
            State::Version => {
                out.push(b);
                if b == b'\n' {
                    self.state = State::Headers;
                    self.content_length = None;
                    self.chunked = false;
                }
            }
            State::Headers | State::ChunkSize | State::Trailers => {
                out.push(b);
                if b != b'\n' {
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    }
                    return;
                }
                let line = std::mem::take(&mut self.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                self.state = match self.state {
                    State::Headers => self.header(line),
                    State::ChunkSize => chunk_size(line),
                    _ if line.is_empty() => State::Method,
                    other => other,
                };
            }
            State::ChunkEnd => {
                out.push(b);
                if b == b'\n' {
                    self.state = State::ChunkSize;
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Opaque => out.push(b),
        }
    }

    fn target_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        let query = self.state == State::Query;
        match b {
            b' ' => {
                out.push(b);
                self.state = State::Version;
            }
            // A line that ends inside the target is no HTTP/1.x request: let hyper refuse it.
            b'\r' | b'\n' => {
                out.push(b);
                self.state = State::Opaque;
            }
            b'?' if !query => {
                out.push(b);
                self.state = State::Query;
            }
            _ if is_control(b) => out.extend_from_slice(REFUSED),
            _ if (query && escape_in_query(b)) || (!query && escape_in_path(b)) => {
                push_escaped(out, b)
            }
            _ => out.push(b),
        }
    }

    /// One header line (without its line end); the state after it.
    fn header(&mut self, line: &[u8]) -> State {
        if line.is_empty() {
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
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => self.content_length = Some(n),
                None => return State::Opaque,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.chunked = value
                .split(|&c| c == b',')
                .any(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        State::Headers
    }
}

/// A chunk-size line (`1a;ext=x`); the state after it.
fn chunk_size(line: &[u8]) -> State {
    let digits = line
        .split(|&c| c == b';')
        .next()
        .unwrap_or(b"")
        .trim_ascii();
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
    raw: Box<[u8]>,
    out: Vec<u8>,
    pos: usize,
}

impl<S> GoTargets<S> {
    pub fn new(inner: S) -> Self {
        GoTargets {
            inner,
            rewriter: Rewriter::default(),
            raw: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            pos: 0,
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
        loop {
            if me.pos < me.out.len() {
                let n = buf.remaining().min(me.out.len() - me.pos);
                buf.put_slice(&me.out[me.pos..me.pos + n]);
                me.pos += n;
                if me.pos == me.out.len() {
                    me.out.clear();
                    me.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut me.raw);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            me.rewriter.feed(raw.filled(), &mut me.out);
        }
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
    fn what_it_cannot_follow_passes_unchanged() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\nGET /<> HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(input), input);
        let input: &[u8] = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /<>";
        assert_eq!(rewrite(input), input);
    }
}
