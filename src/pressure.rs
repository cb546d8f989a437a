//! Backend memory pressure: from the store's own memory to a shed probability.
//!
//! # What is measured, and why not resident memory alone
//!
//! The store is a Go service. Under a surge each in-flight request costs it about
//! 35 KB (heap objects plus a goroutine stack), so its memory follows the number of
//! requests it holds, and it is OOM-killed when that number gets too high. When the
//! surge ends the goroutines exit and the heap objects die at once, so
//! `go_memstats_heap_inuse_bytes + go_memstats_stack_inuse_bytes` falls within a GC
//! cycle. `process_resident_memory_bytes` does not: the Go runtime keeps the freed
//! spans mapped and returns them to the kernel lazily (the background scavenger, and
//! a forced GC only every two minutes), so resident memory stays near its peak for
//! minutes. A shedder driven by RSS alone therefore keeps rejecting traffic for
//! minutes after the danger has passed, on a pod whose memory is free for the
//! taking: Go reuses those retained pages before it asks the kernel for more.
//!
//! So each poll reads two signals:
//! - the **demand** — resident memory minus what the runtime holds resident but free:
//!   `RSS − (go_memstats_heap_idle_bytes − go_memstats_heap_released_bytes)`
//!   ([`MemoryConfig::retained_gauges`]). While a surge builds, nothing is retained and
//!   free, so demand equals RSS and the thresholds mean what an operator expects: a
//!   share of the pod limit as the kernel counts it. When the surge ends, the freed
//!   spans become idle-but-not-released and demand falls at once, while RSS stays up.
//!   Heap and stack *in use* (the fallback, [`MemoryConfig::demand_gauges`]) would also
//!   fall at once, but they see only part of what each request costs resident
//!   (allocator and runtime overhead, buffers), so thresholds on them act too late:
//!   measured in `docs/memory.md`, a surge outran shedding set on in-use memory.
//!   It decides between `soft` and `hard`, and beyond.
//! - the **ceiling** — [`MemoryConfig::gauge`] (default resident memory): what the
//!   kernel charges to the pod's cgroup. It only acts at `critical`: once it reaches
//!   `critical` while demand is itself above `soft`, the ratio used is
//!   `max(demand, ceiling)`. This catches memory the demand does not see when the pod
//!   is truly about to be killed, and cannot keep shedding on retained memory once
//!   demand has fallen after a surge.
//!
//! Without the retained gauges (an empty `retained_gauges`, or a body without them),
//! the sum of `demand_gauges` is the demand; if those are not all in a complete body
//! either (not a Go service), the ceiling decides alone (the snapshot says so). Empty
//! `retained_gauges` and `demand_gauges` select that mode explicitly.
//!
//! # The curve
//!
//! The in-flight ceiling ([`crate::ceiling`]) is the memory guard: it keeps the
//! store's demand under `critical` x `memory_limit_bytes` by refusing requests
//! (critical ones too, inside the limiter's reserve for them) once the requests in
//! flight would fill the headroom. The curve steers sheddable traffic on the memory
//! itself, for what the ceiling does not explain. With `r` the ratio of the worst
//! fresh endpoint to `memory_limit_bytes`:
//! - `r <= soft`: nothing is shed;
//! - `soft < r < hard`: sheddable traffic is shed with probability `x²`, where
//!   `x = (r − soft)/(hard − soft)`: gentle at first (a quarter at mid-band), so a
//!   small excess costs little traffic, and all of it at `hard`;
//! - `r >= hard`: all sheddable traffic is shed. Critical traffic is never shed by
//!   the curve: the ceiling decides for it (at least a few requests at a time,
//!   so the store always makes progress).
//!
//! Severity (for `Retry-After`) is `(r − soft)/(critical − soft)`, clamped to [0, 1].
//!
//! # Smoothing
//!
//! A rising sample is taken as is, so pressure is acted on within one poll. A
//! falling one is blended, `s·previous + (1 − s)·sample` with `s` = 0.5
//! ([`FALL_SMOOTHING`]): one lucky poll does not switch shedding off, yet after a surge
//! the ratio halves its distance to the real value every poll, so shedding stops
//! within one or two polls (from a ratio of 0.9 to a demand of 0.3: 0.6 at the
//! first poll, below `soft`).
//!
//! # Staleness and failures
//!
//! Each endpoint has a state ([`EndpointStatus`]); only `Fresh` and `Failing` ones
//! drive shedding, and never on a sample older than `max_sample_age_ms`:
//! - a good sample makes the endpoint `Fresh`;
//! - a failed poll (timeout, call failure, non-200, unreadable body) makes it
//!   `Failing` while its last good sample is still younger than `max_sample_age_ms`,
//!   then `Failed`. Holding the last sample a few seconds is deliberate: a store too
//!   overloaded to answer its `/metrics` in time is the one that most needs
//!   protection;
//! - a sample that grows old without any newer result (the poller stopped) makes it
//!   `Stale`.
//!
//! [`PressureTracker::take_transitions`] reports each change of state once, for the
//! log; [`PressureStats`] and [`EndpointStats`] carry the counters.
//!
//! # Sharing across workers
//!
//! One elected worker polls and feeds a [`PressureTracker`]; on every tick it
//! publishes [`PressureTracker::snapshot`] under [`SNAPSHOT_KEY`] ([`publish`]). Every
//! worker reads it back on its tick ([`load`]), keeps the [`PressureSnapshot`], and
//! calls [`PressureSnapshot::decide`] per request: pure arithmetic, no hostcall. The
//! snapshot also carries the in-flight ceiling ([`PressureSnapshot::max_in_flight`]:
//! the tightest endpoint's, see [`crate::ceiling`]), which every worker hands to its
//! limiter; the limiter checks it on every request against the exact global count.
//! A snapshot older than `max_sample_age_ms` (the poller died) is ignored; the worker
//! then keeps the last ceiling it saw. The layout is fixed ([`SNAPSHOT_LEN`] bytes,
//! checksummed); see [`PressureSnapshot::encode`].
//!
//! # Polling
//!
//! The poller records the filter's global in-flight count with each sample (for the
//! ceiling) and asks [`PressureTracker::next_poll_in_ms`] when to poll next: fast while
//! memory is high, rising or the ceiling half full, ten times slower when idle.

use std::fmt;

use serde::Deserialize;

use crate::ceiling::{
    self, Estimator, MAX_BYTES_PER_REQUEST, MAX_CEILING, MIN_BYTES_PER_REQUEST, MIN_CEILING,
};
use crate::classify::Criticality;
use crate::config::{check_range, check_unit, field, ConfigError};
use crate::prom::{find_many, PromError, Selector};
use crate::shared::{update, SharedStore, UpdateError};
use crate::wire::f64_to_u32;

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// Most metrics endpoints one filter polls.
pub const MAX_ENDPOINTS: usize = 256;
/// Most demand gauges summed.
pub const MAX_DEMAND_GAUGES: usize = 8;
/// Weight of the previous ratio when a sample is lower (module docs, "Smoothing").
pub const FALL_SMOOTHING: f64 = 0.5;
/// The store's start time, read when present: a change is a restart (the per-request
/// estimate then starts a new window, see [`crate::ceiling`]).
pub const START_TIME_GAUGE: &str = "process_start_time_seconds";
/// Idle polls are this many times slower than `poll_interval_ms`...
const IDLE_POLL_FACTOR: u64 = 10;
/// ...but at most this far apart.
const IDLE_POLL_MAX_MS: u64 = 1000;
/// A demand that grew by more than this share of the limit since the previous sample
/// is rising: poll fast.
const RISING_SHARE: f64 = 0.01;
/// A limit below this is surely a unit mistake (MiB written for bytes).
const MIN_MEMORY_LIMIT_BYTES: u64 = 1 << 20;

/// One metrics endpoint to poll (one per store pod).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsEndpoint {
    /// Envoy cluster name that reaches the pod.
    pub cluster: String,
    pub path: String,
    pub authority: String,
}

impl Default for MetricsEndpoint {
    fn default() -> Self {
        Self {
            cluster: "sessionstore".to_string(),
            path: "/metrics".to_string(),
            authority: "sessionstore".to_string(),
        }
    }
}

impl MetricsEndpoint {
    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(ConfigError::new(
                field(section, "cluster"),
                "must name the Envoy cluster that reaches the store pod",
            ));
        }
        if !self.path.starts_with('/') {
            return Err(ConfigError::new(
                field(section, "path"),
                format!("must start with `/` (like `/metrics`), got {:?}", self.path),
            ));
        }
        if self.authority.trim().is_empty() {
            return Err(ConfigError::new(
                field(section, "authority"),
                "must not be empty (it is sent as `:authority`)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Off by default: it needs `memory_limit_bytes`, which only the operator knows.
    pub enabled: bool,
    pub enforce: bool,
    /// The pod's memory limit (e.g. 419430400 for 400Mi).
    pub memory_limit_bytes: u64,
    pub endpoints: Vec<MetricsEndpoint>,
    pub poll_interval_ms: u64,
    pub timeout_ms: u64,
    /// A sample older than this stops driving shedding; a published snapshot older
    /// than this is ignored by the other workers.
    pub max_sample_age_ms: u64,
    /// The ceiling: what the kernel charges the pod (resident memory). A selector:
    /// `name` or `name{label="value",…}`. Acts only at `critical` (see the module docs).
    pub gauge: String,
    /// `[held, released]`: memory the runtime holds but does not use is `held −
    /// released`; demand is `gauge` minus that. Empty: use `demand_gauges`.
    pub retained_gauges: Vec<String>,
    /// Summed, the demand when `retained_gauges` are not available. Empty (and no
    /// retained gauges): decide on `gauge` alone (for services not written in Go).
    pub demand_gauges: Vec<String>,
    pub soft: f64,
    pub hard: f64,
    /// The line the in-flight ceiling keeps the store's demand under (a ratio of
    /// the limit); above it critical traffic is refused too: an OOM kill serves no one.
    pub critical: f64,
    /// The store's memory per request in flight, if the operator knows it; `None`:
    /// learned from the polls (see [`crate::ceiling`]).
    pub bytes_per_request: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            enforce: true,
            memory_limit_bytes: 0,
            endpoints: vec![MetricsEndpoint::default()],
            poll_interval_ms: 100,
            timeout_ms: 500,
            max_sample_age_ms: 5000,
            gauge: "process_resident_memory_bytes".to_string(),
            retained_gauges: vec![
                "go_memstats_heap_idle_bytes".to_string(),
                "go_memstats_heap_released_bytes".to_string(),
            ],
            demand_gauges: vec![
                "go_memstats_heap_inuse_bytes".to_string(),
                "go_memstats_stack_inuse_bytes".to_string(),
            ],
            soft: 0.65,
            hard: 0.78,
            critical: 0.78,
            bytes_per_request: None,
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.enabled && self.memory_limit_bytes == 0 {
            return Err(ConfigError::new(
                field(section, "memory_limit_bytes"),
                "must be set (the store pod's memory limit in bytes) when memory shedding is enabled",
            ));
        }
        if self.memory_limit_bytes != 0 && self.memory_limit_bytes < MIN_MEMORY_LIMIT_BYTES {
            return Err(ConfigError::new(
                field(section, "memory_limit_bytes"),
                format!(
                    "must be in bytes (e.g. 419430400 for 400Mi), got {}",
                    self.memory_limit_bytes
                ),
            ));
        }
        if self.enabled && self.endpoints.is_empty() {
            return Err(ConfigError::new(
                field(section, "endpoints"),
                "must list at least one metrics endpoint when memory shedding is enabled",
            ));
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(ConfigError::new(
                field(section, "endpoints"),
                format!(
                    "must list at most {MAX_ENDPOINTS} endpoints, got {}",
                    self.endpoints.len()
                ),
            ));
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            endpoint.validate(&format!("{}[{i}]", field(section, "endpoints")))?;
        }
        check_range(
            &field(section, "poll_interval_ms"),
            self.poll_interval_ms,
            100,
            60_000,
        )?;
        check_range(&field(section, "timeout_ms"), self.timeout_ms, 10, 60_000)?;
        check_range(
            &field(section, "max_sample_age_ms"),
            self.max_sample_age_ms,
            self.poll_interval_ms,
            600_000,
        )?;
        if let Err(e) = Selector::parse(&self.gauge) {
            return Err(ConfigError::new(field(section, "gauge"), e.to_string()));
        }
        if !matches!(self.retained_gauges.len(), 0 | 2) {
            return Err(ConfigError::new(
                field(section, "retained_gauges"),
                format!(
                    "must be empty or name two gauges [held, released], got {}",
                    self.retained_gauges.len()
                ),
            ));
        }
        for (i, text) in self.retained_gauges.iter().enumerate() {
            if let Err(e) = Selector::parse(text) {
                let name = format!("{}[{i}]", field(section, "retained_gauges"));
                return Err(ConfigError::new(name, e.to_string()));
            }
        }
        if self.demand_gauges.len() > MAX_DEMAND_GAUGES {
            return Err(ConfigError::new(
                field(section, "demand_gauges"),
                format!(
                    "must list at most {MAX_DEMAND_GAUGES} gauges, got {}",
                    self.demand_gauges.len()
                ),
            ));
        }
        let mut parsed: Vec<Selector> = Vec::with_capacity(self.demand_gauges.len());
        for (i, text) in self.demand_gauges.iter().enumerate() {
            let name = format!("{}[{i}]", field(section, "demand_gauges"));
            let selector =
                Selector::parse(text).map_err(|e| ConfigError::new(&name, e.to_string()))?;
            if parsed.contains(&selector) {
                return Err(ConfigError::new(
                    name,
                    format!("{text:?} is listed twice (it would be counted twice)"),
                ));
            }
            parsed.push(selector);
        }
        check_unit(&field(section, "soft"), self.soft, 0.01, 1.0)?;
        check_unit(&field(section, "hard"), self.hard, self.soft, 1.0)?;
        check_unit(&field(section, "critical"), self.critical, self.hard, 1.0)?;
        if let Some(b) = self.bytes_per_request {
            check_range(
                &field(section, "bytes_per_request"),
                b,
                MIN_BYTES_PER_REQUEST,
                MAX_BYTES_PER_REQUEST,
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// The curve
// ---------------------------------------------------------------------------------

/// Ratio → shed probability of sheddable traffic and severity (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Curve {
    pub soft: f64,
    pub hard: f64,
    pub critical: f64,
}

impl Curve {
    pub fn from_config(cfg: &MemoryConfig) -> Curve {
        Curve {
            soft: cfg.soft,
            hard: cfg.hard,
            critical: cfg.critical,
        }
    }

    /// Probability of shedding a sheddable request: 0 up to `soft`, `x²` in the band,
    /// 1 from `hard`.
    pub fn sheddable(&self, r: f64) -> f64 {
        if r.is_nan() || r <= self.soft {
            0.0
        } else if r >= self.hard {
            1.0
        } else {
            let x = (r - self.soft) / (self.hard - self.soft);
            unit(x * x)
        }
    }

    /// How severe the overload is, in [0, 1]: 0 at `soft`, 1 at `critical`.
    pub fn severity(&self, r: f64) -> f64 {
        if r.is_nan() || r <= self.soft {
            0.0
        } else if r >= self.critical {
            1.0
        } else {
            unit((r - self.soft) / (self.critical - self.soft))
        }
    }
}

/// Clamps to [0, 1]; NaN becomes 0.
fn unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

// ---------------------------------------------------------------------------------
// Endpoint states
// ---------------------------------------------------------------------------------

/// Why a poll produced no sample.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureReason {
    /// No response within `timeout_ms`.
    Timeout,
    /// The call could not be made or broke (unknown cluster, reset, zero headers).
    CallFailed,
    /// The store answered with another status than 200.
    HttpStatus(u16),
    /// The body did not give the gauges.
    Metrics(PromError),
}

impl FailureReason {
    /// Short, fixed name for metrics and tags.
    pub fn name(&self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::CallFailed => "call_failed",
            FailureReason::HttpStatus(_) => "http_status",
            FailureReason::Metrics(_) => "metrics",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Timeout => f.write_str("the metrics call timed out"),
            FailureReason::CallFailed => f.write_str("the metrics call failed"),
            FailureReason::HttpStatus(s) => write!(f, "the metrics endpoint answered HTTP {s}"),
            FailureReason::Metrics(e) => e.fmt(f),
        }
    }
}

/// The state of one endpoint, without the failure reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// No poll result yet.
    Pending,
    /// The last poll succeeded and its sample is young: drives shedding.
    Fresh,
    /// The last poll failed but the last good sample is still young: still drives.
    Failing,
    /// The last poll failed and no young sample is left: does not drive.
    Failed,
    /// The last poll succeeded long ago and nothing came since: does not drive.
    Stale,
}

impl StatusKind {
    pub fn name(self) -> &'static str {
        match self {
            StatusKind::Pending => "pending",
            StatusKind::Fresh => "fresh",
            StatusKind::Failing => "failing",
            StatusKind::Failed => "failed",
            StatusKind::Stale => "stale",
        }
    }

    /// Whether an endpoint in this state takes part in the decision.
    pub fn drives(self) -> bool {
        matches!(self, StatusKind::Fresh | StatusKind::Failing)
    }
}

impl fmt::Display for StatusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state of one endpoint, with the reason of the last failure.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointStatus {
    Pending,
    Fresh,
    Failing(FailureReason),
    Failed(FailureReason),
    Stale,
}

impl EndpointStatus {
    pub fn kind(&self) -> StatusKind {
        match self {
            EndpointStatus::Pending => StatusKind::Pending,
            EndpointStatus::Fresh => StatusKind::Fresh,
            EndpointStatus::Failing(_) => StatusKind::Failing,
            EndpointStatus::Failed(_) => StatusKind::Failed,
            EndpointStatus::Stale => StatusKind::Stale,
        }
    }
}

/// A change of an endpoint's state, reported once by [`PressureTracker::take_transitions`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub endpoint: usize,
    pub from: StatusKind,
    pub to: StatusKind,
    /// The last failure, when `to` is `Failing` or `Failed`.
    pub reason: Option<FailureReason>,
    /// Age of the last good sample, if any.
    pub sample_age_ms: Option<u64>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory metrics endpoint #{}: {} -> {}",
            self.endpoint, self.from, self.to
        )?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        match (self.to, self.sample_age_ms) {
            (StatusKind::Failing, Some(age)) => {
                write!(f, " (still using the last good sample, {age} ms old)")
            }
            (StatusKind::Failed | StatusKind::Stale, Some(age)) => write!(
                f,
                " (last good sample {age} ms old; no longer used for shedding)"
            ),
            (StatusKind::Failed, None) => f.write_str(" (no sample yet; not used for shedding)"),
            _ => Ok(()),
        }
    }
}

/// Counters and last values of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    pub status: EndpointStatus,
    /// Good samples.
    pub samples: u64,
    /// Failed polls.
    pub scrape_failures: u64,
    pub consecutive_failures: u32,
    /// Times its last good sample expired (it stopped driving because of age).
    pub stale_transitions: u64,
    pub last_sample_ms: Option<u64>,
    /// Smoothed ratios of the last good sample (demand is the ceiling in fallback).
    pub demand_ratio: f64,
    pub ceiling_ratio: f64,
}

/// What one good sample said (raw ratios are before smoothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub ceiling_bytes: f64,
    /// `None` when the demand gauges are not configured or not in the body.
    pub demand_bytes: Option<f64>,
    pub ceiling_ratio: f64,
    pub demand_ratio: Option<f64>,
    /// The ratio this endpoint now contributes to the decision (smoothed, ceiling rule
    /// applied).
    pub decision_ratio: f64,
    /// The in-flight ceiling this sample gives.
    pub max_in_flight: u32,
    /// This endpoint's estimate of the store's memory per request in flight (bytes).
    pub bytes_per_request: f64,
}

/// Why [`PressureTracker::on_sample`] took no sample.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleError {
    /// The host passed an index outside the configured endpoints.
    UnknownEndpoint(usize),
    /// The body did not give the gauges (recorded as a failed poll).
    Metrics(PromError),
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleError::UnknownEndpoint(i) => write!(f, "no memory metrics endpoint #{i}"),
            SampleError::Metrics(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SampleError {}

#[derive(Debug, Clone)]
struct Endpoint {
    last_ok_ms: Option<u64>,
    /// Set when the latest poll result is a failure.
    failure: Option<FailureReason>,
    demand: f64,
    ceiling: f64,
    fallback: bool,
    kind: StatusKind,
    reported: StatusKind,
    samples: u64,
    failures: u64,
    consecutive_failures: u32,
    expirations: u64,
    /// Learns this store's memory per request in flight.
    estimator: Estimator,
    /// The in-flight ceiling computed at the last good sample.
    max_in_flight: Option<u32>,
    /// The demand (bytes) of the last good sample, and whether the one before was
    /// lower by a poll-worth of growth (see [`PressureTracker::next_poll_in_ms`]).
    last_demand: f64,
    rising: bool,
    last_in_flight: u32,
}

impl Endpoint {
    fn new(bytes_per_request: Option<u64>) -> Self {
        Endpoint {
            last_ok_ms: None,
            failure: None,
            demand: 0.0,
            ceiling: 0.0,
            fallback: false,
            kind: StatusKind::Pending,
            reported: StatusKind::Pending,
            samples: 0,
            failures: 0,
            consecutive_failures: 0,
            expirations: 0,
            estimator: Estimator::new(bytes_per_request),
            max_in_flight: None,
            last_demand: 0.0,
            rising: false,
            last_in_flight: 0,
        }
    }

    /// This endpoint's in-flight ceiling now: the one from its last sample while that
    /// sample drives; otherwise (no young sample) the larger of that one and the
    /// headroom at rest, so that an old number never sheds forever; with no sample
    /// ever, the whole line at the estimated cost.
    fn in_flight_ceiling(&self, line: f64) -> u32 {
        let b = self.estimator.per_request();
        let at_rest = match self.estimator.rest_memory() {
            Some(rest) => ceiling::ceiling(0, rest, line, b),
            None => ceiling::blind_ceiling(line, b),
        };
        match self.max_in_flight {
            Some(c) if self.kind.drives() => c,
            Some(c) => c.max(at_rest),
            None => at_rest,
        }
    }

    fn age(&self, now_ms: u64) -> Option<u64> {
        self.last_ok_ms.map(|t| now_ms.saturating_sub(t))
    }

    fn derive(&self, now_ms: u64, max_age_ms: u64) -> StatusKind {
        let young = self.age(now_ms).is_some_and(|age| age <= max_age_ms);
        match (&self.failure, self.last_ok_ms) {
            (None, None) => StatusKind::Pending,
            (None, Some(_)) if young => StatusKind::Fresh,
            (None, Some(_)) => StatusKind::Stale,
            (Some(_), _) if young => StatusKind::Failing,
            (Some(_), _) => StatusKind::Failed,
        }
    }

    fn status(&self) -> EndpointStatus {
        match (self.kind, &self.failure) {
            (StatusKind::Pending, _) => EndpointStatus::Pending,
            (StatusKind::Fresh, _) => EndpointStatus::Fresh,
            (StatusKind::Stale, _) => EndpointStatus::Stale,
            (StatusKind::Failing, Some(r)) => EndpointStatus::Failing(r.clone()),
            (StatusKind::Failed, Some(r)) => EndpointStatus::Failed(r.clone()),
            (StatusKind::Failing | StatusKind::Failed, None) => {
                EndpointStatus::Failed(FailureReason::CallFailed)
            }
        }
    }

    /// The ratio this endpoint contributes: demand, unless the ceiling has reached
    /// `critical` while demand is itself above `soft` (retained memory after a surge
    /// must not keep shedding).
    fn decision(&self, soft: f64, critical: f64) -> f64 {
        if self.ceiling >= critical && self.demand >= soft {
            self.demand.max(self.ceiling)
        } else {
            self.demand
        }
    }
}

// ---------------------------------------------------------------------------------
// Tracker (the elected poller's side)
// ---------------------------------------------------------------------------------

/// Per-endpoint memory state on the polling worker; see the module docs.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    curve: Curve,
    /// Bytes; infinite when unset, so that every ratio is 0.
    limit: f64,
    max_age_ms: u64,
    /// `selectors[0]` is the ceiling, then `demands` demand gauges, then `retained`
    /// retained gauges (0 or 2), then the store's start time.
    selectors: Vec<Selector>,
    demands: usize,
    retained: usize,
    /// Memory (bytes) the in-flight ceiling keeps the store under: `critical` x limit.
    line: f64,
    /// Poll intervals while memory is high or rising, and otherwise.
    fast_poll_ms: u64,
    idle_poll_ms: u64,
    scratch: Vec<Result<f64, PromError>>,
    endpoints: Vec<Endpoint>,
    last: PressureSnapshot,
}

impl PressureTracker {
    /// A tracker for a validated configuration. A gauge that does not parse as a
    /// selector (only possible without validation) is looked up verbatim and so
    /// reports "not found" on every poll instead of panicking.
    pub fn new(cfg: &MemoryConfig) -> PressureTracker {
        let parse =
            |text: &String| Selector::parse(text).unwrap_or_else(|_| Selector::name_only(text));
        let mut selectors = Vec::with_capacity(1 + cfg.demand_gauges.len());
        selectors.push(parse(&cfg.gauge));
        selectors.extend(cfg.demand_gauges.iter().map(parse));
        selectors.extend(cfg.retained_gauges.iter().map(parse));
        selectors.push(Selector::name_only(START_TIME_GAUGE));
        let n = cfg.endpoints.len().min(MAX_ENDPOINTS);
        let limit = if cfg.memory_limit_bytes == 0 {
            f64::INFINITY
        } else {
            cfg.memory_limit_bytes as f64
        };
        let fast_poll_ms = cfg.poll_interval_ms.max(1);
        PressureTracker {
            curve: Curve::from_config(cfg),
            limit,
            line: limit * cfg.critical.clamp(0.0, 1.0),
            fast_poll_ms,
            idle_poll_ms: (fast_poll_ms * IDLE_POLL_FACTOR)
                .min(IDLE_POLL_MAX_MS)
                .min(cfg.max_sample_age_ms / 2)
                .max(fast_poll_ms),
            max_age_ms: cfg.max_sample_age_ms,
            scratch: Vec::with_capacity(selectors.len()),
            demands: cfg.demand_gauges.len(),
            retained: cfg.retained_gauges.len(),
            selectors,
            endpoints: vec![Endpoint::new(cfg.bytes_per_request); n],
            last: PressureSnapshot::idle(0, n),
        }
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Feeds the body of a 200 response from endpoint `endpoint`, with the filter's
    /// global in-flight count at the time (the smaller of its values when the poll was
    /// sent and when it was answered; see [`crate::ceiling`]).
    ///
    /// On a body that does not give the gauges, the poll is recorded as failed
    /// ([`FailureReason::Metrics`]) and the error returned for the log. Demand gauges
    /// missing from a complete body switch the endpoint to the ceiling alone; missing
    /// from a truncated body, the poll fails (the missing part cannot be trusted).
    pub fn on_sample(
        &mut self,
        endpoint: usize,
        body: &[u8],
        in_flight: u32,
        now_ms: u64,
    ) -> Result<Reading, SampleError> {
        if endpoint >= self.endpoints.len() {
            return Err(SampleError::UnknownEndpoint(endpoint));
        }
        find_many(body, &self.selectors, &mut self.scratch);
        let values = match self.read_values() {
            Ok(values) => values,
            Err(e) => {
                self.on_failure(endpoint, FailureReason::Metrics(e.clone()), now_ms);
                return Err(SampleError::Metrics(e));
            }
        };
        let (ceiling_bytes, demand_bytes, start_time) = values;
        let ceiling_ratio = ratio(ceiling_bytes, self.limit);
        let demand_ratio = demand_bytes.map(|d| ratio(d, self.limit));
        let fallback = demand_ratio.is_none();

        let max_age = self.max_age_ms;
        let s = FALL_SMOOTHING;
        let (soft, critical) = (self.curve.soft, self.curve.critical);
        let (line, limit) = (self.line, self.limit);
        let ep = &mut self.endpoints[endpoint];
        // Smooth only a continuous series; after a gap (or a change of mode) start over.
        let continuous = ep.derive(now_ms, max_age).drives() && ep.fallback == fallback;
        let fall = |prev: f64, x: f64| {
            if continuous && x < prev {
                s * prev + (1.0 - s) * x
            } else {
                x
            }
        };
        ep.demand = fall(ep.demand, demand_ratio.unwrap_or(ceiling_ratio));
        ep.ceiling = fall(ep.ceiling, ceiling_ratio);
        ep.fallback = fallback;
        ep.last_ok_ms = Some(now_ms);
        ep.failure = None;
        ep.samples = ep.samples.saturating_add(1);
        ep.consecutive_failures = 0;
        ep.kind = ep.derive(now_ms, max_age);
        // The ceiling decides on what the store will need: its demand (resident
        // memory less what it can reuse), raw, not smoothed.
        let memory = demand_bytes.unwrap_or(ceiling_bytes);
        ep.estimator.observe(in_flight, memory, start_time);
        let max_in_flight = ep.estimator.ceiling(in_flight, memory, line);
        ep.max_in_flight = Some(max_in_flight);
        ep.rising = continuous && memory - ep.last_demand > RISING_SHARE * limit;
        ep.last_demand = memory;
        ep.last_in_flight = in_flight;
        Ok(Reading {
            ceiling_bytes,
            demand_bytes,
            ceiling_ratio,
            demand_ratio,
            decision_ratio: ep.decision(soft, critical),
            max_in_flight,
            bytes_per_request: ep.estimator.per_request(),
        })
    }

    /// (ceiling, demand, start time) from `scratch`, or why the poll must count as
    /// failed. Demand is the ceiling minus retained-but-free memory when the retained
    /// pair is in the body, else the sum of the demand gauges, else `None`. The start
    /// time is optional.
    #[allow(clippy::type_complexity)]
    fn read_values(&self) -> Result<(f64, Option<f64>, Option<f64>), PromError> {
        let mut results = self.scratch.iter().zip(&self.selectors);
        let Some((ceiling, sel)) = results.next() else {
            return Err(PromError::NotFound {
                metric: String::new(),
            });
        };
        let ceiling = usable(ceiling, sel)?;
        let demand_part: Vec<_> = results.by_ref().take(self.demands).collect();
        let retained_part: Vec<_> = results.by_ref().take(self.retained).collect();
        let start = results
            .next()
            .and_then(|(result, sel)| usable(result, sel).ok());
        if let [(held, held_sel), (released, released_sel)] = retained_part[..] {
            if let (Ok(held), Ok(released)) =
                (usable(held, held_sel), usable(released, released_sel))
            {
                let retained = (held - released).max(0.0);
                return Ok((ceiling, Some((ceiling - retained).max(0.0)), start));
            }
        }
        let mut demand = 0.0;
        let mut any = false;
        for (result, sel) in demand_part {
            match result {
                Err(PromError::NotFound { .. }) => return Ok((ceiling, None, start)),
                other => {
                    demand += usable(other, sel)?;
                    any = true;
                }
            }
        }
        Ok((ceiling, any.then_some(demand), start))
    }

    /// When to poll next, from now: every `poll_interval_ms` while some endpoint is
    /// busy (its demand above `soft` x limit or rising by more than a hundredth of
    /// the limit since its previous sample, or its in-flight count at half its
    /// ceiling), or when one has no young sample; ten times slower otherwise (at
    /// most 1 s and half of `max_sample_age_ms`). The ceiling stops a step surge
    /// between polls whatever the interval; faster polls re-anchor it sooner.
    pub fn next_poll_in_ms(&self, now_ms: u64) -> u64 {
        let soft = self.curve.soft * self.limit;
        let busy = self.endpoints.iter().any(|ep| {
            let young = ep
                .age(now_ms)
                .is_some_and(|age| age <= self.idle_poll_ms.saturating_mul(2));
            let near_ceiling = ep
                .max_in_flight
                .is_some_and(|c| ep.last_in_flight.saturating_mul(2) >= c);
            !young || ep.failure.is_some() || ep.rising || ep.last_demand > soft || near_ceiling
        });
        if busy {
            self.fast_poll_ms
        } else {
            self.idle_poll_ms
        }
    }

    /// Records a failed poll of `endpoint` (ignored for an unknown index).
    pub fn on_failure(&mut self, endpoint: usize, reason: FailureReason, now_ms: u64) {
        let max_age = self.max_age_ms;
        let Some(ep) = self.endpoints.get_mut(endpoint) else {
            return;
        };
        // A sample that had expired before this failure counts as an expiry.
        let before = ep.derive(now_ms, max_age);
        if ep.kind.drives() && !before.drives() {
            ep.expirations = ep.expirations.saturating_add(1);
        }
        ep.failure = Some(reason);
        ep.failures = ep.failures.saturating_add(1);
        ep.consecutive_failures = ep.consecutive_failures.saturating_add(1);
        ep.kind = ep.derive(now_ms, max_age);
    }

    /// Moves endpoints whose sample has grown too old out of the decision.
    fn refresh(&mut self, now_ms: u64) {
        let max_age = self.max_age_ms;
        for ep in &mut self.endpoints {
            let kind = ep.derive(now_ms, max_age);
            if kind != ep.kind {
                if ep.kind.drives() && !kind.drives() {
                    ep.expirations = ep.expirations.saturating_add(1);
                }
                ep.kind = kind;
            }
        }
    }

    /// The decision now, from the worst endpoint still driving; publish it.
    pub fn snapshot(&mut self, now_ms: u64) -> PressureSnapshot {
        self.refresh(now_ms);
        let (soft, critical) = (self.curve.soft, self.curve.critical);
        let mut worst: Option<(usize, f64)> = None;
        let mut driving = 0usize;
        let mut max_ceiling = 0.0f64;
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !ep.kind.drives() {
                continue;
            }
            driving += 1;
            max_ceiling = max_ceiling.max(ep.ceiling);
            let r = ep.decision(soft, critical);
            if worst.is_none_or(|(_, w)| r > w) {
                worst = Some((i, r));
            }
        }
        let snap = match worst {
            None => PressureSnapshot::idle(now_ms, self.endpoints.len()),
            Some((i, r)) => {
                let ep = &self.endpoints[i];
                let mut flags = FLAG_ACTIVE;
                if ep.ceiling >= critical && ep.demand >= soft && ep.ceiling > ep.demand {
                    flags |= FLAG_CEILING;
                }
                if ep.fallback {
                    flags |= FLAG_FALLBACK;
                }
                PressureSnapshot {
                    flags,
                    driving: clamp_u16(driving),
                    endpoints: clamp_u16(self.endpoints.len()),
                    worst: clamp_u16(i),
                    ratio: r,
                    ceiling_ratio: max_ceiling,
                    p_sheddable: self.curve.sheddable(r),
                    severity: self.curve.severity(r),
                    sample_ms: ep.last_ok_ms.unwrap_or(0),
                    computed_ms: now_ms,
                    max_in_flight: 0,
                    bytes_per_request: 0,
                }
            }
        };
        let snap = self.with_ceiling(snap);
        self.last = snap;
        snap
    }

    /// `snap` with the in-flight ceiling: the smallest of the endpoints' ceilings.
    /// The filter cannot tell which replica a request will reach (Envoy's load
    /// balancer picks it after the filter has admitted the request), and counts its
    /// in-flight requests in one number: so every replica's ceiling is a bound on
    /// that number, each learned against it, and all must hold (docs/memory.md).
    fn with_ceiling(&self, mut snap: PressureSnapshot) -> PressureSnapshot {
        let tightest = self
            .endpoints
            .iter()
            .map(|ep| (ep.in_flight_ceiling(self.line), ep.estimator.per_request()))
            .min_by_key(|&(c, _)| c);
        if let Some((c, b)) = tightest {
            snap.max_in_flight = c;
            snap.bytes_per_request = f64_to_u32(b);
        }
        snap
    }

    /// The in-flight ceiling and estimates of each endpoint, for logs and tests.
    pub fn ceilings(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        self.endpoints
            .iter()
            .map(|ep| (ep.in_flight_ceiling(self.line), ep.estimator.per_request()))
    }

    /// Each endpoint whose state changed since the last call, once, for the log.
    pub fn take_transitions(&mut self, now_ms: u64) -> Vec<Transition> {
        self.refresh(now_ms);
        let mut out = Vec::new();
        for (i, ep) in self.endpoints.iter_mut().enumerate() {
            if ep.kind != ep.reported {
                out.push(Transition {
                    endpoint: i,
                    from: ep.reported,
                    to: ep.kind,
                    reason: match ep.kind {
                        StatusKind::Failing | StatusKind::Failed => ep.failure.clone(),
                        _ => None,
                    },
                    sample_age_ms: ep.age(now_ms),
                });
                ep.reported = ep.kind;
            }
        }
        out
    }

    /// State and counters of one endpoint (as of the last call that gave a time).
    pub fn endpoint_stats(&self, endpoint: usize) -> Option<EndpointStats> {
        let ep = self.endpoints.get(endpoint)?;
        Some(EndpointStats {
            status: ep.status(),
            samples: ep.samples,
            scrape_failures: ep.failures,
            consecutive_failures: ep.consecutive_failures,
            stale_transitions: ep.expirations,
            last_sample_ms: ep.last_ok_ms,
            demand_ratio: ep.demand,
            ceiling_ratio: ep.ceiling,
        })
    }

    /// Totals for metrics; ratios are those of the last [`snapshot`](Self::snapshot).
    /// Counters are monotonic for the life of this tracker: export their increments.
    pub fn stats(&self, now_ms: u64) -> PressureStats {
        let sum = |f: fn(&Endpoint) -> u64| {
            self.endpoints
                .iter()
                .fold(0u64, |acc, ep| acc.saturating_add(f(ep)))
        };
        PressureStats {
            ratio: self.last.ratio,
            ceiling_ratio: self.last.ceiling_ratio,
            sample_age_ms: self.last.sample_age_ms(now_ms),
            endpoints: self.endpoints.len(),
            driving_endpoints: usize::from(self.last.driving),
            samples: sum(|ep| ep.samples),
            scrape_failures: sum(|ep| ep.failures),
            stale_transitions: sum(|ep| ep.expirations),
        }
    }
}

/// `bytes / limit`, 0 for an unset limit.
fn ratio(bytes: f64, limit: f64) -> f64 {
    let r = bytes / limit;
    if r.is_finite() {
        r.max(0.0)
    } else {
        0.0
    }
}

/// A value that can be a memory size: finite and not negative.
fn usable(result: &Result<f64, PromError>, sel: &Selector) -> Result<f64, PromError> {
    match result {
        Ok(value) if value.is_finite() && *value >= 0.0 => Ok(*value),
        Ok(value) => Err(PromError::InvalidValue {
            metric: sel.as_str().to_string(),
            value: *value,
        }),
        Err(e) => Err(e.clone()),
    }
}

fn clamp_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Memory figures for metrics (see [`PressureTracker::stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureStats {
    /// The decision ratio (0 when nothing drives).
    pub ratio: f64,
    /// The highest smoothed ceiling (RSS) ratio among driving endpoints.
    pub ceiling_ratio: f64,
    /// Age of the sample behind the decision.
    pub sample_age_ms: Option<u64>,
    pub endpoints: usize,
    pub driving_endpoints: usize,
    pub samples: u64,
    pub scrape_failures: u64,
    pub stale_transitions: u64,
}

/// Shed-by-memory decisions counted by a worker (the host keeps one for enforced
/// decisions and one for shadow-mode "would have shed").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedCounters {
    pub sheddable: u64,
    pub critical: u64,
}

impl ShedCounters {
    pub fn record(&mut self, criticality: Criticality) {
        match criticality {
            Criticality::Sheddable => self.sheddable = self.sheddable.saturating_add(1),
            Criticality::Critical => self.critical = self.critical.saturating_add(1),
        }
    }

    pub fn total(&self) -> u64 {
        self.sheddable.saturating_add(self.critical)
    }
}

// ---------------------------------------------------------------------------------
// Snapshot (every worker's side)
// ---------------------------------------------------------------------------------

/// Shared-data key of the published snapshot (fixed: shared-data keys never die).
pub const SNAPSHOT_KEY: &str = "sessionguard.memory.v1";
/// Encoded size of a [`PressureSnapshot`].
pub const SNAPSHOT_LEN: usize = 96;
const MAGIC: [u8; 4] = *b"SGMP";
const VERSION: u8 = 2;
/// Bytes covered by the checksum.
const SUMMED: usize = 88;
const FLAG_ACTIVE: u8 = 1;
const FLAG_CEILING: u8 = 2;
const FLAG_FALLBACK: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_ACTIVE | FLAG_CEILING | FLAG_FALLBACK;
const NO_ENDPOINT: u16 = u16::MAX;

/// The memory decision shared by all workers. Cheap to copy; see [`Self::encode`]
/// for the layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureSnapshot {
    flags: u8,
    driving: u16,
    endpoints: u16,
    worst: u16,
    ratio: f64,
    ceiling_ratio: f64,
    p_sheddable: f64,
    severity: f64,
    sample_ms: u64,
    computed_ms: u64,
    /// The in-flight ceiling, 0 = none.
    max_in_flight: u32,
    /// The estimate behind it (bytes per request in flight, for the gauge).
    bytes_per_request: u32,
}

impl Default for PressureSnapshot {
    fn default() -> Self {
        PressureSnapshot::idle(0, 0)
    }
}

/// Why a shared snapshot is not used (the caller then uses an idle one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// Nothing published yet.
    Missing,
    Length(usize),
    Magic,
    Version(u8),
    Checksum,
    /// A field out of its range (with a valid checksum: a bug, not noise).
    Invalid(&'static str),
    /// The poller has not published for longer than `max_sample_age_ms`.
    Expired {
        age_ms: u64,
    },
    /// Computed later than now by more than `max_sample_age_ms` (the clock stepped back).
    FromTheFuture {
        ahead_ms: u64,
    },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory pressure snapshot ")?;
        match self {
            SnapshotError::Missing => f.write_str("not published yet"),
            SnapshotError::Length(n) => {
                write!(f, "has {n} bytes, expected {SNAPSHOT_LEN}")
            }
            SnapshotError::Magic => f.write_str("has a wrong magic number"),
            SnapshotError::Version(v) => write!(f, "has unknown version {v}"),
            SnapshotError::Checksum => f.write_str("fails its checksum"),
            SnapshotError::Invalid(what) => write!(f, "is invalid: {what}"),
            SnapshotError::Expired { age_ms } => write!(
                f,
                "is {age_ms} ms old: the memory poller is not publishing; memory shedding is off"
            ),
            SnapshotError::FromTheFuture { ahead_ms } => {
                write!(
                    f,
                    "is {ahead_ms} ms in the future (clock stepped back); ignored"
                )
            }
        }
    }
}

impl std::error::Error for SnapshotError {}

impl PressureSnapshot {
    /// No pressure: nothing shed, limit untouched.
    pub fn idle(computed_ms: u64, endpoints: usize) -> PressureSnapshot {
        PressureSnapshot {
            flags: 0,
            driving: 0,
            endpoints: clamp_u16(endpoints),
            worst: NO_ENDPOINT,
            ratio: 0.0,
            ceiling_ratio: 0.0,
            p_sheddable: 0.0,
            severity: 0.0,
            sample_ms: 0,
            computed_ms,
            max_in_flight: 0,
            bytes_per_request: 0,
        }
    }

    /// The in-flight ceiling every worker applies (`Limiter::set_memory_ceiling`);
    /// `None` in a snapshot that carries none (memory shedding off, or an unset limit).
    pub fn max_in_flight(&self) -> Option<u32> {
        (self.max_in_flight != 0).then_some(self.max_in_flight)
    }

    /// The estimate of the store's memory per request in flight behind the ceiling.
    pub fn bytes_per_request(&self) -> u32 {
        self.bytes_per_request
    }

    /// Shed this request? `uniform_random` is uniform in [0, 1). `Some(severity)`
    /// (in [0, 1], for `Retry-After`) means shed, with reason "memory".
    pub fn decide(&self, criticality: Criticality, uniform_random: f64) -> Option<f64> {
        let p = self.shed_probability(criticality);
        // NaN compares false: a broken random source never sheds.
        (p > 0.0 && uniform_random < p).then_some(self.severity)
    }

    pub fn shed_probability(&self, criticality: Criticality) -> f64 {
        match criticality {
            Criticality::Sheddable => self.p_sheddable,
            // Critical traffic is refused only by the in-flight ceiling.
            Criticality::Critical => 0.0,
        }
    }

    /// The decision ratio (demand, or the ceiling at `critical`) of the worst endpoint.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The highest ceiling (RSS) ratio among driving endpoints.
    pub fn ceiling_ratio(&self) -> f64 {
        self.ceiling_ratio
    }

    pub fn severity(&self) -> f64 {
        self.severity
    }

    /// Some endpoint drives the decision.
    pub fn is_active(&self) -> bool {
        self.flags & FLAG_ACTIVE != 0
    }

    /// The ceiling (RSS at `critical`) is what drives the decision.
    pub fn ceiling_in_force(&self) -> bool {
        self.flags & FLAG_CEILING != 0
    }

    /// The worst endpoint lacks the demand gauges: its ceiling decides alone.
    pub fn demand_fallback(&self) -> bool {
        self.flags & FLAG_FALLBACK != 0
    }

    pub fn driving_endpoints(&self) -> usize {
        usize::from(self.driving)
    }

    pub fn endpoints(&self) -> usize {
        usize::from(self.endpoints)
    }

    pub fn worst_endpoint(&self) -> Option<usize> {
        (self.worst != NO_ENDPOINT).then_some(usize::from(self.worst))
    }

    /// When the sample behind the decision was received.
    pub fn sample_ms(&self) -> Option<u64> {
        self.is_active().then_some(self.sample_ms)
    }

    pub fn sample_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.sample_ms().map(|t| now_ms.saturating_sub(t))
    }

    /// When the poller computed it.
    pub fn computed_ms(&self) -> u64 {
        self.computed_ms
    }

    /// Little-endian, [`SNAPSHOT_LEN`] = 96 bytes:
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 0  | 4 | magic `SGMP` |
    /// | 4  | 1 | version (2) |
    /// | 5  | 1 | flags: 1 active, 2 ceiling in force, 4 demand fallback |
    /// | 6  | 2 | driving endpoints (u16) |
    /// | 8  | 2 | configured endpoints (u16) |
    /// | 10 | 2 | worst endpoint index (u16, 0xFFFF = none) |
    /// | 12 | 4 | reserved (0) |
    /// | 16 | 8 | decision ratio (f64) |
    /// | 24 | 8 | ceiling ratio (f64) |
    /// | 32 | 8 | shed probability, sheddable (f64) |
    /// | 40 | 16 | reserved (0) |
    /// | 56 | 8 | severity (f64) |
    /// | 64 | 8 | sample time, ms (u64) |
    /// | 72 | 8 | computed time, ms (u64) |
    /// | 80 | 4 | in-flight ceiling (u32, 0 = none) |
    /// | 84 | 4 | bytes per request in flight behind it (u32) |
    /// | 88 | 4 | FNV-1a 32 of bytes 0..88 |
    /// | 92 | 4 | reserved (0) |
    pub fn encode(&self) -> [u8; SNAPSHOT_LEN] {
        let mut b = [0u8; SNAPSHOT_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.driving.to_le_bytes());
        b[8..10].copy_from_slice(&self.endpoints.to_le_bytes());
        b[10..12].copy_from_slice(&self.worst.to_le_bytes());
        b[16..24].copy_from_slice(&self.ratio.to_le_bytes());
        b[24..32].copy_from_slice(&self.ceiling_ratio.to_le_bytes());
        b[32..40].copy_from_slice(&self.p_sheddable.to_le_bytes());
        b[56..64].copy_from_slice(&self.severity.to_le_bytes());
        b[64..72].copy_from_slice(&self.sample_ms.to_le_bytes());
        b[72..80].copy_from_slice(&self.computed_ms.to_le_bytes());
        b[80..84].copy_from_slice(&self.max_in_flight.to_le_bytes());
        b[84..88].copy_from_slice(&self.bytes_per_request.to_le_bytes());
        let sum = fnv1a(&b[..SUMMED]);
        b[SUMMED..SUMMED + 4].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads an encoded snapshot; any garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<PressureSnapshot, SnapshotError> {
        if bytes.is_empty() {
            return Err(SnapshotError::Missing);
        }
        let b: &[u8; SNAPSHOT_LEN] = bytes
            .try_into()
            .map_err(|_| SnapshotError::Length(bytes.len()))?;
        if b[0..4] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        if b[4] != VERSION {
            return Err(SnapshotError::Version(b[4]));
        }
        if u32_at(b, SUMMED) != fnv1a(&b[..SUMMED]) {
            return Err(SnapshotError::Checksum);
        }
        let snap = PressureSnapshot {
            flags: b[5],
            driving: u16_at(b, 6),
            endpoints: u16_at(b, 8),
            worst: u16_at(b, 10),
            ratio: f64_at(b, 16),
            ceiling_ratio: f64_at(b, 24),
            p_sheddable: f64_at(b, 32),
            severity: f64_at(b, 56),
            sample_ms: u64_at(b, 64),
            computed_ms: u64_at(b, 72),
            max_in_flight: u32_at(b, 80),
            bytes_per_request: u32_at(b, 84),
        };
        snap.check()?;
        Ok(snap)
    }

    fn check(&self) -> Result<(), SnapshotError> {
        let prob = |v: f64| (0.0..=1.0).contains(&v);
        let ratio = |v: f64| v.is_finite() && v >= 0.0;
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(SnapshotError::Invalid("unknown flags"));
        }
        if !ratio(self.ratio) || !ratio(self.ceiling_ratio) {
            return Err(SnapshotError::Invalid("ratio out of range"));
        }
        if !prob(self.p_sheddable) || !prob(self.severity) {
            return Err(SnapshotError::Invalid("probability out of [0, 1]"));
        }
        if self.max_in_flight != 0 && !(MIN_CEILING..=MAX_CEILING).contains(&self.max_in_flight) {
            return Err(SnapshotError::Invalid("in-flight ceiling out of range"));
        }
        if self.driving > self.endpoints {
            return Err(SnapshotError::Invalid(
                "more driving endpoints than endpoints",
            ));
        }
        if !self.is_active() && self.p_sheddable > 0.0 {
            return Err(SnapshotError::Invalid("inactive snapshot that sheds"));
        }
        Ok(())
    }

    /// `self` if it was computed within `max_age_ms` of `now_ms`.
    pub fn check_current(
        self,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Result<PressureSnapshot, SnapshotError> {
        if self.computed_ms > now_ms {
            let ahead_ms = self.computed_ms - now_ms;
            if ahead_ms > max_age_ms {
                return Err(SnapshotError::FromTheFuture { ahead_ms });
            }
            return Ok(self);
        }
        let age_ms = now_ms - self.computed_ms;
        if age_ms > max_age_ms {
            return Err(SnapshotError::Expired { age_ms });
        }
        Ok(self)
    }
}

fn u16_at(b: &[u8; SNAPSHOT_LEN], at: usize) -> u16 {
    let mut x = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        x.copy_from_slice(s);
    }
    u16::from_le_bytes(x)
}

fn u32_at(b: &[u8; SNAPSHOT_LEN], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8; SNAPSHOT_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

fn f64_at(b: &[u8; SNAPSHOT_LEN], at: usize) -> f64 {
    f64::from_bits(u64_at(b, at))
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Publishes `snap` under [`SNAPSHOT_KEY`], unless the stored one is newer (another
/// poller got there first) by no more than `max_age_ms`. A newer one beyond that
/// (clock stepped back) or an unreadable one is overwritten. `Ok(true)` if written.
pub fn publish<S: SharedStore + ?Sized>(
    store: &S,
    snap: &PressureSnapshot,
    max_age_ms: u64,
    max_attempts: u32,
) -> Result<bool, UpdateError> {
    let written = update(store, SNAPSHOT_KEY, max_attempts, |current| {
        if let Some(existing) = current.and_then(|b| PressureSnapshot::decode(b).ok()) {
            let ahead = existing.computed_ms.saturating_sub(snap.computed_ms);
            if ahead > 0 && ahead <= max_age_ms {
                return None;
            }
        }
        Some((snap.encode().to_vec(), ()))
    })?;
    Ok(written.is_some())
}

/// Reads the published snapshot. On `Err` the caller uses
/// [`PressureSnapshot::default`] (no pressure) and may log the error once.
pub fn load<S: SharedStore + ?Sized>(
    store: &S,
    now_ms: u64,
    max_age_ms: u64,
) -> Result<PressureSnapshot, SnapshotError> {
    let (bytes, _cas) = store.get(SNAPSHOT_KEY).ok_or(SnapshotError::Missing)?;
    PressureSnapshot::decode(&bytes)?.check_current(now_ms, max_age_ms)
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::shared::MemStore;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MI: f64 = 1024.0 * 1024.0;
    const LIMIT: u64 = 400 * 1024 * 1024;
    const S: Criticality = Criticality::Sheddable;
    const C: Criticality = Criticality::Critical;

    /// The curve's tests pin the thresholds they were written for.
    fn cfg() -> MemoryConfig {
        MemoryConfig {
            enabled: true,
            memory_limit_bytes: LIMIT,
            soft: 0.70,
            hard: 0.85,
            critical: 0.95,
            ..MemoryConfig::default()
        }
    }

    fn cfg_endpoints(n: usize) -> MemoryConfig {
        MemoryConfig {
            endpoints: vec![MetricsEndpoint::default(); n],
            ..cfg()
        }
    }

    /// A Kask /metrics body (client_golang layout) with the given ratios of the limit.
    fn kask(rss: f64, heap: f64, stack: f64) -> String {
        let b = |r: f64| format!("{:e}", (r * LIMIT as f64).round());
        format!(
            "# HELP go_goroutines Number of goroutines that currently exist.\n\
             # TYPE go_goroutines gauge\n\
             go_goroutines 5023\n\
             # HELP go_memstats_heap_idle_bytes Number of heap bytes waiting to be used.\n\
             # TYPE go_memstats_heap_idle_bytes gauge\n\
             go_memstats_heap_idle_bytes 1.2124160e+07\n\
             # HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.\n\
             # TYPE go_memstats_heap_inuse_bytes gauge\n\
             go_memstats_heap_inuse_bytes {}\n\
             # HELP go_memstats_stack_inuse_bytes Number of bytes in use by the stack allocator.\n\
             # TYPE go_memstats_stack_inuse_bytes gauge\n\
             go_memstats_stack_inuse_bytes {}\n\
             http_request_duration_seconds_bucket{{code=\"404\",method=\"GET\",le=\"+Inf\"}} 570123\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {}\n\
             process_virtual_memory_bytes 1.2345e+07\n",
            b(heap),
            b(stack),
            b(rss)
        )
    }

    /// Demand `d` (split 60/40 between heap and stack), RSS `rss`.
    fn body(d: f64, rss: f64) -> Vec<u8> {
        kask(rss, d * 0.6, d * 0.4).into_bytes()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    // ---- configuration ----

    #[test]
    fn defaults_validate_and_parse() {
        MemoryConfig::default().validate("memory").unwrap();
        cfg().validate("memory").unwrap();
        let c = Config::parse(
            br#"{"memory": {"enabled": true, "memory_limit_bytes": 419430400,
                "demand_gauges": [], "gauge": "container_memory_working_set_bytes{container=\"kask\"}",
                "bytes_per_request": 40000}}"#,
        )
        .unwrap();
        assert!(c.memory.demand_gauges.is_empty());
        assert_eq!(c.memory.bytes_per_request, Some(40000));
        // What a new user writes: the limit, nothing else.
        let c = Config::parse(br#"{"memory": {"enabled": true, "memory_limit_bytes": 419430400}}"#)
            .unwrap();
        assert_eq!(c.memory.bytes_per_request, None);
        // Settings the ceiling retired are refused, by name.
        for retired in [
            "critical_max_shed",
            "min_limit_factor",
            "fall_smoothing",
            "drop_on_failure",
        ] {
            let json = format!(r#"{{"memory": {{"{retired}": 0}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(retired), "{e}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |json: &str| Config::parse(json.as_bytes()).unwrap_err();
        let cases = [
            (r#"{"memory": {"bogus": 1}}"#, "memory.bogus"),
            (
                r#"{"memory": {"enabled": true}}"#,
                "memory.memory_limit_bytes",
            ),
            (
                r#"{"memory": {"memory_limit_bytes": 400}}"#,
                "memory.memory_limit_bytes",
            ),
            (r#"{"memory": {"gauge": "rss bytes"}}"#, "memory.gauge"),
            (
                r#"{"memory": {"demand_gauges": ["a", "b{x=1}"]}}"#,
                "memory.demand_gauges[1]",
            ),
            (
                r#"{"memory": {"demand_gauges": ["a", "a"]}}"#,
                "memory.demand_gauges[1]",
            ),
            (
                r#"{"memory": {"demand_gauges": ["a","b","c","d","e","f","g","h","i"]}}"#,
                "memory.demand_gauges",
            ),
            (
                r#"{"memory": {"endpoints": [{}, {"path": "metrics"}]}}"#,
                "memory.endpoints[1].path",
            ),
            (
                r#"{"memory": {"endpoints": [{"cluster": ""}]}}"#,
                "memory.endpoints[0].cluster",
            ),
            (r#"{"memory": {"hard": 0.5}}"#, "memory.hard"),
            (r#"{"memory": {"critical": 1.2}}"#, "memory.critical"),
            (
                r#"{"memory": {"bytes_per_request": 100}}"#,
                "memory.bytes_per_request",
            ),
        ];
        for (json, field) in cases {
            let e = err(json);
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = err(r#"{"memory": {"gauge": "a{x=1}"}}"#);
        assert!(e.message.contains("quoted"), "{e}");
    }

    // ---- the curve ----

    #[test]
    fn curve_shape() {
        let c = Curve::from_config(&cfg());
        // Sheddable: 0 at soft, x² in the band, 1 from hard.
        assert_eq!(c.sheddable(0.0), 0.0);
        assert_eq!(c.sheddable(0.70), 0.0);
        assert!(close(c.sheddable(0.775), 0.25));
        assert!(close(c.sheddable(0.70 + 0.15 * 0.9), 0.81));
        assert_eq!(c.sheddable(0.85), 1.0);
        assert_eq!(c.sheddable(3.0), 1.0);
        assert_eq!(c.sheddable(f64::NAN), 0.0);
        let mut prev = 0.0;
        for i in 0..=1000 {
            let p = c.sheddable(f64::from(i) / 1000.0);
            assert!(p >= prev && (0.0..=1.0).contains(&p));
            prev = p;
        }
        // Severity: 0 at soft, 1 at critical.
        assert_eq!(c.severity(0.70), 0.0);
        assert!(close(c.severity(0.825), 0.5));
        assert_eq!(c.severity(0.95), 1.0);
    }

    #[test]
    fn degenerate_thresholds_do_not_divide_by_zero() {
        let c = Curve {
            soft: 0.8,
            hard: 0.8,
            critical: 0.8,
        };
        for r in [0.0, 0.79, 0.8, 0.81, 2.0, f64::INFINITY] {
            for v in [c.sheddable(r), c.severity(r)] {
                assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{r}: {v}");
            }
        }
    }

    // ---- thresholds through the tracker ----

    #[test]
    fn thresholds_and_decisions() {
        // (demand, rss, p sheddable); critical traffic is never shed by the curve.
        let cases = [
            (0.50, 0.52, 0.0),
            (0.775, 0.80, 0.25),
            (0.86, 0.88, 1.0),
            (0.97, 0.97, 1.0),
            (1.2, 1.2, 1.0),
        ];
        for (d, rss, ps) in cases {
            let mut t = PressureTracker::new(&cfg());
            t.on_sample(0, &body(d, rss), 0, 1000).unwrap();
            let s = t.snapshot(1000);
            assert!(s.is_active());
            assert!(close(s.shed_probability(S), ps), "{d}: {s:?}");
            assert_eq!(s.shed_probability(C), 0.0, "{d}: {s:?}");
        }
        // decide: u < p sheds, with the severity.
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(0.775, 0.8), 0, 0).unwrap();
        let s = t.snapshot(0);
        assert_eq!(s.decide(S, 0.24), Some(s.severity()));
        assert!(s.severity() > 0.0 && s.severity() < 1.0);
        assert_eq!(s.decide(S, 0.26), None);
        assert_eq!(s.decide(C, 0.0), None);
        assert_eq!(s.decide(S, f64::NAN), None);
    }

    #[test]
    fn rss_above_critical_is_a_hard_ceiling() {
        // Demand over soft but the gauges miss memory (e.g. cgo): RSS at 97% of the limit.
        let mut t = PressureTracker::new(&cfg());
        let r = t.on_sample(0, &body(0.72, 0.97), 0, 0).unwrap();
        assert!(close(r.decision_ratio, 0.97));
        let s = t.snapshot(0);
        assert!(s.ceiling_in_force());
        assert_eq!(s.shed_probability(S), 1.0);
        // RSS above critical but demand low: memory retained after a surge, reused
        // before the kernel is asked for more; it must not keep shedding.
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(0.30, 0.97), 0, 0).unwrap();
        let s = t.snapshot(0);
        assert!(!s.ceiling_in_force());
        assert_eq!(s.shed_probability(S), 0.0);
        // RSS high but below critical, demand low: nothing is shed.
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(0.30, 0.93), 0, 0).unwrap();
        let s = t.snapshot(0);
        assert!(!s.ceiling_in_force());
        assert_eq!(s.shed_probability(S), 0.0);
        assert!(close(s.ceiling_ratio(), 0.93));
        assert!(close(s.ratio(), 0.30));
    }

    // ---- the end of a surge ----

    #[test]
    fn end_of_surge_stops_shedding_within_two_samples() {
        let mut t = PressureTracker::new(&cfg());
        let mut now = 0;
        let mut poll = |t: &mut PressureTracker, d: f64, rss: f64| {
            now += 1000;
            t.on_sample(0, &body(d, rss), 0, now).unwrap();
            t.snapshot(now)
        };
        // Surge: demand climbs past hard; RSS follows it up.
        for (d, rss) in [(0.3, 0.35), (0.6, 0.66), (0.8, 0.86), (0.9, 0.93)] {
            poll(&mut t, d, rss);
        }
        let s = poll(&mut t, 0.88, 0.93);
        assert_eq!(s.shed_probability(S), 1.0);
        // Load back to normal: goroutines exit, heap-in-use falls; RSS stays near peak.
        let after: Vec<f64> = [(0.20, 0.93), (0.20, 0.93), (0.19, 0.92), (0.2, 0.92)]
            .iter()
            .map(|&(d, rss)| poll(&mut t, d, rss).shed_probability(S))
            .collect();
        assert_eq!(after[0], 0.0, "{after:?}");
        assert!(after.iter().all(|&p| p == 0.0), "{after:?}");
        // Even from far above the limit it takes at most two samples.
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(1.2, 0.94), 0, 0).unwrap();
        t.on_sample(0, &body(0.2, 0.94), 0, 1000).unwrap();
        t.on_sample(0, &body(0.2, 0.94), 0, 2000).unwrap();
        assert_eq!(t.snapshot(2000).shed_probability(S), 0.0);
    }

    #[test]
    fn rss_alone_keeps_shedding_after_the_surge() {
        // The contrast the design is about: with the ceiling as the only signal,
        // retained RSS keeps shedding although the demand is gone.
        let mut t = PressureTracker::new(&MemoryConfig {
            demand_gauges: Vec::new(),
            ..cfg()
        });
        t.on_sample(0, &body(0.9, 0.93), 0, 0).unwrap();
        for i in 1..=10 {
            t.on_sample(0, &body(0.2, 0.93), 0, i * 1000).unwrap();
        }
        let s = t.snapshot(10_000);
        assert!(s.demand_fallback());
        assert_eq!(s.shed_probability(S), 1.0);
    }

    #[test]
    fn rising_is_immediate_falling_is_smoothed() {
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(0.2, 0.3), 0, 0).unwrap();
        let r = t.on_sample(0, &body(0.9, 0.94), 0, 1000).unwrap();
        assert!(close(r.decision_ratio, 0.9));
        let r = t.on_sample(0, &body(0.5, 0.94), 0, 2000).unwrap();
        assert!(close(r.decision_ratio, 0.7));
        let r = t.on_sample(0, &body(0.5, 0.94), 0, 3000).unwrap();
        assert!(close(r.decision_ratio, 0.6));
    }

    // ---- signals ----

    #[test]
    fn demand_is_resident_memory_less_what_the_runtime_retains_free() {
        let mut t = PressureTracker::new(&cfg());
        let r = t
            .on_sample(0, crate::prom::tests::GO_METRICS.as_bytes(), 0, 0)
            .unwrap();
        assert_eq!(r.ceiling_bytes, 1.82452224e8);
        assert_eq!(
            r.demand_bytes,
            Some(1.82452224e8 - (1.212416e7 - 3.080192e6))
        );
    }

    #[test]
    fn demand_is_heap_plus_stack_in_use_without_retained_gauges() {
        let mut t = PressureTracker::new(&MemoryConfig {
            retained_gauges: Vec::new(),
            ..cfg()
        });
        let r = t
            .on_sample(0, crate::prom::tests::GO_METRICS.as_bytes(), 0, 0)
            .unwrap();
        assert_eq!(r.ceiling_bytes, 1.82452224e8);
        assert_eq!(r.demand_bytes, Some(9.8828288e7 + 6.5273856e7));
        assert!(close(r.ceiling_ratio, 1.82452224e8 / LIMIT as f64));
    }

    #[test]
    fn no_go_gauges_falls_back_to_the_ceiling() {
        let mut t = PressureTracker::new(&cfg());
        let r = t
            .on_sample(0, crate::prom::tests::PYTHON_METRICS.as_bytes(), 0, 0)
            .unwrap();
        assert_eq!(r.demand_bytes, None);
        assert!(close(r.decision_ratio, 3.4029568e7 / LIMIT as f64));
        assert!(t.snapshot(0).demand_fallback());
    }

    #[test]
    fn missing_ceiling_or_bad_values_fail_the_poll() {
        let mut t = PressureTracker::new(&cfg());
        let e = t.on_sample(0, b"go_goroutines 3\n", 0, 0).unwrap_err();
        assert!(
            matches!(e, SampleError::Metrics(PromError::NotFound { .. })),
            "{e}"
        );
        assert!(matches!(
            t.endpoint_stats(0).unwrap().status,
            EndpointStatus::Failed(FailureReason::Metrics(PromError::NotFound { .. }))
        ));
        for bad in ["NaN", "+Inf", "-1"] {
            let b = format!("process_resident_memory_bytes {bad}\n");
            let e = t.on_sample(0, b.as_bytes(), 0, 0).unwrap_err();
            assert!(
                matches!(e, SampleError::Metrics(PromError::InvalidValue { .. })),
                "{e}"
            );
        }
        let b = "process_resident_memory_bytes 1e8\ngo_memstats_heap_inuse_bytes NaN\ngo_memstats_stack_inuse_bytes 1\n";
        assert!(t.on_sample(0, b.as_bytes(), 0, 0).is_err());
        assert_eq!(t.endpoint_stats(0).unwrap().scrape_failures, 5);
        assert_eq!(
            t.on_sample(7, b"", 0, 0),
            Err(SampleError::UnknownEndpoint(7))
        );
        assert!(!t.snapshot(0).is_active());
    }

    #[test]
    fn truncated_body_without_demand_fails_rather_than_falls_back() {
        let full = body(0.3, 0.93);
        // Cut inside the stack gauge's line: RSS comes later in the body, so cut
        // after moving RSS to the top.
        let text = String::from_utf8(full).unwrap();
        let moved = format!(
            "process_resident_memory_bytes 3.9e8\n{}",
            text.replace("process_resident_memory_bytes", "x_process_resident")
        );
        let cut = moved.find("\ngo_memstats_stack_inuse_bytes ").unwrap() + 1 + 33;
        let mut t = PressureTracker::new(&cfg());
        let e = t.on_sample(0, &moved.as_bytes()[..cut], 0, 0).unwrap_err();
        assert!(
            matches!(e, SampleError::Metrics(PromError::Truncated { .. })),
            "{e}"
        );
        assert!(!t.snapshot(0).is_active());
    }

    // ---- staleness, failures, recovery ----

    #[test]
    fn an_old_sample_stops_driving_and_a_new_one_resumes() {
        let mut t = PressureTracker::new(&cfg());
        assert_eq!(t.take_transitions(0), vec![]);
        t.on_sample(0, &body(0.9, 0.92), 0, 1000).unwrap();
        let tr = t.take_transitions(1000);
        assert_eq!(
            (tr[0].from, tr[0].to),
            (StatusKind::Pending, StatusKind::Fresh)
        );
        assert!(t.snapshot(6000).is_active()); // exactly max_sample_age_ms old
        assert_eq!(t.snapshot(6000).sample_age_ms(6000), Some(5000));
        let s = t.snapshot(6001);
        assert!(!s.is_active());
        assert_eq!(s.decide(S, 0.0), None);
        let tr = t.take_transitions(6001);
        assert_eq!(tr.len(), 1);
        assert_eq!(
            (tr[0].from, tr[0].to),
            (StatusKind::Fresh, StatusKind::Stale)
        );
        assert!(tr[0].to_string().contains("no longer used"), "{}", tr[0]);
        // Reported once.
        assert_eq!(t.take_transitions(9000), vec![]);
        assert_eq!(t.stats(9000).stale_transitions, 1);
        // Recovery: the next good sample drives again, without smoothing from the gap.
        let r = t.on_sample(0, &body(0.5, 0.9), 0, 10_000).unwrap();
        assert!(close(r.decision_ratio, 0.5));
        let tr = t.take_transitions(10_000);
        assert_eq!(
            (tr[0].from, tr[0].to),
            (StatusKind::Stale, StatusKind::Fresh)
        );
        assert!(t.snapshot(10_000).is_active());
    }

    #[test]
    fn failures_hold_the_last_sample_until_it_is_too_old() {
        let mut t = PressureTracker::new(&cfg());
        t.on_sample(0, &body(0.9, 0.92), 0, 0).unwrap();
        t.take_transitions(0);
        t.on_failure(0, FailureReason::Timeout, 1000);
        t.on_failure(0, FailureReason::HttpStatus(503), 2000);
        let st = t.endpoint_stats(0).unwrap();
        assert_eq!(
            st.status,
            EndpointStatus::Failing(FailureReason::HttpStatus(503))
        );
        assert_eq!(st.consecutive_failures, 2);
        let tr = t.take_transitions(2000);
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].to, StatusKind::Failing);
        assert!(tr[0].to_string().contains("HTTP 503"), "{}", tr[0]);
        assert_eq!(t.snapshot(5000).shed_probability(S), 1.0);
        // Past max_sample_age_ms: no longer drives.
        t.on_failure(0, FailureReason::Timeout, 5500);
        let s = t.snapshot(5001 + 1000);
        assert!(!s.is_active());
        let tr = t.take_transitions(6001);
        assert_eq!(
            (tr[0].from, tr[0].to),
            (StatusKind::Failing, StatusKind::Failed)
        );
        let stats = t.stats(6001);
        assert_eq!(stats.scrape_failures, 3);
        assert_eq!(stats.stale_transitions, 1);
        assert_eq!(stats.samples, 1);
        // Recovery.
        t.on_sample(0, &body(0.2, 0.9), 0, 7000).unwrap();
        assert_eq!(t.endpoint_stats(0).unwrap().status, EndpointStatus::Fresh);
        assert_eq!(t.endpoint_stats(0).unwrap().consecutive_failures, 0);
        assert!(t.snapshot(7000).is_active());
    }

    #[test]
    fn failure_before_any_sample() {
        let mut t = PressureTracker::new(&cfg());
        t.on_failure(0, FailureReason::CallFailed, 0);
        t.on_failure(9, FailureReason::CallFailed, 0); // unknown: ignored
        let tr = t.take_transitions(0);
        assert_eq!(
            (tr[0].from, tr[0].to),
            (StatusKind::Pending, StatusKind::Failed)
        );
        assert!(tr[0].to_string().contains("no sample yet"), "{}", tr[0]);
        assert!(!t.snapshot(0).is_active());
    }

    // ---- several endpoints ----

    #[test]
    fn the_worst_fresh_endpoint_drives() {
        let mut t = PressureTracker::new(&cfg_endpoints(3));
        t.on_sample(0, &body(0.5, 0.6), 0, 0).unwrap();
        t.on_sample(1, &body(0.8, 0.85), 0, 0).unwrap();
        t.on_sample(2, &body(0.75, 0.9), 0, 3000).unwrap();
        let s = t.snapshot(3000);
        assert_eq!(s.worst_endpoint(), Some(1));
        assert!(close(s.ratio(), 0.8));
        assert!(close(s.ceiling_ratio(), 0.9));
        assert_eq!((s.driving_endpoints(), s.endpoints()), (3, 3));
        // Endpoint 1 goes stale: the next worst (still fresh) drives.
        let s = t.snapshot(5500);
        assert_eq!(s.worst_endpoint(), Some(2));
        assert!(close(s.ratio(), 0.75));
        assert_eq!(s.driving_endpoints(), 1);
        assert_eq!(s.sample_age_ms(5500), Some(2500));
        // An unknown endpoint changes nothing.
        assert!(t.on_sample(3, &body(1.0, 1.0), 0, 5500).is_err());
        assert_eq!(t.snapshot(5500).worst_endpoint(), Some(2));
    }

    #[test]
    fn unset_limit_never_sheds() {
        let mut t = PressureTracker::new(&MemoryConfig::default());
        t.on_sample(0, &body(0.99, 0.99), 0, 0).unwrap();
        let s = t.snapshot(0);
        assert_eq!(s.shed_probability(S), 0.0);
        assert_eq!(s.ratio(), 0.0);
    }

    #[test]
    fn labelled_ceiling_selector() {
        let mut t = PressureTracker::new(&MemoryConfig {
            gauge: "container_memory_working_set_bytes{container=\"kask\"}".into(),
            demand_gauges: Vec::new(),
            ..cfg()
        });
        let b = format!(
            "container_memory_working_set_bytes{{container=\"envoy\"}} 1e6\ncontainer_memory_working_set_bytes{{container=\"kask\"}} {}\n",
            0.9 * LIMIT as f64
        );
        let r = t.on_sample(0, b.as_bytes(), 0, 0).unwrap();
        assert!(close(r.ceiling_ratio, 0.9));
        assert!(r.ceiling_bytes > 300.0 * MI);
    }

    // ---- the in-flight ceiling ----

    const PRIOR: f64 = crate::ceiling::PRIOR_BYTES_PER_REQUEST as f64;

    /// The ceiling for ratios of the limit, give or take one request (the bodies
    /// round their values).
    fn expected(in_flight: u32, demand: f64, line: f64, b: f64) -> std::ops::RangeInclusive<u32> {
        let c = ((f64::from(in_flight) + (line - demand) * LIMIT as f64 / b).floor()) as u32;
        c.saturating_sub(1)..=c + 1
    }

    #[test]
    fn a_sample_gives_the_ceiling_and_the_snapshot_carries_it() {
        let mut t = PressureTracker::new(&cfg());
        // Before any sample: the whole line at the prior cost (bounded).
        let blind = t.snapshot(0);
        assert!(expected(0, 0.0, 0.95, PRIOR).contains(&blind.max_in_flight().unwrap()));
        assert!(!blind.is_active());
        let r = t.on_sample(0, &body(0.5, 0.52), 300, 1000).unwrap();
        let demand = r.demand_bytes.unwrap() / LIMIT as f64;
        let want = r.max_in_flight;
        assert!(expected(300, demand, 0.95, PRIOR).contains(&want));
        let s = t.snapshot(1000);
        assert_eq!(s.max_in_flight(), Some(want));
        assert_eq!(s.bytes_per_request(), PRIOR as u32);
        assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
        // Over the line: fewer than in flight now, never below the minimum.
        let r = t.on_sample(0, &body(1.2, 1.2), 300, 2000).unwrap();
        assert_eq!(r.max_in_flight, MIN_CEILING);
        // An unset limit has no line: the largest ceiling.
        let mut t = PressureTracker::new(&MemoryConfig::default());
        let r = t.on_sample(0, &body(0.5, 0.5), 10, 0).unwrap();
        assert_eq!(r.max_in_flight, MAX_CEILING);
    }

    #[test]
    fn the_ceiling_follows_a_surge_between_polls() {
        // A store at 20 MiB + 36 KiB per request; the limit 64 MiB, the line 0.78.
        let mi = 1024.0 * 1024.0;
        let limit = 64.0 * mi;
        let mut t = PressureTracker::new(&MemoryConfig {
            enabled: true,
            memory_limit_bytes: 64 << 20,
            ..MemoryConfig::default()
        });
        let mem = |n: u32| 20.0 * mi + 36.0 * 1024.0 * f64::from(n);
        let body = |n: u32| {
            format!(
                "process_resident_memory_bytes {}\ngo_memstats_heap_idle_bytes 0\ngo_memstats_heap_released_bytes 0\nprocess_start_time_seconds 1.7e9\n",
                mem(n)
            )
        };
        // Polls every 100 ms while in flight climbs by 100 per poll (a step surge),
        // each admitted up to the last ceiling: memory never passes the line by more
        // than the estimation error allows, and the estimate converges.
        let mut n = 5;
        let mut peak = 0.0f64;
        for i in 0..60u64 {
            t.on_sample(0, body(n).as_bytes(), n, i * 100).unwrap();
            let c = t.snapshot(i * 100).max_in_flight().unwrap();
            n = (n + 100).min(c);
            peak = peak.max(mem(n));
        }
        assert!(peak <= 0.78 * limit, "peak {:.3}", peak / limit);
        // Cheaper than the prior: the prior holds, and the ceiling is the headroom
        // at that cost (36/64 of what the store could hold).
        let (c, b) = t.ceilings().next().unwrap();
        assert_eq!(b, PRIOR);
        let allows = (0.78 * limit - 20.0 * mi) / PRIOR;
        assert!(
            f64::from(c) > allows - 2.0 && f64::from(c) <= allows + 3.0,
            "{c} {allows}"
        );
    }

    #[test]
    fn without_a_young_sample_the_ceiling_relaxes_to_the_headroom_at_rest() {
        let mut t = PressureTracker::new(&MemoryConfig {
            bytes_per_request: Some(PRIOR as u64),
            ..cfg()
        });
        // The store at rest, then over the line with 100 in flight (memory that the
        // requests do not explain): the minimum.
        let r = t.on_sample(0, &body(0.3, 0.3), 10, 0).unwrap();
        t.on_sample(0, &body(1.0, 1.0), 100, 0).unwrap();
        assert_eq!(t.snapshot(0).max_in_flight(), Some(MIN_CEILING));
        let demand = r.demand_bytes.unwrap() / LIMIT as f64;
        // The poller goes blind (store down): failures keep the last ceiling while the
        // sample is young...
        t.on_failure(0, FailureReason::Timeout, 1000);
        assert_eq!(t.snapshot(1000).max_in_flight(), Some(MIN_CEILING));
        // ...then the headroom at rest: never shed forever, never unbounded.
        let s = t.snapshot(10_000);
        assert!(!s.is_active());
        let rest = demand - 10.0 * PRIOR / LIMIT as f64;
        let c = s.max_in_flight().unwrap();
        assert!(expected(0, rest, 0.95, PRIOR).contains(&c), "{c}");
    }

    #[test]
    fn several_endpoints_the_tightest_ceiling_holds() {
        let mut t = PressureTracker::new(&cfg_endpoints(3));
        t.on_sample(0, &body(0.3, 0.3), 100, 0).unwrap();
        let r = t.on_sample(1, &body(0.8, 0.8), 100, 0).unwrap();
        // Endpoint 2 never answered: its blind ceiling is the loosest.
        let s = t.snapshot(0);
        assert_eq!(s.max_in_flight(), Some(r.max_in_flight));
        let all: Vec<u32> = t.ceilings().map(|(c, _)| c).collect();
        assert!(all[0] > all[1] && all[2] > all[0], "{all:?}");
        assert!(expected(0, 0.0, 0.95, PRIOR).contains(&all[2]));
    }

    #[test]
    fn a_restart_in_the_body_starts_a_new_window() {
        let mut t = PressureTracker::new(&cfg());
        let with_start = |d: f64, start: f64| {
            let mut b = body(d, d);
            b.extend_from_slice(format!("process_start_time_seconds {start}\n").as_bytes());
            b
        };
        t.on_sample(0, &with_start(0.5, 1.0), 10, 0).unwrap();
        t.on_sample(0, &with_start(0.1, 2.0), 0, 100).unwrap();
        assert_eq!(t.endpoints[0].estimator.stats().restarts, 1);
        // A body without it is fine.
        t.on_sample(0, &body(0.1, 0.1), 0, 200).unwrap();
    }

    #[test]
    fn polls_are_fast_when_memory_is_high_or_rising_and_slow_when_idle() {
        let mut t = PressureTracker::new(&MemoryConfig {
            poll_interval_ms: 100,
            ..cfg()
        });
        // Nothing yet: fast.
        assert_eq!(t.next_poll_in_ms(0), 100);
        t.on_sample(0, &body(0.2, 0.2), 10, 0).unwrap();
        assert_eq!(t.next_poll_in_ms(0), 1000);
        // Rising by more than 1% of the limit since the last sample.
        t.on_sample(0, &body(0.25, 0.25), 10, 1000).unwrap();
        assert_eq!(t.next_poll_in_ms(1000), 100);
        t.on_sample(0, &body(0.25, 0.25), 10, 1100).unwrap();
        assert_eq!(t.next_poll_in_ms(1100), 1000);
        // Above soft.
        t.on_sample(0, &body(0.75, 0.75), 10, 2000).unwrap();
        t.on_sample(0, &body(0.75, 0.75), 10, 2100).unwrap();
        assert_eq!(t.next_poll_in_ms(2100), 100);
        // A failure: fast.
        t.on_sample(0, &body(0.2, 0.2), 10, 3000).unwrap();
        t.on_sample(0, &body(0.2, 0.2), 10, 3100).unwrap();
        assert_eq!(t.next_poll_in_ms(3100), 1000);
        t.on_failure(0, FailureReason::Timeout, 3200);
        assert_eq!(t.next_poll_in_ms(3200), 100);
        // In flight at half the ceiling.
        let c = t.snapshot(3200).max_in_flight().unwrap();
        t.on_sample(0, &body(0.2, 0.2), c, 4000).unwrap();
        t.on_sample(0, &body(0.2, 0.2), c, 4100).unwrap();
        assert_eq!(t.next_poll_in_ms(4100), 100);
        // Idle never slower than half the sample age.
        let t = PressureTracker::new(&MemoryConfig {
            poll_interval_ms: 500,
            max_sample_age_ms: 800,
            ..cfg()
        });
        assert_eq!(t.idle_poll_ms, 500);
    }

    // ---- snapshot ----

    fn busy_snapshot() -> PressureSnapshot {
        let mut t = PressureTracker::new(&cfg_endpoints(2));
        t.on_sample(1, &body(0.72, 0.97), 0, 1234).unwrap();
        t.snapshot(1500)
    }

    #[test]
    fn snapshot_round_trip() {
        for s in [
            busy_snapshot(),
            PressureSnapshot::idle(99, 3),
            PressureSnapshot::default(),
        ] {
            let bytes = s.encode();
            assert_eq!(bytes.len(), SNAPSHOT_LEN);
            assert_eq!(PressureSnapshot::decode(&bytes), Ok(s));
        }
        let s = busy_snapshot();
        assert!(s.ceiling_in_force());
        assert_eq!(s.worst_endpoint(), Some(1));
        assert_eq!(s.sample_ms(), Some(1234));
        assert_eq!(s.computed_ms(), 1500);
        assert_eq!(&s.encode()[0..4], b"SGMP");
    }

    #[test]
    fn snapshot_garbage_is_rejected() {
        let good = busy_snapshot().encode();
        assert_eq!(PressureSnapshot::decode(&[]), Err(SnapshotError::Missing));
        assert_eq!(
            PressureSnapshot::decode(&good[..95]),
            Err(SnapshotError::Length(95))
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            PressureSnapshot::decode(&long),
            Err(SnapshotError::Length(97))
        );
        // Every single-bit flip is caught (magic, version or checksum), except in
        // the trailing reserved word.
        for i in 0..92 {
            for bit in 0..8 {
                let mut b = good;
                b[i] ^= 1 << bit;
                assert!(PressureSnapshot::decode(&b).is_err(), "byte {i} bit {bit}");
            }
        }
        let mut b = good;
        b[4] = 3;
        assert_eq!(PressureSnapshot::decode(&b), Err(SnapshotError::Version(3)));
        // Out-of-range fields with a valid checksum.
        let mut bad = busy_snapshot();
        bad.p_sheddable = 1.5;
        assert!(matches!(
            PressureSnapshot::decode(&bad.encode()),
            Err(SnapshotError::Invalid(_))
        ));
        let mut bad = PressureSnapshot::idle(0, 1);
        bad.p_sheddable = 0.5;
        assert!(PressureSnapshot::decode(&bad.encode()).is_err());
        let mut bad = busy_snapshot();
        bad.max_in_flight = 3;
        assert!(PressureSnapshot::decode(&bad.encode()).is_err());
        let e = PressureSnapshot::decode(&[1, 2, 3]).unwrap_err();
        assert!(e.to_string().starts_with("memory pressure snapshot"), "{e}");
    }

    #[test]
    fn snapshot_expiry() {
        let s = busy_snapshot(); // computed at 1500
        assert_eq!(s.check_current(6500, 5000), Ok(s));
        assert_eq!(
            s.check_current(6501, 5000),
            Err(SnapshotError::Expired { age_ms: 5001 })
        );
        assert_eq!(s.check_current(0, 5000), Ok(s));
        let future = PressureSnapshot::idle(20_000, 1);
        assert_eq!(
            future.check_current(10_000, 5000),
            Err(SnapshotError::FromTheFuture { ahead_ms: 10_000 })
        );
    }

    #[test]
    fn publish_and_load_through_shared_data() {
        let store = MemStore::new();
        assert_eq!(load(&store, 0, 5000), Err(SnapshotError::Missing));
        let s = busy_snapshot(); // computed at 1500
        assert_eq!(publish(&store, &s, 5000, 4), Ok(true));
        assert_eq!(load(&store, 2000, 5000), Ok(s));
        assert!(matches!(
            load(&store, 10_000, 5000),
            Err(SnapshotError::Expired { .. })
        ));
        // An older snapshot from a late poller does not overwrite a newer one...
        let older = PressureSnapshot::idle(1000, 2);
        assert_eq!(publish(&store, &older, 5000, 4), Ok(false));
        assert_eq!(load(&store, 2000, 5000), Ok(s));
        // ...unless the stored one is too far ahead (the clock stepped back).
        let far = PressureSnapshot::idle(100_000, 2);
        assert_eq!(publish(&store, &far, 5000, 4), Ok(true));
        let after_step = PressureSnapshot::idle(2000, 2);
        assert_eq!(publish(&store, &after_step, 5000, 4), Ok(true));
        assert_eq!(load(&store, 2000, 5000), Ok(after_step));
        // Garbage in the key is overwritten, and reported by load until then.
        store.set(SNAPSHOT_KEY, b"garbage", None).unwrap();
        assert_eq!(load(&store, 2000, 5000), Err(SnapshotError::Length(7)));
        assert_eq!(publish(&store, &s, 5000, 4), Ok(true));
        assert_eq!(load(&store, 2000, 5000), Ok(s));
    }

    #[test]
    fn shed_counters() {
        let mut c = ShedCounters::default();
        let s = busy_snapshot();
        for i in 0..100 {
            let u = f64::from(i) / 100.0;
            if s.decide(S, u).is_some() {
                c.record(S);
            }
            if s.decide(C, u).is_some() {
                c.record(C);
            }
        }
        assert_eq!(c.sheddable, 100);
        assert_eq!(c.critical, 0); // the curve never sheds critical traffic
        assert_eq!(c.total(), 100);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> MemoryConfig {
        MemoryConfig {
            enabled: true,
            memory_limit_bytes: 400 << 20,
            endpoints: vec![MetricsEndpoint::default(); 2],
            ..MemoryConfig::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decode_never_panics_and_accepted_snapshots_are_sane(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
            u in 0.0f64..1.0,
        ) {
            if let Ok(s) = PressureSnapshot::decode(&bytes) {
                prop_assert!(s.max_in_flight().is_none_or(|c| c >= MIN_CEILING));
                let _ = s.decide(Criticality::Sheddable, u);
            }
        }

        #[test]
        fn garbage_with_a_valid_frame_never_panics(
            mut body in proptest::array::uniform32(any::<u64>()),
        ) {
            let mut b = [0u8; SNAPSHOT_LEN];
            for (i, w) in body.iter_mut().enumerate().take(SNAPSHOT_LEN / 8) {
                b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            b[0..4].copy_from_slice(&MAGIC);
            b[4] = VERSION;
            let sum = fnv1a(&b[..SUMMED]);
            b[SUMMED..SUMMED + 4].copy_from_slice(&sum.to_le_bytes());
            if let Ok(s) = PressureSnapshot::decode(&b) {
                prop_assert!((0.0..=1.0).contains(&s.shed_probability(Criticality::Critical)));
                prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
            }
        }

        #[test]
        fn tracker_never_panics(
            steps in proptest::collection::vec(
                (0usize..4, proptest::collection::vec(any::<u8>(), 0..256), any::<u64>(), any::<bool>()),
                0..32,
            )
        ) {
            let mut t = PressureTracker::new(&cfg());
            for (idx, bytes, now, fail) in steps {
                if fail {
                    t.on_failure(idx, FailureReason::Timeout, now);
                } else {
                    let _ = t.on_sample(idx, &bytes, 0, now);
                }
                let s = t.snapshot(now);
                prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
                let _ = t.take_transitions(now);
                let _ = t.stats(now);
            }
        }

        #[test]
        fn snapshot_is_always_decodable(
            values in proptest::collection::vec((0.0f64..3.0, 0.0f64..3.0), 1..10),
        ) {
            let mut t = PressureTracker::new(&cfg());
            for (i, (d, rss)) in values.into_iter().enumerate() {
                let limit = (400u64 << 20) as f64;
                let body = format!(
                    "process_resident_memory_bytes {}\ngo_memstats_heap_inuse_bytes {}\ngo_memstats_stack_inuse_bytes 0\n",
                    rss * limit, d * limit
                );
                let now = i as u64 * 1000;
                t.on_sample(i % 2, body.as_bytes(), 0, now).unwrap();
                let s = t.snapshot(now);
                prop_assert_eq!(PressureSnapshot::decode(&s.encode()), Ok(s));
                prop_assert!(s.shed_probability(Criticality::Critical) <= s.shed_probability(Criticality::Sheddable));
            }
        }
    }
}
