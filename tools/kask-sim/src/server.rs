//! Process wiring for `kask-sim` serving: storage, backend, memory model, HTTP/1.1 listener,
//! port reporting and graceful shutdown on SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};

use crate::api::Router;
use crate::backend::{Backend, ServiceTime};
use crate::control::Knobs;
use crate::handler::{self, App};
use crate::log;
use crate::memory::MemoryModel;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::wire::GoTargets;

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub port_file: Option<PathBuf>,
    pub base_uri: String,
    pub default_ttl: u64,
    pub per_request_bytes: usize,
    pub backend_parallelism: usize,
    pub service_time: ServiceTime,
    pub release_delay: Duration,
    pub memory_limit: Option<u64>,
    pub get_delay_ms: u64,
    pub read_delay_ms: u64,
    pub error_rate: f64,
    pub control: bool,
}

/// Runs the server until a termination signal; returns the process exit code.
pub fn run(cfg: ServeConfig) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kask-sim-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::fatal(&format!("cannot start runtime: {e}"));
            return 1;
        }
    };
    let result = rt.block_on(serve(cfg));
    let code = match result {
        Ok((app, store)) => {
            // Queued backend jobs finish first, then the writer commits everything pending.
            app.backend.shutdown();
            store.shutdown();
            log::info("shutdown complete");
            0
        }
        Err(e) => {
            log::fatal(&e);
            1
        }
    };
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn serve(cfg: ServeConfig) -> Result<(Arc<App>, Arc<Store>), String> {
    let store = Arc::new(Store::open(&cfg.data_dir, cfg.default_ttl)?);
    let backend = Backend::start(
        Arc::clone(&store),
        cfg.backend_parallelism,
        cfg.service_time,
    )
    .map_err(|e| format!("cannot start backend workers: {e}"))?;
    let memory = Arc::new(MemoryModel::new(
        cfg.per_request_bytes,
        cfg.release_delay,
        cfg.memory_limit,
    ));
    memory
        .start_watchdog()
        .map_err(|e| format!("cannot start memory watchdog: {e}"))?;
    let app = Arc::new(App {
        router: Router::new(&cfg.base_uri, cfg.control),
        metrics: Metrics::new(),
        memory,
        backend,
        knobs: Knobs::new(cfg.get_delay_ms, cfg.error_rate),
        read_delay: Duration::from_millis(cfg.read_delay_ms),
        parallelism: cfg.backend_parallelism,
    });

    let listener =
        listen(cfg.listen).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read bound address: {e}"))?;
    if let Some(pf) = &cfg.port_file {
        write_port_file(pf, local.port())
            .map_err(|e| format!("cannot write port file {}: {e}", pf.display()))?;
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "kask-sim listening on {local}");
        let _ = out.flush();
    }
    log::info(&format!(
        "Starting service as http://{local}{} (data dir {}, default_ttl {}s, backend parallelism {}, memory limit {})",
        cfg.base_uri,
        cfg.data_dir.display(),
        cfg.default_ttl,
        cfg.backend_parallelism,
        cfg.memory_limit
            .map(|l| format!("{l} bytes"))
            .unwrap_or_else(|| "none".into()),
    ));

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // Kask's http.ListenAndServe has no timeouts: idle keep-alive connections live until the
        // client closes them. hyper's default 30 s header timeout would also cut idle pooled
        // connections (it runs while waiting for the next request), which Envoy can race.
        .header_read_timeout(None)
        // Go writes canonical header names; match it for anyone diffing raw responses.
        .title_case_headers(true);
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Typically EMFILE under a flood: back off instead of spinning.
                        log::error(&format!("accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = Arc::clone(&app);
                let service = service_fn(move |req| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, std::convert::Infallible>(handler::handle(app, req).await) }
                });
                // Request targets as Go reads them (hyper's URI parser refuses some Kask accepts).
                let conn = http.serve_connection(TokioIo::new(GoTargets::new(stream)), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            signal = &mut shutdown => {
                log::info(&format!("received {signal}, shutting down"));
                break;
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            log::warn("in-flight requests did not finish in time; closing anyway");
        }
    }
    Ok((app, store))
}

/// Binds with the kernel's `somaxconn` backlog, as Go's net package does, rather than tokio's
/// fixed 1024: under a connection flood the accept queue is part of what is being modelled.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(4096);
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted process rebind the port while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Writes the port via a temporary file and a rename, so readers never see a partial file.
pub fn write_port_file(path: &Path, port: u16) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{port}\n"))?;
    std::fs::rename(&tmp, path)
}
