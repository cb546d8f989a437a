//! Black-box conformance tests: the real kask-sim binary on an ephemeral loopback port, spoken
//! to with a minimal HTTP/1.1 client so every status, header and body byte is visible.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kask-sim");

// ---------------------------------------------------------------- harness

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kask-sim-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is SIGKILLed and reaped however the test ends.
struct Proc {
    child: Child,
    stderr_path: PathBuf,
}

impl Proc {
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running kask-sim server.
struct Server {
    proc: Proc,
    port: u16,
    stdout_line: String,
}

fn spawn(args: &[&str], dir: &TempDir, tag: &str) -> Proc {
    let stderr_path = dir.path(&format!("{tag}.stderr"));
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn kask-sim");
    Proc { child, stderr_path }
}

fn wait_port_file(path: &Path, proc: &mut Proc) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("kask-sim exited early ({status}): {}", proc.stderr());
        }
        assert!(Instant::now() < deadline, "no port file: {}", proc.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    fn start(dir: &TempDir, extra: &[&str]) -> Server {
        let data = dir.path("data");
        let port_file = dir.path("port");
        let _ = std::fs::remove_file(&port_file);
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--port-file",
            port_file.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let mut proc = spawn(&args, dir, "server");
        let port = wait_port_file(&port_file, &mut proc);
        let stdout = proc.child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        // The line is printed before the port file's rename completes, so this cannot block.
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read stdout line");
        Server {
            proc,
            port,
            stdout_line: line,
        }
    }

    fn req(&self, method: &str, target: &str, body: Option<&[u8]>) -> Resp {
        request(self.port, method, target, body)
    }

    fn get(&self, target: &str) -> Resp {
        self.req("GET", target, None)
    }

    fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).expect("utf-8 metrics")
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }
}

fn raw(port: u16, bytes: &[u8]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).ok();
    s.write_all(bytes).expect("write request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    parse(&buf)
}

fn request(port: u16, method: &str, target: &str, body: Option<&[u8]>) -> Resp {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
        .into_bytes();
    if let Some(b) = body {
        req.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    raw(port, &req)
}

fn parse(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = std::str::from_utf8(&buf[..split]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if let Some(n) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(n);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn metric(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

fn problem_body(kind: &str, title: &str, detail: &str, instance: &str) -> String {
    format!(
        "{{\n  \"type\": \"https://www.mediawiki.org/wiki/Kask/errors/{kind}\",\n  \"title\": \"{title}\",\n  \"detail\": \"{detail}\",\n  \"instance\": \"{instance}\"\n}}\n"
    )
}

fn not_found(instance: &str) -> String {
    problem_body(
        "not_found",
        "Not found",
        "The value you requested was not found",
        instance,
    )
}

fn bad_request(instance: &str) -> String {
    problem_body(
        "bad_request",
        "Bad request",
        "The request was incorrect or malformed",
        instance,
    )
}

fn server_error(instance: &str) -> String {
    problem_body(
        "server_error",
        "Internal server error",
        "The server encountered an error with your request",
        instance,
    )
}

fn assert_problem(r: &Resp, status: u16, body: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.text(), body);
}

/// Opens `n` connections that each send a GET and keep waiting for the answer.
fn park_requests(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            let req = format!("GET /sessions/v1/park{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            s.write_all(req.as_bytes()).ok()?;
            Some(s)
        })
        .collect()
}

// ---------------------------------------------------------------- API rows

#[test]
fn listening_line_and_port_file_agree() {
    let dir = TempDir::new("listen");
    let s = Server::start(&dir, &[]);
    assert_eq!(
        s.stdout_line,
        format!("kask-sim listening on 127.0.0.1:{}\n", s.port)
    );
}

#[test]
fn get_post_delete_rows() {
    let dir = TempDir::new("rows");
    let s = Server::start(&dir, &[]);

    // GET miss.
    let r = s.get("/sessions/v1/enwiki%3AMWSession%3Aabc");
    assert_problem(&r, 404, &not_found("/sessions/v1/enwiki:MWSession:abc"));

    // POST: 201, empty body, no content-type, content-length 0.
    let value: &[u8] = b"PHP.abc=.\x00\xff\x01binary";
    let r = s.req("POST", "/sessions/v1/enwiki%3AMWSession%3Aabc", Some(value));
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("content-type"), None);
    assert_eq!(r.header("content-length"), Some("0"));
    assert!(r.body.is_empty());

    // GET hit, through the undecoded spelling of the same key.
    let r = s.get("/sessions/v1/enwiki:MWSession:abc");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body, value);

    // POST overwrites.
    assert_eq!(
        s.req("POST", "/sessions/v1/enwiki:MWSession:abc", Some(b"v2"))
            .status,
        201
    );
    assert_eq!(s.get("/sessions/v1/enwiki:MWSession:abc").body, b"v2");

    // Empty POST.
    let r = s.req("POST", "/sessions/v1/k", Some(b""));
    assert_problem(&r, 400, &bad_request("/sessions/v1/k"));
    let r = s.req("POST", "/sessions/v1/k", None);
    assert_problem(&r, 400, &bad_request("/sessions/v1/k"));

    // PUT and other methods.
    let r = s.req("PUT", "/sessions/v1/k", Some(b"x"));
    assert_problem(&r, 400, &bad_request("/sessions/v1/k"));
    let r = s.req("PATCH", "/sessions/v1/k", Some(b"x"));
    assert_problem(&r, 400, &bad_request("/sessions/v1/k"));
    let r = s.req("HEAD", "/sessions/v1/k", None);
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());

    // DELETE: 204 whether or not the key existed.
    for _ in 0..2 {
        let r = s.req("DELETE", "/sessions/v1/enwiki%3AMWSession%3Aabc", None);
        assert_eq!(r.status, 204, "{r:?}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("content-type"), None);
    }
    assert_eq!(s.get("/sessions/v1/enwiki:MWSession:abc").status, 404);
}

#[test]
fn key_parsing_rows() {
    let dir = TempDir::new("keys");
    let s = Server::start(&dir, &[]);
    s.req("POST", "/sessions/v1/cat", Some(b"meow"));
    s.req("POST", "/sessions/v1/foo%3Fbar", Some(b"q"));
    s.req("POST", "/sessions/v1/cat%20dog", Some(b"both"));

    assert_eq!(s.get("/sessions/v1/cat").body, b"meow");
    assert_eq!(s.get("/sessions/v1/foo%3Fbar").body, b"q");
    assert_eq!(s.get("/sessions/v1/cat%20dog").body, b"both");
    // A bare trailing `?` is an empty RawQuery in Go: not a query.
    assert_eq!(s.get("/sessions/v1/cat?").body, b"meow");

    assert_problem(
        &s.get("/sessions/v1/cat/dog"),
        404,
        &not_found("/sessions/v1/cat/dog"),
    );
    assert_problem(&s.get("/sessions/v1/"), 404, &not_found("/sessions/v1/"));
    assert_problem(
        &s.get("/sessions/v1/cat%2Fdog"),
        404,
        &not_found("/sessions/v1/cat/dog"),
    );
    assert_problem(
        &s.get("/sessions/v1/foo?bar"),
        400,
        &bad_request("/sessions/v1/foo"),
    );
    assert_problem(
        &s.get("/sessions/v1/a%3Cb%3E%26"),
        404,
        &not_found("/sessions/v1/a\\u003cb\\u003e\\u0026"),
    );
    assert_problem(
        &s.get("/sessions/v1/bad%FF"),
        404,
        &not_found("/sessions/v1/bad\\ufffd"),
    );

    // Outside the base URI: Go's ServeMux plain-text 404.
    for path in ["/something/else", "/", "/metrics/", "/_sim/control"] {
        let r = s.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.body, b"404 page not found\n");
    }

    // ServeMux redirects.
    let r = s.get("/sessions/v1");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("/sessions/v1/"));
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(
        r.body,
        b"<a href=\"/sessions/v1/\">Moved Permanently</a>.\n\n"
    );
    let r = s.get("/sessions/v1//cat");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("/sessions/v1/cat"));

    // Invalid percent-encoding: rejected like Go's server, before any handler.
    let r = raw(
        s.port,
        b"GET /sessions/v1/%zz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body, b"400 Bad Request");
}

/// Go's `net/http` refuses a request target only for a control byte or a bad escape; Kask
/// takes `<`, `>`, `"`, `` ` ``, `{`, `|`, `#` and non-UTF-8 bytes as part of the key.
#[test]
fn raw_bytes_go_accepts_in_a_target_are_part_of_the_key() {
    let dir = TempDir::new("rawkeys");
    let s = Server::start(&dir, &[]);
    let raw_target = |method: &str, target: &[u8], body: &[u8]| {
        let mut req = format!("{method} ").into_bytes();
        req.extend_from_slice(target);
        req.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(body);
        raw(s.port, &req)
    };
    let cases: [(&[u8], &str, &str); 4] = [
        (
            b"/sessions/v1/a<b>",
            "/sessions/v1/a%3Cb%3E",
            "a\\u003cb\\u003e",
        ),
        (
            b"/sessions/v1/<script>\"`{|}^\\",
            "/sessions/v1/%3Cscript%3E%22%60%7B%7C%7D%5E%5C",
            "\\u003cscript\\u003e\\\"`{|}^\\\\",
        ),
        (
            b"/sessions/v1/frag#ment",
            "/sessions/v1/frag%23ment",
            "frag#ment",
        ),
        (b"/sessions/v1/bin\xff", "/sessions/v1/bin%FF", "bin\\ufffd"),
    ];
    for (i, (target, escaped, instance_key)) in cases.iter().enumerate() {
        let name = String::from_utf8_lossy(target);
        // Missing: Kask's 404 problem, the key (HTML-escaped by Go's JSON) in `instance`.
        let r = raw_target("GET", target, b"");
        assert_problem(&r, 404, &not_found(&format!("/sessions/v1/{instance_key}")));
        let value = format!("value {i}");
        let r = raw_target("POST", target, value.as_bytes());
        assert_eq!(r.status, 201, "{name}: {r:?}");
        // The raw and the escaped spelling name the same key.
        for spelling in [*target, escaped.as_bytes()] {
            let r = raw_target("GET", spelling, b"");
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, value.as_bytes()),
                "{name}"
            );
        }
        // A query after such a key is still a query (Kask: 400).
        let mut with_query = target.to_vec();
        with_query.extend_from_slice(b"?<x>");
        assert_eq!(raw_target("GET", &with_query, b"").status, 400, "{name}");
        assert_eq!(raw_target("DELETE", target, b"").status, 204, "{name}");
        assert_eq!(
            raw_target("GET", escaped.as_bytes(), b"").status,
            404,
            "{name}"
        );
    }
    // A control byte in the target is refused like Go's server refuses it.
    for target in [
        &b"/sessions/v1/a\tb"[..],
        b"/sessions/v1/a\x7fb",
        b"/sessions/v1/a\x01",
    ] {
        let r = raw_target("GET", target, b"");
        assert_eq!(r.status, 400, "{target:?}");
        assert_eq!(r.body, b"400 Bad Request", "{target:?}");
        assert_eq!(r.header("connection"), Some("close"));
    }
}

#[test]
fn healthz_and_base_uri_flag() {
    let dir = TempDir::new("health");
    let s = Server::start(&dir, &["--base-uri", "v2/store"]);
    let r = s.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("healthz json");
    for k in ["version", "build_date", "build_host", "go_version"] {
        assert!(v[k].is_string(), "{k} in {}", r.text());
    }
    assert!(r.text().starts_with("{\n  \"version\": "));
    assert!(r.text().ends_with("\"\n}\n"));

    assert_eq!(s.req("POST", "/v2/store/k", Some(b"v")).status, 201);
    assert_eq!(s.get("/v2/store/k").body, b"v");
    assert_eq!(s.get("/sessions/v1/k").status, 404);
    assert_eq!(s.get("/sessions/v1/k").body, b"404 page not found\n");
}

// ---------------------------------------------------------------- storage

#[test]
fn values_expire_after_default_ttl() {
    let dir = TempDir::new("ttl");
    let s = Server::start(&dir, &["--default-ttl", "1"]);
    assert_eq!(s.req("POST", "/sessions/v1/t", Some(b"v")).status, 201);
    assert_eq!(s.get("/sessions/v1/t").status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    assert_problem(&s.get("/sessions/v1/t"), 404, &not_found("/sessions/v1/t"));
    // A new POST resets the TTL.
    assert_eq!(s.req("POST", "/sessions/v1/t", Some(b"w")).status, 201);
    assert_eq!(s.get("/sessions/v1/t").body, b"w");
}

#[test]
fn acknowledged_post_survives_kill_9() {
    let dir = TempDir::new("kill9");
    let mut s = Server::start(&dir, &[]);
    for i in 0..20 {
        let r = s.req(
            "POST",
            &format!("/sessions/v1/durable{i}"),
            Some(format!("v{i}").as_bytes()),
        );
        assert_eq!(r.status, 201);
    }
    assert_eq!(s.req("DELETE", "/sessions/v1/durable0", None).status, 204);
    s.proc.signal(libc::SIGKILL);
    let status = s.proc.wait_exit(Duration::from_secs(5)).expect("died");
    assert_eq!(status.signal(), Some(9));

    let s2 = Server::start(&dir, &[]);
    assert_eq!(s2.get("/sessions/v1/durable0").status, 404);
    for i in 1..20 {
        let r = s2.get(&format!("/sessions/v1/durable{i}"));
        assert_eq!(r.status, 200, "durable{i}");
        assert_eq!(r.body, format!("v{i}").as_bytes());
    }
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = TempDir::new("term");
    let mut s = Server::start(&dir, &[]);
    assert_eq!(s.req("POST", "/sessions/v1/k", Some(b"v")).status, 201);
    s.proc.signal(libc::SIGTERM);
    let status = s.proc.wait_exit(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
    let log = s.proc.stderr();
    assert!(log.contains("shutdown complete"), "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        assert_eq!(v["appname"], "kask-sim");
    }
    let s2 = Server::start(&dir, &[]);
    assert_eq!(s2.get("/sessions/v1/k").body, b"v");
}

// ---------------------------------------------------------------- metrics

#[test]
fn metrics_content() {
    let dir = TempDir::new("metrics");
    let s = Server::start(&dir, &["--memory-limit", "400Mi"]);
    s.get("/sessions/v1/miss");
    s.get("/sessions/v1/miss");
    s.req("POST", "/sessions/v1/k", Some(b"v"));
    s.req("PUT", "/sessions/v1/k", Some(b"v"));
    s.get("/healthz");
    s.get("/elsewhere");

    let r = s.get("/metrics");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = String::from_utf8(r.body).expect("utf-8");
    assert_eq!(
        metric(&m, "http_requests_total{code=\"404\",method=\"GET\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "http_requests_total{code=\"201\",method=\"POST\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "http_requests_total{code=\"400\",method=\"PUT\"}"),
        1.0
    );
    // Only base-URI requests are instrumented, as in Kask.
    assert!(!m.contains("code=\"200\""), "{m}");
    assert_eq!(
        metric(
            &m,
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"+Inf\"}"
        ),
        2.0
    );
    for le in [
        "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    ] {
        let series = format!(
            "http_request_duration_seconds_bucket{{code=\"404\",method=\"GET\",le=\"{le}\"}}"
        );
        assert!(m.contains(&series), "{series}");
    }
    assert!(m.contains("http_request_duration_seconds_sum{code=\"404\",method=\"GET\"} "));
    assert!(m.contains("# TYPE http_request_duration_seconds histogram\n"));
    assert!(m.contains("# TYPE http_requests_total counter\n"));
    assert!(m.contains("kask_build_info{build_date=\""));
    let rss = metric(&m, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 200e6, "rss {rss}");
    assert!(metric(&m, "process_start_time_seconds") > 1.5e9);
    assert!(metric(&m, "go_goroutines") >= 1.0);
    assert!(metric(&m, "go_memstats_heap_inuse_bytes") > 0.0);
    assert!(metric(&m, "go_memstats_stack_inuse_bytes") > 0.0);
    assert_eq!(metric(&m, "kasksim_inflight_requests"), 1.0);
    assert!(metric(&m, "kasksim_inflight_peak") >= 1.0);
    assert_eq!(metric(&m, "kasksim_backend_queue_depth"), 0.0);
    assert_eq!(
        metric(&m, "kasksim_memory_limit_bytes"),
        400.0 * 1024.0 * 1024.0
    );
}

#[test]
fn backend_queue_builds_beyond_parallelism() {
    let dir = TempDir::new("queue");
    let s = Server::start(
        &dir,
        &[
            "--backend-parallelism",
            "1",
            "--service-time-ms",
            "400",
            "--service-time-dist",
            "const",
        ],
    );
    let port = s.port;
    let workers: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                request(port, "GET", &format!("/sessions/v1/q{i}"), None).status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(250));
    let m = s.metrics();
    assert!(metric(&m, "kasksim_backend_queue_depth") >= 2.0, "{m}");
    assert_eq!(metric(&m, "kasksim_backend_busy"), 1.0);
    assert!(metric(&m, "kasksim_inflight_requests") >= 5.0);
    for w in workers {
        assert_eq!(w.join().expect("thread"), 404);
    }
    let m = s.metrics();
    assert!(metric(&m, "kasksim_inflight_peak") >= 5.0);
    // Four serialised 400 ms services: the later ones waited over 1 s.
    assert!(
        metric(
            &m,
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"1\"}"
        ) <= 3.0
    );
}

/// Clients that go away while their request waits for a backend worker (as Envoy does when
/// its route times out) cost the backend nothing: Kask's Go server cancels the request's
/// context, kask-sim drops the queued job and counts it.
#[test]
fn queued_requests_of_departed_clients_are_dropped() {
    let dir = TempDir::new("abandon");
    let s = Server::start(
        &dir,
        &[
            "--backend-parallelism",
            "1",
            "--service-time-ms",
            "300",
            "--service-time-dist",
            "const",
        ],
    );
    // One request holds the only worker; ten more queue behind it, then their clients leave.
    let port = s.port;
    let first = std::thread::spawn(move || request(port, "GET", "/sessions/v1/first", None).status);
    std::thread::sleep(Duration::from_millis(50));
    let parked = park_requests(s.port, 10);
    assert_eq!(parked.len(), 10);
    std::thread::sleep(Duration::from_millis(100));
    assert!(metric(&s.metrics(), "kasksim_backend_queue_depth") >= 10.0);
    drop(parked);
    // Served right after the first job, not after ten dead ones (3 s).
    let started = Instant::now();
    assert_eq!(s.get("/sessions/v1/last").status, 404);
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
    assert_eq!(first.join().expect("thread"), 404);
    let m = s.metrics();
    assert_eq!(metric(&m, "kasksim_abandoned_total"), 10.0, "{m}");
    assert_eq!(metric(&m, "kasksim_backend_queue_depth"), 0.0);
    // Kask's middleware never records a request whose handler did not finish.
    assert_eq!(
        metric(&m, "http_requests_total{code=\"404\",method=\"GET\"}"),
        2.0
    );
}

// ---------------------------------------------------------------- memory model

#[test]
fn memory_limit_kills_with_sigkill() {
    let dir = TempDir::new("oom");
    let mut s = Server::start(
        &dir,
        &[
            "--memory-limit",
            "30Mi",
            "--per-request-bytes",
            "1Mi",
            "--get-delay-ms",
            "10000",
        ],
    );
    let m = s.metrics();
    assert!(metric(&m, "process_resident_memory_bytes") < 30.0 * 1048576.0);
    let _parked = park_requests(s.port, 60);
    let status = s
        .proc
        .wait_exit(Duration::from_secs(15))
        .expect("kask-sim should have been OOM-killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let log = s.proc.stderr();
    assert!(log.contains("memory limit exceeded"), "{log}");
}

/// Go's heap-in-use + stack-in-use cover ~30 KB of the ~33-34 KB Kask holds resident per
/// in-flight request (at 2,000-5,000 in flight); kask-sim's gauges must follow a surge in the same proportion, or a
/// shedder deciding on them would react later than it would in front of Kask.
#[test]
fn inuse_gauges_follow_rss_like_kask() {
    let dir = TempDir::new("inuse");
    let s = Server::start(&dir, &["--get-delay-ms", "20000"]);
    let inuse = |m: &str| {
        metric(m, "go_memstats_heap_inuse_bytes") + metric(m, "go_memstats_stack_inuse_bytes")
    };
    let m0 = s.metrics();
    let parked = park_requests(s.port, 1000);
    assert_eq!(parked.len(), 1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    let m1 = loop {
        let m = s.metrics();
        if metric(&m, "kasksim_inflight_requests") > 1000.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rss_growth =
        metric(&m1, "process_resident_memory_bytes") - metric(&m0, "process_resident_memory_bytes");
    let inuse_growth = inuse(&m1) - inuse(&m0);
    let per_request = rss_growth / 1000.0;
    let share = inuse_growth / rss_growth;
    assert!(
        (28_000.0..48_000.0).contains(&per_request),
        "RSS per in-flight request {per_request}"
    );
    assert!((0.8..=1.0).contains(&share), "in-use / RSS growth {share}");
    // Stack is ~2/5 of in-use growth, as Kask's ~12 KB of ~30 KB.
    let stack_growth =
        metric(&m1, "go_memstats_stack_inuse_bytes") - metric(&m0, "go_memstats_stack_inuse_bytes");
    assert!((0.35..0.45).contains(&(stack_growth / inuse_growth)));
    drop(parked);
}

#[test]
fn rss_stays_high_after_surge_until_release_delay() {
    let dir = TempDir::new("retain");
    let s = Server::start(
        &dir,
        &[
            "--per-request-bytes",
            "1Mi",
            "--get-delay-ms",
            "1000",
            "--release-delay-secs",
            "2",
        ],
    );
    let mib = 1048576.0;
    let m0 = s.metrics();
    let rss0 = metric(&m0, "process_resident_memory_bytes");
    let inuse0 =
        metric(&m0, "go_memstats_heap_inuse_bytes") + metric(&m0, "go_memstats_stack_inuse_bytes");

    let port = s.port;
    let surge: Vec<_> = (0..30)
        .map(|i| {
            std::thread::spawn(move || {
                request(port, "GET", &format!("/sessions/v1/s{i}"), None).status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = s.metrics();
    let inuse_during = metric(&during, "go_memstats_heap_inuse_bytes")
        + metric(&during, "go_memstats_stack_inuse_bytes");
    assert!(
        inuse_during >= inuse0 + 25.0 * mib,
        "{inuse0} -> {inuse_during}"
    );
    for t in surge {
        assert_eq!(t.join().expect("thread"), 404);
    }

    // Right after: live demand is back to base, resident memory is not.
    let after = s.metrics();
    let rss_after = metric(&after, "process_resident_memory_bytes");
    let inuse_after = metric(&after, "go_memstats_heap_inuse_bytes")
        + metric(&after, "go_memstats_stack_inuse_bytes");
    assert!(rss_after >= rss0 + 25.0 * mib, "{rss0} -> {rss_after}");
    assert!(
        inuse_after <= inuse0 + 1.5 * mib,
        "{inuse0} -> {inuse_after}"
    );
    assert!(metric(&after, "go_memstats_heap_idle_bytes") >= 25.0 * mib);

    // After the release delay the pages go back to the OS.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let m = s.metrics();
        let rss = metric(&m, "process_resident_memory_bytes");
        if rss <= rss0 + 8.0 * mib {
            assert!(metric(&m, "go_memstats_heap_released_bytes") >= 25.0 * mib);
            break;
        }
        assert!(Instant::now() < deadline, "rss still {rss} (base {rss0})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------- fault knobs

#[test]
fn error_rate_answers_server_errors() {
    let dir = TempDir::new("errors");
    let s = Server::start(&dir, &["--error-rate", "1"]);
    assert_problem(
        &s.get("/sessions/v1/k"),
        500,
        &server_error("/sessions/v1/k"),
    );
    assert_problem(
        &s.req("POST", "/sessions/v1/k", Some(b"v")),
        500,
        &server_error("/sessions/v1/k"),
    );
    assert_problem(
        &s.req("DELETE", "/sessions/v1/k", None),
        500,
        &server_error("/sessions/v1/k"),
    );
    let m = s.metrics();
    assert_eq!(
        metric(&m, "http_requests_total{code=\"500\",method=\"GET\"}"),
        1.0
    );
    // Kask's DELETE error path calls WriteHeader(204) after the 500: metrics say 204.
    assert_eq!(
        metric(&m, "http_requests_total{code=\"204\",method=\"DELETE\"}"),
        1.0
    );
}

#[test]
fn control_endpoint() {
    let dir = TempDir::new("control");
    let s = Server::start(&dir, &["--control"]);

    let r = s.req(
        "POST",
        "/_sim/control",
        Some(br#"{"delay_ms": 300, "error_rate": 0}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["delay_ms"], 300);
    assert_eq!(v["error_rate"], 0.0);

    let t = Instant::now();
    assert_eq!(s.get("/sessions/v1/slow").status, 404);
    assert!(t.elapsed() >= Duration::from_millis(300));

    let r = s.req(
        "POST",
        "/_sim/control",
        Some(br#"{"delay_ms": 0, "error_rate": 1.0}"#),
    );
    assert_eq!(r.status, 200);
    assert_problem(
        &s.get("/sessions/v1/x"),
        500,
        &server_error("/sessions/v1/x"),
    );

    let r = s.req(
        "POST",
        "/_sim/control",
        Some(br#"{"error_rate": 0, "reset_peak": true}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/sessions/v1/x").status, 404);
    assert_eq!(metric(&s.metrics(), "kasksim_inflight_peak"), 1.0);

    let r = s.req("POST", "/_sim/control", Some(br#"{"delay": 5}"#));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unknown field `delay`"), "{}", r.text());
    let r = s.req("POST", "/_sim/control", Some(b"{oops"));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("invalid control request"), "{}", r.text());
    let r = s.req("POST", "/_sim/control", Some(br#"{"error_rate": 1.5}"#));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("error_rate"), "{}", r.text());

    let r = s.get("/_sim/control");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["error_rate"], 0.0);
}

// ---------------------------------------------------------------- CLI

fn run_cli(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kask-sim");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_rejected_by_name() {
    let dir = TempDir::new("cli");
    let d = dir.path("data");
    let d = d.to_str().expect("utf-8");
    let (code, err) = run_cli(&["--data-dir", d, "--memory-limit", "lots"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--memory-limit"), "{err}");
    let (code, err) = run_cli(&["--data-dir", d, "--default-ttl", "-5"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--default-ttl") && err.contains("TTL must be a positive integer"),
        "{err}"
    );
    let (code, err) = run_cli(&["--data-dir", d, "--listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--allow-non-loopback"), "{err}");
    let (code, err) = run_cli(&["--data-dir", d, "--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, err) = run_cli(&["--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--data-dir"), "{err}");
}

// ---------------------------------------------------------------- supervise

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_events(path: &Path, what: &str, n: usize, sup: &mut Proc) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = events(path);
        if ev.iter().filter(|e| e["event"] == what).count() >= n {
            return ev;
        }
        if let Ok(Some(st)) = sup.child.try_wait() {
            panic!("supervisor exited ({st}): {}", sup.stderr());
        }
        assert!(Instant::now() < deadline, "waiting for {n} {what}: {ev:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = Vec::new();
            if s.read_to_end(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "port {port} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn supervise_restarts_on_same_port_and_reports_oom() {
    let dir = TempDir::new("supervise");
    let ev_path = dir.path("events.jsonl");
    let port_file = dir.path("port");
    let data = dir.path("data");
    let mut sup = spawn(
        &[
            "supervise",
            "--backoff-initial-ms",
            "100",
            "--backoff-max-ms",
            "400",
            "--events-file",
            ev_path.to_str().expect("utf-8"),
            "--",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--port-file",
            port_file.to_str().expect("utf-8"),
            "--memory-limit",
            "30Mi",
            "--per-request-bytes",
            "1Mi",
            "--get-delay-ms",
            "3000",
        ],
        &dir,
        "supervisor",
    );
    let port = wait_port_file(&port_file, &mut sup);
    wait_healthy(port);

    // An external SIGKILL: restarted on the same port, not reported as OOM.
    let ev = wait_events(&ev_path, "start", 1, &mut sup);
    let pid1 = ev[0]["pid"].as_i64().expect("pid");
    // SAFETY: kill(2) on the supervisor's child, which the supervisor has not reaped.
    unsafe {
        libc::kill(pid1 as libc::pid_t, libc::SIGKILL);
    }
    let ev = wait_events(&ev_path, "start", 2, &mut sup);
    let exit = ev
        .iter()
        .find(|e| e["event"] == "exit")
        .expect("exit event");
    assert_eq!(exit["signal"], 9);
    assert!(exit["code"].is_null());
    assert_eq!(exit["oom"], false);
    assert!(exit["t"].as_u64().expect("t") > 1_500_000_000_000);
    wait_healthy(port);
    assert_eq!(
        std::fs::read_to_string(&port_file).expect("port").trim(),
        port.to_string()
    );

    // An emulated OOM kill: reported as such, then restarted again.
    let parked = park_requests(port, 60);
    let ev = wait_events(&ev_path, "start", 3, &mut sup);
    drop(parked);
    let exits: Vec<_> = ev.iter().filter(|e| e["event"] == "exit").collect();
    assert_eq!(exits.len(), 2);
    assert_eq!(exits[1]["signal"], 9);
    assert_eq!(exits[1]["oom"], true);
    assert!(ev.iter().any(|e| e["event"] == "backoff"));
    wait_healthy(port);
    let pid3 = ev
        .iter()
        .filter(|e| e["event"] == "start")
        .nth(2)
        .and_then(|e| e["pid"].as_i64())
        .expect("third pid");

    // SIGTERM to the supervisor is forwarded; both exit.
    sup.signal(libc::SIGTERM);
    let st = sup
        .wait_exit(Duration::from_secs(10))
        .expect("supervisor exits");
    assert_eq!(st.code(), Some(0));
    assert!(
        !Path::new(&format!("/proc/{pid3}")).exists(),
        "child {pid3} still alive"
    );
    let ev = events(&ev_path);
    let stop = ev
        .iter()
        .find(|e| e["event"] == "stop")
        .expect("stop event");
    assert_eq!(stop["child_code"], 0);
}

#[test]
fn supervise_gives_up_after_max_restarts() {
    let dir = TempDir::new("giveup");
    let ev_path = dir.path("events.jsonl");
    // A child whose data dir is a regular file cannot open its store and exits 1 every time.
    let not_a_dir = dir.path("file");
    std::fs::write(&not_a_dir, b"x").expect("write file");
    let mut sup = spawn(
        &[
            "supervise",
            "--backoff-initial-ms",
            "10",
            "--max-restarts",
            "2",
            "--events-file",
            ev_path.to_str().expect("utf-8"),
            "--",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            not_a_dir.to_str().expect("utf-8"),
        ],
        &dir,
        "supervisor",
    );
    let st = sup.wait_exit(Duration::from_secs(10)).expect("gives up");
    assert_eq!(st.code(), Some(1));
    let ev = events(&ev_path);
    assert_eq!(ev.iter().filter(|e| e["event"] == "start").count(), 3);
    assert_eq!(
        ev.last().map(|e| e["event"].clone()),
        Some("give_up".into())
    );
    assert!(ev
        .iter()
        .filter(|e| e["event"] == "exit")
        .all(|e| e["code"] == 1));
}
