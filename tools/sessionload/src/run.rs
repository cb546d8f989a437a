//! One run: the open-loop dispatcher, the workers that execute requests
//! and judge their outcomes, and the recorder with its progress line.
//!
//! The dispatcher hands each request to the pool at its scheduled time,
//! whatever happened to earlier ones. Latency and the deadline (scheduled
//! time + timeout) count from the scheduled time, so time spent queued for a
//! connection, or lost because the generator itself fell behind, is
//! measured rather than hidden (no coordinated omission).

use crate::client::{ConnSlot, Endpoint, ReqError, WorkQueue};
use crate::histogram::us_to_ms;
use crate::record::{
    ErrorKind, IncorrectKind, Outcome, Record, Recorder, RunInfo, Summary, Timeseries,
};
use crate::rng::{hash2, Rng};
use crate::scenario::Scenario;
use crate::schedule::Schedule;
use crate::target::Target;
use crate::tracker::{GetResult, Tracker, Verdict};
use crate::workload::{
    encode_key, parse_version, Class, KeyNames, KeyRef, MissSpace, Op, Values, Workload, Zipf,
};
use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::Method;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the run does with reader misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Zipf-distributed reader misses (the scenario's key space).
    Scenario,
    /// Every reader miss is a new key.
    DistinctMisses,
}

pub struct RunConfig {
    /// Already scaled.
    pub scenario: Scenario,
    pub mode: Mode,
    pub target: Target,
    pub out_dir: PathBuf,
    pub max_requests: Option<u64>,
    pub rate_scale: f64,
    pub duration_scale: f64,
    pub quiet: bool,
    pub late_threshold: Duration,
    /// Mixed into session (and distinct-miss) key names; 0 = reproducible.
    pub run_salt: u64,
}

struct Job {
    op: Op,
    prefill: bool,
    phase: usize,
    sched: Instant,
    sched_us: u64,
    lag_us: u64,
    dispatched: Instant,
}

/// Shared by the dispatcher, the workers and the progress line.
struct Ctx {
    endpoint: Endpoint,
    base_uri: String,
    timeout: Duration,
    names: KeyNames,
    values: Values,
    tracker: Mutex<Tracker>,
    queue: WorkQueue<Job>,
    dispatched: AtomicU64,
    interval_max_lag_us: AtomicU64,
    interval_late: AtomicU64,
    late_threshold_us: u64,
}

impl Ctx {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn is_delete_success(status: u16) -> bool {
    // What MediaWiki's RESTBagOStuff accepts for a DELETE.
    matches!(status, 200 | 204 | 205 | 404 | 410)
}

async fn worker(ctx: Arc<Ctx>, tx: mpsc::UnboundedSender<Record>) {
    let mut slot = ConnSlot::new(ctx.endpoint.clone());
    while let Some(job) = ctx.queue.pop().await {
        let rec = execute(&ctx, &mut slot, job).await;
        let _ = tx.send(rec);
    }
}

async fn execute(ctx: &Ctx, slot: &mut ConnSlot, job: Job) -> Record {
    let class = job.op.class;
    let version = job.op.version;
    let session = match job.op.key {
        KeyRef::Session(id) => Some(id),
        _ => None,
    };
    let start = Instant::now();
    let deadline = job.sched + ctx.timeout;
    let mut rec = Record {
        class,
        prefill: job.prefill,
        phase: job.phase,
        sched_us: job.sched_us,
        latency_us: 0,
        lag_us: job.lag_us,
        queue_wait_us: micros(start.saturating_duration_since(job.dispatched)),
        sent: false,
        status: None,
        outcome: Outcome::Error(ErrorKind::Timeout),
        not_found_ok: false,
    };

    let key = ctx.names.key(job.op.key);
    let path = format!("{}{}", ctx.base_uri, encode_key(&key));
    let (method, body) = match class {
        Class::Write => (Method::POST, Bytes::from(ctx.values.value(&key, version))),
        Class::Delete => (Method::DELETE, Bytes::new()),
        Class::ReaderMiss | Class::UserGet => (Method::GET, Bytes::new()),
    };

    let (ticket, result) = if start >= deadline {
        // Its whole budget went waiting for a connection.
        (None, Err(ReqError::Timeout))
    } else {
        slot.request(method, &path, body, deadline, || match (class, session) {
            (Class::Write, Some(id)) => {
                ctx.tracker().write_sent(id, version);
                0
            }
            (Class::Delete, Some(id)) => {
                ctx.tracker().delete_sent(id);
                0
            }
            (Class::UserGet, Some(id)) => ctx.tracker().get_sent(id),
            _ => 0,
        })
        .await
    };
    rec.latency_us = micros(Instant::now().saturating_duration_since(job.sched));
    rec.sent = ticket.is_some();

    let resp = match result {
        Err(ReqError::Timeout) => {
            rec.outcome = Outcome::Error(ErrorKind::Timeout);
            None
        }
        Err(ReqError::Conn(_)) => {
            rec.outcome = Outcome::Error(ErrorKind::ConnError);
            None
        }
        Ok(r) => {
            rec.status = Some(r.status);
            Some(r)
        }
    };
    let status = resp.as_ref().map(|r| r.status);

    // Bookkeeping for this run's sessions, and the class's verdict.
    let verdict = match (class, session) {
        (Class::Write, Some(id)) => {
            if rec.sent {
                ctx.tracker().write_done(id, version, status == Some(201));
            } else {
                ctx.tracker().abandoned(id, false);
            }
            None
        }
        (Class::Delete, Some(id)) => {
            ctx.tracker()
                .delete_done(id, status.is_some_and(is_delete_success));
            None
        }
        (Class::UserGet, Some(id)) => {
            let gr = match &resp {
                Some(r) if r.status == 404 => GetResult::NotFound,
                Some(r) if r.status == 200 => GetResult::Found(parse_version(&r.body)),
                _ => GetResult::Other,
            };
            let mut v = ctx.tracker().get_done(id, ticket, gr);
            if v == Verdict::Ok {
                if let (Some(r), GetResult::Found(Some(ver))) = (&resp, gr) {
                    if r.body.as_ref() != ctx.values.value(&key, ver).as_slice() {
                        v = Verdict::WrongBody;
                    }
                }
            }
            Some(v)
        }
        _ => None,
    };

    if let Some(s) = status {
        rec.outcome = classify(class, s, verdict);
        rec.not_found_ok = s == 404 && rec.outcome == Outcome::Ok && class != Class::Delete;
    }
    if rec.latency_us > micros(ctx.timeout) && rec.status.is_some() {
        // Arrived after the deadline (the timer fired late): the client
        // would have given up. The store's answer still counted above for
        // the session bookkeeping, which describes the store, not the client.
        rec.outcome = Outcome::Error(ErrorKind::Timeout);
        rec.status = None;
        rec.not_found_ok = false;
    }
    rec
}

/// Outcome of a response with `status` for `class`.
fn classify(class: Class, status: u16, verdict: Option<Verdict>) -> Outcome {
    if status == 503 {
        return Outcome::Shed;
    }
    match class {
        Class::ReaderMiss => match status {
            404 => Outcome::Ok,
            200 => Outcome::Incorrect(IncorrectKind::Phantom200),
            _ => Outcome::Error(ErrorKind::HttpError),
        },
        Class::UserGet => match (status, verdict) {
            (200 | 404, Some(Verdict::Stale404)) => Outcome::Incorrect(IncorrectKind::Stale404),
            (200 | 404, Some(Verdict::WrongBody)) => Outcome::Incorrect(IncorrectKind::WrongBody),
            (200 | 404, Some(Verdict::Resurrected200)) => {
                Outcome::Incorrect(IncorrectKind::Resurrected200)
            }
            (200 | 404, _) => Outcome::Ok,
            _ => Outcome::Error(ErrorKind::HttpError),
        },
        Class::Write => {
            if status == 201 {
                Outcome::Ok
            } else {
                Outcome::Error(ErrorKind::HttpError)
            }
        }
        Class::Delete => {
            if is_delete_success(status) {
                Outcome::Ok
            } else {
                Outcome::Error(ErrorKind::HttpError)
            }
        }
    }
}

// ---- dispatcher ---------------------------------------------------------

/// Hands requests to the pool at their scheduled times. Runs on its own OS
/// thread: tokio's timer has 1 ms granularity, which would add ~1 ms of
/// dispatch lag (and so of measured latency) to every request; a thread
/// sleeping on the OS clock is typically within ~0.1 ms.
struct Dispatcher {
    ctx: Arc<Ctx>,
    tx: mpsc::UnboundedSender<Record>,
    rt: tokio::runtime::Handle,
    workers: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// What the dispatcher did.
struct Dispatched {
    stopped_by: &'static str,
    t0_unix_ms: u64,
    elapsed_s: f64,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Dispatcher {
    /// New sessions whose login was answered join the live set, or are forgotten
    /// (`Workload::logged_in`, `Tracker::login`).
    fn settle_logins(&self, workload: &mut Workload) {
        let mut tracker = self.ctx.tracker();
        workload.logged_in(|id| tracker.login(id));
    }

    fn dispatch(&mut self, op: Op, prefill: bool, phase: usize, sched: Instant, sched_us: u64) {
        let now = Instant::now();
        let lag_us = micros(now.saturating_duration_since(sched));
        if let KeyRef::Session(id) = op.key {
            self.ctx
                .tracker()
                .dispatched(id, op.class == Class::UserGet);
        }
        self.ctx.dispatched.fetch_add(1, Ordering::Relaxed);
        if !prefill {
            self.ctx
                .interval_max_lag_us
                .fetch_max(lag_us, Ordering::Relaxed);
            if lag_us > self.ctx.late_threshold_us {
                self.ctx.interval_late.fetch_add(1, Ordering::Relaxed);
            }
        }
        let job = Job {
            op,
            prefill,
            phase,
            sched,
            sched_us,
            lag_us,
            dispatched: now,
        };
        if self.ctx.queue.push(job) {
            self.workers
                .push(self.rt.spawn(worker(self.ctx.clone(), self.tx.clone())));
        }
    }

    /// Block until `at`, or until stopped (returns false).
    fn pace(&self, at: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= at {
                return true;
            }
            let wait = at - now;
            if wait < Duration::from_micros(30) {
                std::thread::yield_now();
            } else {
                // Short slices so a stop request is seen promptly.
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
    }

    fn run(
        mut self,
        sc: &Scenario,
        mode: Mode,
        max_requests: Option<u64>,
        quiet: bool,
        t0_tx: watch::Sender<Option<Instant>>,
    ) -> Dispatched {
        let mut rng = Rng::new(hash2(sc.seed, 0x776f_726b));
        let misses = match mode {
            Mode::Scenario => MissSpace::Zipf(Zipf::new(sc.keys.reader_space, sc.keys.zipf_s)),
            Mode::DistinctMisses => MissSpace::Distinct { next: 0 },
        };
        let mut workload = Workload::new(sc.mix, &sc.keys, misses);
        let mut stopped_by = "schedule_end";

        // Prefill: create sessions at a fixed rate before the measured schedule.
        if sc.keys.prefill > 0 {
            if !quiet {
                eprintln!(
                    "prefill: writing {} sessions at {}/s",
                    sc.keys.prefill, sc.keys.prefill_rate
                );
            }
            let p0 = Instant::now();
            for i in 0..sc.keys.prefill {
                let at = p0 + Duration::from_secs_f64(i as f64 / sc.keys.prefill_rate);
                if !self.pace(at) {
                    stopped_by = "interrupted";
                    break;
                }
                let op = workload.new_session_write();
                self.dispatch(op, true, 0, at, 0);
            }
            // Let the prefill's writes land before the measured schedule begins.
            let last = Instant::now();
            while self.ctx.tracker().sessions_acked() < sc.keys.prefill
                && last.elapsed() < sc.timeout
                && !self.stop.load(Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.settle_logins(&mut workload);
        }

        let t0 = Instant::now();
        let t0_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let _ = t0_tx.send(Some(t0));
        let schedule = Schedule::new(&sc.phases, sc.arrival, hash2(sc.seed, 0x7363_6864));
        let total_s = schedule.total_s();
        let mut n: u64 = 0;
        if stopped_by == "schedule_end" {
            for due in schedule {
                if max_requests.is_some_and(|m| n >= m) {
                    stopped_by = "max_requests";
                    break;
                }
                let at = t0 + Duration::from_secs_f64(due.at_s);
                if !self.pace(at) {
                    stopped_by = "interrupted";
                    break;
                }
                if n.is_multiple_of(LOGIN_CHECK_EVERY) {
                    self.settle_logins(&mut workload);
                }
                let op = workload.next(&mut rng);
                self.dispatch(op, false, due.phase, at, (due.at_s * 1e6) as u64);
                n += 1;
            }
            // Run to the planned end even if the last arrival came earlier.
            if stopped_by == "schedule_end" && !self.pace(t0 + Duration::from_secs_f64(total_s)) {
                stopped_by = "interrupted";
            }
        }
        let elapsed_s = if stopped_by == "schedule_end" {
            total_s
        } else {
            t0.elapsed().as_secs_f64()
        };
        self.ctx.queue.close();
        Dispatched {
            stopped_by,
            t0_unix_ms,
            elapsed_s,
            workers: self.workers,
        }
    }
}

/// New sessions join the live set (and get logged-in reads) once their creating
/// write is acknowledged; the dispatcher checks every this many requests (a few ms).
const LOGIN_CHECK_EVERY: u64 = 16;

fn read_nofile_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn read_port_range() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|x| x.parse::<u64>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

fn write_json<T: serde::Serialize>(dir: &Path, name: &str, v: &T) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    std::fs::write(&tmp, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<(Summary, Timeseries)> {
    let sc = &cfg.scenario;
    std::fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", cfg.out_dir.display()))?;
    if let Some((lo, hi)) = read_port_range() {
        if sc.connections as u64 > (hi.saturating_sub(lo) + 1) * 3 / 4 {
            eprintln!(
                "warning: connections = {} is close to the {} local ports in net.ipv4.ip_local_port_range ({lo}-{hi}); connect() will slow down or fail",
                sc.connections,
                hi.saturating_sub(lo) + 1
            );
        }
    }
    if let Some(limit) = read_nofile_limit() {
        if (sc.connections as u64) + 64 > limit {
            eprintln!(
                "warning: connections = {} but the open-file limit is {limit}; raise it (ulimit -n) or expect conn_error",
                sc.connections
            );
        }
    }

    let host = HeaderValue::from_str(&cfg.target.host_header)
        .map_err(|_| anyhow::anyhow!("--target: host is not a valid Host header"))?;
    let opened = Arc::new(AtomicU64::new(0));
    let ctx = Arc::new(Ctx {
        endpoint: Endpoint {
            addr: cfg.target.addr,
            host,
            connect_timeout: sc.connect_timeout,
            opened: opened.clone(),
        },
        base_uri: sc.base_uri.clone(),
        timeout: sc.timeout,
        names: KeyNames::new(sc.keys.wiki_ids.clone(), sc.seed, cfg.run_salt),
        values: Values::new(sc.seed, sc.keys.value_min_bytes, sc.keys.value_max_bytes),
        tracker: Mutex::new(Tracker::new()),
        queue: WorkQueue::new(sc.connections),
        dispatched: AtomicU64::new(0),
        interval_max_lag_us: AtomicU64::new(0),
        interval_late: AtomicU64::new(0),
        late_threshold_us: micros(cfg.late_threshold),
    });

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping the schedule, draining in-flight requests");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }

    let (tx, rx) = mpsc::unbounded_channel::<Record>();
    let wall_start = Instant::now();
    // t0 (start of the main schedule) is known after the prefill; the
    // recorder learns it through this channel.
    let (t0_tx, t0_rx) = watch::channel::<Option<Instant>>(None);
    let recorder = Recorder::new(sc.phases.len(), micros(cfg.late_threshold));
    let rec_task = tokio::spawn(record_loop(
        rx,
        recorder,
        ctx.clone(),
        t0_rx,
        cfg.quiet,
        sc.timeout,
    ));

    let disp = Dispatcher {
        ctx: ctx.clone(),
        tx,
        rt: tokio::runtime::Handle::current(),
        workers: Vec::new(),
        stop,
    };
    let (sc2, mode, max_requests, quiet) = (sc.clone(), cfg.mode, cfg.max_requests, cfg.quiet);
    let d = tokio::task::spawn_blocking(move || disp.run(&sc2, mode, max_requests, quiet, t0_tx))
        .await
        .map_err(|e| anyhow::anyhow!("dispatcher failed: {e}"))?;
    let stopped_by = d.stopped_by;
    let elapsed_s = d.elapsed_s;
    let t0_unix_ms = d.t0_unix_ms;
    let total_s = sc.total_duration_s();
    let starts = Schedule::new(&sc.phases, sc.arrival, 0).phase_starts();

    // Drain: every queued request's deadline is at most `timeout` away.
    let drain_deadline = Instant::now() + sc.timeout + Duration::from_secs(5);
    for w in d.workers {
        let abort = w.abort_handle();
        if tokio::time::timeout_at(drain_deadline, w).await.is_err() {
            abort.abort();
        }
    }
    let recorder = rec_task
        .await
        .map_err(|e| anyhow::anyhow!("recorder failed: {e}"))?;

    let (sessions_written, sessions_deleted) = {
        let t = ctx.tracker();
        (t.sessions_acked(), t.sessions_deleted())
    };
    let info = RunInfo {
        mode: match cfg.mode {
            Mode::Scenario => "scenario".into(),
            Mode::DistinctMisses => "distinct-misses".into(),
        },
        scenario: sc.name.clone(),
        target: cfg.target.url.clone(),
        base_uri: sc.base_uri.clone(),
        seed: sc.seed,
        arrival: sc.arrival.name(),
        rate_scale: cfg.rate_scale,
        duration_scale: cfg.duration_scale,
        timeout_ms: u64::try_from(sc.timeout.as_millis()).unwrap_or(u64::MAX),
        max_requests: cfg.max_requests,
        stopped_by: stopped_by.to_string(),
        planned_duration_s: total_s,
        elapsed_s,
        wall_s: wall_start.elapsed().as_secs_f64(),
        phases: sc
            .phases
            .iter()
            .zip(starts)
            .map(|(p, s)| (p.name.clone(), s, p.duration_s, p.rate_from, p.rate_to))
            .collect(),
        peak_queue: ctx.queue.peak_len(),
        max_connections: sc.connections,
        peak_connections: ctx.queue.workers(),
        connections_opened: opened.load(Ordering::Relaxed),
        prefill_requested: sc.keys.prefill,
        sessions_written,
        sessions_deleted,
        t0_unix_ms,
    };
    let (summary, ts) = recorder.into_documents(info);
    write_json(&cfg.out_dir, "summary.json", &summary)?;
    write_json(&cfg.out_dir, "timeseries.json", &ts)?;
    Ok((summary, ts))
}

async fn record_loop(
    mut rx: mpsc::UnboundedReceiver<Record>,
    mut rec: Recorder,
    ctx: Arc<Ctx>,
    t0_rx: watch::Receiver<Option<Instant>>,
    quiet: bool,
    timeout: Duration,
) -> Recorder {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut buf = Vec::with_capacity(512);
    let mut done_total: u64 = 0;
    let mut last_dispatched: u64 = 0;
    let mut last_tick = Instant::now();
    // A second is final once all its requests must have finished.
    let settle_s = timeout.as_secs() + 3;
    loop {
        tokio::select! {
            got = rx.recv_many(&mut buf, 512) => {
                if got == 0 {
                    break;
                }
                for r in buf.drain(..) {
                    rec.add(&r);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let dt = now.duration_since(last_tick).as_secs_f64().max(1e-3);
                last_tick = now;
                let iv = rec.take_interval();
                done_total += iv.done;
                let dispatched = ctx.dispatched.load(Ordering::Relaxed);
                let rate = (dispatched - last_dispatched) as f64 / dt;
                let last_dispatched_before = last_dispatched;
                last_dispatched = dispatched;
                let lag = ctx.interval_max_lag_us.swap(0, Ordering::Relaxed);
                let late = ctx.interval_late.swap(0, Ordering::Relaxed);
                let t0 = *t0_rx.borrow();
                let t = t0.map(|t0| now.saturating_duration_since(t0).as_secs());
                if let Some(t) = t {
                    rec.finalize_before(t.saturating_sub(settle_s) as usize);
                }
                if !quiet {
                    let when = t.map_or("prefill".to_string(), |t| format!("{t}s"));
                    eprintln!(
                        "t={when} rate={rate:.0}/s ok={} shed={} err={} incorrect={} inflight={} queue={} conns={} lag={:.1}ms",
                        iv.ok,
                        iv.shed,
                        iv.err,
                        iv.incorrect,
                        dispatched.saturating_sub(done_total.min(dispatched)),
                        ctx.queue.len(),
                        ctx.queue.workers(),
                        us_to_ms(lag),
                    );
                }
                let sent_now = dispatched - last_dispatched_before;
                if late > 0 && late * 100 >= sent_now.max(1) {
                    eprintln!(
                        "warning: generator behind schedule: {late} requests dispatched more than {:.0} ms late in the last second (max lag {:.1} ms)",
                        us_to_ms(ctx.late_threshold_us),
                        us_to_ms(lag)
                    );
                }
            }
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        use Class::*;
        assert_eq!(classify(ReaderMiss, 404, None), Outcome::Ok);
        assert_eq!(classify(ReaderMiss, 503, None), Outcome::Shed);
        assert_eq!(
            classify(ReaderMiss, 200, None),
            Outcome::Incorrect(IncorrectKind::Phantom200)
        );
        assert_eq!(
            classify(ReaderMiss, 500, None),
            Outcome::Error(ErrorKind::HttpError)
        );
        assert_eq!(
            classify(UserGet, 404, Some(Verdict::NotFoundOk)),
            Outcome::Ok
        );
        assert_eq!(
            classify(UserGet, 404, Some(Verdict::Stale404)),
            Outcome::Incorrect(IncorrectKind::Stale404)
        );
        assert_eq!(
            classify(UserGet, 200, Some(Verdict::WrongBody)),
            Outcome::Incorrect(IncorrectKind::WrongBody)
        );
        assert_eq!(
            classify(UserGet, 503, Some(Verdict::NotJudged)),
            Outcome::Shed
        );
        assert_eq!(classify(Write, 201, None), Outcome::Ok);
        assert_eq!(
            classify(Write, 200, None),
            Outcome::Error(ErrorKind::HttpError)
        );
        assert_eq!(classify(Delete, 204, None), Outcome::Ok);
        assert_eq!(classify(Delete, 404, None), Outcome::Ok);
        assert_eq!(
            classify(Delete, 400, None),
            Outcome::Error(ErrorKind::HttpError)
        );
    }
}
