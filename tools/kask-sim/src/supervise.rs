//! `kask-sim supervise`: restarts a kask-sim child the way Kubernetes restarts a crashing
//! container (CrashLoopBackOff), so the incident replay can show the OOM-kill/restart loop.
//! The port stays the same across restarts, as a Service would keep it.

use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use crate::log;
use crate::memory::OOM_MARKER_ENV;

/// The child is up long enough to forget its crash history after this many backoffs.
const RESET_FACTOR: u32 = 10;
/// How long a child gets to exit after the forwarded SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct SuperviseConfig {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_restarts: Option<u32>,
    pub events_file: Option<PathBuf>,
    pub child_args: Vec<String>,
}

struct Events(Option<std::fs::File>);

impl Events {
    fn emit(&mut self, event: &str, mut fields: Value) {
        if let Value::Object(map) = &mut fields {
            map.insert("t".into(), json!(log::unix_millis()));
            map.insert("event".into(), json!(event));
        }
        if let Some(f) = &mut self.0 {
            let mut line = fields.to_string();
            line.push('\n');
            if f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .is_err()
            {
                log::error("cannot write supervise events file");
            }
        }
    }
}

pub fn run(cfg: SuperviseConfig) -> i32 {
    // A current-thread runtime spawns children from the main thread, which lives as long as
    // the supervisor: PR_SET_PDEATHSIG fires when the *thread* that forked exits.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::fatal(&format!("cannot start runtime: {e}"));
            return 1;
        }
    };
    rt.block_on(supervise(cfg))
}

/// If the child is told to listen on port 0, picks a free port once so every restart reuses it.
pub fn pin_port(args: &mut [String]) -> Result<(), String> {
    let mut idx = None;
    for i in 0..args.len() {
        if args[i] == "--listen" && i + 1 < args.len() {
            idx = Some((i + 1, false));
        } else if args[i].starts_with("--listen=") {
            idx = Some((i, true));
        }
    }
    let Some((i, inline)) = idx else {
        return Ok(());
    };
    let value = if inline {
        args[i]["--listen=".len()..].to_string()
    } else {
        args[i].clone()
    };
    let Some((host, port)) = value.rsplit_once(':') else {
        return Ok(());
    };
    if port != "0" {
        return Ok(());
    }
    let addr = value
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --listen {value}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen {value} resolves to no address"))?;
    let port = TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot pick a free port on {addr}: {e}"))?
        .port();
    let pinned = format!("{host}:{port}");
    args[i] = if inline {
        format!("--listen={pinned}")
    } else {
        pinned
    };
    Ok(())
}

fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn supervise(cfg: SuperviseConfig) -> i32 {
    let mut events = Events(None);
    if let Some(path) = &cfg.events_file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => events.0 = Some(f),
            Err(e) => {
                log::fatal(&format!("cannot open events file {}: {e}", path.display()));
                return 1;
            }
        }
    }
    let mut args = cfg.child_args.clone();
    if let Err(e) = pin_port(&mut args) {
        log::fatal(&e);
        return 1;
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            log::fatal(&format!("cannot locate own executable: {e}"));
            return 1;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::fatal("cannot install signal handlers");
        return 1;
    };
    let marker = std::env::temp_dir().join(format!("kask-sim-oom-{}", std::process::id()));

    let mut backoff = cfg.backoff_initial;
    let mut restarts: u32 = 0;
    loop {
        let _ = std::fs::remove_file(&marker);
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env(OOM_MARKER_ENV, &marker)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                log::fatal(&format!("cannot start child {}: {e}", exe.display()));
                events.emit("spawn_error", json!({ "error": e.to_string() }));
                return 1;
            }
        };
        let pid = child.id();
        let started = Instant::now();
        events.emit("start", json!({ "pid": pid, "restarts": restarts }));
        log::info(&format!(
            "started kask-sim child pid {pid:?} (restart {restarts})"
        ));

        let status = tokio::select! {
            s = child.wait() => s,
            _ = term.recv() => return stop(&mut child, &mut events, "SIGTERM").await,
            _ = int.recv() => return stop(&mut child, &mut events, "SIGINT").await,
        };
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                log::fatal(&format!("cannot wait for child: {e}"));
                return 1;
            }
        };
        let uptime = started.elapsed();
        let oom = pid.is_some_and(|p| {
            std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == p.to_string())
        });
        events.emit(
            "exit",
            json!({
                "pid": pid,
                "signal": status.signal(),
                "code": status.code(),
                "oom": oom,
                "uptime_ms": uptime.as_millis() as u64,
            }),
        );
        log::warn(&format!(
            "kask-sim child pid {pid:?} exited ({status}){} after {} ms",
            if oom { " [OOMKilled]" } else { "" },
            uptime.as_millis()
        ));

        if cfg.max_restarts.is_some_and(|max| restarts >= max) {
            events.emit("give_up", json!({ "restarts": restarts }));
            return exit_code(&status);
        }
        if uptime >= backoff * RESET_FACTOR {
            backoff = cfg.backoff_initial;
        }
        events.emit("backoff", json!({ "delay_ms": backoff.as_millis() as u64 }));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = term.recv() => { events.emit("stop", json!({ "signal": "SIGTERM" })); return 0; }
            _ = int.recv() => { events.emit("stop", json!({ "signal": "SIGINT" })); return 0; }
        }
        restarts += 1;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// Forwards SIGTERM, waits for the child, and reports how it ended.
async fn stop(child: &mut tokio::process::Child, events: &mut Events, why: &str) -> i32 {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            let _ = child.kill().await;
            None
        }
    };
    events.emit(
        "stop",
        json!({
            "signal": why,
            "child_code": status.and_then(|s| s.code()),
            "child_signal": status.and_then(|s| s.signal()),
        }),
    );
    log::info(&format!("supervisor stopped by {why}"));
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pins_port_zero_once() {
        let mut a = v(&["--listen", "127.0.0.1:0", "--data-dir", "x"]);
        pin_port(&mut a).unwrap();
        let port: u16 = a[1].rsplit_once(':').unwrap().1.parse().unwrap();
        assert!(port > 0);
        assert!(a[1].starts_with("127.0.0.1:"));

        let mut b = v(&["--listen=127.0.0.1:0"]);
        pin_port(&mut b).unwrap();
        assert!(b[0].starts_with("--listen=127.0.0.1:"));
        assert_ne!(b[0], "--listen=127.0.0.1:0");
    }

    #[test]
    fn leaves_fixed_ports_and_missing_listen_alone() {
        let mut a = v(&["--listen", "127.0.0.1:8080"]);
        pin_port(&mut a).unwrap();
        assert_eq!(a[1], "127.0.0.1:8080");
        let mut b = v(&["--data-dir", "x"]);
        pin_port(&mut b).unwrap();
        assert_eq!(b, v(&["--data-dir", "x"]));
    }
}
