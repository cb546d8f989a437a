//! Outcomes of requests, and what is made of them: per-class totals and
//! latency histograms, the per-second time series, the progress line and
//! the summary/timeseries JSON documents.

use crate::histogram::{us_to_ms, Histogram};
use crate::workload::Class;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No complete response before the deadline (scheduled time + timeout).
    Timeout,
    /// Connect failure, reset, or unreadable response.
    ConnError,
    /// A status the class does not expect (e.g. 500, 502, 504, 400).
    HttpError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncorrectKind {
    /// 404 for a session whose write was acknowledged before the GET was sent.
    Stale404,
    /// 200 whose body is not a value this run could have left there.
    WrongBody,
    /// 200 for a key that was never written (reader miss).
    Phantom200,
    /// 200 for a session whose DELETE was acknowledged before the GET was sent.
    Resurrected200,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Shed,
    Error(ErrorKind),
    Incorrect(IncorrectKind),
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub class: Class,
    /// Part of the prefill (not counted in classes or time series).
    pub prefill: bool,
    pub phase: usize,
    /// Scheduled time, µs since the start of the main schedule.
    pub sched_us: u64,
    /// From scheduled time to the end of the response (or failure).
    pub latency_us: u64,
    /// How late the generator handed it to the pool.
    pub lag_us: u64,
    /// Time spent waiting for a free connection.
    pub queue_wait_us: u64,
    /// Whether it reached a connection at all.
    pub sent: bool,
    pub status: Option<u16>,
    pub outcome: Outcome,
    /// A user_get 404 that was correct (session not yet acknowledged).
    pub not_found_ok: bool,
}

// ---- aggregation --------------------------------------------------------

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ErrorCounts {
    pub timeout: u64,
    pub conn_error: u64,
    pub http_error: u64,
    pub total: u64,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct IncorrectCounts {
    pub stale_404: u64,
    pub wrong_body: u64,
    pub phantom_200: u64,
    pub resurrected_200: u64,
    pub total: u64,
}

impl IncorrectCounts {
    fn add(&mut self, o: &IncorrectCounts) {
        self.stale_404 += o.stale_404;
        self.wrong_body += o.wrong_body;
        self.phantom_200 += o.phantom_200;
        self.resurrected_200 += o.resurrected_200;
        self.total += o.total;
    }
}

#[derive(Debug, Default)]
struct ClassAgg {
    sent: u64,
    ok: u64,
    shed: u64,
    not_found_ok: u64,
    errors: ErrorCounts,
    incorrect: IncorrectCounts,
    ok_latency: Histogram,
    shed_latency: Histogram,
    status: BTreeMap<u16, u64>,
}

impl ClassAgg {
    fn add(&mut self, r: &Record) {
        self.sent += 1;
        if let Some(s) = r.status {
            *self.status.entry(s).or_default() += 1;
        }
        match r.outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.ok_latency.record(r.latency_us);
                if r.not_found_ok {
                    self.not_found_ok += 1;
                }
            }
            Outcome::Shed => {
                self.shed += 1;
                self.shed_latency.record(r.latency_us);
            }
            Outcome::Error(k) => {
                self.errors.total += 1;
                match k {
                    ErrorKind::Timeout => self.errors.timeout += 1,
                    ErrorKind::ConnError => self.errors.conn_error += 1,
                    ErrorKind::HttpError => self.errors.http_error += 1,
                }
            }
            Outcome::Incorrect(k) => {
                self.incorrect.total += 1;
                match k {
                    IncorrectKind::Stale404 => self.incorrect.stale_404 += 1,
                    IncorrectKind::WrongBody => self.incorrect.wrong_body += 1,
                    IncorrectKind::Phantom200 => self.incorrect.phantom_200 += 1,
                    IncorrectKind::Resurrected200 => self.incorrect.resurrected_200 += 1,
                }
            }
        }
    }

    fn merge(&mut self, o: &ClassAgg) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.shed += o.shed;
        self.not_found_ok += o.not_found_ok;
        self.errors.timeout += o.errors.timeout;
        self.errors.conn_error += o.errors.conn_error;
        self.errors.http_error += o.errors.http_error;
        self.errors.total += o.errors.total;
        self.incorrect.add(&o.incorrect);
        self.ok_latency.merge(&o.ok_latency);
        self.shed_latency.merge(&o.shed_latency);
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct SecondClass {
    pub sent: u64,
    pub ok: u64,
    pub shed: u64,
    pub error: u64,
    pub incorrect: u64,
    pub p99_ms: Option<f64>,
}

struct SecondAgg {
    classes: [SecondClass; 4],
    max_lag_us: u64,
    /// Live until the second is finalized (then only the p99s remain).
    hists: Option<Box<[Histogram; 5]>>,
    p99_all_ms: Option<f64>,
}

impl SecondAgg {
    fn new() -> Self {
        SecondAgg {
            classes: [SecondClass::default(); 4],
            max_lag_us: 0,
            hists: None,
            p99_all_ms: None,
        }
    }

    fn finalize(&mut self) {
        if let Some(h) = self.hists.take() {
            for (i, c) in self.classes.iter_mut().enumerate() {
                c.p99_ms = h[i].percentile(99.0).map(us_to_ms);
            }
            self.p99_all_ms = h[4].percentile(99.0).map(us_to_ms);
        }
    }
}

/// Counts since the last progress line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Interval {
    pub done: u64,
    pub ok: u64,
    pub shed: u64,
    pub err: u64,
    pub incorrect: u64,
}

/// Collects records. Memory is fixed per class plus one small entry per
/// second of schedule; per-second histograms exist only for the last few
/// seconds (until every request of that second must have finished).
pub struct Recorder {
    classes: [ClassAgg; 4],
    prefill: ClassAgg,
    lag: Histogram,
    late: u64,
    late_threshold_us: u64,
    queue_wait: Histogram,
    queued: u64,
    queue_timeouts: u64,
    seconds: Vec<SecondAgg>,
    finalized_upto: usize,
    phase_sent: Vec<u64>,
    interval: Interval,
}

impl Recorder {
    pub fn new(phases: usize, late_threshold_us: u64) -> Self {
        Recorder {
            classes: Default::default(),
            prefill: ClassAgg::default(),
            lag: Histogram::new(),
            late: 0,
            late_threshold_us,
            queue_wait: Histogram::new(),
            queued: 0,
            queue_timeouts: 0,
            seconds: Vec::new(),
            finalized_upto: 0,
            phase_sent: vec![0; phases],
            interval: Interval::default(),
        }
    }

    pub fn add(&mut self, r: &Record) {
        let iv = &mut self.interval;
        iv.done += 1;
        match r.outcome {
            Outcome::Ok => iv.ok += 1,
            Outcome::Shed => iv.shed += 1,
            Outcome::Error(_) => iv.err += 1,
            Outcome::Incorrect(_) => iv.incorrect += 1,
        }
        if r.prefill {
            self.prefill.add(r);
            return;
        }
        self.classes[r.class.index()].add(r);
        if let Some(p) = self.phase_sent.get_mut(r.phase) {
            *p += 1;
        }
        self.lag.record(r.lag_us);
        if r.lag_us > self.late_threshold_us {
            self.late += 1;
        }
        if r.sent {
            self.queue_wait.record(r.queue_wait_us);
        } else if r.outcome == Outcome::Error(ErrorKind::Timeout) {
            self.queue_timeouts += 1;
        }
        if r.queue_wait_us > 1000 {
            self.queued += 1;
        }
        let sec = (r.sched_us / 1_000_000) as usize;
        if sec >= self.seconds.len() {
            // Bounded by the scenario's duration (validated <= 7 days).
            self.seconds.resize_with(sec + 1, SecondAgg::new);
        }
        let live = sec >= self.finalized_upto;
        let s = &mut self.seconds[sec];
        s.max_lag_us = s.max_lag_us.max(r.lag_us);
        let c = &mut s.classes[r.class.index()];
        c.sent += 1;
        match r.outcome {
            Outcome::Ok => {
                c.ok += 1;
                if live {
                    let h = s
                        .hists
                        .get_or_insert_with(|| Box::new(std::array::from_fn(|_| Histogram::new())));
                    h[r.class.index()].record(r.latency_us);
                    h[4].record(r.latency_us);
                }
            }
            Outcome::Shed => c.shed += 1,
            Outcome::Error(_) => c.error += 1,
            Outcome::Incorrect(_) => c.incorrect += 1,
        }
    }

    /// Finalize every second before `upto_sec` (its requests are all done).
    pub fn finalize_before(&mut self, upto_sec: usize) {
        let end = upto_sec.min(self.seconds.len());
        while self.finalized_upto < end {
            self.seconds[self.finalized_upto].finalize();
            self.finalized_upto += 1;
        }
    }

    pub fn take_interval(&mut self) -> Interval {
        std::mem::take(&mut self.interval)
    }

    #[cfg(test)]
    pub fn late(&self) -> u64 {
        self.late
    }
}

// ---- documents ----------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct LatencyMs {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl LatencyMs {
    fn of(h: &Histogram) -> Self {
        LatencyMs {
            count: h.count(),
            p50: h.percentile(50.0).map(us_to_ms),
            p90: h.percentile(90.0).map(us_to_ms),
            p99: h.percentile(99.0).map(us_to_ms),
            max: h.max().map(us_to_ms),
            mean: h.mean().map(|m| round3(m / 1000.0)),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ClassSummary {
    pub sent: u64,
    pub ok: u64,
    pub shed_503: u64,
    pub errors: ErrorCounts,
    pub incorrect: IncorrectCounts,
    /// Of `ok`: correct 404s (reader misses, or sessions not yet acknowledged).
    pub not_found_ok: u64,
    /// Latency of successful (`ok`) requests, from their scheduled time.
    pub latency_ms: LatencyMs,
    /// Latency of 503 responses (how fast the shed was).
    pub shed_latency_ms: LatencyMs,
    /// sent / elapsed_s
    pub achieved_rate: f64,
    /// ok / elapsed_s
    pub ok_rate: f64,
    pub status_counts: BTreeMap<String, u64>,
}

fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

fn status_map(m: &BTreeMap<u16, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

impl ClassSummary {
    fn of(a: &ClassAgg, elapsed_s: f64) -> Self {
        let per_s = |n: u64| {
            if elapsed_s > 0.0 {
                round3(n as f64 / elapsed_s)
            } else {
                0.0
            }
        };
        ClassSummary {
            sent: a.sent,
            ok: a.ok,
            shed_503: a.shed,
            errors: a.errors,
            incorrect: a.incorrect,
            not_found_ok: a.not_found_ok,
            latency_ms: LatencyMs::of(&a.ok_latency),
            shed_latency_ms: LatencyMs::of(&a.shed_latency),
            achieved_rate: per_s(a.sent),
            ok_rate: per_s(a.ok),
            status_counts: status_map(&a.status),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PhaseSummary {
    pub name: String,
    pub start_s: f64,
    pub duration_s: f64,
    pub rate_from: f64,
    pub rate_to: f64,
    /// Expected number of requests at the planned rate.
    pub planned: f64,
    pub sent: u64,
}

#[derive(Debug, Serialize)]
pub struct ScheduleSummary {
    pub late_threshold_ms: f64,
    /// Requests handed to the pool more than `late_threshold_ms` after their
    /// scheduled time (the generator itself fell behind).
    pub late: u64,
    /// True if at least 1% of requests were late, or the p99 lag exceeds the
    /// threshold: the offered load was then measurably lower than planned.
    pub behind_schedule: bool,
    pub max_lag_ms: f64,
    pub p50_lag_ms: Option<f64>,
    pub p99_lag_ms: Option<f64>,
    pub mean_lag_ms: Option<f64>,
    /// Requests that waited > 1 ms for a free connection.
    pub queued: u64,
    pub p99_queue_wait_ms: Option<f64>,
    pub max_queue_wait_ms: Option<f64>,
    /// Requests whose deadline passed before a connection was free.
    pub queue_timeouts: u64,
    pub peak_queue: usize,
    pub max_connections: usize,
    pub peak_connections: usize,
    pub connections_opened: u64,
}

#[derive(Debug, Serialize)]
pub struct PrefillSummary {
    pub requested: u64,
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct CorrectnessSummary {
    pub incorrect: u64,
    pub stale_404: u64,
    pub wrong_body: u64,
    pub phantom_200: u64,
    pub resurrected_200: u64,
    /// Sessions with at least one acknowledged (201) write.
    pub sessions_written: u64,
    /// Sessions whose DELETE was acknowledged.
    pub sessions_deleted: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub tool: &'static str,
    pub version: &'static str,
    pub mode: String,
    pub scenario: String,
    pub target: String,
    pub base_uri: String,
    pub seed: u64,
    pub arrival: &'static str,
    pub rate_scale: f64,
    pub duration_scale: f64,
    pub timeout_ms: u64,
    pub max_requests: Option<u64>,
    pub stopped_by: String,
    pub planned_duration_s: f64,
    /// Time the schedule ran (start of the first phase to the end of the
    /// last phase, or to the stop); rates are per this.
    pub elapsed_s: f64,
    /// Whole run including prefill and draining in-flight requests.
    pub wall_s: f64,
    pub phases: Vec<PhaseSummary>,
    pub overall: ClassSummary,
    pub classes: BTreeMap<&'static str, ClassSummary>,
    pub status_counts: BTreeMap<String, u64>,
    pub schedule: ScheduleSummary,
    pub correctness: CorrectnessSummary,
    pub prefill: PrefillSummary,
}

#[derive(Debug, Serialize)]
pub struct SecondOut {
    pub t: u64,
    pub phase: String,
    pub sent: u64,
    pub ok: u64,
    pub shed: u64,
    pub error: u64,
    pub incorrect: u64,
    /// p99 latency of successful requests scheduled in this second.
    pub p99_ms: Option<f64>,
    pub max_lag_ms: f64,
    pub classes: BTreeMap<&'static str, SecondClass>,
}

#[derive(Debug, Serialize)]
pub struct Timeseries {
    pub interval_s: u64,
    /// Wall-clock time of t = 0 (start of the first phase), ms since the epoch.
    pub t0_unix_ms: u64,
    pub seconds: Vec<SecondOut>,
}

/// Facts about the run that the recorder does not see in records.
pub struct RunInfo {
    pub mode: String,
    pub scenario: String,
    pub target: String,
    pub base_uri: String,
    pub seed: u64,
    pub arrival: &'static str,
    pub rate_scale: f64,
    pub duration_scale: f64,
    pub timeout_ms: u64,
    pub max_requests: Option<u64>,
    pub stopped_by: String,
    pub planned_duration_s: f64,
    pub elapsed_s: f64,
    pub wall_s: f64,
    pub phases: Vec<(String, f64, f64, f64, f64)>,
    pub peak_queue: usize,
    pub max_connections: usize,
    pub peak_connections: usize,
    pub connections_opened: u64,
    pub prefill_requested: u64,
    pub sessions_written: u64,
    pub sessions_deleted: u64,
    pub t0_unix_ms: u64,
}

impl Recorder {
    pub fn into_documents(mut self, info: RunInfo) -> (Summary, Timeseries) {
        self.finalize_before(usize::MAX);
        let elapsed = info.elapsed_s;
        let mut overall = ClassAgg::default();
        for c in &self.classes {
            overall.merge(c);
        }
        let classes: BTreeMap<&'static str, ClassSummary> = Class::ALL
            .iter()
            .map(|c| {
                (
                    c.name(),
                    ClassSummary::of(&self.classes[c.index()], elapsed),
                )
            })
            .collect();
        let inc = overall.incorrect;
        let phases: Vec<PhaseSummary> = info
            .phases
            .iter()
            .enumerate()
            .map(|(i, (name, start, dur, r0, r1))| PhaseSummary {
                name: name.clone(),
                start_s: round3(*start),
                duration_s: round3(*dur),
                rate_from: *r0,
                rate_to: *r1,
                planned: round3((r0 + r1) / 2.0 * dur),
                sent: self.phase_sent.get(i).copied().unwrap_or(0),
            })
            .collect();
        let phase_of = |t: f64| -> String {
            phases
                .iter()
                .rev()
                .find(|p| t >= p.start_s)
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        let seconds: Vec<SecondOut> = self
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let sum = |f: fn(&SecondClass) -> u64| s.classes.iter().map(f).sum::<u64>();
                SecondOut {
                    t: t as u64,
                    phase: phase_of(t as f64),
                    sent: sum(|c| c.sent),
                    ok: sum(|c| c.ok),
                    shed: sum(|c| c.shed),
                    error: sum(|c| c.error),
                    incorrect: sum(|c| c.incorrect),
                    p99_ms: s.p99_all_ms,
                    max_lag_ms: us_to_ms(s.max_lag_us),
                    classes: Class::ALL
                        .iter()
                        .map(|c| (c.name(), s.classes[c.index()]))
                        .collect(),
                }
            })
            .collect();
        let summary = Summary {
            tool: "sessionload",
            version: env!("CARGO_PKG_VERSION"),
            mode: info.mode,
            scenario: info.scenario,
            target: info.target,
            base_uri: info.base_uri,
            seed: info.seed,
            arrival: info.arrival,
            rate_scale: info.rate_scale,
            duration_scale: info.duration_scale,
            timeout_ms: info.timeout_ms,
            max_requests: info.max_requests,
            stopped_by: info.stopped_by,
            planned_duration_s: round3(info.planned_duration_s),
            elapsed_s: round3(elapsed),
            wall_s: round3(info.wall_s),
            phases,
            status_counts: status_map(&overall.status),
            overall: ClassSummary::of(&overall, elapsed),
            classes,
            schedule: ScheduleSummary {
                late_threshold_ms: us_to_ms(self.late_threshold_us),
                late: self.late,
                // Sustained, not a single hiccup: >= 1% late, or a p99 lag
                // beyond the threshold.
                behind_schedule: self.late * 100 >= self.lag.count().max(1)
                    || self.lag.percentile(99.0).unwrap_or(0) > self.late_threshold_us,
                max_lag_ms: us_to_ms(self.lag.max().unwrap_or(0)),
                p50_lag_ms: self.lag.percentile(50.0).map(us_to_ms),
                p99_lag_ms: self.lag.percentile(99.0).map(us_to_ms),
                mean_lag_ms: self.lag.mean().map(|m| round3(m / 1000.0)),
                queued: self.queued,
                p99_queue_wait_ms: self.queue_wait.percentile(99.0).map(us_to_ms),
                max_queue_wait_ms: self.queue_wait.max().map(us_to_ms),
                queue_timeouts: self.queue_timeouts,
                peak_queue: info.peak_queue,
                max_connections: info.max_connections,
                peak_connections: info.peak_connections,
                connections_opened: info.connections_opened,
            },
            correctness: CorrectnessSummary {
                incorrect: inc.total,
                stale_404: inc.stale_404,
                wrong_body: inc.wrong_body,
                phantom_200: inc.phantom_200,
                resurrected_200: inc.resurrected_200,
                sessions_written: info.sessions_written,
                sessions_deleted: info.sessions_deleted,
            },
            prefill: PrefillSummary {
                requested: info.prefill_requested,
                ok: self.prefill.ok,
                failed: self.prefill.sent - self.prefill.ok,
            },
        };
        let ts = Timeseries {
            interval_s: 1,
            t0_unix_ms: info.t0_unix_ms,
            seconds,
        };
        (summary, ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        class: Class,
        sched_ms: u64,
        lat_ms: u64,
        outcome: Outcome,
        status: Option<u16>,
    ) -> Record {
        Record {
            class,
            prefill: false,
            phase: 0,
            sched_us: sched_ms * 1000,
            latency_us: lat_ms * 1000,
            lag_us: 100,
            queue_wait_us: 0,
            sent: true,
            status,
            outcome,
            not_found_ok: false,
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            mode: "scenario".into(),
            scenario: "t".into(),
            target: "http://127.0.0.1:1".into(),
            base_uri: "/sessions/v1/".into(),
            seed: 1,
            arrival: "poisson",
            rate_scale: 1.0,
            duration_scale: 1.0,
            timeout_ms: 3000,
            max_requests: None,
            stopped_by: "schedule_end".into(),
            planned_duration_s: 2.0,
            elapsed_s: 2.0,
            wall_s: 2.5,
            phases: vec![("p".into(), 0.0, 2.0, 10.0, 10.0)],
            peak_queue: 0,
            max_connections: 4,
            peak_connections: 1,
            connections_opened: 1,
            prefill_requested: 0,
            sessions_written: 0,
            sessions_deleted: 0,
            t0_unix_ms: 0,
        }
    }

    #[test]
    fn aggregates_per_class_and_second() {
        let mut r = Recorder::new(1, 5000);
        for i in 0..100 {
            r.add(&rec(
                Class::ReaderMiss,
                i * 10,
                i + 1,
                Outcome::Ok,
                Some(404),
            ));
        }
        r.add(&rec(Class::ReaderMiss, 1500, 2, Outcome::Shed, Some(503)));
        r.add(&rec(
            Class::Write,
            1500,
            3000,
            Outcome::Error(ErrorKind::Timeout),
            None,
        ));
        r.add(&rec(
            Class::UserGet,
            1600,
            5,
            Outcome::Incorrect(IncorrectKind::Stale404),
            Some(404),
        ));
        let (s, ts) = r.into_documents(info());
        let rm = &s.classes["reader_miss"];
        assert_eq!(rm.sent, 101);
        assert_eq!(rm.ok, 100);
        assert_eq!(rm.shed_503, 1);
        let approx = |v: Option<f64>, want: f64| {
            let v = v.unwrap();
            assert!((v - want).abs() / want < 0.02, "{v} vs {want}");
        };
        approx(rm.latency_ms.p50, 50.0);
        assert_eq!(rm.latency_ms.max, Some(100.0));
        assert_eq!(rm.status_counts["404"], 100);
        assert_eq!(s.classes["write"].errors.timeout, 1);
        assert_eq!(s.overall.incorrect.stale_404, 1);
        assert_eq!(s.correctness.incorrect, 1);
        assert_eq!(s.overall.sent, 103);
        assert_eq!(s.overall.achieved_rate, 51.5);
        assert_eq!(s.phases[0].sent, 103);
        assert_eq!(ts.seconds.len(), 2);
        assert_eq!(ts.seconds[0].sent, 100);
        assert_eq!(ts.seconds[1].sent, 3);
        assert_eq!(ts.seconds[1].shed, 1);
        assert_eq!(ts.seconds[1].error, 1);
        assert_eq!(ts.seconds[1].incorrect, 1);
        assert_eq!(ts.seconds[1].classes["user_get"].incorrect, 1);
        approx(ts.seconds[0].p99_ms, 99.0);
        assert!(ts.seconds[1].p99_ms.is_none());
        assert!(!s.schedule.behind_schedule);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["classes"]["delete"]["latency_ms"]["p50"].is_null());
    }

    #[test]
    fn late_dispatch_is_counted() {
        let mut r = Recorder::new(1, 5000);
        let mut x = rec(Class::ReaderMiss, 0, 1, Outcome::Ok, Some(404));
        x.lag_us = 12_000;
        r.add(&x);
        assert_eq!(r.late(), 1);
        let (s, _) = r.into_documents(info());
        assert!(s.schedule.behind_schedule);
        assert_eq!(s.schedule.max_lag_ms, 12.0);
    }

    #[test]
    fn a_single_hiccup_is_counted_but_not_behind() {
        let mut r = Recorder::new(1, 5000);
        for i in 0..1000 {
            let mut x = rec(Class::ReaderMiss, i, 1, Outcome::Ok, Some(404));
            x.lag_us = if i == 10 { 9000 } else { 100 };
            r.add(&x);
        }
        let (s, _) = r.into_documents(info());
        assert_eq!(s.schedule.late, 1);
        assert_eq!(s.schedule.max_lag_ms, 9.0);
        assert!(!s.schedule.behind_schedule);
    }

    #[test]
    fn finalized_seconds_drop_histograms_but_keep_counts() {
        let mut r = Recorder::new(1, 5000);
        r.add(&rec(Class::ReaderMiss, 0, 7, Outcome::Ok, Some(404)));
        r.finalize_before(1);
        assert!(r.seconds[0].hists.is_none());
        r.add(&rec(Class::ReaderMiss, 10, 900, Outcome::Ok, Some(404))); // straggler
        let (_, ts) = r.into_documents(info());
        assert_eq!(ts.seconds[0].ok, 2);
        let p = ts.seconds[0].p99_ms.unwrap();
        assert!((p - 7.0).abs() < 0.15, "{p}");
    }
}
