//! The connection pool: a queue of due requests served by up to `max`
//! workers, each owning one HTTP/1.1 keep-alive connection.
//!
//! A request pushed while no worker is idle makes a new worker (a new
//! connection) if fewer than `max` exist; otherwise it waits in the queue,
//! and since its latency counts from its scheduled time, the wait is part of
//! what is measured. Connections are opened lazily and reopened after a
//! timeout, a connection error or a `connection: close` from the server.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

/// Responses larger than this are treated as connection errors.
const MAX_BODY: usize = 8 << 20;

// ---- queue --------------------------------------------------------------

struct QueueState<J> {
    jobs: VecDeque<J>,
    idle: usize,
    workers: usize,
    closed: bool,
    peak_len: usize,
}

/// Multi-producer, multi-consumer job queue that also decides when a new
/// worker is needed.
pub struct WorkQueue<J> {
    state: Mutex<QueueState<J>>,
    notify: Notify,
    max_workers: usize,
}

impl<J> WorkQueue<J> {
    pub fn new(max_workers: usize) -> Self {
        WorkQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                idle: 0,
                workers: 0,
                closed: false,
                peak_len: 0,
            }),
            notify: Notify::new(),
            max_workers: max_workers.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<J>> {
        // A worker that panicked cannot leave the queue inconsistent (every
        // critical section is a few field updates), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job. Returns true if the caller must start one more worker
    /// (already counted).
    pub fn push(&self, job: J) -> bool {
        let (wake, spawn) = {
            let mut st = self.lock();
            st.jobs.push_back(job);
            st.peak_len = st.peak_len.max(st.jobs.len());
            if st.idle > 0 {
                st.idle -= 1;
                (true, false)
            } else if st.workers < self.max_workers {
                st.workers += 1;
                (false, true)
            } else {
                (false, false)
            }
        };
        if wake {
            self.notify.notify_one();
        }
        spawn
    }

    /// Next job, waiting while the queue is empty; None once closed and empty.
    pub async fn pop(&self) -> Option<J> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            {
                let mut st = self.lock();
                if let Some(j) = st.jobs.pop_front() {
                    return Some(j);
                }
                if st.closed {
                    return None;
                }
                st.idle += 1;
                // Register before releasing the lock so no wake-up is lost.
                notified.as_mut().enable();
            }
            notified.await;
        }
    }

    /// No more jobs will come: idle workers exit once the queue drains.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn peak_len(&self) -> usize {
        self.lock().peak_len
    }

    pub fn workers(&self) -> usize {
        self.lock().workers
    }
}

// ---- connections --------------------------------------------------------

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Value of the Host header.
    pub host: HeaderValue,
    pub connect_timeout: Duration,
    /// Connections opened so far (shared by all slots).
    pub opened: Arc<AtomicU64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqError {
    /// The deadline passed (before or after the request was sent).
    Timeout,
    /// Connect failed, the connection broke, or the response was unreadable.
    Conn(String),
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
    used: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One worker's connection, opened on first use.
pub struct ConnSlot {
    ep: Endpoint,
    conn: Option<Conn>,
}

enum SendFail {
    /// The request never left (connection not ready); safe to retry.
    Unsent(String),
    Failed(String),
}

impl ConnSlot {
    pub fn new(ep: Endpoint) -> Self {
        ConnSlot { ep, conn: None }
    }

    async fn connect(&mut self, deadline: Instant) -> Result<(), ReqError> {
        self.conn = None;
        let connect_deadline = deadline.min(Instant::now() + self.ep.connect_timeout);
        let stream = match timeout_at(connect_deadline, TcpStream::connect(self.ep.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ReqError::Conn(format!("connect: {e}"))),
            Err(_) if connect_deadline < deadline => {
                return Err(ReqError::Conn("connect timeout".into()))
            }
            Err(_) => return Err(ReqError::Timeout),
        };
        let _ = stream.set_nodelay(true);
        // Close with RST, not FIN: a connection dropped after a timeout
        // must not leave a TIME_WAIT socket behind. Thousands of them (one
        // client address, one server port) exhaust the ephemeral port range
        // and make every connect() scan it, which starved the generator in
        // surge runs.
        let _ = stream.set_zero_linger();
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ReqError::Conn(format!("handshake: {e}")))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        self.ep.opened.fetch_add(1, Ordering::Relaxed);
        self.conn = Some(Conn {
            sender,
            task,
            used: false,
        });
        Ok(())
    }

    fn build(
        &self,
        method: &Method,
        path: &str,
        body: &Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, self.ep.host.clone())
            .header(USER_AGENT, "sessionload/0.1");
        if *method == Method::POST {
            b = b.header(CONTENT_TYPE, "application/octet-stream");
        }
        b.body(Full::new(body.clone()))
            .map_err(|e| format!("bad request: {e}"))
    }

    /// Send one request and read the whole response before `deadline`.
    ///
    /// `on_send` runs once, just before the request is handed to a ready
    /// connection; its value is returned (None if the request never got that
    /// far). A request that a reused connection could not even accept is
    /// retried once on a fresh connection (keep-alive close races); nothing
    /// that reached the wire is retried.
    pub async fn request<T>(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        deadline: Instant,
        on_send: impl FnOnce() -> T,
    ) -> (Option<T>, Result<Response, ReqError>) {
        let mut on_send = Some(on_send);
        let mut ticket: Option<T> = None;
        for attempt in 0..2 {
            if self.conn.as_ref().is_none_or(|c| c.sender.is_closed()) {
                if let Err(e) = self.connect(deadline).await {
                    return (ticket, Err(e));
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return (ticket, Err(ReqError::Conn("no connection".into())));
            };
            let reused = conn.used;
            match timeout_at(deadline, conn.sender.ready()).await {
                Err(_) => {
                    self.conn = None;
                    return (ticket, Err(ReqError::Timeout));
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    if reused && attempt == 0 {
                        continue;
                    }
                    return (ticket, Err(ReqError::Conn(format!("not ready: {e}"))));
                }
                Ok(Ok(())) => {}
            }
            let req = match self.build(&method, path, &body) {
                Ok(r) => r,
                Err(e) => return (ticket, Err(ReqError::Conn(e))),
            };
            let Some(conn) = self.conn.as_mut() else {
                return (ticket, Err(ReqError::Conn("no connection".into())));
            };
            conn.used = true;
            if let Some(f) = on_send.take() {
                ticket = Some(f());
            }
            let fut = conn.sender.try_send_request(req);
            let exchange = async move {
                let resp = match fut.await {
                    Ok(r) => r,
                    Err(mut e) => {
                        let msg = e.error().to_string();
                        return Err(if e.take_message().is_some() {
                            SendFail::Unsent(msg)
                        } else {
                            SendFail::Failed(msg)
                        });
                    }
                };
                let status = resp.status().as_u16();
                let close = resp
                    .headers()
                    .get(hyper::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let body = Limited::new(resp.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| SendFail::Failed(format!("body: {e}")))?
                    .to_bytes();
                Ok((status, body, close))
            };
            match timeout_at(deadline, exchange).await {
                Err(_) => {
                    // The connection still has our request outstanding.
                    self.conn = None;
                    return (ticket, Err(ReqError::Timeout));
                }
                Ok(Err(SendFail::Unsent(msg))) => {
                    self.conn = None;
                    if reused && attempt == 0 {
                        continue;
                    }
                    return (ticket, Err(ReqError::Conn(msg)));
                }
                Ok(Err(SendFail::Failed(msg))) => {
                    self.conn = None;
                    return (ticket, Err(ReqError::Conn(msg)));
                }
                Ok(Ok((status, body, close))) => {
                    if close {
                        self.conn = None;
                    }
                    return (ticket, Ok(Response { status, body }));
                }
            }
        }
        (ticket, Err(ReqError::Conn("connection closed".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_spawns_up_to_max_then_queues() {
        let q: WorkQueue<u32> = WorkQueue::new(2);
        assert!(q.push(1));
        assert!(q.push(2));
        assert!(!q.push(3), "at max: queue instead");
        assert_eq!(q.workers(), 2);
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop().await, Some(1));
        q.close();
        assert_eq!(q.pop().await, Some(2));
        assert_eq!(q.pop().await, Some(3));
        assert_eq!(q.pop().await, None);
        assert_eq!(q.peak_len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_workers_are_woken_not_duplicated() {
        let q: Arc<WorkQueue<u32>> = Arc::new(WorkQueue::new(8));
        let done = Arc::new(AtomicU64::new(0));
        assert!(q.push(0));
        let mut handles = Vec::new();
        let start = |q: Arc<WorkQueue<u32>>, done: Arc<AtomicU64>| {
            tokio::spawn(async move {
                while let Some(_j) = q.pop().await {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        handles.push(start(q.clone(), done.clone()));
        // Let the worker drain and go idle, then feed it slowly.
        for i in 1..200u32 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            if q.push(i) {
                handles.push(start(q.clone(), done.clone()));
            }
        }
        q.close();
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 200);
        assert!(q.workers() <= 8);
    }
}
