//! kask-sim: a Kask-faithful session store emulator (see README.md). This file is the CLI only.

mod api;
mod backend;
mod control;
mod handler;
mod log;
mod memory;
mod metrics;
mod problem;
mod rng;
mod server;
mod store;
mod supervise;
mod units;
mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

use backend::{ServiceDist, ServiceTime};

#[derive(Parser)]
#[command(
    name = "kask-sim",
    version,
    about = "Kask-faithful session store emulator with a realistic memory model",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run kask-sim as a child and restart it when it dies, with CrashLoopBackOff-style backoff.
    Supervise(SuperviseArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free port. Must be loopback unless
    /// --allow-non-loopback.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
    listen: String,

    /// Allow a listen address that is not loopback.
    #[arg(long)]
    allow_non_loopback: bool,

    /// Directory for the durable store (created if missing).
    #[arg(long, value_name = "DIR", required = true)]
    data_dir: Option<PathBuf>,

    /// Write the bound port number to this file (atomically, via rename).
    #[arg(long, value_name = "FILE")]
    port_file: Option<PathBuf>,

    /// Base URI of the key routes (normalised to a leading and trailing slash).
    #[arg(long, value_name = "PATH", default_value = "/sessions/v1/")]
    base_uri: String,

    /// Seconds before a stored value expires; 0 disables expiry.
    #[arg(long, value_name = "SECS", default_value = "86400", value_parser = parse_ttl,
          allow_negative_numbers = true)]
    default_ttl: u64,

    /// Memory held (allocated and touched) by each in-flight request; accepts Ki/Mi/Gi.
    #[arg(long, value_name = "BYTES", default_value = "20Ki", value_parser = parse_request_bytes)]
    per_request_bytes: usize,

    /// Backend (Cassandra stand-in) requests served at once; the rest queue.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    backend_parallelism: u16,

    /// Mean backend service time in milliseconds.
    #[arg(long, value_name = "MS", default_value = "2", value_parser = parse_service_ms)]
    service_time_ms: f64,

    /// Backend service-time distribution.
    #[arg(long, value_name = "DIST", value_enum, default_value = "exp")]
    service_time_dist: ServiceDist,

    /// Seconds freed request memory stays resident before it is returned to the OS (Go's lazy
    /// heap release); 0 returns it at once.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    release_delay_secs: u64,

    /// Emulated container memory limit (e.g. 300Mi); over it the process SIGKILLs itself.
    #[arg(long, value_name = "BYTES", value_parser = parse_limit)]
    memory_limit: Option<u64>,

    /// Extra fixed latency in milliseconds for every key request (GET, POST, DELETE).
    #[arg(long, value_name = "MS", default_value_t = 0, value_parser = parse_delay)]
    get_delay_ms: u64,

    /// Extra fixed latency in milliseconds for GETs only, on top of --get-delay-ms (reads
    /// that wait on a slow backend while writes are fast).
    #[arg(long, value_name = "MS", default_value_t = 0, value_parser = parse_delay)]
    read_delay_ms: u64,

    /// Fraction of key requests answered with Kask's 500 problem.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_error_rate)]
    error_rate: f64,

    /// Enable POST /_sim/control to change delay and error rate at runtime.
    #[arg(long)]
    control: bool,
}

#[derive(Args)]
struct SuperviseArgs {
    /// First restart delay.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    backoff_initial_ms: u64,

    /// Longest restart delay.
    #[arg(long, value_name = "MS", default_value_t = 10000)]
    backoff_max_ms: u64,

    /// Give up (exit with the child's status) after this many restarts.
    #[arg(long, value_name = "N")]
    max_restarts: Option<u32>,

    /// Append JSON-lines events (start, exit, backoff, stop, give_up) to this file.
    #[arg(long, value_name = "FILE")]
    events_file: Option<PathBuf>,

    /// Arguments for the kask-sim child, after `--`.
    #[arg(last = true, required = true, value_name = "KASK_SIM_ARGS")]
    child_args: Vec<String>,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not an integer number of seconds"))?;
    u64::try_from(n).map_err(|_| "TTL must be a positive integer (0 disables expiry)".into())
}

fn parse_request_bytes(s: &str) -> Result<usize, String> {
    let n = units::parse_bytes(s)?;
    if n > 1 << 30 {
        return Err("at most 1Gi per request".into());
    }
    usize::try_from(n).map_err(|_| "too large".into())
}

fn parse_limit(s: &str) -> Result<u64, String> {
    match units::parse_bytes(s)? {
        0 => Err("the memory limit must be positive".into()),
        n => Ok(n),
    }
}

fn parse_service_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_finite() && (0.0..=60_000.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 60000 milliseconds".into())
    }
}

fn parse_delay(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a non-negative integer"))?;
    control::validate_delay_ms(v)
}

fn parse_error_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    control::validate_error_rate(v)
}

/// Resolves the listen address and enforces the loopback-only default.
fn resolve_listen(a: &ServeArgs) -> Result<SocketAddr, String> {
    let addr = a
        .listen
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{}': {e}", a.listen))?
        .next()
        .ok_or_else(|| format!("'{}' resolves to no address", a.listen))?;
    if !addr.ip().is_loopback() && !a.allow_non_loopback {
        return Err(format!(
            "'{}' is not a loopback address; pass --allow-non-loopback to listen on it",
            a.listen
        ));
    }
    Ok(addr)
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Cmd::Supervise(s)) => supervise::run(supervise::SuperviseConfig {
            backoff_initial: Duration::from_millis(s.backoff_initial_ms),
            backoff_max: Duration::from_millis(s.backoff_max_ms.max(s.backoff_initial_ms)),
            max_restarts: s.max_restarts,
            events_file: s.events_file,
            child_args: s.child_args,
        }),
        None => {
            let a = cli.serve;
            let listen = match resolve_listen(&a) {
                Ok(l) => l,
                Err(e) => Cli::command()
                    .error(
                        ErrorKind::ValueValidation,
                        format!("invalid value for '--listen <HOST:PORT>': {e}"),
                    )
                    .exit(),
            };
            let Some(data_dir) = a.data_dir else {
                Cli::command()
                    .error(
                        ErrorKind::MissingRequiredArgument,
                        "--data-dir <DIR> is required",
                    )
                    .exit()
            };
            server::run(server::ServeConfig {
                listen,
                data_dir,
                port_file: a.port_file,
                base_uri: api::normalise_base_uri(&a.base_uri),
                default_ttl: a.default_ttl,
                per_request_bytes: a.per_request_bytes,
                backend_parallelism: usize::from(a.backend_parallelism),
                service_time: ServiceTime {
                    mean_ms: a.service_time_ms,
                    dist: a.service_time_dist,
                },
                release_delay: Duration::from_secs(a.release_delay_secs),
                memory_limit: a.memory_limit,
                get_delay_ms: a.get_delay_ms,
                read_delay_ms: a.read_delay_ms,
                error_rate: a.error_rate,
                control: a.control,
            })
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn negative_ttl_is_rejected_with_a_clear_message() {
        assert_eq!(parse_ttl("0"), Ok(0));
        assert_eq!(parse_ttl("86400"), Ok(86400));
        assert!(parse_ttl("-1")
            .unwrap_err()
            .contains("TTL must be a positive integer"));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = Cli::try_parse_from(["kask-sim", "--data-dir", "d", "--memory-limit", "lots"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--memory-limit"), "{err}");
        let err = Cli::try_parse_from(["kask-sim", "--data-dir", "d", "--error-rate", "2"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--error-rate"), "{err}");
        assert!(Cli::try_parse_from(["kask-sim"]).is_err());
    }

    #[test]
    fn supervise_parses_child_args() {
        let cli = Cli::try_parse_from([
            "kask-sim",
            "supervise",
            "--backoff-initial-ms",
            "200",
            "--",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "d",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            Some(Cmd::Supervise(s)) => {
                assert_eq!(s.backoff_initial_ms, 200);
                assert_eq!(s.child_args, ["--listen", "127.0.0.1:0", "--data-dir", "d"]);
            }
            None => panic!("expected supervise"),
        }
    }

    #[test]
    fn non_loopback_needs_opt_in() {
        let cli = Cli::try_parse_from(["kask-sim", "--data-dir", "d", "--listen", "0.0.0.0:0"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(resolve_listen(&cli.serve).is_err());
        let cli = Cli::try_parse_from([
            "kask-sim",
            "--data-dir",
            "d",
            "--listen",
            "0.0.0.0:0",
            "--allow-non-loopback",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(resolve_listen(&cli.serve).is_ok());
        let cli = Cli::try_parse_from(["kask-sim", "--data-dir", "d", "--listen", "[::1]:0"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(resolve_listen(&cli.serve).is_ok());
    }
}
