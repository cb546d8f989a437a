//! sessionload: open-loop HTTP load generator and incident-replay driver for
//! a Kask-style session store (GET/POST/DELETE `/sessions/v1/{key}`).

mod client;
mod histogram;
mod record;
mod rng;
mod run;
mod scenario;
mod schedule;
mod target;
mod tracker;
mod workload;

use clap::{Parser, Subcommand};
use run::{Mode, RunConfig};
use scenario::Scenario;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(
    name = "sessionload",
    version,
    about = "Open-loop load generator and incident replay for Kask-style session stores"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Base URL of the store or proxy, e.g. http://127.0.0.1:8081 (loopback only)
    #[arg(long)]
    target: String,
    /// Directory for summary.json and timeseries.json (created if missing)
    #[arg(long)]
    out: PathBuf,
    /// No per-second progress line on stderr (warnings still print)
    #[arg(long)]
    quiet: bool,
    /// Permit a target outside 127.0.0.0/8, ::1 and localhost
    #[arg(long)]
    allow_non_loopback: bool,
    /// A request handed to the pool later than this after its scheduled time
    /// counts as "late" (the generator fell behind)
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    late_ms: f64,
    /// Exit with status 3 if any response was incorrect (stale_404, wrong_body, ...)
    #[arg(long)]
    fail_on_incorrect: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a scenario against a target
    Run {
        /// Scenario file (.toml, or .json)
        #[arg(long)]
        scenario: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Stop after this many requests (not counting prefill)
        #[arg(long)]
        max_requests: Option<u64>,
        /// Multiply every phase's rate by X
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        rate_scale: f64,
        /// Multiply every phase's duration by X
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        duration_scale: f64,
        /// Override the scenario's seed
        #[arg(long)]
        seed: Option<u64>,
        /// Override the scenario's maximum number of connections
        #[arg(long)]
        connections: Option<usize>,
    },
    /// Validate a scenario file and print its plan
    Check {
        #[arg(long)]
        scenario: PathBuf,
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        rate_scale: f64,
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        duration_scale: f64,
    },
    /// GET N distinct never-written keys at a fixed rate (cache memory-bound test)
    DistinctMisses {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: DistinctOpts,
    },
}

#[derive(clap::Args, Debug)]
struct DistinctOpts {
    /// Number of distinct keys (= requests)
    #[arg(long)]
    count: u64,
    /// Requests per second
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Key seed; same seed = same keys. Default: a new seed per run
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "/sessions/v1/")]
    base_uri: String,
    /// Wiki id prefix of the keys
    #[arg(long, default_value = "enwiki")]
    wiki: String,
    /// Poisson arrivals instead of evenly spaced ones
    #[arg(long)]
    poisson: bool,
}

fn clock_salt() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(40)
}

fn print_plan(s: &Scenario) {
    println!("scenario {:?}: ok", s.name);
    if let Some(d) = &s.description {
        println!("  {d}");
    }
    println!(
        "  base_uri {}  seed {}  connections {}  timeout {} ms  arrival {}",
        s.base_uri,
        s.seed,
        s.connections,
        s.timeout.as_millis(),
        s.arrival.name()
    );
    println!(
        "  mix reader_miss {} user_get {} write {} delete {}",
        s.mix.reader_miss, s.mix.user_get, s.mix.write, s.mix.delete
    );
    println!(
        "  keys reader_space {} zipf_s {} session_pool {} prefill {}",
        s.keys.reader_space, s.keys.zipf_s, s.keys.session_pool, s.keys.prefill
    );
    let mut t = 0.0;
    for p in &s.phases {
        let rate = if p.rate_from == p.rate_to {
            format!("{} req/s", p.rate_from)
        } else {
            format!("{} -> {} req/s", p.rate_from, p.rate_to)
        };
        println!(
            "  [{t:>7.1}s +{:>6.1}s] {:<12} {rate}  (~{:.0} requests)",
            p.duration_s,
            p.name,
            p.expected_requests()
        );
        t += p.duration_s;
    }
    println!(
        "  total {:.1} s, ~{:.0} requests",
        s.total_duration_s(),
        s.expected_requests()
    );
}

fn distinct_scenario(o: &DistinctOpts, seed: u64) -> Result<Scenario, String> {
    let mut errs = Vec::new();
    let (count, rate, poisson) = (o.count, o.rate, o.poisson);
    if count == 0 || count > 1_000_000_000 {
        errs.push(format!("--count: must be between 1 and 10^9 (got {count})"));
    }
    if !(rate.is_finite() && rate > 0.0 && rate <= scenario::MAX_RATE) {
        errs.push(format!(
            "--rate: must be > 0 and <= {} (got {rate})",
            scenario::MAX_RATE
        ));
    }
    if !errs.is_empty() {
        return Err(errs.join("\n"));
    }
    // Long enough for `count` arrivals; --max-requests=count ends the run.
    let n = count as f64;
    let duration_s = if poisson {
        (n + 6.0 * n.sqrt() + 10.0) / rate
    } else {
        (n + 0.5) / rate
    };
    let doc = serde_json::json!({
        "name": "distinct-misses",
        "base_uri": o.base_uri,
        "seed": seed,
        "connections": o.connections,
        "timeout_ms": o.timeout_ms,
        "arrival": if poisson { "poisson" } else { "uniform" },
        "mix": { "reader_miss": 1.0 },
        "keys": { "wiki_ids": [o.wiki] },
        "phases": [{ "name": "distinct", "duration_s": duration_s, "rate": rate }],
    });
    scenario::parse_json(&doc.to_string())
}

/// Scenario-field errors of the synthesized distinct-misses scenario, named
/// by the command-line flags that set those fields.
fn distinct_error(e: &str) -> String {
    const MAP: [(&str, &str); 5] = [
        ("connections:", "--connections:"),
        ("timeout_ms:", "--timeout-ms:"),
        ("base_uri:", "--base-uri:"),
        ("keys.wiki_ids[0]:", "--wiki:"),
        ("phases: total duration", "--count/--rate: total duration"),
    ];
    e.lines()
        .map(|l| {
            MAP.iter()
                .find(|(from, _)| l.starts_with(from))
                .map_or(l.to_string(), |(from, to)| {
                    format!("{to}{}", &l[from.len()..])
                })
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let (scenario, common, mode, max_requests, rate_scale, duration_scale, run_salt) = match cli.cmd
    {
        Cmd::Check {
            scenario,
            rate_scale,
            duration_scale,
        } => {
            let s = scenario::load(&scenario).map_err(anyhow::Error::msg)?;
            let s = s
                .scaled(rate_scale, duration_scale)
                .map_err(anyhow::Error::msg)?;
            print_plan(&s);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Run {
            scenario,
            common,
            max_requests,
            rate_scale,
            duration_scale,
            seed,
            connections,
        } => {
            let mut s = scenario::load(&scenario).map_err(anyhow::Error::msg)?;
            if let Some(seed) = seed {
                s.seed = seed;
            }
            if let Some(c) = connections {
                if c == 0 || c > 60_000 {
                    anyhow::bail!("--connections: must be between 1 and 60000 (got {c})");
                }
                s.connections = c;
            }
            let s = s
                .scaled(rate_scale, duration_scale)
                .map_err(anyhow::Error::msg)?;
            (
                s,
                common,
                Mode::Scenario,
                max_requests,
                rate_scale,
                duration_scale,
                clock_salt(),
            )
        }
        Cmd::DistinctMisses { common, opts } => {
            // Keys are a function of the seed alone: a given --seed repeats
            // the same keys; without one every run gets new keys.
            let (seed, salt) = (opts.seed.unwrap_or_else(clock_salt), 0);
            let s = distinct_scenario(&opts, seed)
                .map_err(|e| anyhow::anyhow!("{}", distinct_error(&e)))?;
            (
                s,
                common,
                Mode::DistinctMisses,
                Some(opts.count),
                1.0,
                1.0,
                salt,
            )
        }
    };
    let late_threshold = Duration::try_from_secs_f64(common.late_ms / 1000.0)
        .ok()
        .filter(|d| *d <= Duration::from_secs(3600))
        .ok_or_else(|| anyhow::anyhow!("--late-ms: must be a number between 0 and 3600000"))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    let quiet = common.quiet;
    let fail_on_incorrect = common.fail_on_incorrect;
    let out = common.out.clone();
    let (summary, _ts) = rt.block_on(async move {
        let target = target::resolve(&common.target, common.allow_non_loopback)
            .await
            .map_err(anyhow::Error::msg)?;
        if !quiet {
            eprintln!(
                "sessionload: {} -> {} for {:.1} s (~{:.0} requests, {} max connections)",
                scenario.name,
                target.url,
                scenario.total_duration_s(),
                match max_requests {
                    Some(m) => (m as f64).min(scenario.expected_requests()),
                    None => scenario.expected_requests(),
                },
                scenario.connections
            );
        }
        run::run(RunConfig {
            scenario,
            mode,
            target,
            out_dir: common.out,
            max_requests,
            rate_scale,
            duration_scale,
            quiet,
            late_threshold,
            run_salt,
        })
        .await
    })?;
    // Outstanding connection tasks may still be parked; don't wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));

    let o = &summary.overall;
    eprintln!(
        "done: sent={} ok={} shed={} errors={} (timeout {}, conn {}, http {}) incorrect={} p99(ok)={} ms achieved={:.0}/s",
        o.sent,
        o.ok,
        o.shed_503,
        o.errors.total,
        o.errors.timeout,
        o.errors.conn_error,
        o.errors.http_error,
        o.incorrect.total,
        o.latency_ms.p99.map_or("-".to_string(), |v| format!("{v:.2}")),
        o.achieved_rate
    );
    if !summary.schedule.behind_schedule && summary.schedule.late > 0 {
        eprintln!(
            "note: {} of {} requests were dispatched more than {} ms late (max lag {:.1} ms, p99 {:.2} ms)",
            summary.schedule.late,
            o.sent,
            summary.schedule.late_threshold_ms,
            summary.schedule.max_lag_ms,
            summary.schedule.p99_lag_ms.unwrap_or(0.0)
        );
    }
    if summary.schedule.behind_schedule {
        eprintln!(
            "warning: generator fell behind schedule: {} requests more than {} ms late (max lag {:.1} ms, p99 {:.1} ms); the offered load was lower than planned",
            summary.schedule.late,
            summary.schedule.late_threshold_ms,
            summary.schedule.max_lag_ms,
            summary.schedule.p99_lag_ms.unwrap_or(0.0)
        );
    }
    eprintln!("wrote {}/summary.json and timeseries.json", out.display());
    if fail_on_incorrect && summary.correctness.incorrect > 0 {
        eprintln!("incorrect responses: {}", summary.correctness.incorrect);
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}
