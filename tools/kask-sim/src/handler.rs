//! Per-request behaviour: Kask's handlers for the base URI, plus /metrics, /healthz, the
//! optional control endpoint and ServeMux's own answers, all under the memory model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};

use crate::api::{KeyParse, Route, Router};
use crate::backend::{Backend, Job, Outcome};
use crate::control::Knobs;
use crate::memory::{self, MemoryModel};
use crate::metrics::{self, Metrics, Snapshot, BUILD};
use crate::problem::{self, Problem};
use crate::{log, rng};

pub type Resp = Response<Full<Bytes>>;

pub struct App {
    pub router: Router,
    pub metrics: Metrics,
    pub memory: Arc<MemoryModel>,
    pub backend: Backend,
    pub knobs: Knobs,
    /// Extra fixed latency for GETs only (a store whose reads are slow and writes fast).
    pub read_delay: Duration,
    pub parallelism: usize,
}

const NOSNIFF: &str = "nosniff";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

fn response(status: u16, content_type: Option<&'static str>, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    r
}

/// Kask's `HTTPError`.
fn problem(p: Problem, instance: &[u8]) -> Resp {
    let mut r = response(p.status(), Some("application/json"), p.body(instance));
    r.headers_mut()
        .insert("x-content-type-options", HeaderValue::from_static(NOSNIFF));
    r
}

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Resp {
    let _inflight = app.metrics.enter();
    // Every request, whatever its route, holds its memory until the response is produced, as a
    // goroutine and its buffers do in Kask.
    let _mem = match app.memory.acquire() {
        Ok(g) => g,
        Err(e) => {
            log::error(&format!("cannot allocate request memory: {e}"));
            return problem(Problem::ServerError, req.uri().path().as_bytes());
        }
    };

    let (route, path) = app.router.route(req.uri().path(), req.uri().query());
    match route {
        Route::Key(parsed) => {
            let started = Instant::now();
            let method = req.method().clone();
            let (resp, observed) = key_request(&app, req, parsed, &path).await;
            app.metrics
                .observe(observed, method.as_str(), started.elapsed().as_secs_f64());
            resp
        }
        Route::Metrics => metrics_response(&app),
        Route::Healthz => {
            let body = problem::go_marshal_indent(&[
                ("version", BUILD.version.as_bytes()),
                ("build_date", BUILD.build_date.as_bytes()),
                ("build_host", BUILD.build_host.as_bytes()),
                ("go_version", BUILD.go_version.as_bytes()),
            ]);
            response(200, Some("application/json"), body)
        }
        Route::Control => control(&app, req).await,
        Route::NotFound => {
            let mut r = response(404, Some(TEXT_PLAIN), problem::PLAIN_NOT_FOUND);
            r.headers_mut()
                .insert("x-content-type-options", HeaderValue::from_static(NOSNIFF));
            r
        }
        Route::Redirect(location) => redirect(req.method(), &location),
        Route::Asterisk => {
            let mut r = response(400, None, Bytes::new());
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Route::BadEncoding => {
            // Go's server rejects the request line itself: "400 Bad Request", then closes.
            let mut r = response(400, Some(TEXT_PLAIN), &b"400 Bad Request"[..]);
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// `http.Redirect(w, r, location, 301)`.
fn redirect(method: &Method, location: &str) -> Resp {
    let is_get = *method == Method::GET;
    let ct = (is_get || *method == Method::HEAD).then_some("text/html; charset=utf-8");
    let body = if is_get {
        Bytes::from(problem::redirect_body(location))
    } else {
        Bytes::new()
    };
    let mut r = response(301, ct, body);
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

/// Returns the response and the status Kask's Prometheus middleware records for it.
async fn key_request(
    app: &App,
    req: Request<Incoming>,
    parsed: KeyParse,
    path: &[u8],
) -> (Resp, u16) {
    let key = match parsed {
        KeyParse::Key(k) => k,
        KeyParse::NotFound => return (problem(Problem::NotFound, path), 404),
        KeyParse::BadRequest => return (problem(Problem::BadRequest, path), 400),
    };
    match *req.method() {
        Method::GET => match read(app, key).await {
            Ok(Outcome::Value(Some(v))) => {
                (response(200, Some("application/octet-stream"), v), 200)
            }
            Ok(_) => (problem(Problem::NotFound, path), 404),
            Err(()) => (problem(Problem::ServerError, path), 500),
        },
        Method::POST => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return (problem(Problem::ServerError, path), 500),
            };
            if body.is_empty() {
                return (problem(Problem::BadRequest, path), 400);
            }
            match storage(app, Job::Set(key, body.to_vec())).await {
                // Kask sets Content-Type after WriteHeader, so none is sent.
                Ok(_) => (response(201, None, Bytes::new()), 201),
                Err(()) => (problem(Problem::ServerError, path), 500),
            }
        }
        Method::DELETE => match storage(app, Job::Delete(key)).await {
            Ok(_) => (response(204, None, Bytes::new()), 204),
            // Kask writes the 500 problem and then a superfluous WriteHeader(204): the client
            // sees 500 but its metrics middleware records 204.
            Err(()) => (problem(Problem::ServerError, path), 204),
        },
        _ => (problem(Problem::BadRequest, path), 400),
    }
}

/// A GET's storage call, after the extra read latency if any.
async fn read(app: &App, key: Vec<u8>) -> Result<Outcome, ()> {
    if !app.read_delay.is_zero() {
        tokio::time::sleep(app.read_delay).await;
    }
    storage(app, Job::Get(key)).await
}

/// A storage call as Kask makes it to Cassandra: injected latency, injected failure, then the
/// bounded-parallelism backend. Real storage errors are logged; injected ones are not, since
/// they can be most of the traffic.
async fn storage(app: &App, job: Job) -> Result<Outcome, ()> {
    let delay = app.knobs.delay_ms();
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let rate = app.knobs.error_rate();
    if rate > 0.0 && rng::shared_unit() < rate {
        return Err(());
    }
    app.backend.run(job).await.map_err(|e| {
        log::error(&format!("Error from storage ({e})"));
    })
}

fn metrics_response(app: &App) -> Resp {
    // One task per client connection (the serve loop itself is not a task).
    let goroutines = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let snap = Snapshot {
        goroutines,
        mem: app.memory.stats(goroutines),
        rss: memory::rss_bytes(),
        vsz: memory::vsz_bytes(),
        queue_depth: app.backend.queue_depth(),
        abandoned: app.backend.abandoned(),
        backend_busy: app.backend.busy(),
        backend_parallelism: app.parallelism,
        memory_limit: app.memory.limit().unwrap_or(0),
    };
    response(200, Some(metrics::CONTENT_TYPE), app.metrics.render(&snap))
}

fn json(status: u16, value: &impl serde::Serialize) -> Resp {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    response(status, Some("application/json"), body)
}

async fn control(app: &App, req: Request<Incoming>) -> Resp {
    let error = |msg: String| json(400, &serde_json::json!({ "error": msg }));
    match *req.method() {
        Method::GET => json(200, &app.knobs.settings()),
        Method::POST => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(format!("cannot read body: {e}")),
            };
            match app.knobs.apply(&body) {
                Ok(applied) => {
                    if applied.reset_peak {
                        app.metrics.reset_peak();
                    }
                    json(200, &app.knobs.settings())
                }
                Err(msg) => error(msg),
            }
        }
        ref m => error(format!("method {m} not allowed; use GET or POST")),
    }
}
